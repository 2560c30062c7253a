//! The engine's timers, kept as ordered deadlines so that a tick costs what
//! is due, not what is live: TIMEOUT of unused pinholes, idle checks of
//! established kernel-mode connections, the closing time of flows whose
//! connection has ended, and forgetting ended objects.
//!
//! A tick has two halves so that the kernel's flow table is read without the
//! engine's lock: `timers_due` names the flows whose last-seen times are
//! needed, the daemon reads them (and a bounded batch of the table, the
//! safety net for flows whose events were lost or that an earlier daemon
//! left), and `timers_apply` decides.

use std::collections::{BTreeMap, HashMap};

use firewall_common::{
    flow::{FlowKey, FlowValue},
    pinhole::pinhole_flags,
};

use super::{Engine, Maps, Mode, State, FORGET_AFTER};
use crate::{
    error::ApiError,
    flags::ConnFlags,
    policy::Transport,
    sweeper::{self, Expiry},
};

/// How long after a pinhole was seen used without its establishment event
/// the engine stops waiting for the event.
const EVENT_GRACE_NS: u64 = 1_000_000_000;

/// Something to do at a deadline. Timers are not cancelled: one that comes
/// due for an object that has moved on does nothing.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Timer {
    /// An unused endpoint's TIMEOUT (kernel pinhole or user-mode listener).
    PinholeTimeout(u64),
    /// A pinhole was taken used, but its connection was not reported: end
    /// the object if that is still so (the datapath could not create flows).
    AwaitEstablished(u64, &'static str),
    /// An established kernel-mode connection's idle check.
    Idle(u64),
    /// The flows of an ended connection, removed once quiet for tcp_closing
    /// (a late ACK or retransmitted FIN still gets through meanwhile).
    Linger { owner: u64, keys: Vec<FlowKey> },
    /// An ended object, forgotten FORGET_AFTER after it ended.
    Forget(u64),
}

#[derive(Default)]
pub(super) struct Timers {
    queue: BTreeMap<(u64, u64), Timer>,
    seq: u64,
    /// Taken by `timers_due`, waiting for `timers_apply`.
    pending: Vec<Timer>,
}

impl Timers {
    pub(super) fn at(&mut self, due_ns: u64, t: Timer) {
        self.seq += 1;
        self.queue.insert((due_ns, self.seq), t);
    }

    pub(super) fn pop_due(&mut self, now_ns: u64) -> Vec<Timer> {
        let later = self.queue.split_off(&(now_ns.saturating_add(1), 0));
        std::mem::replace(&mut self.queue, later)
            .into_values()
            .collect()
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }
}

/// Flow values read for a tick: `None` for a key the table does not hold.
pub type Readings = HashMap<FlowKey, Option<FlowValue>>;

impl<M: Maps> Engine<M> {
    /// Timers due at `now_ns`: the flows whose values `timers_apply` needs.
    pub fn timers_due(&mut self, now_ns: u64) -> Vec<FlowKey> {
        let due = self.timers.pop_due(now_ns);
        let mut keys = Vec::new();
        for t in &due {
            match t {
                Timer::Idle(id) => {
                    if let Some(o) = self.objects.get(id) {
                        keys.extend(o.flows.iter().copied());
                    }
                }
                Timer::Linger { keys: k, .. } => keys.extend(k.iter().copied()),
                _ => {}
            }
        }
        self.timers.pending.extend(due);
        keys
    }

    /// Runs the due timers with the flow values read for them, then applies
    /// the flow-table rules (idle, TCP teardown) to a batch of the table.
    pub fn timers_apply(
        &mut self,
        now_ns: u64,
        readings: &Readings,
        batch: &[(FlowKey, FlowValue)],
    ) -> Result<(), ApiError> {
        let mut gone: Vec<(FlowKey, Expiry)> = Vec::new();
        for t in std::mem::take(&mut self.timers.pending) {
            match t {
                Timer::Forget(id) => self.forget(id),
                Timer::PinholeTimeout(id) => self.pinhole_timeout(id, now_ns)?,
                Timer::AwaitEstablished(id, reason) => {
                    if self
                        .objects
                        .get(&id)
                        .is_some_and(|o| o.state == State::Listening)
                    {
                        log::debug!("connection {id}: used, but never reported; ending it");
                        self.terminate(id, reason);
                    }
                }
                Timer::Idle(id) => self.idle_check(id, now_ns, readings, &mut gone),
                Timer::Linger { owner, keys } => {
                    self.linger_check(owner, keys, now_ns, readings, &mut gone)
                }
            }
        }
        self.sweep_batch(batch, now_ns, &mut gone);
        self.remove_flows(gone, now_ns)
    }

