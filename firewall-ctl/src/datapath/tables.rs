//! Typed access to the pinned maps.

use anyhow::Context as _;
use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    Array, HashMap, Map, MapData, PerCpuArray,
};
use firewall_common::{
    flow::{FlowKey, FlowValue},
    inplace::{InPlaceAdjust, InPlaceState},
    intercept::{InterceptConf, InterceptKey, InterceptValue},
    map_names,
    pinhole::{
        BusyClientKey, BusyClientValue, DatapathEvent, PeerFilterKey, PeerFilterValue, PinholeKey,
        PinholeValue,
    },
    stats::{Counter, StatValue, COUNTER_SLOTS},
    wall::{NatEndpoint, UdpMapping},
};

use super::PinPaths;
use firewall_core::maps::MapError;

use crate::mapops;

/// The per-CPU verdict counters, summed over CPUs.
pub struct Stats {
    map: PerCpuArray<MapData, StatValue>,
}

impl Stats {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        let data = pins.open_map(map_names::STATS)?;
        Ok(Self {
            map: PerCpuArray::try_from(Map::from_map_data(data)?)?,
        })
    }

    pub fn read(&self) -> anyhow::Result<Vec<(Counter, StatValue)>> {
        let mut out = Vec::new();
        for c in Counter::ALL {
            debug_assert!((*c as u32) < COUNTER_SLOTS);
            out.push((*c, self.sum(*c as u32)?));
        }
        Ok(out)
    }

    /// The FTP control lines the stream verdict forwarded (`packets` are
    /// lines).
    pub fn ftp_lines(&self) -> anyhow::Result<StatValue> {
        self.sum(firewall_common::stats::FTP_LINES_SLOT)
    }

    fn sum(&self, slot: u32) -> anyhow::Result<StatValue> {
        let per_cpu = self.map.get(&slot, 0)?;
        Ok(per_cpu.iter().fold(StatValue::default(), |a, v| StatValue {
            packets: a.packets + v.packets,
            bytes: a.bytes + v.bytes,
        }))
    }

    /// Events the datapath could not send (the EVENTS ring was full).
    pub fn events_lost(&self) -> anyhow::Result<u64> {
        Ok(self.sum(firewall_common::stats::EVENTS_LOST_SLOT)?.packets)
    }
}

/// The interception tables: which ports, where to, and the mark.
pub struct InterceptTables {
    ports: HashMap<MapData, InterceptKey, InterceptValue>,
    conf: Array<MapData, InterceptConf>,
}

impl InterceptTables {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        let open =
            |name: &str| -> anyhow::Result<Map> { Ok(Map::from_map_data(pins.open_map(name)?)?) };
        Ok(Self {
            ports: HashMap::try_from(open(map_names::INTERCEPT)?)?,
            conf: Array::try_from(open(map_names::INTERCEPT_CONF)?)?,
        })
    }

    /// Replaces the intercepted ports and turns interception on (mark ≠ 0) or off.
    pub fn set(
        &mut self,
        conf: InterceptConf,
        ports: &[(InterceptKey, InterceptValue)],
    ) -> anyhow::Result<()> {
        // Off while the ports change, so no SYN sees half a configuration.
        self.conf.set(0, InterceptConf::default(), 0)?;
        let old: Vec<InterceptKey> = self.ports.keys().collect::<Result<_, _>>()?;
        for k in old {
            self.ports.remove(&k)?;
        }
        for (k, v) in ports {
            self.ports.insert(k, v, 0)?;
        }
        self.conf.set(0, conf, 0)?;
        Ok(())
    }

    pub fn ports(&self) -> anyhow::Result<Vec<(InterceptKey, InterceptValue)>> {
        Ok(self.ports.iter().collect::<Result<_, _>>()?)
    }
}

/// Typed access to a pinned hash map.
pub struct Table<K, V> {
    map: HashMap<MapData, K, V>,
    /// The map's fd again, for the operations aya lacks (`mapops`).
    fd: std::os::fd::OwnedFd,
    capacity: u32,
}

