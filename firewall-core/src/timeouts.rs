//! How long things last: flows, pinholes.

use std::time::Duration;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// Idle time after which an established TCP flow is removed.
    #[serde(with = "secs")]
    pub tcp_established: Duration,
    /// Time a TCP flow lives after FIN or RST was seen.
    #[serde(with = "secs")]
    pub tcp_closing: Duration,
    /// Idle time after which a TCP connection one side never answered (a
    /// SYN without reply) is removed (RFC 5382's transitory timeout).
    #[serde(with = "secs")]
    pub tcp_transitory: Duration,
    /// Idle time after which a UDP flow is removed.
    #[serde(with = "secs")]
    pub udp_idle: Duration,
    /// Quiet time after which a UDP mapping (an internal endpoint's
    /// external port, the same toward every destination) ends: RFC 4787
    /// asks for at least 2 minutes and recommends 5.
    #[serde(with = "secs")]
    pub udp_mapping: Duration,
    /// TIMEOUT flag: an unused pinhole (TCP listener) closes after this.
    #[serde(with = "secs")]
    pub pinhole: Duration,
    /// TIMEOUT flag on UDP: the connection closes after this much quiet.
    #[serde(with = "secs")]
    pub udp_pinhole_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        // The same orders of magnitude as netfilter's conntrack defaults; the
        // pinhole TIMEOUT is the spec's "about one minute".
        Self {
            tcp_established: Duration::from_secs(7200),
            tcp_closing: Duration::from_secs(10),
            tcp_transitory: Duration::from_secs(240),
            udp_idle: Duration::from_secs(60),
            udp_mapping: Duration::from_secs(300),
            pinhole: Duration::from_secs(60),
            udp_pinhole_idle: Duration::from_secs(60),
        }
    }
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}
