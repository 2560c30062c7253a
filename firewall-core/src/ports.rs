//! Port allocation on the firewall's addresses, per (address, protocol).
//!
//! Blocks of N consecutive ports start at a multiple of N (RTP/RTCP pairs on
//! even ports, and the API's rule for any N). Every port handed out is also
//! reserved in the kernel's own port space through a `PortReserver` (the
//! daemon's binds a socket to it, not listening), so a local service can
//! never take a pinhole's port, and a port a local service holds is never
//! handed out.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    ops::RangeInclusive,
};

use crate::{
    error::{ApiError, ErrorKind},
    policy::Transport,
};

/// What holds a reserved port in the kernel (a bound socket, in the daemon):
/// opaque to the engine; the relay takes it to listen on.
pub type PortHandle = Box<dyn std::any::Any + Send>;

/// Reserves ports in the kernel's own port space.
pub trait PortReserver: Send {
    /// Holds `lease` (`transparent`: on an address this machine does not
    /// have, which the firewall answers for). Fails with `address-in-use`
    /// when a local service holds the port, `address-not-available` for an
    /// address that is not this machine's, `exhausted` out of descriptors.
    fn reserve(&mut self, lease: &Lease, transparent: bool) -> Result<PortHandle, ApiError>;
}

/// Reserves nothing in the kernel (unit tests, in-process simulations).
pub struct NoReservation;

impl PortReserver for NoReservation {
    fn reserve(&mut self, _: &Lease, _: bool) -> Result<PortHandle, ApiError> {
        Ok(Box::new(()))
    }
}

/// One reserved port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    pub addr: Ipv4Addr,
    pub transport: Transport,
    pub port: u16,
}

impl Lease {
    pub fn endpoint(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr, self.port)
    }
}

#[derive(Default)]
struct Space {
    /// Reserved ports, with what holds each in the kernel.
    used: BTreeMap<u16, Option<PortHandle>>,
    /// Where the next search starts, so that released ports are not reused at once.
    cursor: u32,
    /// Not an address of this machine: one the firewall answers for
    /// (IP_TRANSPARENT sockets); forgotten when its last port is released.
    transparent: bool,
}

/// How a reserved port is held in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// By a bound socket where the address is this machine's (so no local
    /// service takes it); none on addresses answered for transparently.
    Kernel,
    /// By a bound socket always: the relay will listen on it.
    Socket,
}

pub struct PortPool {
    range: RangeInclusive<u16>,
    reserver: Box<dyn PortReserver>,
    spaces: HashMap<(Ipv4Addr, Transport), Space>,
}

/// A lease's port is taken (`why`: by what).
pub fn in_use_error(lease: &Lease, why: &str) -> ApiError {
    ApiError::new(
        ErrorKind::AddressInUse,
        format!(
            "{} port {} on {} is {why}",
            proto_name(lease.transport),
            lease.port,
            lease.addr
        ),
    )
}

fn proto_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "TCP",
        Transport::Udp => "UDP",
    }
}

impl PortPool {
    pub fn new(range: RangeInclusive<u16>, reserver: impl PortReserver + 'static) -> Self {
        Self {
            range,
            reserver: Box::new(reserver),
            spaces: HashMap::new(),
        }
    }

    pub fn range(&self) -> &RangeInclusive<u16> {
        &self.range
    }

    /// Ports reserved on (addr, transport).
    pub fn in_use(&self, addr: Ipv4Addr, transport: Transport) -> usize {
        self.spaces
            .get(&(addr, transport))
            .map_or(0, |s| s.used.len())
    }

    /// Ports reserved on every address and transport.
    pub fn total_in_use(&self) -> usize {
        self.spaces.values().map(|s| s.used.len()).sum()
    }

    fn take(&mut self, lease: Lease, hold: Hold) -> Result<(), ApiError> {
        let space = self
            .spaces
            .entry((lease.addr, lease.transport))
            .or_default();
        if space.used.contains_key(&lease.port) {
            return Err(in_use_error(&lease, "already used by another pinhole"));
        }
        // An address this machine does not have needs no kernel reservation
        // (no local service can bind it) unless a socket will use the port.
        let socket = if hold == Hold::Socket || !space.transparent {
            Some(self.reserver.reserve(&lease, space.transparent)?)
        } else {
            None
        };
        space.used.insert(lease.port, socket);
        Ok(())
    }

    /// Exactly this port (held by a kernel socket where the address is this
    /// machine's).
    pub fn reserve_exact(
        &mut self,
        addr: Ipv4Addr,
        transport: Transport,
        port: u16,
    ) -> Result<Lease, ApiError> {
        self.reserve_exact_held(addr, transport, port, Hold::Kernel)
    }

