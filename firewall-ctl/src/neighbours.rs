//! Neighbour (ARP) resolution for next hops the datapath found unresolved.
//!
//! XDP cannot make the kernel resolve a neighbour; it drops the packet
//! (`drop_no_neighbour`) and reports the next hop. The daemon then asks the
//! kernel to resolve it (RTM_NEWNEIGH with NTF_USE, through iproute2's
//! `ip neigh replace ADDR dev IF use`), so the sender's retransmission goes
//! through. Requests are deduplicated per second.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::Mutex,
    time::{Duration, Instant},
};

pub struct Resolver {
    recent: Mutex<HashMap<(u32, Ipv4Addr), Instant>>,
}

const AGAIN_AFTER: Duration = Duration::from_secs(1);

impl Default for Resolver {
    fn default() -> Self {
        Self::new()
    }
}

impl Resolver {
    pub fn new() -> Self {
        Self {
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a request for this next hop should go out now.
    fn due(&self, ifindex: u32, addr: Ipv4Addr) -> bool {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        recent.retain(|_, t| now.duration_since(*t) < AGAIN_AFTER);
        if recent.contains_key(&(ifindex, addr)) {
            return false;
        }
        recent.insert((ifindex, addr), now);
        true
    }

    /// Starts resolution of `addr` on interface `ifindex` (in the background).
    pub fn resolve(&self, ifindex: u32, addr: Ipv4Addr) {
        if addr.is_unspecified() || !self.due(ifindex, addr) {
            return;
        }
        let Ok(ifname) = nix::net::if_::if_indextoname(ifindex) else {
            log::debug!("neighbour {addr}: no interface {ifindex}");
            return;
        };
        let ifname = ifname.to_string_lossy().into_owned();
        log::debug!("resolving neighbour {addr} on {ifname}");
        let spawned = tokio::process::Command::new("ip")
            .args(["neigh", "replace", &addr.to_string(), "dev", &ifname, "use"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn();
        match spawned {
            Ok(child) => {
                tokio::spawn(async move {
                    if let Ok(out) = child.wait_with_output().await {
                        if !out.status.success() {
                            log::warn!(
                                "resolving neighbour {addr} on {ifname}: {}",
                                String::from_utf8_lossy(&out.stderr).trim()
                            );
                        }
                    }
                });
            }
            Err(e) => log::warn!("resolving neighbour {addr} on {ifname}: cannot run ip: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_deduplicated() {
        let r = Resolver::new();
        let a = Ipv4Addr::new(10, 2, 0, 2);
        assert!(r.due(3, a));
        assert!(!r.due(3, a));
        assert!(r.due(4, a), "another interface");
    }
}
