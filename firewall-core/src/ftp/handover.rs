//! A control connection's filter state handed from a restarting daemon to
//! the next one (with the connection's sockets), and taken up again.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use super::{
    lines::{Lines, Replies},
    session_host, Control, FtpStats, Opening, Secondaries, Tally,
};
use crate::{error::ApiError, flags::ConnFlags};

/// A control connection's filter state between two reads, as a restarting
/// daemon hands it to the next one (with the connection's two sockets).
/// The calls' ids are not in it: the next daemon's engine starts afresh.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControlState {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
    pub external: Ipv4Addr,
    extra_flags: ConnFlags,
    #[serde(default)]
    pub published: bool,
    from_client: Lines,
    from_server: Lines,
    replies: Replies,
    dropping_reply: bool,
    tally: Tally,
    /// Openings announced but not yet used, to be made again by the next
    /// daemon (see `ControlState::keep_pending`).
    #[serde(default)]
    pending: Vec<Opening>,
    /// Read in place (`Control::in_place`).
    #[serde(default)]
    in_place: bool,
}

impl ControlState {
    /// The openings handed on with the connection.
    pub fn pending(&self) -> &[Opening] {
        &self.pending
    }

    /// Keeps only the openings `waiting` says no connection has used (asked
    /// of the engine as late as possible: one used meanwhile would be made
    /// again for nothing, and expire).
    pub fn keep_pending(&mut self, waiting: impl Fn(u64) -> bool) {
        self.pending.retain(|o| waiting(o.id()));
    }

    /// Without the lines it was reading: a connection read in place is
    /// taken up by the next daemon from the translation the datapath has
    /// (`firewall_core::in_place`), where the sender sends again whatever
    /// the filter held.
    pub fn between_lines(mut self) -> Self {
        self.from_client = Lines::default();
        self.from_server = Lines::default();
        self.replies = Replies::default();
        self.dropping_reply = false;
        self
    }
}

impl Control {
    /// What the next daemon needs to go on filtering this connection. The
    /// pinholes it made stay the engine's (whatever became a connection
    /// stays in the kernel; unused ones go with the engine, and the next
    /// daemon makes them again: `ControlState::keep_pending`).
    pub fn hand_over(mut self) -> ControlState {
        let pending = std::mem::take(&mut self.opened);
        ControlState {
            client: self.client,
            server: self.server,
            external: self.external,
            extra_flags: self.extra_flags,
            published: self.published,
            from_client: std::mem::take(&mut self.from_client),
            from_server: std::mem::take(&mut self.from_server),
            replies: std::mem::take(&mut self.replies),
            dropping_reply: self.dropping_reply,
            tally: self.tally,
            pending,
            in_place: self.in_place,
        }
    }

    /// Goes on filtering a connection a previous daemon handed over, in a
    /// session of this daemon's engine (not counted again as a new control
    /// connection), with the openings it announced that were not used yet
    /// made again where they were announced.
    pub fn resume(
        api: Arc<dyn Secondaries>,
        stats: Arc<FtpStats>,
        state: ControlState,
    ) -> Result<Self, ApiError> {
        let session = api.session(*session_host(state.published, &state.client, &state.server))?;
        let mut c = Self {
            api,
            stats,
            session,
            client: state.client,
            server: state.server,
            external: state.external,
            extra_flags: state.extra_flags,
            published: state.published,
            in_place: state.in_place,
            from_client: state.from_client,
            from_server: state.from_server,
            replies: state.replies,
            dropping_reply: state.dropping_reply,
            opened: Vec::new(),
            tally: state.tally,
        };
        c.reopen(state.pending);
        Ok(c)
    }
}
