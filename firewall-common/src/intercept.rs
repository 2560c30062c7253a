//! Transparent interception of primary connections (the FTP control
//! connection on TCP 21 by default).
//!
//! A TC ingress program on the internal interface decides which SYNs to
//! intercept (a connection to an intercepted port routed out of the external
//! interface), records their 4-tuple in INTERCEPTING and marks them; a
//! policy-routing rule delivers marked packets locally, where an `sk_lookup`
//! program gives the recorded ones to the daemon's transparent listener (in
//! INTERCEPT_LISTENER). Done in the kernel's listener lookup, this also
//! covers a SYN that meets a TIME_WAIT socket of an earlier connection of the
//! same 4-tuple: the kernel retires the TIME_WAIT socket for the listener, as
//! it does for netfilter's TPROXY. Later segments of connections the daemon
//! terminated (and of the relay's transparent listeners) are found with a
//! socket lookup and marked too. No netfilter is involved.

/// Key of the INTERCEPT map: a destination port whose connections are
/// terminated by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct InterceptKey {
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

impl InterceptKey {
    pub const fn new(protocol: u8, port: u16) -> Self {
        Self {
            port,
            protocol,
            _pad: 0,
        }
    }
}

/// Where intercepted connections of one port go.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InterceptValue {
    /// The daemon's transparent listener (loopback).
    pub listener_addr: [u8; 4],
    /// Host byte order.
    pub listener_port: u16,
    pub _pad: u16,
}

/// The one entry of INTERCEPT_CONF; a zero mark turns the TC program off.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InterceptConf {
    /// skb mark for which a policy-routing rule delivers locally.
    pub mark: u32,
    /// Only connections routed out of this interface are intercepted.
    pub egress_ifindex: u32,
}

/// Key of INTERCEPTING: a SYN the TC program decided to intercept, as the
/// listener lookup sees it (client = remote, server = local).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct InterceptTuple {
    pub client_addr: [u8; 4],
    pub server_addr: [u8; 4],
    /// Host byte order.
    pub client_port: u16,
    /// Host byte order.
    pub server_port: u16,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, explicit padding.
    unsafe impl aya::Pod for super::InterceptKey {}
    unsafe impl aya::Pod for super::InterceptValue {}
    unsafe impl aya::Pod for super::InterceptConf {}
    unsafe impl aya::Pod for super::InterceptTuple {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<InterceptKey>(), 4);
        assert_eq!(core::mem::size_of::<InterceptValue>(), 8);
        assert_eq!(core::mem::size_of::<InterceptConf>(), 8);
        assert_eq!(core::mem::size_of::<InterceptTuple>(), 12);
    }
}
