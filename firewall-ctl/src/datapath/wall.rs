//! The wall's tables: its settings (the NAT address and ports, the external
//! interface) and the source networks that may open connections.

use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    Array, Map, MapData,
};
use firewall_common::{
    map_names,
    wall::{SourceValue, WallConf},
};
use ipnet::Ipv4Net;

use super::PinPaths;

pub struct WallTables {
    conf: Array<MapData, WallConf>,
    sources: LpmTrie<MapData, [u8; 4], SourceValue>,
}

impl WallTables {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        let open =
            |name: &str| -> anyhow::Result<Map> { Ok(Map::from_map_data(pins.open_map(name)?)?) };
        Ok(Self {
            conf: Array::try_from(open(map_names::WALL_CONF)?)?,
            sources: LpmTrie::try_from(open(map_names::WALL_SOURCES)?)?,
        })
    }

    /// Replaces the settings and the allowed sources. The wall admits no new
    /// connection while they change (the settings are written last).
    pub fn set(&mut self, conf: WallConf, sources: &[Ipv4Net]) -> anyhow::Result<()> {
        self.conf.set(0, WallConf::default(), 0)?;
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

    pub fn conf(&self) -> anyhow::Result<WallConf> {
        Ok(self.conf.get(&0, 0)?)
    }
}
