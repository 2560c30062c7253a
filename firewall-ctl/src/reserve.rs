//! The kernel side of port reservations: a socket bound to each reserved
//! port (not listening), so no local service takes it; the relay listens on
//! it in user mode.

use socket2::{Domain, Protocol, Socket, Type};

use firewall_core::{
    error::{ApiError, ErrorKind},
    policy::Transport,
    ports::{in_use_error, Lease, PortHandle, PortReserver},
};

/// Binds (without listening) to hold the port in the kernel.
fn kernel_reserve(lease: &Lease, transparent: bool) -> std::io::Result<Socket> {
    let (ty, proto) = match lease.transport {
        Transport::Tcp => (Type::STREAM, Protocol::TCP),
        Transport::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let s = Socket::new(Domain::IPV4, ty.cloexec(), Some(proto))?;
    if lease.transport == Transport::Udp {
        // Nobody reads it: datagrams the stack delivers here must not pile up.
        let _ = s.set_recv_buffer_size(0);
    }
    if transparent {
        s.set_ip_transparent(true)?;
    }
    s.bind(&lease.endpoint().into())?;
    Ok(s)
}

/// Reserves ports by binding sockets.
pub struct KernelReserver;

impl PortReserver for KernelReserver {
    fn reserve(&mut self, lease: &Lease, transparent: bool) -> Result<PortHandle, ApiError> {
        let proto = match lease.transport {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        };
        kernel_reserve(lease, transparent)
            .map(|s| Box::new(s) as PortHandle)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EADDRINUSE) => in_use_error(lease, "in use by a local service"),
                Some(libc::EADDRNOTAVAIL) => ApiError::new(
                    ErrorKind::AddressNotAvailable,
                    format!("{} is not an address of this machine", lease.addr),
                ),
                Some(libc::EMFILE | libc::ENFILE) => {
                    log::error!("out of file descriptors reserving ports: {e} (raise LimitNOFILE)");
                    ApiError::new(
                        ErrorKind::Exhausted,
                        format!("out of file descriptors reserving a port: {e}"),
                    )
                }
                _ => ApiError::new(
                    ErrorKind::Internal,
                    format!(
                        "reserving {proto} port {} on {}: {e}",
                        lease.port, lease.addr
                    ),
                ),
            })
    }
}

/// The socket holding a reserved port, out of the pool's handle.
pub fn socket(handle: PortHandle) -> Option<Socket> {
    handle.downcast::<Socket>().ok().map(|s| *s)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use firewall_core::{error::ErrorKind, policy::Transport, ports::PortPool};

    use super::KernelReserver;

    #[test]
    fn kernel_reservation_blocks_local_services_and_is_released() {
        // Loopback exists everywhere; ports from a high, random-ish range.
        let lo = Ipv4Addr::LOCALHOST;
        let base = 40000 + (std::process::id() % 1000) as u16 * 16;
        let mut p = PortPool::new(base..=base + 15, KernelReserver);
        let l = p.reserve_block(lo, Transport::Tcp, 1).unwrap()[0];
        assert!(
            std::net::TcpListener::bind(l.endpoint()).is_err(),
            "the port is held in the kernel"
        );
        p.release(&l);
        assert!(
            std::net::TcpListener::bind(l.endpoint()).is_ok(),
            "released"
        );
        // A port a local service holds is skipped.
        let held = std::net::TcpListener::bind(SocketAddrV4::new(lo, base + 4)).unwrap();
        assert_eq!(
            p.reserve_exact(lo, Transport::Tcp, base + 4)
                .unwrap_err()
                .kind,
            ErrorKind::AddressInUse
        );
        drop(held);
    }
}
