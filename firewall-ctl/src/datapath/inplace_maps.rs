//! The maps of FTP control connections forwarded in place
//! (`firewall_common::inplace`): which ports, each connection's state (the
//! datapath's, read here) and translation (written here, whole), and the
//! segments the datapath hands over.

use aya::maps::{HashMap, Map, MapData};
use firewall_common::{
    flow::FlowKey,
    inplace::{InPlaceAdjust, InPlaceSegment, InPlaceState},
    intercept::InterceptKey,
    map_names, IPPROTO_TCP,
};

use super::{tables::Table, PinPaths};

pub struct InPlaceMaps {
    ports: HashMap<MapData, InterceptKey, u32>,
    state: Table<FlowKey, InPlaceState>,
    adjust: Table<FlowKey, InPlaceAdjust>,
}

impl InPlaceMaps {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        let ports = Map::from_map_data(pins.open_map(map_names::INPLACE_PORTS)?)?;
        Ok(Self {
            ports: HashMap::try_from(ports)?,
            state: Table::open(pins)?,
            adjust: Table::open(pins)?,
        })
    }

    /// New outbound TCP connections to these ports are forwarded in place
    /// (the others stay as they are).
    pub fn set_ports(&mut self, ports: &[u16]) -> anyhow::Result<()> {
        let old: Vec<InterceptKey> = self.ports.keys().collect::<Result<_, _>>()?;
        for k in old {
            if !ports.contains(&k.port) {
                self.ports.remove(&k)?;
            }
        }
        for &p in ports {
            self.ports.insert(InterceptKey::new(IPPROTO_TCP, p), 0, 0)?;
        }
        Ok(())
    }

    /// The datapath's state of the connection whose client's key is `client`.
    pub fn state(&self, client: &FlowKey) -> anyhow::Result<Option<InPlaceState>> {
        self.state.get(client)
    }

    /// The connection's translation and offers as published.
    pub fn adjust(&self, client: &FlowKey) -> anyhow::Result<Option<InPlaceAdjust>> {
        self.adjust.get(client)
    }

    /// Replaces the connection's translation and offers (the datapath reads
    /// the old value or the new, never a mixture). Never creates the entry:
    /// one the sweeper removed with the flows stays removed (false).
    pub fn set_adjust(&mut self, client: &FlowKey, adjust: &InPlaceAdjust) -> anyhow::Result<bool> {
        self.adjust.replace(client, adjust)
    }

    /// Forgets the connection (both maps; absent entries are no error).
    pub fn remove(&mut self, client: &FlowKey) -> anyhow::Result<()> {
        self.state.remove(client)?;
        self.adjust.remove(client)?;
        Ok(())
    }
}

/// A record of `INPLACE_SEGMENTS`, or None if it is not one.
pub fn decode_segment(bytes: &[u8]) -> Option<InPlaceSegment> {
    if bytes.len() < size_of::<InPlaceSegment>() {
        return None;
    }
    // SAFETY: `InPlaceSegment` is repr(C) plain data, valid for any bytes;
    // the length was checked, and the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<InPlaceSegment>()) })
}
