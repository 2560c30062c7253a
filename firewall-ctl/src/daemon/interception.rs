//! Intercepting outbound FTP control connections for the proxy (and the
//! listeners of published FTP servers), with the kernel's forwarding of
//! their plain lines.

use std::{net::Ipv4Addr, sync::Arc};

use firewall_common::intercept::{InterceptConf, InterceptKey, InterceptValue};

use super::{ftp_calls::FtpCalls, Shared, State};
use crate::{
    config::Config,
    datapath::{Datapath, InterceptTables, LineMaps},
    netif::Interface,
    primary::{self, Interception},
    routing::LocalDelivery,
};

/// Intercepts the primary connections of the FTP filter's ports (or turns
/// interception off when the filter is off).
pub(super) fn start(
    dp: &mut Datapath,
    config: &Config,
    internal: &Interface,
    external: &Interface,
    shared: &Arc<Shared>,
    state: &mut State,
    resumed: Vec<primary::Handed>,
) -> anyhow::Result<Option<primary::Proxy>> {
    let mut tables = InterceptTables::open(dp.pins())?;
    if config.ftp_ports.is_empty() {
        tables.set(InterceptConf::default(), &[])?;
        if !resumed.is_empty() {
            log::warn!(
                "FTP filter off: {} handed-over control connections end",
                resumed.len()
            );
        }
        log::info!("FTP filter off: no interception");
        return Ok(None);
    }
    let delivery = LocalDelivery {
        fwmark: config.fwmark,
        table: config.route_table,
    };
    // Recorded first, so that `down` removes it even if `up` dies halfway.
    state.local_delivery = Some(delivery);
    state.write()?;
    delivery.install()?;
    let (listener, at) = primary::listener()?;
    // Read in place, outbound control connections are not intercepted
    // (`ftp_in_place`); published servers' still are.
    let intercepted: &[u16] = if config.ftp_in_place {
        &[]
    } else {
        &config.ftp_ports
    };
    let ports: Vec<(InterceptKey, InterceptValue)> = intercepted
        .iter()
        .map(|p| {
            (
                InterceptKey::new(firewall_common::IPPROTO_TCP, *p),
                InterceptValue {
                    listener_addr: at.ip().octets(),
                    listener_port: at.port(),
                    _pad: 0,
                },
            )
        })
        .collect();
    tables.set(
        InterceptConf {
            mark: config.fwmark,
            egress_ifindex: external.index,
        },
        &ports,
    )?;
    dp.attach_interception(internal, &listener)?;
    // Published FTP servers: listeners on their external ports, so that a
    // taken port fails `up` with everything else. The daemon connects to
    // them from the internal address.
    let internal_addr = internal.addresses().next();
    if internal_addr.is_none() && config.published.iter().any(|p| p.ftp) {
        anyhow::bail!(
            "{} has no IPv4 address to connect to the published FTP servers from",
            internal.name
        );
    }
    let internal_addr = internal_addr.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let published = config
        .published
        .iter()
        .filter(|p| p.ftp)
        .map(|p| primary::published_listener(config.external_addresses[0], p.port, p.server))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for p in &published {
        log::info!(
            "published FTP server {} through the FTP filter (full proxy from {})",
            p.server,
            internal_addr
        );
    }
    let (lines, kernel_lines) = kernel_lines(dp, config, &resumed)?;
    let ctx = Arc::new(Interception {
        api: Arc::new(FtpCalls::for_daemon(shared)),
        stats: shared.ftp.clone(),
        external: config.external_addresses[0],
        internal: internal_addr,
        ftp_ports: config.ftp_ports.clone(),
        ftp_user_mode: config.ftp_user_mode,
        lines,
        kernel_lines,
    });
    log::info!(
        "FTP filter on: TCP ports {:?} from {} intercepted (listener {at}, fwmark {:#x}, table {})",
        intercepted,
        internal.name,
        config.fwmark,
        config.route_table
    );
    Ok(Some(primary::Proxy::start(
        listener,
        ctx,
        resumed,
        published,
        shared.controls.clone(),
    )?))
}

/// The maps of control lines forwarded in the kernel, and whether its
/// verdict is attached (when the configuration asks for it). The maps are
/// opened for handed-over connections whose lines the kernel forwarded even
/// when not.
fn kernel_lines(
    dp: &mut Datapath,
    config: &Config,
    resumed: &[primary::Handed],
) -> anyhow::Result<(Option<Arc<LineMaps>>, bool)> {
    let in_use: Vec<u32> = resumed
        .iter()
        .filter_map(|h| h.lines.as_ref())
        .flat_map(|l| l.slots)
        .collect();
    if !config.ftp_kernel_lines && in_use.is_empty() {
        log::info!(
            "FTP control lines: every line through the daemon (ftp.control_lines = \"user\")"
        );
        return Ok((None, false));
    }
    let maps = Arc::new(LineMaps::open(dp.pins(), &in_use)?);
    // An optimisation: without it every line goes through the daemon.
    let attached = config.ftp_kernel_lines
        && match dp.attach_ftp_lines() {
            Ok(()) => {
                log::info!("FTP control lines: plain commands and replies forwarded in the kernel");
                true
            }
            Err(e) => {
                log::warn!("FTP control lines: every line through the daemon: {e:#}");
                false
            }
        };
    Ok((Some(maps), attached))
}