    /// `reserve_exact`, with a socket also on an address the firewall
    /// answers for transparently (a relay will listen on it).
    pub fn reserve_exact_held(
        &mut self,
        addr: Ipv4Addr,
        transport: Transport,
        port: u16,
        hold: Hold,
    ) -> Result<Lease, ApiError> {
        if port == 0 {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                "port 0 cannot be reserved",
            ));
        }
        let lease = Lease {
            addr,
            transport,
            port,
        };
        self.take(lease, hold)?;
        Ok(lease)
    }

    /// N consecutive ports from the pool whose lowest is a multiple of N; all
    /// or nothing. Held in the kernel where the address is this machine's.
    pub fn reserve_block(
        &mut self,
        addr: Ipv4Addr,
        transport: Transport,
        n: u16,
    ) -> Result<Vec<Lease>, ApiError> {
        self.reserve_block_held(addr, transport, n, Hold::Kernel)
    }

    /// `reserve_block`, with a socket for each port also on an address the
    /// firewall answers for transparently (a relay will listen on it).
    pub fn reserve_block_held(
        &mut self,
        addr: Ipv4Addr,
        transport: Transport,
        n: u16,
        hold: Hold,
    ) -> Result<Vec<Lease>, ApiError> {
        if n == 0 {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                "a block of 0 ports",
            ));
        }
        let (lo, hi, n32) = (
            *self.range.start() as u32,
            *self.range.end() as u32,
            n as u32,
        );
        let first = lo.div_ceil(n32) * n32;
        if first + n32 - 1 > hi {
            return Err(self.exhausted(addr, transport, n));
        }
        let blocks = (hi + 1 - n32 - first) / n32 + 1;
        let start = self.spaces.get(&(addr, transport)).map_or(0, |s| s.cursor) % blocks;
        for i in 0..blocks {
            let base = first + ((start + i) % blocks) * n32;
            let free = self
                .spaces
                .get(&(addr, transport))
                .is_none_or(|s| (base..base + n32).all(|p| !s.used.contains_key(&(p as u16))));
            if !free {
                continue;
            }
            let mut taken = Vec::new();
            for p in base..base + n32 {
                let lease = Lease {
                    addr,
                    transport,
                    port: p as u16,
                };
                match self.take(lease, hold) {
                    Ok(()) => taken.push(lease),
                    Err(e) if e.kind == ErrorKind::AddressInUse => break,
                    Err(e) => {
                        taken.iter().for_each(|l| self.release(l));
                        return Err(e);
                    }
                }
            }
            if taken.len() == n as usize {
                self.spaces.entry((addr, transport)).or_default().cursor = (start + i + 1) % blocks;
                return Ok(taken);
            }
            // A local service holds a port of this block: release and go on.
            taken.iter().for_each(|l| self.release(l));
        }
        Err(self.exhausted(addr, transport, n))
    }

    fn exhausted(&self, addr: Ipv4Addr, transport: Transport, n: u16) -> ApiError {
        ApiError::new(
            ErrorKind::Exhausted,
            format!(
                "no free block of {n} {} port(s) aligned to {n} on {addr} in the pool {}-{}",
                proto_name(transport),
                self.range.start(),
                self.range.end()
            ),
        )
    }

    /// Hands over the socket that holds `lease` in the kernel (the user-mode
    /// relay listens on it, so the port never leaves the pool's hands). The
    /// lease stays reserved until `release`.
    pub fn take_socket(&mut self, lease: &Lease) -> Option<PortHandle> {
        self.spaces
            .get_mut(&(lease.addr, lease.transport))?
            .used
            .get_mut(&lease.port)?
            .take()
    }

    pub fn release(&mut self, lease: &Lease) {
        let key = (lease.addr, lease.transport);
        if let Some(space) = self.spaces.get_mut(&key) {
            space.used.remove(&lease.port);
            if space.transparent && space.used.is_empty() {
                self.spaces.remove(&key);
            }
        }
    }

    /// Ports on `addr`, which is not this machine's, are reserved with
    /// transparent sockets (IP_TRANSPARENT): the firewall answers for that
    /// address, as for the server of an intercepted FTP control connection.
    pub fn answer_transparently(&mut self, addr: Ipv4Addr, transport: Transport) {
        self.spaces
            .entry((addr, transport))
            .or_default()
            .transparent = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);

    #[test]
    fn aligned_blocks() {
        let mut p = PortPool::new(20001..=20100, NoReservation);
        for n in [1u16, 2, 3, 4, 7] {
            let b = p.reserve_block(A, Transport::Tcp, n).unwrap();
            assert_eq!(b.len(), n as usize);
            assert_eq!(b[0].port % n, 0, "lowest port is a multiple of {n}");
            for w in b.windows(2) {
                assert_eq!(w[1].port, w[0].port + 1);
            }
            assert!(b.iter().all(|l| p.range().contains(&l.port)));
        }
    }

    #[test]
    fn exhaustion_and_reuse() {
        let mut p = PortPool::new(30000..=30009, NoReservation);
        let leases: Vec<Lease> = (0..10)
            .map(|_| p.reserve_block(A, Transport::Tcp, 1).unwrap()[0])
            .collect();
        assert_eq!(
            p.reserve_block(A, Transport::Tcp, 1).unwrap_err().kind,
            ErrorKind::Exhausted
        );
        // Protocols are separate spaces.
        p.reserve_block(A, Transport::Udp, 1).unwrap();
        p.release(&leases[3]);
        assert_eq!(
            p.reserve_block(A, Transport::Tcp, 1).unwrap()[0].port,
            leases[3].port
        );
    }

    #[test]
    fn misaligned_free_space_is_not_used() {
        // Pool 45000..=45007; leave only 45001..=45003 free: no aligned pair but 45002-45003.
        let mut p = PortPool::new(45000..=45007, NoReservation);
        for port in [45000, 45004, 45005, 45006, 45007] {
            p.reserve_exact(A, Transport::Tcp, port).unwrap();
        }
        let b = p.reserve_block(A, Transport::Tcp, 2).unwrap();
        assert_eq!((b[0].port, b[1].port), (45002, 45003));
        assert_eq!(
            p.reserve_block(A, Transport::Tcp, 2).unwrap_err().kind,
            ErrorKind::Exhausted
        );
        assert_eq!(
            p.in_use(A, Transport::Tcp),
            7,
            "the failed call left nothing reserved"
        );
    }

    #[test]
    fn explicit_ports() {
        let mut p = PortPool::new(20000..=20010, NoReservation);
        p.reserve_exact(A, Transport::Tcp, 45000).unwrap();
        assert_eq!(
            p.reserve_exact(A, Transport::Tcp, 45000).unwrap_err().kind,
            ErrorKind::AddressInUse
        );
        p.reserve_exact(A, Transport::Udp, 45000).unwrap();
    }
}
