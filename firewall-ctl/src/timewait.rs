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
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage, SOCK_DESTROY,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

fn socket() -> anyhow::Result<Socket> {
    let mut s = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    s.bind_auto().context("binding the sock_diag socket")?;
    s.connect(&SocketAddr::new(0, 0))?;
    Ok(s)
}

fn request(flags: u16, states: StateFlags, id: SocketId) -> NetlinkMessage<SockDiagMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut m = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: AF_INET,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: id,
        })
        .into(),
    );
    m.finalize();
    m
}

fn send(s: &Socket, m: &NetlinkMessage<SockDiagMessage>) -> anyhow::Result<()> {
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    s.send(&buf, 0).context("sending a sock_diag request")?;
    Ok(())
}

/// Reads the answers to one request until it is done; `each` gets every
/// socket reported. Returns the errno of an error answer (0: an ACK).
fn receive(s: &Socket, mut each: impl FnMut(&SocketId)) -> anyhow::Result<i32> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s
            .recv(&mut &mut buf[..], 0)
            .context("reading sock_diag answers")?;
        let mut at = 0;
        while at < n {
            let m = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[at..n])
                .context("parsing a sock_diag answer")?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    each(&r.header.socket_id)
                }
                NetlinkPayload::Done(_) => return Ok(0),
                NetlinkPayload::Error(e) => {
                    return Ok(e.code.map_or(0, |c| -c.get()));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += (len + 3) & !3;
        }
    }
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
/// answered for those servers is going). Returns how many there were.
pub fn destroy_transparent() -> anyhow::Result<usize> {
    let own = own_addresses()?;
    let s = socket()?;
    send(
        &s,
        &request(
            NLM_F_REQUEST | NLM_F_DUMP,
            StateFlags::all(),
            SocketId::new_v4(),
        ),
    )?;
    let mut ours = Vec::new();
    receive(&s, |id| {
        if !own.contains(&id.source_address) {
            ours.push(id.clone());
        }
    })?;
    let mut destroyed = 0;
    for id in ours {
        let mut m = request(NLM_F_REQUEST | NLM_F_ACK, StateFlags::all(), id);
        // The crate frames every request as SOCK_DIAG_BY_FAMILY.
        m.header.message_type = SOCK_DESTROY;
        send(&s, &m)?;
        match receive(&s, |_| {})? {
            0 => destroyed += 1,
            // Gone by itself meanwhile.
            libc::ENOENT => {}
            errno => {
                return Err(std::io::Error::from_raw_os_error(errno))
                    .context("destroying a transparent socket (SOCK_DESTROY)")
            }
        }
    }
    Ok(destroyed)
}
