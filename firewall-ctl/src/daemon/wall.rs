//! Raising the wall at `up`: its settings into the datapath, and only then
//! forwarding on, so that no packet is ever forwarded unfiltered.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _};
use firewall_common::wall::{PublishKey, PublishValue, WallConf};

use crate::{
    config::Config,
    datapath::{PinPaths, WallTables},
    netif::{self, Interface},
};

/// The firewall's own connections take their source ports from
/// `net.ipv4.ip_local_port_range`; a translated connection must never get one
/// of them, or the datapath would take the replies of a local connection.
pub fn check_nat_ports(config: &Config) -> anyhow::Result<()> {
    let key = "net.ipv4.ip_local_port_range";
    let text = netif::read_sysctl(key)?;
    let (lo, hi) = parse_range(&text).with_context(|| format!("reading {key} ({text:?})"))?;
    let nat = &config.nat_port_range;
    if *nat.start() <= hi && lo <= *nat.end() {
        bail!(
            "nat.ports {}-{} overlaps this host's ephemeral ports ({key} = {lo}-{hi}): choose a range outside it",
            nat.start(),
            nat.end()
        );
    }
    Ok(())
}

fn parse_range(text: &str) -> anyhow::Result<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) if lo <= hi => Ok((lo, hi)),
        _ => bail!("not two ports"),
    }
}

/// The wall's settings for this configuration: new outbound connections
/// from `outbound_from` leave through `external`, translated to the first
/// external address.
fn conf(config: &Config, external: &Interface) -> anyhow::Result<WallConf> {
    let mut secret = [0u8; 4];
    getrandom::fill(&mut secret)
        .map_err(|e| anyhow::anyhow!("a random secret for the NAT port selection: {e}"))?;
    Ok(WallConf {
        nat_addr: config.external_addresses[0].octets(),
        nat_port_lo: *config.nat_port_range.start(),
        nat_port_hi: *config.nat_port_range.end(),
        external_ifindex: external.index,
        port_secret: u32::from_ne_bytes(secret),
    })
}

/// Writes the wall's settings, then turns forwarding on (the datapath is
/// attached before: from the first forwarded packet on, the wall stands).
/// The sysctls it changes go into `saved` with their old values, for `down`.
pub fn raise(
    pins: &PinPaths,
    config: &Config,
    internal: &Interface,
    external: &Interface,
    saved: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let conf = conf(config, external)?;
    let published = published(config, internal);
    let mut tables = WallTables::open(pins)?;
    tables
        .set_tftp(&config.tftp_ports)
        .context("writing the TFTP helper's ports")?;
    tables
        .set(
            conf,
            &config.outbound_from,
            &config.datapath_rules(),
            &published,
        )
        .context("writing the wall's settings")?;
    for r in &config.rules {
        log::info!("rule: {}", r.describe());
    }
    match config.tftp_ports.as_slice() {
        [] => log::info!("TFTP helper: off"),
        ports => log::info!("TFTP helper: answers to requests to port {ports:?}"),
    }
    for p in &config.published {
        log::info!(
            "published: {:?} {}:{} -> {}",
            p.transport,
            config.external_addresses[0],
            p.port,
            p.server
        );
    }
    netif::set_sysctls(&netif::forwarding_sysctls(&[internal, external]), saved)
}

/// The published servers as the datapath holds them.
fn published(config: &Config, internal: &Interface) -> Vec<(PublishKey, PublishValue)> {
    config
        .published
        .iter()
        // An FTP server's connections go through the daemon's filter.
        .filter(|p| !p.ftp)
        .map(|p| {
            (
                PublishKey::new(
                    p.transport.ipproto(),
                    config.external_addresses[0].octets(),
                    p.port,
                ),
                PublishValue {
                    server_addr: p.server.ip().octets(),
                    server_port: p.server.port(),
                    _pad: 0,
                    egress_ifindex: internal.index,
                },
            )
        })
        .collect()
}

/// A reloaded configuration's sources, rules, published servers and TFTP
/// helper ports into the running wall (its settings, the NAT address and ports, stay).
pub fn reapply(pins: &PinPaths, config: &Config, internal: &Interface) -> anyhow::Result<()> {
    let mut tables = WallTables::open(pins)?;
    tables
        .update(
            &config.outbound_from,
            &config.datapath_rules(),
            &published(config, internal),
        )
        .context("updating the wall's sources, rules and published servers")?;
    tables
        .set_tftp(&config.tftp_ports)
        .context("updating the TFTP helper's ports")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sysctl_reads_as_two_ports() {
        assert_eq!(parse_range("32768\t60999\n").unwrap(), (32768, 60999));
        assert!(parse_range("32768").is_err());
        assert!(parse_range("9 8").is_err());
        assert!(parse_range("1 2 3").is_err());
    }
}