    /// The whole tick at once, reading through `Maps` (tests and in-process
    /// use; the daemon reads the kernel outside the engine's lock).
    pub fn tick(&mut self, now_ns: u64) -> Result<(), ApiError> {
        let keys = self.timers_due(now_ns);
        let mut readings = Readings::new();
        for k in keys {
            readings.insert(k, self.maps.get_flow(&k)?);
        }
        let batch = self.maps.flows()?;
        self.timers_apply(now_ns, &readings, &batch)
    }

    /// An unused endpoint past its TIMEOUT ends; one whose pinhole a packet
    /// used meanwhile waits for its establishment event instead.
    pub(super) fn pinhole_timeout(&mut self, id: u64, now_ns: u64) -> Result<(), ApiError> {
        let Some(o) = self.objects.get_mut(&id) else {
            return Ok(());
        };
        if o.state != State::Listening {
            return Ok(());
        }
        if o.mode == Mode::Kernel {
            if let Some(key) = o.pinhole.take() {
                let taken = self.maps.take_pinhole(&key)?;
                if taken.is_some_and(|v| pinhole_used(&v)) {
                    self.timers.at(
                        now_ns + EVENT_GRACE_NS,
                        Timer::AwaitEstablished(id, "timeout"),
                    );
                    return Ok(());
                }
            }
        }
        self.terminate(id, "timeout");
        self.expired.pinholes_timed_out += 1;
        Ok(())
    }

    /// Ends `id` if its flows have been quiet for its idle timeout, else
    /// checks again when they would be.
    pub(super) fn idle_check(
        &mut self,
        id: u64,
        now_ns: u64,
        readings: &Readings,
        gone: &mut Vec<(FlowKey, Expiry)>,
    ) {
        let Some(o) = self.objects.get(&id) else {
            return;
        };
        if o.state != State::Established || o.mode != Mode::Kernel {
            return;
        }
        let Some(idle) = self.idle_timeout(o.transport, o.flags) else {
            return;
        };
        if o.flows.iter().any(|k| !readings.contains_key(k)) {
            // Not read this time: look again in a second.
            self.timers.at(now_ns + 1_000_000_000, Timer::Idle(id));
            return;
        }
        // Its flows still in the table and not taken over by a new
        // connection reusing the 5-tuple.
        let (mut ours, mut last) = (Vec::new(), 0);
        for k in &o.flows {
            if let Some(Some(v)) = readings.get(k) {
                if v.owner == id {
                    ours.push(*k);
                    last = last.max(v.last_seen_ns);
                }
            }
        }
        let why = match o.transport {
            Transport::Tcp => Expiry::TcpIdle,
            Transport::Udp => Expiry::UdpIdle,
        };
        if ours.is_empty() {
            // Evicted or taken over: nothing of it is left to forward.
            self.terminate(id, "closed");
        } else if now_ns.saturating_sub(last) < idle {
            self.timers.at(last + idle, Timer::Idle(id));
        } else {
            log::debug!("connection {id}: idle");
            if let Some(o) = self.objects.get_mut(&id) {
                o.flows.retain(|k| ours.contains(k));
            }
            // Removed below; the connection ends when its last flow goes.
            gone.extend(ours.iter().map(|k| (*k, why)));
        }
    }

    /// How long an established kernel-mode connection may be quiet; None:
    /// until Kill (UDP without TIMEOUT).
    pub(super) fn idle_timeout(&self, t: Transport, flags: ConnFlags) -> Option<u64> {
        let to = &self.cfg.timeouts;
        match t {
            Transport::Tcp => Some(to.tcp_established.as_nanos() as u64),
            Transport::Udp if flags.contains(ConnFlags::TIMEOUT) => {
                Some(to.udp_pinhole_idle.as_nanos() as u64)
            }
            Transport::Udp => None,
        }
    }

