//! `[[rule]]`: the access rules for new outbound connections (ISA's access
//! rules), in order, the first that matches deciding. Without any, the
//! embedded rule: the sources of `wall.outbound_from` may open anything.
//! Each rule becomes datapath entries (`firewall_common::rules`), one per
//! source network × destination network × port range.

use std::{fmt::Write as _, ops::RangeInclusive, str::FromStr};

use firewall_common::{
    rules::{rule_action, Rule, RULE_SLOTS},
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize};

use super::{err, types::Network, ConfigError};

/// A `[[rule]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleFile {
    pub name: Option<String>,
    pub action: Action,
    pub from: Option<Vec<Network>>,
    pub to: Option<Vec<Network>>,
    pub protocol: Option<RuleProtocol>,
    pub ports: Option<Vec<Ports>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// The protocols the wall tracks; `any` is all three.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    #[default]
    Any,
    Tcp,
    Udp,
    /// ICMP echo (ping).
    Icmp,
}

impl RuleProtocol {
    const fn ipproto(self) -> u8 {
        match self {
            Self::Any => 0,
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
            Self::Icmp => IPPROTO_ICMP,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
        }
    }
}

/// Destination ports: "443" or "8000-8080".
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Ports(RangeInclusive<u16>);

impl FromStr for Ports {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port or a port range like \"8000-8080\"");
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p != 0);
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (port(a).ok_or_else(bad)?, port(b).ok_or_else(bad)?),
            None => {
                let p = port(s).ok_or_else(bad)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("{s:?} ends before it starts"));
        }
        Ok(Ports(lo..=hi))
    }
}

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::types::from_str(d)
    }
}

/// A validated rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccessRule {
    pub name: Option<String>,
    pub action: Action,
    pub from: Vec<Ipv4Net>,
    pub to: Vec<Ipv4Net>,
    pub protocol: RuleProtocol,
    /// Destination port ranges; empty: every port.
    pub ports: Vec<RangeInclusive<u16>>,
    /// The embedded rule (no `[[rule]]` in the file).
    pub embedded: bool,
}

impl AccessRule {
    /// The embedded rule: the outbound sources may open anything.
    fn embedded(outbound_from: &[Ipv4Net]) -> Self {
        Self {
            name: Some("embedded: anything out".into()),
            action: Action::Allow,
            from: outbound_from.to_vec(),
            to: vec![Ipv4Net::default()],
            protocol: RuleProtocol::Any,
            ports: vec![],
            embedded: true,
        }
    }

    /// Its datapath entries: one per source × destination × port range.
    fn entries(&self) -> Vec<Rule> {
        let all = [0..=u16::MAX];
        let ports = if self.ports.is_empty() {
            &all[..]
        } else {
            &self.ports[..]
        };
        let action = match self.action {
            Action::Allow => rule_action::ALLOW,
            Action::Deny => rule_action::DENY,
        };
        let mut entries = Vec::new();
        for src in &self.from {
            for dst in &self.to {
                for p in ports {
                    entries.push(Rule {
                        src_addr: src.network().octets(),
                        src_mask: src.netmask().octets(),
                        dst_addr: dst.network().octets(),
                        dst_mask: dst.netmask().octets(),
                        port_lo: *p.start(),
                        port_hi: *p.end(),
                        protocol: self.protocol.ipproto(),
                        action,
                        _pad: [0; 2],
                    });
                }
            }
        }
        entries
    }

