//! Starting (or turning off) the reading of FTP control connections in
//! place (`[ftp] control = "in-place"`).

use std::sync::Arc;

use crate::{
    config::Config,
    datapath::{Datapath, InPlaceMaps},
    flags::ConnFlags,
    in_place::{self, InPlace},
};

use super::{ftp_calls::FtpCalls, Shared};

/// The in-place programs loaded and the FTP ports' new connections marked
/// for them, with the daemon's thread reading what they hand over; or,
/// when the configuration does not ask for it, no port marked (a previous
/// daemon's pinned ports cleared).
/// `resumed`: the connections a previous daemon handed over.
pub(super) fn start(
    dp: &mut Datapath,
    config: &Config,
    shared: &Arc<Shared>,
    resumed: Vec<in_place::Handed>,
) -> anyhow::Result<Option<InPlace>> {
    let mut maps = InPlaceMaps::open(dp.pins())?;
    if !config.ftp_in_place || config.ftp_ports.is_empty() {
        maps.set_ports(&[])?;
        return Ok(None);
    }
    // The programs before the ports: a connection marked in place is
    // tail-called into them from its first segment on.
    dp.load_in_place()?;
    let ring = dp
        .segments
        .take()
        .ok_or_else(|| anyhow::anyhow!("the INPLACE_SEGMENTS ring is taken already"))?;
    let ctx = in_place::Context {
        api: Arc::new(FtpCalls::for_daemon(shared)),
        stats: shared.ftp.clone(),
        extra_flags: if config.ftp_user_mode {
            ConnFlags::NO_KERNEL_MODE
        } else {
            ConnFlags::empty()
        },
    };
    let task = InPlace::start(ring, dp.pins(), ctx, resumed)?;
    maps.set_ports(&config.ftp_ports)?;
    log::info!(
        "FTP control connections to TCP ports {:?} forwarded in place (the datapath hands the daemon the lines the filter acts on)",
        config.ftp_ports
    );
    Ok(Some(task))
}