    pub(super) fn linger_check(
        &mut self,
        owner: u64,
        keys: Vec<FlowKey>,
        now_ns: u64,
        readings: &Readings,
        gone: &mut Vec<(FlowKey, Expiry)>,
    ) {
        let closing = self.cfg.timeouts.tcp_closing.as_nanos() as u64;
        // Still ours: in the table, not taken over by a new connection.
        let ours: Vec<(FlowKey, Option<u64>)> = keys
            .into_iter()
            .filter_map(|k| match readings.get(&k) {
                None => Some((k, None)),
                Some(Some(v)) if v.owner == owner => Some((k, Some(v.last_seen_ns))),
                Some(_) => None,
            })
            .collect();
        if ours.is_empty() {
            return;
        }
        if ours.iter().any(|(_, seen)| seen.is_none()) {
            // Not read this time: look again in a second.
            let keys = ours.into_iter().map(|(k, _)| k).collect();
            self.timers
                .at(now_ns + 1_000_000_000, Timer::Linger { owner, keys });
            return;
        }
        let last = ours.iter().filter_map(|(_, s)| *s).max().unwrap_or(0);
        let keys: Vec<FlowKey> = ours.into_iter().map(|(k, _)| k).collect();
        if now_ns.saturating_sub(last) >= closing {
            gone.extend(keys.into_iter().map(|k| (k, Expiry::TcpClosed)));
        } else {
            self.timers
                .at(last + closing, Timer::Linger { owner, keys });
        }
    }

    /// The flow-table rules on a batch of entries: flows whose events were
    /// lost, flows an earlier daemon left, anything the timers do not know.
    pub(super) fn sweep_batch(
        &mut self,
        batch: &[(FlowKey, FlowValue)],
        now_ns: u64,
        gone: &mut Vec<(FlowKey, Expiry)>,
    ) {
        let t = self.cfg.timeouts;
        for (key, why) in sweeper::expired(batch, now_ns, &t) {
            let owned_by = self
                .flow_owner
                .get(&key)
                .and_then(|id| self.objects.get(id));
            // A UDP connection made through a pinhole lives until Kill unless
            // it was opened with TIMEOUT (its own idle timer then applies).
            if why == Expiry::UdpIdle && owned_by.is_some() {
                continue;
            }
            if !gone.iter().any(|(g, _)| *g == key) {
                gone.push((key, why));
            }
        }
    }

    /// Deletes expired flows (one batch), counts them, and ends the
    /// connections that had them. A flow that carried a packet after the
    /// tick began (`now_ns`) stays: it was read before a new connection
    /// took it up (a SYN reusing its 5-tuple), and deleting it would end
    /// that connection.
    pub(super) fn remove_flows(
        &mut self,
        mut gone: Vec<(FlowKey, Expiry)>,
        now_ns: u64,
    ) -> Result<(), ApiError> {
        if gone.is_empty() {
            return Ok(());
        }
        // Both entries of such a flow stay (the answers' one may not have
        // carried a packet yet).
        let mut used = Vec::new();
        for (key, _) in &gone {
            if let Some(v) = self.maps.get_flow(key)? {
                if v.last_seen_ns > now_ns {
                    used.push(*key);
                    used.push(sweeper::reply_key(key, &v));
                }
            }
        }
        if !used.is_empty() {
            log::debug!("{} expired flows used again since read: kept", used.len());
            gone.retain(|(k, _)| !used.contains(k));
            if gone.is_empty() {
                return Ok(());
            }
        }
        let keys: Vec<FlowKey> = gone.iter().map(|(k, _)| *k).collect();
        self.maps.del_flows(&keys)?;
        let mut ended: Vec<u64> = Vec::new();
        for (key, why) in gone {
            self.expired.add(why);
            if let Some(id) = self.flow_owner.remove(&key) {
                if let Some(o) = self.objects.get_mut(&id) {
                    o.flows.retain(|k| *k != key);
                    if o.flows.is_empty() && o.state == State::Established && !ended.contains(&id) {
                        ended.push(id);
                    }
                }
            }
        }
        for id in ended {
            self.terminate(id, "closed");
        }
        Ok(())
    }

    pub(super) fn forget(&mut self, id: u64) {
        let Some(o) = self.objects.get(&id) else {
            return;
        };
        if o.state != State::Terminated {
            return;
        }
        let parent = o.parent;
        self.objects.remove(&id);
        if let Some(p) = parent.and_then(|p| self.objects.get_mut(&p)) {
            p.children.retain(|c| *c != id);
        }
    }

    /// Schedules forgetting an object that just ended.
    pub(super) fn forget_later(&mut self, id: u64, ended_ns: u64) {
        self.timers
            .at(ended_ns + FORGET_AFTER.as_nanos() as u64, Timer::Forget(id));
    }

    /// Timers waiting (for status and tests).
    pub fn timers_waiting(&self) -> usize {
        self.timers.len()
    }
}

/// Whether a packet used the pinhole: a single-use one that a first packet
/// won, or any that established a connection.
pub(super) fn pinhole_used(v: &firewall_common::pinhole::PinholeValue) -> bool {
    v.uses > 0 || (v.flags & pinhole_flags::MULTIPLE == 0 && v.remaining == 0)
}
