//! The connection flags of BindForClient, RedirectConnections and AllowFutureConnect.
//!
//! The original constants' values are not public; these bits are our own.
//! Names on the CLI and in the API are kebab-case.

use bitflags::bitflags;

bitflags! {
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ConnFlags: u32 {
        const ALLOW_MULTIPLE = 1 << 0;
        const TIMEOUT = 1 << 1;
        const NO_KERNEL_MODE = 1 << 2;
        const BIDIRECTIONAL = 1 << 3;
        const PROXY_MODE = 1 << 4;
        const ALLOW_ADDRESSES_IN_CLASS_C_NETWORK = 1 << 5;
        const ALLOW_ADDRESSES_IN_NETWORK = 1 << 6;
        const ALLOW_ADDRESSES_ALL = 1 << 7;
        const INCREASE_RECEIVE_BUFFER = 1 << 8;
        /// AllowFutureConnect: the permission is the client address's, not
        /// the session's (in this firewall a session is a client address).
        const ADDRESS_BASED = 1 << 9;
    }
}

const NAMES: &[(&str, ConnFlags)] = &[
    ("allow-multiple", ConnFlags::ALLOW_MULTIPLE),
    ("timeout", ConnFlags::TIMEOUT),
    ("no-kernel-mode", ConnFlags::NO_KERNEL_MODE),
    ("bidirectional", ConnFlags::BIDIRECTIONAL),
    ("proxy-mode", ConnFlags::PROXY_MODE),
    (
        "allow-addresses-in-class-c-network",
        ConnFlags::ALLOW_ADDRESSES_IN_CLASS_C_NETWORK,
    ),
    (
        "allow-addresses-in-network",
        ConnFlags::ALLOW_ADDRESSES_IN_NETWORK,
    ),
    ("allow-addresses-all", ConnFlags::ALLOW_ADDRESSES_ALL),
    (
        "increase-receive-buffer",
        ConnFlags::INCREASE_RECEIVE_BUFFER,
    ),
    ("address-based", ConnFlags::ADDRESS_BASED),
];

impl ConnFlags {
    /// The allowed-address flags, which widen the BindForClient target policy.
    pub const ALLOWED_ADDRESSES: ConnFlags = ConnFlags::ALLOW_ADDRESSES_IN_CLASS_C_NETWORK
        .union(ConnFlags::ALLOW_ADDRESSES_IN_NETWORK)
        .union(ConnFlags::ALLOW_ADDRESSES_ALL);

    /// Parses one kebab-case name.
    pub fn from_kebab(name: &str) -> Result<ConnFlags, String> {
        NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                let known: Vec<&str> = NAMES.iter().map(|(n, _)| *n).collect();
                format!("unknown flag {name:?} (known: {})", known.join(", "))
            })
    }

    /// Parses names, each possibly a comma-separated list (as `--flags a,b`).
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<ConnFlags, String> {
        let mut flags = ConnFlags::empty();
        for part in names
            .iter()
            .flat_map(|s| s.as_ref().split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            flags |= ConnFlags::from_kebab(part)?;
        }
        Ok(flags)
    }

    pub fn names(self) -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(_, f)| self.contains(*f))
            .map(|(n, _)| *n)
            .collect()
    }
}

impl serde::Serialize for ConnFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

impl<'de> serde::Deserialize<'de> for ConnFlags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        ConnFlags::parse(&names).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let all = ConnFlags::all();
        assert_eq!(ConnFlags::parse(&all.names()).unwrap(), all);
        assert_eq!(
            ConnFlags::parse(&["timeout,allow-multiple", " proxy-mode"]).unwrap(),
            ConnFlags::TIMEOUT | ConnFlags::ALLOW_MULTIPLE | ConnFlags::PROXY_MODE
        );
        assert!(ConnFlags::parse(&["turbo"])
            .unwrap_err()
            .contains("unknown flag \"turbo\""));
        assert_eq!(
            serde_json::to_string(&ConnFlags::TIMEOUT).unwrap(),
            r#"["timeout"]"#
        );
    }
}
