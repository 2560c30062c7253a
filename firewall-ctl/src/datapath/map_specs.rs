//! The maps the datapath pins, with the layout a pinned map must have to be
//! re-adopted by a new daemon.

use firewall_common::{
    flow::{FlowKey, FlowValue},
    frag::{FragKey, FragValue},
    ftp_lines::LineState,
    inplace::{InPlaceAdjust, InPlaceState},
    intercept::{InterceptConf, InterceptKey, InterceptValue},
    map_names,
    pinhole::{
        BusyClientKey, BusyClientValue, PeerFilterKey, PeerFilterValue, PinholeKey, PinholeValue,
    },
    rules::Rule,
    stats::StatValue,
    tftp::TftpConf,
    wall::{NatEndpoint, PublishKey, PublishValue, SourceValue, UdpMapping, WallConf},
};

/// The maps the datapath pins, and the layout a pinned map must have to be re-adopted.
pub(super) struct MapSpec {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
}

pub(super) const MAPS: &[MapSpec] = &[
    MapSpec {
        name: map_names::FLOWS,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<FlowValue>() as u32,
    },
    MapSpec {
        name: map_names::FRAGMENTS,
        key_size: size_of::<FragKey>() as u32,
        value_size: size_of::<FragValue>() as u32,
    },
    MapSpec {
        name: map_names::STATS,
        key_size: 4,
        value_size: size_of::<StatValue>() as u32,
    },
    MapSpec {
        name: map_names::PINHOLES,
        key_size: size_of::<PinholeKey>() as u32,
        value_size: size_of::<PinholeValue>() as u32,
    },
    MapSpec {
        name: map_names::BUSY_CLIENTS,
        key_size: size_of::<BusyClientKey>() as u32,
        value_size: size_of::<BusyClientValue>() as u32,
    },
    MapSpec {
        name: map_names::PEER_FILTERS,
        // struct bpf_lpm_trie_key: prefix length, then the data.
        key_size: 4 + size_of::<PeerFilterKey>() as u32,
        value_size: size_of::<PeerFilterValue>() as u32,
    },
    MapSpec {
        name: map_names::INTERCEPT,
        key_size: size_of::<InterceptKey>() as u32,
        value_size: size_of::<InterceptValue>() as u32,
    },
    MapSpec {
        name: map_names::INTERCEPT_CONF,
        key_size: 4,
        value_size: size_of::<InterceptConf>() as u32,
    },
    MapSpec {
        name: map_names::WALL_CONF,
        key_size: 4,
        value_size: size_of::<WallConf>() as u32,
    },
    MapSpec {
        name: map_names::PUBLISHED,
        key_size: size_of::<PublishKey>() as u32,
        value_size: size_of::<PublishValue>() as u32,
    },
    MapSpec {
        name: map_names::RULES,
        key_size: 4,
        value_size: size_of::<Rule>() as u32,
    },
    MapSpec {
        name: map_names::RULES_ACTIVE,
        key_size: 4,
        value_size: 4,
    },
    MapSpec {
        name: map_names::UDP_MAPPINGS,
        key_size: size_of::<NatEndpoint>() as u32,
        value_size: size_of::<UdpMapping>() as u32,
    },
    MapSpec {
        name: map_names::UDP_PORT_OWNERS,
        key_size: 4,
        value_size: size_of::<NatEndpoint>() as u32,
    },
    MapSpec {
        name: map_names::INPLACE_PORTS,
        key_size: size_of::<InterceptKey>() as u32,
        value_size: 4,
    },
    MapSpec {
        name: map_names::INPLACE,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<InPlaceState>() as u32,
    },
    MapSpec {
        name: map_names::INPLACE_ADJUST,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<InPlaceAdjust>() as u32,
    },
    // Pinned so that their programs stay in them while no daemon runs
    // (`--keep-datapath`): the kernel empties a program array when the last
    // descriptor to it closes, and the pipeline's tail call would then fail
    // for every segment of a connection read in place.
    MapSpec {
        name: map_names::INPLACE_PROGS_XDP,
        key_size: 4,
        value_size: 4,
    },
    MapSpec {
        name: map_names::INPLACE_PROGS_TC,
        key_size: 4,
        value_size: 4,
    },
    MapSpec {
        name: map_names::TFTP_CONF,
        key_size: 4,
        value_size: size_of::<TftpConf>() as u32,
    },
    MapSpec {
        name: map_names::WALL_SOURCES,
        key_size: 4 + 4,
        value_size: size_of::<SourceValue>() as u32,
    },
    MapSpec {
        name: map_names::LINE_SOCKS,
        key_size: 4,
        value_size: 4,
    },
    MapSpec {
        name: map_names::LINE_SLOTS,
        key_size: 8,
        value_size: 4,
    },
    MapSpec {
        name: map_names::LINE_STATE,
        key_size: 4,
        value_size: size_of::<LineState>() as u32,
    },
];
