//! Transparent interception of primary connections (the FTP control
//! connection on TCP 21 by default).
//!
//! A TC ingress program on the internal interface hands the SYN of a
//! connection to an intercepted port to the daemon's transparent listener
//! (`bpf_sk_assign`) and marks it; a policy-routing rule delivers marked
//! packets locally. Later segments of connections the daemon terminated (and
//! of the relay's transparent listeners) are found with a socket lookup and
//! marked too. No netfilter is involved.

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

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, explicit padding.
    unsafe impl aya::Pod for super::InterceptKey {}
    unsafe impl aya::Pod for super::InterceptValue {}
    unsafe impl aya::Pod for super::InterceptConf {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<InterceptKey>(), 4);
        assert_eq!(core::mem::size_of::<InterceptValue>(), 8);
        assert_eq!(core::mem::size_of::<InterceptConf>(), 8);
    }
}
