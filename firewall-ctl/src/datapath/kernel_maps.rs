//! The engine's view of the pinned maps (`firewall_core::maps::Maps`).

use std::net::Ipv4Addr;

use firewall_common::{
    flow::{FlowKey, FlowValue},
    inplace::{InPlaceAdjust, InPlaceState},
    pinhole::{BusyClientKey, BusyClientValue, PinholeKey, PinholeValue},
};
use firewall_core::maps::{MapError, MapResult, Maps};

use super::{
    tables::{BusyClients, FlowTable, PeerFilters, PinholeTable, Table},
    PinPaths,
};

/// The engine's view of the pinned maps.
pub struct KernelMaps {
    pub flows: FlowTable,
    pub pinholes: PinholeTable,
    pub peers: PeerFilters,
    pub busy: BusyClients,
    /// The state and translation of FTP control connections forwarded in
    /// place, keyed by their client's flow key: they go with the flows.
    inplace_state: Table<FlowKey, InPlaceState>,
    inplace_adjust: Table<FlowKey, InPlaceAdjust>,
}

impl KernelMaps {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        Ok(Self {
            flows: FlowTable::open(pins)?,
            pinholes: PinholeTable::open(pins)?,
            peers: PeerFilters::open(pins)?,
            busy: BusyClients::open(pins)?,
            inplace_state: Table::open(pins)?,
            inplace_adjust: Table::open(pins)?,
        })
    }
}

/// A failure that is not a full table.
fn other(e: anyhow::Error) -> MapError {
    MapError::Other(format!("{e:#}"))
}

impl Maps for KernelMaps {
    fn put_pinhole(&mut self, key: &PinholeKey, value: &PinholeValue) -> MapResult<()> {
        self.pinholes.try_insert(key, value)
    }
    fn get_pinhole(&self, key: &PinholeKey) -> MapResult<Option<PinholeValue>> {
        self.pinholes.get(key).map_err(other)
    }
    fn del_pinhole(&mut self, key: &PinholeKey) -> MapResult<()> {
        self.pinholes.remove(key).map(|_| ()).map_err(other)
    }
    fn take_pinhole(&mut self, key: &PinholeKey) -> MapResult<Option<PinholeValue>> {
        self.pinholes.take(key).map_err(other)
    }
    fn pinholes(&self) -> MapResult<Vec<(PinholeKey, PinholeValue)>> {
        self.pinholes.all().map_err(other)
    }
    fn put_peer_rule(&mut self, filter: u32, net: ipnet::Ipv4Net, allow: bool) -> MapResult<()> {
        self.peers.insert(filter, net, allow)
    }
    fn del_peer_rule(&mut self, filter: u32, net: ipnet::Ipv4Net) -> MapResult<()> {
        self.peers.remove(filter, net).map_err(other)
    }
    fn get_flow(&self, key: &FlowKey) -> MapResult<Option<FlowValue>> {
        self.flows.get(key).map_err(other)
    }
    fn del_flow(&mut self, key: &FlowKey) -> MapResult<bool> {
        let was = self.flows.remove(key).map_err(other)?;
        self.inplace_adjust.remove(key).map_err(other)?;
        self.inplace_state.remove(key).map_err(other)?;
        Ok(was)
    }
    fn del_flows(&mut self, keys: &[FlowKey]) -> MapResult<usize> {
        let n = self.flows.remove_many(keys).map_err(other)?;
        // Both directions' keys: the client's is the one these have.
        self.inplace_adjust.remove_many(keys).map_err(other)?;
        self.inplace_state.remove_many(keys).map_err(other)?;
        Ok(n)
    }
    fn flows(&self) -> MapResult<Vec<(FlowKey, FlowValue)>> {
        self.flows.all().map_err(other)
    }
    fn busy_clients(&self) -> MapResult<Vec<Ipv4Addr>> {
        Ok(self
            .busy
            .all()
            .map_err(other)?
            .into_iter()
            .map(|(k, _)| Ipv4Addr::from(k.addr))
            .collect())
    }
    fn set_client_busy(
        &mut self,
        client: Ipv4Addr,
        busy: Option<BusyClientValue>,
    ) -> MapResult<()> {
        let key = BusyClientKey {
            addr: client.octets(),
        };
        match busy {
            Some(v) => self.busy.try_insert(&key, &v),
            None => self.busy.remove(&key).map(|_| ()).map_err(other),
        }
    }
}
