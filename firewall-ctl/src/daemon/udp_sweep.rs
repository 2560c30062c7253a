//! The UDP mappings' part of the sweeper's tick: the flows just read stamp
//! their mappings, a batch of the mappings is checked for quiet ones, and a
//! batch of the port owners for orphans (a port whose owner no mapping
//! names: left by a daemon stopped between ending a mapping and freeing its
//! port), freed once they and their flows have been quiet as long.

use std::{
    net::Ipv4Addr,
    sync::{atomic::Ordering::Relaxed, Arc, Mutex},
};

use firewall_common::wall::UdpMapping;
use firewall_core::udp_mappings::{self, Activity, Orphans};

use super::{
    tasks::{SCAN_BATCH, TICK},
    Shared,
};
use crate::{datapath::UdpMappings, mapops::Scan};

/// The sweep's tables and where it is in them, taken by each tick's
/// blocking task.
pub(super) struct Sweep(Arc<Mutex<State>>);

struct State {
    maps: UdpMappings,
    mappings: Scan,
    owners: Scan,
    orphans: Orphans,
}

/// What one tick did.
#[derive(Default)]
struct Done {
    ended: u64,
    freed: u64,
}

impl Sweep {
    pub(super) fn new(maps: UdpMappings) -> Self {
        Self(Arc::new(Mutex::new(State {
            maps,
            mappings: Scan::default(),
            owners: Scan::default(),
            orphans: Orphans::default(),
        })))
    }

    /// One tick, with the activity of the flows the tick read.
    pub(super) async fn run(&self, shared: &Shared, seen: Activity) -> anyhow::Result<()> {
        let config = shared.config();
        let t = config.timeouts;
        // A full pass over the flow table (sized by the configuration).
        let lag = TICK * (config.flow_table_size as usize).div_ceil(SCAN_BATCH) as u32;
        let quiet = udp_mappings::quiet_needed(t.udp_mapping, t.udp_idle, lag);
        let state = self.0.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            sweep(&mut state, &seen, quiet)
        })
        .await?;
        let done = done?;
        shared
            .work
            .udp_mappings_ended
            .fetch_add(done.ended, Relaxed);
        shared
            .work
            .udp_orphan_ports_freed
            .fetch_add(done.freed, Relaxed);
        Ok(())
    }
}

fn sweep(state: &mut State, seen: &Activity, quiet: std::time::Duration) -> anyhow::Result<Done> {
    let maps = &mut state.maps;
    let mut done = Done::default();
    for (&(ep, port), &t) in seen {
        if let Some(m) = maps.get(&ep)? {
            if let Some(t) = udp_mappings::raised(&m, port, t) {
                let stamped = UdpMapping {
                    last_seen_ns: t,
                    ..m
                };
                maps.mappings.replace(&ep, &stamped)?;
            }
        }
    }
    state.orphans.touch(seen);

    let now = crate::netif::monotonic_ns();
    let batch = maps.mappings.scan(&mut state.mappings, SCAN_BATCH)?;
    for (ep, port) in udp_mappings::expired(&batch, now, quiet) {
        if maps.end(&ep, port)? {
            log::debug!(
                "UDP mapping of {}:{} to port {port} ended (quiet)",
                Ipv4Addr::from(ep.addr),
                ep.port
            );
            done.ended += 1;
        }
    }

    let owners = maps.owners(&mut state.owners, SCAN_BATCH)?;
    let mut read = Vec::with_capacity(owners.len());
    for (port, ep) in owners {
        read.push((port, ep, maps.get(&ep)?.map(|m| m.nat_port)));
    }
    for (port, ep) in state.orphans.batch(&read, now, quiet) {
        if maps.free_orphan(port, &ep)? {
            log::info!(
                "NAT port {port} freed: owned by {}:{} without a UDP mapping naming it",
                Ipv4Addr::from(ep.addr),
                ep.port
            );
            done.freed += 1;
        }
        state.orphans.freed(port, ep);
    }
    if state.owners.wrapped {
        state.orphans.pass_done();
    }
    Ok(done)
}