/// A value of a `Table`, with what inserting it implies.
pub trait TableValue: aya::Pod {
    /// Adjusts the value as it is inserted.
    fn on_insert(&mut self) {}
}

impl TableValue for FlowValue {
    /// An entry that has not seen a packet counts as seen when installed, so
    /// that the idle timeout also removes flows that are never used.
    fn on_insert(&mut self) {
        if self.last_seen_ns == 0 {
            self.last_seen_ns = crate::netif::monotonic_ns();
        }
    }
}

impl TableValue for PinholeValue {}
impl TableValue for InPlaceState {}
impl TableValue for InPlaceAdjust {}
impl TableValue for BusyClientValue {}

/// The flow table: the call the engine uses to install, read and remove flows.
pub type FlowTable = Table<FlowKey, FlowValue>;
/// The pinhole table.
pub type PinholeTable = Table<PinholeKey, PinholeValue>;

/// Map name of each table type.
pub trait TableName {
    const NAME: &'static str;
}

impl TableName for Table<FlowKey, FlowValue> {
    const NAME: &'static str = map_names::FLOWS;
}

impl TableName for Table<PinholeKey, PinholeValue> {
    const NAME: &'static str = map_names::PINHOLES;
}

impl TableName for Table<FlowKey, InPlaceState> {
    const NAME: &'static str = map_names::INPLACE;
}

impl TableName for Table<FlowKey, InPlaceAdjust> {
    const NAME: &'static str = map_names::INPLACE_ADJUST;
}

/// Clients at their quota of concurrent TCP secondaries.
pub type BusyClients = Table<BusyClientKey, BusyClientValue>;

impl TableName for Table<BusyClientKey, BusyClientValue> {
    const NAME: &'static str = map_names::BUSY_CLIENTS;
}

impl TableValue for UdpMapping {}
impl TableValue for NatEndpoint {}

impl TableName for Table<NatEndpoint, UdpMapping> {
    const NAME: &'static str = map_names::UDP_MAPPINGS;
}

impl TableName for Table<u32, NatEndpoint> {
    const NAME: &'static str = map_names::UDP_PORT_OWNERS;
}

