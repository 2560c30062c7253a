//! The protocol helpers' keys: the FTP filter's (`[ftp]`) and the TFTP
//! helper's (`[tftp]`) server ports.

use firewall_common::tftp::TFTP_PORTS;

use super::{
    err,
    file::{FtpFile, TftpFile},
    ConfigError, DEFAULT_FTP_PORTS,
};
use crate::policy::ProtocolRule;

/// TFTP's well-known port (RFC 1350).
pub const DEFAULT_TFTP_PORTS: &[u16] = &[69];

/// Ports listed once each, none 0.
fn distinct(key: &str, ports: &[u16]) -> Result<(), ConfigError> {
    for (i, p) in ports.iter().enumerate() {
        if *p == 0 || ports[..i].contains(p) {
            return Err(err(
                format!("{key}[{i}]"),
                format!("{p} is 0 or listed twice"),
            ));
        }
    }
    Ok(())
}

/// The FTP filter's ports; empty when it is off.
pub(super) fn ftp_ports(
    ftp: &FtpFile,
    protocols: &[ProtocolRule],
) -> Result<Vec<u16>, ConfigError> {
    if !ftp.enabled.unwrap_or(true) {
        return Ok(Vec::new());
    }
    let ports = ftp
        .ports
        .clone()
        .unwrap_or_else(|| DEFAULT_FTP_PORTS.to_vec());
    if ports.is_empty() || ports.len() > 16 {
        return Err(err(
            "ftp.ports",
            "give 1 to 16 ports (or enabled = false to turn the FTP filter off)",
        ));
    }
    distinct("ftp.ports", &ports)?;
    if !protocols.iter().any(|p| p.name == "ftp") {
        return Err(err(
            "ftp.enabled",
            "the FTP filter needs a protocol named \"ftp\" in [[protocols]] (or enabled = false)",
        ));
    }
    Ok(ports)
}

/// The TFTP helper's server ports; `[]` turns it off.
pub(super) fn tftp_ports(tftp: &TftpFile) -> Result<Vec<u16>, ConfigError> {
    let ports = tftp
        .ports
        .clone()
        .unwrap_or_else(|| DEFAULT_TFTP_PORTS.to_vec());
    if ports.len() > TFTP_PORTS {
        return Err(err(
            "tftp.ports",
            format!("at most {TFTP_PORTS} ports ([] turns the TFTP helper off)"),
        ));
    }
    distinct("tftp.ports", &ports)?;
    Ok(ports)
}
