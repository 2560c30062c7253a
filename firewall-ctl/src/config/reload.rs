//! What a reload may change. Rules, policy, timeouts, the wall's sources and
//! published servers apply to a running daemon; what the datapath was built
//! with (map sizes, addresses, port ranges) or what holds kernel state
//! (interception, the metrics listener, data filters) needs a restart.

use super::{err, Config, ConfigError};

impl Config {
    /// The keys that differ between the running configuration and `new`,
    /// or an error naming the first one that only a restart can change.
    pub fn reload_changes(&self, new: &Config) -> Result<Vec<&'static str>, ConfigError> {
        let ftp_published = |c: &Config| -> Vec<super::Published> {
            c.published.iter().filter(|p| p.ftp).cloned().collect()
        };
        let restart_only: [(&str, bool); 16] = [
            // Their listeners belong to the FTP filter's interception.
            (
                "publish (an FTP server)",
                ftp_published(self) != ftp_published(new),
            ),
            (
                "addresses.internal_networks",
                self.internal_networks != new.internal_networks,
            ),
            (
                "addresses.external_addresses",
                self.external_addresses != new.external_addresses,
            ),
            ("maps.flows", self.flow_table_size != new.flow_table_size),
            (
                "maps.pinholes",
                self.pinhole_table_size != new.pinhole_table_size,
            ),
            ("ports.range", self.port_range != new.port_range),
            ("ports.snat_block", self.snat_block != new.snat_block),
            ("nat.ports", self.nat_port_range != new.nat_port_range),
            ("ftp.ports", self.ftp_ports != new.ftp_ports),
            (
                "ftp.data_connections",
                self.ftp_user_mode != new.ftp_user_mode,
            ),
            (
                "ftp.control_lines",
                self.ftp_kernel_lines != new.ftp_kernel_lines,
            ),
            ("ftp.control", self.ftp_in_place != new.ftp_in_place),
            (
                "scan.block_executables",
                self.block_executables != new.block_executables,
            ),
            ("interception.fwmark", self.fwmark != new.fwmark),
            (
                "interception.route_table",
                self.route_table != new.route_table,
            ),
            ("metrics.listen", self.metrics_listen != new.metrics_listen),
        ];
        if let Some((key, _)) = restart_only.iter().find(|(_, changed)| *changed) {
            return Err(err(
                *key,
                "changed, but only a restart applies it (systemctl restart firewall, or down and up); nothing was reloaded",
            ));
        }
        let reloadable = [
            ("timeouts", self.timeouts != new.timeouts),
            (
                "policy",
                self.client_quota != new.client_quota
                    || self.max_pending_per_session != new.max_pending_per_session
                    || self.default_allowed_addresses != new.default_allowed_addresses,
            ),
            ("protocols", self.protocols != new.protocols),
            ("networks", self.networks != new.networks),
            (
                "wall.outbound_from",
                self.outbound_from != new.outbound_from,
            ),
            // The embedded rule follows wall.outbound_from, reported as such.
            (
                "rule",
                self.rules != new.rules
                    && !(self.rules.iter().all(|r| r.embedded)
                        && new.rules.iter().all(|r| r.embedded)),
            ),
            ("publish", self.published != new.published),
            ("tftp.ports", self.tftp_ports != new.tftp_ports),
        ];
        Ok(reloadable
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| key)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::ifs;

    fn parse(text: &str) -> Config {
        let (i, e) = ifs();
        Config::parse(text, &i, &e).unwrap()
    }

    #[test]
    fn rules_policy_and_timeouts_reload() {
        let old = parse("");
        assert_eq!(old.reload_changes(&parse("")).unwrap(), Vec::<&str>::new());
        let new = parse(
            "[timeouts]\nudp_idle = 30\n[policy]\nclient_quota = 10\n[wall]\noutbound_from = [\"10.1.0.0/25\"]\n\
             [[publish]]\ntransport = \"tcp\"\nport = 8080\nserver = \"10.1.0.2:80\"\n\
             [[protocols]]\nname = \"ftp\"\ntransport = \"tcp\"\nports = [21]\nclients = [\"10.1.0.2/32\"]\n\
             [tftp]\nports = [69, 1069]",
        );
        assert_eq!(
            old.reload_changes(&new).unwrap(),
            vec![
                "timeouts",
                "policy",
                "protocols",
                "wall.outbound_from",
                "publish",
                "tftp.ports"
            ]
        );
    }

    #[test]
    fn what_needs_a_restart_is_refused_by_key() {
        let old = parse("");
        for (text, key) in [
            ("[maps]\nflows = 2048", "maps.flows"),
            ("[maps]\npinholes = 128", "maps.pinholes"),
            (
                "[addresses]\ninternal_networks = [\"10.1.0.0/25\"]",
                "addresses.internal_networks",
            ),
            ("[ports]\nrange = \"30000-40000\"", "ports.range"),
            ("[nat]\nports = \"2000-3000\"", "nat.ports"),
            ("[ftp]\nports = [2121]", "ftp.ports"),
            ("[ftp]\nenabled = false", "ftp.ports"),
            ("[interception]\nfwmark = 7", "interception.fwmark"),
            ("[metrics]\nlisten = \"127.0.0.1:9469\"", "metrics.listen"),
            (
                "[scan]\nblock_executables = [\"ftp\"]",
                "scan.block_executables",
            ),
        ] {
            let e = old.reload_changes(&parse(text)).unwrap_err();
            assert_eq!(e.key, key, "{text}");
            assert!(e.to_string().contains("restart"), "{e}");
        }
    }
}
