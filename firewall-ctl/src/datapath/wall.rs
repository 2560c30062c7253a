//! The wall's tables: its settings (the NAT address and ports, the external
//! interface), the source networks that may open connections, the access
//! rules and the published servers; and the UDP mappings the datapath makes.

use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    Array, HashMap, Map, MapData,
};
use firewall_common::{
    map_names,
    rules::{Rule, RULE_SLOTS},
    tftp::{TftpConf, TFTP_PORTS},
    wall::{NatEndpoint, PublishKey, PublishValue, SourceValue, UdpMapping, WallConf},
};
use ipnet::Ipv4Net;

use super::{PinPaths, Table};

pub struct WallTables {
    conf: Array<MapData, WallConf>,
    sources: LpmTrie<MapData, [u8; 4], SourceValue>,
    published: HashMap<MapData, PublishKey, PublishValue>,
    rules: Array<MapData, Rule>,
    rules_active: Array<MapData, u32>,
    tftp: Array<MapData, TftpConf>,
}

impl WallTables {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        let open =
            |name: &str| -> anyhow::Result<Map> { Ok(Map::from_map_data(pins.open_map(name)?)?) };
        Ok(Self {
            conf: Array::try_from(open(map_names::WALL_CONF)?)?,
            sources: LpmTrie::try_from(open(map_names::WALL_SOURCES)?)?,
            published: HashMap::try_from(open(map_names::PUBLISHED)?)?,
            rules: Array::try_from(open(map_names::RULES)?)?,
            rules_active: Array::try_from(open(map_names::RULES_ACTIVE)?)?,
            tftp: Array::try_from(open(map_names::TFTP_CONF)?)?,
        })
    }

    /// Writes the access rules into the bank the datapath does not read,
    /// then switches to it: a packet sees the old rules or the new, never a
    /// mixture. At most `RULE_SLOTS` entries (the configuration checks).
    pub fn set_rules(&mut self, rules: &[Rule]) -> anyhow::Result<()> {
        anyhow::ensure!(
            rules.len() <= RULE_SLOTS as usize,
            "{} rule entries, more than the {RULE_SLOTS} the datapath holds",
            rules.len()
        );
        let active = self.rules_active.get(&0, 0)?;
        let bank = if active == 0 { 1 } else { 0 };
        // The entries, then the end of the list.
        let end = Rule::default();
        for (i, r) in rules.iter().chain(std::iter::once(&end)).enumerate() {
            if i < RULE_SLOTS as usize {
                self.rules.set(bank * RULE_SLOTS + i as u32, *r, 0)?;
            }
        }
        self.rules_active.set(0, bank, 0)?;
        Ok(())
    }

    /// The TFTP helper's server ports (none: off). At most `TFTP_PORTS`
    /// (the configuration checks).
    pub fn set_tftp(&mut self, ports: &[u16]) -> anyhow::Result<()> {
        anyhow::ensure!(
            ports.len() <= TFTP_PORTS,
            "{} TFTP ports, more than the {TFTP_PORTS} the datapath holds",
            ports.len()
        );
        let mut conf = TftpConf::default();
        conf.ports[..ports.len()].copy_from_slice(ports);
        self.tftp.set(0, conf, 0)?;
        Ok(())
    }

    /// Replaces the settings, the allowed sources and the published servers.
    /// The wall admits no new outbound connection while they change (the
    /// settings are written last).
    pub fn set(
        &mut self,
        conf: WallConf,
        sources: &[Ipv4Net],
        rules: &[Rule],
        published: &[(PublishKey, PublishValue)],
    ) -> anyhow::Result<()> {
        self.conf.set(0, WallConf::default(), 0)?;
        self.set_rules(rules)?;
        let old: Vec<PublishKey> = self.published.keys().collect::<Result<_, _>>()?;
        for k in old {
            self.published.remove(&k)?;
        }
        for (k, v) in published {
            self.published.insert(k, v, 0)?;
        }
        let old: Vec<LpmKey<[u8; 4]>> = self.sources.keys().collect::<Result<_, _>>()?;
        for k in old {
            self.sources.remove(&k)?;
        }
        for net in sources {
            let key = LpmKey::new(net.prefix_len() as u32, net.network().octets());
            self.sources.insert(&key, SourceValue { allow: 1 }, 0)?;
        }
        self.conf.set(0, conf, 0)?;
        Ok(())
    }

    /// A reload: the allowed sources, rules and published servers become
    /// these, the settings stay. New entries go in before old ones go out, so a
    /// source or server in both is never missing, not even for a moment.
    pub fn update(
        &mut self,
        sources: &[Ipv4Net],
        rules: &[Rule],
        published: &[(PublishKey, PublishValue)],
    ) -> anyhow::Result<()> {
        self.set_rules(rules)?;
        for (k, v) in published {
            self.published.insert(k, v, 0)?;
        }
        let stale: Vec<PublishKey> = self
            .published
            .keys()
            .filter(|k| {
                !k.as_ref()
                    .is_ok_and(|k| published.iter().any(|(p, _)| p == k))
            })
            .collect::<Result<_, _>>()?;
        for k in stale {
            self.published.remove(&k)?;
        }
        let keys: Vec<LpmKey<[u8; 4]>> = sources
            .iter()
            .map(|n| LpmKey::new(n.prefix_len() as u32, n.network().octets()))
            .collect();
        for k in &keys {
            self.sources.insert(k, SourceValue { allow: 1 }, 0)?;
        }
        let same = |a: &LpmKey<[u8; 4]>, b: &LpmKey<[u8; 4]>| {
            a.prefix_len() == b.prefix_len() && a.data() == b.data()
        };
        let stale: Vec<LpmKey<[u8; 4]>> = self
            .sources
            .keys()
            .filter(|k| !k.as_ref().is_ok_and(|k| keys.iter().any(|n| same(n, k))))
            .collect::<Result<_, _>>()?;
        for k in stale {
            self.sources.remove(&k)?;
        }
        Ok(())
    }
}