impl<K: aya::Pod + std::fmt::Debug, V: TableValue> Table<K, V>
where
    Self: TableName,
{
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        use std::os::fd::AsFd as _;
        let data = pins.open_map(Self::NAME)?;
        let capacity = data.info()?.max_entries();
        let fd = data.fd().as_fd().try_clone_to_owned()?;
        Ok(Self {
            map: HashMap::try_from(Map::from_map_data(data)?)?,
            fd,
            capacity,
        })
    }

    /// Up to `max` entries from `scan` on (a batched read; see `mapops`).
    pub fn scan(&self, scan: &mut mapops::Scan, max: usize) -> anyhow::Result<Vec<(K, V)>> {
        use std::os::fd::AsFd as _;
        mapops::lookup_batch(self.fd.as_fd(), scan, max)
            .with_context(|| format!("reading {} in batches", Self::NAME))
    }

    /// Every entry, read in batches.
    pub fn all(&self) -> anyhow::Result<Vec<(K, V)>> {
        let mut scan = mapops::Scan::default();
        let mut out = Vec::new();
        loop {
            out.extend(self.scan(&mut scan, 4096)?);
            if scan.wrapped {
                return Ok(out);
            }
        }
    }

    /// Deletes these keys (missing ones are skipped); how many were there.
    pub fn remove_many(&mut self, keys: &[K]) -> anyhow::Result<usize> {
        use std::os::fd::AsFd as _;
        mapops::delete_batch(self.fd.as_fd(), keys)
            .with_context(|| format!("deleting from {} in a batch", Self::NAME))
    }

    /// Takes the entry out atomically (lookup and delete in one step).
    pub fn take(&mut self, key: &K) -> anyhow::Result<Option<V>> {
        use std::os::fd::AsFd as _;
        mapops::lookup_and_delete(self.fd.as_fd(), key)
            .with_context(|| format!("taking {key:?} out of {}", Self::NAME))
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Inserts or replaces an entry; a full table is told apart from other
    /// failures (the kernel answers E2BIG).
    pub fn try_insert(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        let mut value = *value;
        value.on_insert();
        self.map.insert(key, value, 0).map_err(|e| match &e {
            aya::maps::MapError::SyscallError(s)
                if s.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                MapError::Full {
                    map: Self::NAME,
                    capacity: self.capacity,
                }
            }
            _ => MapError::Other(format!("inserting {key:?} into {}: {e}", Self::NAME)),
        })
    }

    /// Inserts or replaces an entry.
    pub fn insert(&mut self, key: &K, value: &V) -> anyhow::Result<()> {
        let mut value = *value;
        value.on_insert();
        self.map
            .insert(key, value, 0)
            .with_context(|| format!("inserting {key:?} into {}", Self::NAME))
    }

    /// Replaces an entry that exists, never creating one (the datapath may
    /// have removed or replaced it meanwhile). Whether it was there.
    pub fn replace(&mut self, key: &K, value: &V) -> anyhow::Result<bool> {
        // "Only if the key exists" (BPF_EXIST in linux/bpf.h).
        const BPF_EXIST: u64 = 2;
        match self.map.insert(key, *value, BPF_EXIST) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(e).with_context(|| format!("replacing {key:?} in {}", Self::NAME)),
        }
    }

    pub fn get(&self, key: &K) -> anyhow::Result<Option<V>> {
        match self.map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether it was there.
    pub fn remove(&mut self, key: &K) -> anyhow::Result<bool> {
        match self.map.remove(key) {
            Ok(()) => Ok(true),
            // (aya reports a missing key to delete as the syscall's ENOENT.)
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// All entries. Entries removed while iterating are skipped.
    pub fn entries(&self) -> anyhow::Result<Vec<(K, V)>> {
        let mut out = Vec::new();
        for r in self.map.iter() {
            match r {
                Ok(kv) => out.push(kv),
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Entries in the table (a full scan).
    pub fn count(&self) -> anyhow::Result<usize> {
        Ok(self.map.keys().filter(|k| k.is_ok()).count())
    }
}

/// Typed access to the pinned peer filters (an LPM trie of (filter id, network) -> allow).
pub struct PeerFilters {
    map: LpmTrie<MapData, PeerFilterKey, PeerFilterValue>,
}

impl PeerFilters {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        let data = pins.open_map(map_names::PEER_FILTERS)?;
        Ok(Self {
            map: LpmTrie::try_from(Map::from_map_data(data)?)?,
        })
    }

    fn key(filter: u32, net: ipnet::Ipv4Net) -> LpmKey<PeerFilterKey> {
        LpmKey::new(
            32 + net.prefix_len() as u32,
            PeerFilterKey {
                filter: filter.to_be_bytes(),
                addr: net.network().octets(),
            },
        )
    }

    pub fn insert(
        &mut self,
        filter: u32,
        net: ipnet::Ipv4Net,
        allow: bool,
    ) -> Result<(), MapError> {
        self.map
            .insert(
                &Self::key(filter, net),
                PeerFilterValue {
                    allow: allow as u32,
                },
                0,
            )
            .map_err(|e| match &e {
                aya::maps::MapError::SyscallError(s)
                    if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) =>
                {
                    MapError::Full {
                        map: map_names::PEER_FILTERS,
                        capacity: firewall_common::map_sizes::PEER_FILTERS,
                    }
                }
                _ => MapError::Other(format!("inserting peer filter {filter} {net}: {e}")),
            })
    }

    pub fn remove(&mut self, filter: u32, net: ipnet::Ipv4Net) -> anyhow::Result<()> {
        match self.map.remove(&Self::key(filter, net)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Decodes one record of the EVENTS ring buffer.
pub fn decode_event(bytes: &[u8]) -> Option<DatapathEvent> {
    if bytes.len() < size_of::<DatapathEvent>() {
        return None;
    }
    // SAFETY: DatapathEvent is plain old data and the length was checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DatapathEvent>()) })
}
