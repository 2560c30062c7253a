//! The errors of the API's calls: a stable kind (kebab-case in JSON) and a
//! message naming what was wrong.

use serde::{Deserialize, Serialize};

/// The kinds of errors the API distinguishes (stable, kebab-case in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request could not be parsed or has the wrong version.
    BadRequest,
    InvalidArgument,
    /// The allowed-address policy refuses a target (FTP-bounce guard).
    AccessDenied,
    /// The protocol rules do not allow the session's client this protocol.
    ProtocolDenied,
    /// The requested port is taken, or a filter denied the bind.
    AddressInUse,
    /// The address is not one of the firewall's (or a routable client's).
    AddressNotAvailable,
    /// No port (block) is free, or a table is full.
    Exhausted,
    /// The session's client has its quota of concurrent secondary
    /// connections (FWX_E_IS_BUSY).
    Busy,
    /// A call outside the event contexts it supports.
    BadContext,
    /// A connection is already emulated by a filter.
    AlreadyEmulated,
    /// EmulateConnection on a connection whose bind was not emulated.
    NotEmulated,
    /// The daemon is shutting down.
    Terminating,
    /// Something failed inside the daemon (kernel, maps).
    Internal,
    /// No daemon answers on the socket (client side only).
    NotRunning,
    /// `up` while another daemon answers on the socket.
    AlreadyRunning,
    /// A valid combination this firewall does not implement (yet).
    NotSupported,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::AccessDenied => "access-denied",
            ErrorKind::ProtocolDenied => "protocol-denied",
            ErrorKind::AddressInUse => "address-in-use",
            ErrorKind::AddressNotAvailable => "address-not-available",
            ErrorKind::Exhausted => "exhausted",
            ErrorKind::Busy => "busy",
            ErrorKind::BadContext => "bad-context",
            ErrorKind::AlreadyEmulated => "already-emulated",
            ErrorKind::NotEmulated => "not-emulated",
            ErrorKind::Terminating => "terminating",
            ErrorKind::Internal => "internal",
            ErrorKind::NotRunning => "not-running",
            ErrorKind::AlreadyRunning => "already-running",
            ErrorKind::NotSupported => "not-supported",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error, PartialEq)]
#[error("{}: {message}", kind.as_str())]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}