    /// One line: "allow tcp from 10.1.0.0/24 to any ports 80,443 (web)".
    pub fn describe(&self) -> String {
        let nets = |n: &[Ipv4Net]| {
            n.iter()
                .map(|n| {
                    if n.prefix_len() == 0 {
                        "any".to_string()
                    } else {
                        n.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut s = format!(
            "{} {} from {} to {}",
            match self.action {
                Action::Allow => "allow",
                Action::Deny => "deny",
            },
            self.protocol.name(),
            nets(&self.from),
            nets(&self.to)
        );
        if !self.ports.is_empty() {
            let ports: Vec<String> = self
                .ports
                .iter()
                .map(|p| {
                    if p.start() == p.end() {
                        p.start().to_string()
                    } else {
                        format!("{}-{}", p.start(), p.end())
                    }
                })
                .collect();
            let _ = write!(s, " ports {}", ports.join(","));
        }
        if let Some(name) = &self.name {
            let _ = write!(s, " ({name})");
        }
        s
    }
}

/// The rules of the file, checked, or the embedded rule without any.
pub(super) fn read(
    file: Option<Vec<RuleFile>>,
    outbound_from: &[Ipv4Net],
) -> Result<Vec<AccessRule>, ConfigError> {
    let Some(file) = file else {
        return Ok(vec![AccessRule::embedded(outbound_from)]);
    };
    let mut rules = Vec::new();
    for (i, r) in file.into_iter().enumerate() {
        let key = |f: &str| format!("rule[{i}].{f}");
        let protocol = r.protocol.unwrap_or_default();
        let nets = |field: &str, nets: Option<Vec<Network>>, default: Vec<Ipv4Net>| match nets {
            Some(n) if n.is_empty() => Err(err(
                key(field),
                "must name at least one network (leave the key out for the default)",
            )),
            Some(n) => Ok(n.into_iter().map(|n| n.0).collect::<Vec<_>>()),
            None => Ok(default),
        };
        let from = nets("from", r.from, outbound_from.to_vec())?;
        let to = nets("to", r.to, vec![Ipv4Net::default()])?;
        for (j, net) in from.iter().enumerate() {
            if !outbound_from
                .iter()
                .any(|o| o.contains(net) || net.contains(o))
            {
                return Err(err(
                    format!("rule[{i}].from[{j}]"),
                    format!("{net} is outside wall.outbound_from: its connections are refused before any rule"),
                ));
            }
        }
        let ports = match r.ports {
            Some(_) if protocol == RuleProtocol::Icmp => {
                return Err(err(
                    key("ports"),
                    "ICMP echo has no ports: leave ports out of an icmp rule",
                ))
            }
            Some(p) if p.is_empty() => {
                return Err(err(
                    key("ports"),
                    "must name at least one port (leave the key out for every port)",
                ))
            }
            Some(p) => p.into_iter().map(|p| p.0).collect(),
            None => vec![],
        };
        rules.push(AccessRule {
            name: r.name,
            action: r.action,
            from,
            to,
            protocol,
            ports,
            embedded: false,
        });
    }
    let entries: usize = rules.iter().map(|r| r.entries().len()).sum();
    if entries > RULE_SLOTS as usize {
        return Err(err(
            "rule",
            format!(
                "the rules make {entries} datapath entries (each rule's from × to × ports), more than the {RULE_SLOTS} it holds: merge networks or port ranges"
            ),
        ));
    }
    Ok(rules)
}

/// The datapath's entries for the rules, in order.
pub fn compile(rules: &[AccessRule]) -> Vec<Rule> {
    rules.iter().flat_map(AccessRule::entries).collect()
}

#[cfg(test)]
mod tests {
    use firewall_common::rules::allows;

    use super::*;

    fn parse(text: &str) -> Result<Vec<AccessRule>, ConfigError> {
        let (i, e) = super::super::tests::ifs();
        super::super::Config::parse(text, &i, &e).map(|c| c.rules)
    }

    const CLIENT: [u8; 4] = [10, 1, 0, 2];
    const SERVER: [u8; 4] = [192, 0, 2, 1];

    #[test]
    fn without_rules_the_outbound_sources_may_open_anything() {
        let entries = compile(&parse("").unwrap());
        assert_eq!(entries.len(), 1);
        assert!(allows(&entries, IPPROTO_TCP, CLIENT, SERVER, 22));
        assert!(allows(&entries, IPPROTO_ICMP, CLIENT, SERVER, 0));
        assert!(!allows(&entries, IPPROTO_TCP, [10, 9, 0, 2], SERVER, 22));
    }

    #[test]
    fn rules_compile_in_order_and_the_first_match_decides() {
        let rules = parse(
            r#"
            [[rule]]
            action = "deny"
            to = ["192.0.2.128/25"]
            [[rule]]
            name = "web"
            action = "allow"
            protocol = "tcp"
            ports = ["80", "443", "8000-8080"]
            [[rule]]
            action = "allow"
            protocol = "udp"
            to = ["192.0.2.0/24"]
            ports = ["53"]
            [[rule]]
            action = "allow"
            protocol = "icmp"
            "#,
        )
        .unwrap();
        assert_eq!(
            rules[1].describe(),
            "allow tcp from 10.1.0.0/24 to any ports 80,443,8000-8080 (web)"
        );
        let e = compile(&rules);
        assert_eq!(e.len(), 1 + 3 + 1 + 1);
        assert!(allows(&e, IPPROTO_TCP, CLIENT, SERVER, 443));
        assert!(allows(&e, IPPROTO_TCP, CLIENT, SERVER, 8042));
        assert!(!allows(&e, IPPROTO_TCP, CLIENT, SERVER, 22));
        assert!(allows(&e, IPPROTO_UDP, CLIENT, SERVER, 53));
        assert!(!allows(&e, IPPROTO_UDP, CLIENT, [198, 51, 100, 1], 53));
        assert!(allows(&e, IPPROTO_ICMP, CLIENT, SERVER, 0));
        assert!(
            !allows(&e, IPPROTO_TCP, CLIENT, [192, 0, 2, 200], 443),
            "the deny first"
        );
    }

    #[test]
    fn an_empty_list_lets_nothing_out() {
        let e = compile(&parse("rule = []").unwrap());
        assert!(!allows(&e, IPPROTO_TCP, CLIENT, SERVER, 80));
    }

    #[test]
    fn bad_rules_name_their_key() {
        for (text, key, says) in [
            (
                "[[rule]]\naction = \"maybe\"",
                "rule[0].action",
                "unknown variant",
            ),
            (
                "[[rule]]\naction = \"allow\"\nprotocol = \"icmp\"\nports = [\"1\"]",
                "rule[0].ports",
                "no ports",
            ),
            (
                "[[rule]]\naction = \"allow\"\nports = []",
                "rule[0].ports",
                "at least one",
            ),
            (
                "[[rule]]\naction = \"allow\"\nports = [\"0\"]",
                "rule[0].ports[0]",
                "not a port",
            ),
            (
                "[[rule]]\naction = \"allow\"\nports = [\"90-80\"]",
                "rule[0].ports[0]",
                "ends before",
            ),
            (
                "[[rule]]\naction = \"allow\"\nto = []",
                "rule[0].to",
                "at least one",
            ),
            (
                "[[rule]]\naction = \"allow\"\nfrom = [\"10.9.0.0/16\"]",
                "rule[0].from[0]",
                "outside wall.outbound_from",
            ),
            (
                "[[rule]]\naction = \"allow\"\nto = [\"10.1.0.1/24\"]",
                "rule[0].to[0]",
                "host bits",
            ),
            (
                "[[rule]]\naction = \"allow\"\nport = [\"80\"]",
                "rule[0]",
                "unknown field",
            ),
        ] {
            let e = parse(text).map(|_| ()).unwrap_err();
            let whole = format!("{}: {}", e.key, e.problem);
            assert!(
                whole.contains(key) && whole.contains(says),
                "{text:?}: {whole}"
            );
        }
    }

    #[test]
    fn too_many_entries_are_refused() {
        let ports: Vec<String> = (0..65).map(|p| format!("\"{}\"", 1000 + p)).collect();
        let text = format!(
            "[[rule]]\naction = \"allow\"\nports = [{}]",
            ports.join(", ")
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, "rule");
        assert!(e.problem.contains("65 datapath entries"), "{}", e.problem);
    }
}
