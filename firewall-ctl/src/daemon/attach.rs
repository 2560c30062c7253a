//! Where the datapath is attached, and attaching it.

use super::{State, UpOptions};
use crate::{
    config::Config,
    datapath::{self, AttachMode, Datapath, PinPaths, Side},
    netif::Interface,
};

/// The hook the datapath runs at: the one named; without one, a restart
/// keeps the running datapath's, and a fresh start chooses by the
/// interfaces' kinds (`datapath::choose`).
pub(super) fn mode(
    opts: &UpOptions,
    previous: Option<&State>,
    pins: &PinPaths,
    internal: &Interface,
    external: &Interface,
) -> AttachMode {
    if let Some(m) = opts.xdp_mode {
        return m;
    }
    if let Some(s) = previous.filter(|s| left_here(s, pins, internal, external)) {
        return s.xdp_mode;
    }
    let kind = |i: &Interface| {
        i.link_kind().unwrap_or_else(|e| {
            log::warn!("{}: cannot tell its kind ({e:#}); taken as virtual", i.name);
            Some("unknown".into())
        })
    };
    let (mode, why) = datapath::choose(kind(internal).as_deref(), kind(external).as_deref());
    log::info!("datapath at {mode:?}: {why} (--xdp-mode names another)");
    mode
}

/// Whether the datapath the daemon of `s` left pinned is on these interfaces.
pub(super) fn left_here(
    s: &State,
    pins: &PinPaths,
    internal: &Interface,
    external: &Interface,
) -> bool {
    pins.any_exists()
        && s.internal_ifindex == internal.index
        && s.external_ifindex == external.index
}

pub(super) fn start(
    pins: &PinPaths,
    config: &Config,
    internal: &Interface,
    external: &Interface,
    mode: AttachMode,
    adopt: bool,
) -> anyhow::Result<Datapath> {
    let mut dp = Datapath::load(
        pins,
        datapath::MapSizes {
            flows: config.flow_table_size,
            pinholes: config.pinhole_table_size,
        },
    )?;
    dp.attach(Side::Internal, internal, mode, adopt)?;
    dp.attach(Side::External, external, mode, adopt)?;
    Ok(dp)
}
