//! The wall's tables: its settings (the NAT address and ports, the external
//! interface) and the source networks that may open connections.

use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    Array, HashMap, Map, MapData,
};
use firewall_common::{
    map_names,
    wall::{PublishKey, PublishValue, SourceValue, WallConf},
};
use ipnet::Ipv4Net;

use super::PinPaths;

pub struct WallTables {
    conf: Array<MapData, WallConf>,
    sources: LpmTrie<MapData, [u8; 4], SourceValue>,
    published: HashMap<MapData, PublishKey, PublishValue>,
}

impl WallTables {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        let open =
            |name: &str| -> anyhow::Result<Map> { Ok(Map::from_map_data(pins.open_map(name)?)?) };
        Ok(Self {
            conf: Array::try_from(open(map_names::WALL_CONF)?)?,
            sources: LpmTrie::try_from(open(map_names::WALL_SOURCES)?)?,
            published: HashMap::try_from(open(map_names::PUBLISHED)?)?,
        })
    }

    /// Replaces the settings, the allowed sources and the published servers.
    /// The wall admits no new outbound connection while they change (the
    /// settings are written last).
    pub fn set(
        &mut self,
        conf: WallConf,
        sources: &[Ipv4Net],
        published: &[(PublishKey, PublishValue)],
    ) -> anyhow::Result<()> {
        self.conf.set(0, WallConf::default(), 0)?;
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

    /// A reload: the allowed sources and published servers become these,
    /// the settings stay. New entries go in before old ones go out, so a
    /// source or server in both is never missing, not even for a moment.
    pub fn update(
        &mut self,
        sources: &[Ipv4Net],
        published: &[(PublishKey, PublishValue)],
    ) -> anyhow::Result<()> {
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
