//! The typed values of the configuration file: each reads itself and says
//! what is wrong with a bad value (the key is added by the reader).

use std::{fmt, ops::RangeInclusive, str::FromStr, time::Duration};

use ipnet::Ipv4Net;
use serde::{de, Deserialize, Deserializer};

use crate::flags::ConnFlags;

/// Deserializes a value from its string form through `FromStr`.
pub(super) fn from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(de::Error::custom)
}

/// An IPv4 network in CIDR form without host bits ("10.1.0.0/24").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network(pub Ipv4Net);

impl FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let net: Ipv4Net = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 network in CIDR form (like 10.1.0.0/24)"))?;
        if net != net.trunc() {
            return Err(format!(
                "{s:?} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        Ok(Network(net))
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str(d)
    }
}

/// The ports handed out when a call asks for any port ("20000-59999").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRange(pub RangeInclusive<u16>);

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port range like \"20000-59999\"");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let a: u16 = a.trim().parse().map_err(|_| bad())?;
        let b: u16 = b.trim().parse().map_err(|_| bad())?;
        if a < 1024 {
            return Err(format!(
                "starts at {a}: ports below 1024 are never handed out"
            ));
        }
        if b < a {
            return Err(format!("{s:?} ends before it starts"));
        }
        Ok(PortRange(a..=b))
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str(d)
    }
}

/// Timeouts accept a week at most.
pub const TIMEOUT_RANGE: RangeInclusive<u64> = 1..=604_800;

/// A timeout: whole seconds (`60`) or a duration with units (`"90s"`,
/// `"2h"`), within `TIMEOUT_RANGE` seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeout(pub Duration);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("seconds, or a duration like \"90s\" or \"2h\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                u64::try_from(v)
                    .map(Duration::from_secs)
                    .map_err(|_| E::custom(format!("{v} s is negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Ok(Duration::from_secs(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v)
                    .map_err(|e| E::custom(format!("{v:?} is not a duration ({e})")))
            }
        }
        let t = d.deserialize_any(V)?;
        let (lo, hi) = (*TIMEOUT_RANGE.start(), *TIMEOUT_RANGE.end());
        if t.subsec_nanos() != 0 || !TIMEOUT_RANGE.contains(&t.as_secs()) {
            return Err(de::Error::custom(format!(
                "{} is out of range {lo}..={hi} s (whole seconds)",
                humantime::format_duration(t)
            )));
        }
        Ok(Timeout(t))
    }
}

/// One of the allowed-address flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowedAddresses(pub ConnFlags);

impl FromStr for AllowedAddresses {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        let f = ConnFlags::from_kebab(name)?;
        if !ConnFlags::ALLOWED_ADDRESSES.contains(f) {
            return Err(format!("{name:?} is not an allowed-address flag (allow-addresses-in-class-c-network, allow-addresses-in-network, allow-addresses-all)"));
        }
        Ok(AllowedAddresses(f))
    }
}

impl<'de> Deserialize<'de> for AllowedAddresses {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str(d)
    }
}

/// Where FTP data connections are forwarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataConnections {
    /// By the datapath (the default).
    #[default]
    Kernel,
    /// Through the user-mode relay (no-kernel-mode).
    User,
}

/// How the FTP filter reads outbound control connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlMode {
    /// Terminated by the daemon, which connects to the server itself (the
    /// default).
    #[default]
    Proxy,
    /// Forwarded by the datapath, which hands the daemon the lines the
    /// filter acts on.
    InPlace,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_themselves() {
        assert!("10.1.0.0/24".parse::<Network>().is_ok());
        assert!("10.1.0.1/24"
            .parse::<Network>()
            .unwrap_err()
            .contains("did you mean 10.1.0.0/24"));
        assert_eq!("2000-3000".parse::<PortRange>(), Ok(PortRange(2000..=3000)));
        assert!("3000".parse::<PortRange>().is_err());
        let t: Timeout = toml::from_str::<toml::Value>("t = \"2m\"")
            .unwrap()
            .get("t")
            .unwrap()
            .clone()
            .try_into()
            .unwrap();
        assert_eq!(t.0, Duration::from_secs(120));
    }
}