/// The UDP mappings (`UDP_MAPPINGS`) and the NAT ports they own
/// (`UDP_PORT_OWNERS`): the datapath makes them, the daemon keeps their
/// stamps current and ends the quiet ones.
pub struct UdpMappings {
    pub mappings: Table<NatEndpoint, UdpMapping>,
    owners: Table<u32, NatEndpoint>,
}

impl UdpMappings {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        Ok(Self {
            mappings: Table::open(pins)?,
            owners: Table::open(pins)?,
        })
    }

    pub fn get(&self, ep: &NatEndpoint) -> anyhow::Result<Option<UdpMapping>> {
        self.mappings.get(ep)
    }

    /// Ends the mapping of `ep` to NAT `port` and frees the port (when
    /// `ep` still owns it). A mapping the datapath has moved to another port
    /// meanwhile stays. Whether a mapping ended.
    pub fn end(&mut self, ep: &NatEndpoint, port: u16) -> anyhow::Result<bool> {
        let ended = match self.get(ep)? {
            Some(m) if m.nat_port == port => self.mappings.remove(ep)?,
            _ => false,
        };
        // After the mapping: the datapath then claims the port afresh, never
        // through a mapping whose port is gone.
        if self.owners.get(&(port as u32))? == Some(*ep) {
            self.owners.remove(&(port as u32))?;
        }
        Ok(ended)
    }

    /// A batch of the port owners: NAT port → internal endpoint.
    pub fn owners(
        &self,
        scan: &mut crate::mapops::Scan,
        max: usize,
    ) -> anyhow::Result<Vec<(u16, NatEndpoint)>> {
        Ok(self
            .owners
            .scan(scan, max)?
            .into_iter()
            .map(|(p, ep)| (p as u16, ep))
            .collect())
    }

    /// Frees `port` if `ep` still owns it and no mapping of `ep` names it
    /// (an orphan); whether it was freed. The datapath never maps an
    /// endpoint to a port another claim holds, so the check stands.
    pub fn free_orphan(&mut self, port: u16, ep: &NatEndpoint) -> anyhow::Result<bool> {
        if self.owners.get(&(port as u32))? != Some(*ep)
            || self.get(ep)?.is_some_and(|m| m.nat_port == port)
        {
            return Ok(false);
        }
        self.owners.remove(&(port as u32))
    }
}
