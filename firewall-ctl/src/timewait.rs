//! The transparent sockets of intercepted connections, when the daemon stops.
//!
//! The daemon answers for servers' addresses with transparent sockets; when
//! it closes the client's leg of a control connection first, that leg waits
//! out TIME_WAIT (60 s) as a socket server:21 ↔ client:port. While the
//! daemon runs, the interception hands a SYN that meets one to the listener
//! (the client reused its port). Once the daemon is gone, the stack's early
//! demultiplexing would still give forwarded SYNs of that 5-tuple to the
//! leftover socket, and forwarding drops such packets: the firewall would
//! stall the client for a minute. So these sockets are destroyed when the
//! daemon stops (`SOCK_DESTROY` of sock_diag, as `ss -K` does), and with
//! them the connections still open, which are reset rather than left to
//! close later into TIME_WAIT.
//!
//! Ours are told apart by their local address: a TCP socket bound to an
//! address this machine does not have can only be a transparent one.

use std::{collections::HashSet, net::IpAddr};

use anyhow::Context as _;
use netlink_packet_sock_diag::{
    constants::{AF_INET, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage, SOCK_DESTROY,
};

use crate::netlink::{Netlink, NETLINK_SOCK_DIAG};

fn request(states: StateFlags, id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family: AF_INET,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id: id,
    })
}

/// The addresses of this machine (its network namespace).
fn own_addresses() -> anyhow::Result<HashSet<IpAddr>> {
    let mut out = HashSet::new();
    for a in nix::ifaddrs::getifaddrs().context("listing the interfaces' addresses")? {
        if let Some(ip) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            out.insert(IpAddr::V4(ip.ip()));
        }
    }
    Ok(out)
}

/// Destroys the TCP sockets bound to addresses this machine does not have
/// (the transparent sockets of intercepted connections), in every state:
/// TIME_WAIT ones go silently, live ones are reset (the daemon that
/// answered for those servers is going), but those in `except` (local,
/// remote: handed to the next daemon). Returns how many there were.
pub fn destroy_transparent(
    except: &[(std::net::SocketAddrV4, std::net::SocketAddrV4)],
) -> anyhow::Result<usize> {
    let own = own_addresses()?;
    let mut nl = Netlink::open(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    let ours: Vec<SocketId> = nl
        .dump(request(StateFlags::all(), SocketId::new_v4()))
        .context("listing TCP sockets (sock_diag)")?
        .into_iter()
        .filter_map(|m| match m {
            SockDiagMessage::InetResponse(r) => Some(r.header.socket_id),
            _ => None,
        })
        .filter(|id| !own.contains(&id.source_address))
        .filter(|id| {
            !except.iter().any(|(local, remote)| {
                id.source_address == IpAddr::V4(*local.ip())
                    && id.source_port == local.port()
                    && id.destination_address == IpAddr::V4(*remote.ip())
                    && id.destination_port == remote.port()
            })
        })
        .collect();
    let mut destroyed = 0;
    for id in ours {
        // The crate frames every request as SOCK_DIAG_BY_FAMILY: SOCK_DESTROY
        // is the same request under another message type.
        match nl.ack_as(request(StateFlags::all(), id), SOCK_DESTROY) {
            Ok(()) => destroyed += 1,
            // Gone by itself meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e).context("destroying a transparent socket (SOCK_DESTROY)"),
        }
    }
    Ok(destroyed)
}
