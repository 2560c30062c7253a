//! The engine's view of the datapath's maps, and a version of them in memory.

use std::{collections::HashMap, net::Ipv4Addr};

use firewall_common::{
    flow::{FlowKey, FlowValue},
    pinhole::{BusyClientValue, PinholeKey, PinholeValue},
};
use ipnet::Ipv4Net;

use crate::error::{ApiError, ErrorKind};

/// Why a map operation failed: a full table is the caller's to hear about
/// (`exhausted`), anything else is the firewall's own failure (`internal`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("the {map} map is full ({capacity} entries)")]
    Full { map: &'static str, capacity: u32 },
    #[error("{0}")]
    Other(String),
}

pub type MapResult<T> = Result<T, MapError>;

impl From<MapError> for ApiError {
    fn from(e: MapError) -> Self {
        match e {
            MapError::Full { .. } => ApiError::new(ErrorKind::Exhausted, e.to_string()),
            MapError::Other(m) => ApiError::new(ErrorKind::Internal, m),
        }
    }
}

/// What the engine writes to and reads from the datapath.
pub trait Maps: Send {
    fn put_pinhole(&mut self, key: &PinholeKey, value: &PinholeValue) -> MapResult<()>;
    fn get_pinhole(&self, key: &PinholeKey) -> MapResult<Option<PinholeValue>>;
    fn del_pinhole(&mut self, key: &PinholeKey) -> MapResult<()>;
    /// Removes the pinhole and returns it as it was at that moment, so that
    /// a packet using it at the same time cannot be overlooked.
    fn take_pinhole(&mut self, key: &PinholeKey) -> MapResult<Option<PinholeValue>>;
    fn pinholes(&self) -> MapResult<Vec<(PinholeKey, PinholeValue)>>;
    fn put_peer_rule(&mut self, filter: u32, net: Ipv4Net, allow: bool) -> MapResult<()>;
    fn del_peer_rule(&mut self, filter: u32, net: Ipv4Net) -> MapResult<()>;
    fn get_flow(&self, key: &FlowKey) -> MapResult<Option<FlowValue>>;
    fn del_flow(&mut self, key: &FlowKey) -> MapResult<bool>;
    /// Removes these flows (missing ones are skipped) in one go.
    fn del_flows(&mut self, keys: &[FlowKey]) -> MapResult<usize>;
    fn flows(&self) -> MapResult<Vec<(FlowKey, FlowValue)>>;
    fn busy_clients(&self) -> MapResult<Vec<Ipv4Addr>>;
    /// Marks a client as at its TCP quota (`Some`) or not (`None`).
    fn set_client_busy(&mut self, client: Ipv4Addr, busy: Option<BusyClientValue>)
        -> MapResult<()>;
}

/// Maps in memory instead of the kernel: for running the engine in-process
/// without BPF (tests, control-plane benchmarks). Nothing forwards packets.
#[derive(Default)]
pub struct MemMaps {
    pub pinholes: HashMap<PinholeKey, PinholeValue>,
    pub rules: HashMap<(u32, Ipv4Net), bool>,
    pub flows: HashMap<FlowKey, FlowValue>,
    pub busy: HashMap<Ipv4Addr, BusyClientValue>,
}

impl Maps for MemMaps {
    fn put_pinhole(&mut self, key: &PinholeKey, value: &PinholeValue) -> MapResult<()> {
        self.pinholes.insert(*key, *value);
        Ok(())
    }
    fn get_pinhole(&self, key: &PinholeKey) -> MapResult<Option<PinholeValue>> {
        Ok(self.pinholes.get(key).copied())
    }
    fn del_pinhole(&mut self, key: &PinholeKey) -> MapResult<()> {
        self.pinholes.remove(key);
        Ok(())
    }
    fn take_pinhole(&mut self, key: &PinholeKey) -> MapResult<Option<PinholeValue>> {
        Ok(self.pinholes.remove(key))
    }
    fn pinholes(&self) -> MapResult<Vec<(PinholeKey, PinholeValue)>> {
        Ok(self.pinholes.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_peer_rule(&mut self, filter: u32, net: Ipv4Net, allow: bool) -> MapResult<()> {
        self.rules.insert((filter, net), allow);
        Ok(())
    }
    fn del_peer_rule(&mut self, filter: u32, net: Ipv4Net) -> MapResult<()> {
        self.rules.remove(&(filter, net));
        Ok(())
    }
    fn get_flow(&self, key: &FlowKey) -> MapResult<Option<FlowValue>> {
        Ok(self.flows.get(key).copied())
    }
    fn del_flow(&mut self, key: &FlowKey) -> MapResult<bool> {
        Ok(self.flows.remove(key).is_some())
    }
    fn del_flows(&mut self, keys: &[FlowKey]) -> MapResult<usize> {
        Ok(keys
            .iter()
            .filter(|k| self.flows.remove(k).is_some())
            .count())
    }
    fn flows(&self) -> MapResult<Vec<(FlowKey, FlowValue)>> {
        Ok(self.flows.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn busy_clients(&self) -> MapResult<Vec<Ipv4Addr>> {
        Ok(self.busy.keys().copied().collect())
    }
    fn set_client_busy(
        &mut self,
        client: Ipv4Addr,
        busy: Option<BusyClientValue>,
    ) -> MapResult<()> {
        match busy {
            Some(v) => self.busy.insert(client, v),
            None => self.busy.remove(&client),
        };
        Ok(())
    }
}
