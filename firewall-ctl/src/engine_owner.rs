//! The engine's one owner: a thread that runs every engine call in turn and
//! carries out their effects, reached through a cloneable `EngineHandle`.
//!
//! The engine writes the kernel's maps itself (a pinhole per call, flow
//! deletions per tick); owning it from one thread means nothing waits on a
//! lock while another caller is in a syscall, and callers that are async
//! tasks (the API, the relay) never block a runtime worker: they await the
//! answer. Calls queue in the order they are made and run one after another,
//! so the engine's state is never seen half-changed; a call's effects are
//! carried out before its caller gets the answer (a relay endpoint listens
//! before the FTP filter forwards the reply that names it).

use std::sync::{mpsc as std_mpsc, Arc};

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{
    api::{ApiError, ErrorKind},
    engine::{Effects, Engine, Event, Maps, RelayCmd},
    relay::{ConnectionHook, Relay},
};

/// A call: runs on the engine and returns the delivery of its answer, made
/// once the effects are out.
type Call<M> = Box<dyn FnOnce(&mut Engine<M>) -> Reply + Send>;
type Reply = Box<dyn FnOnce() + Send>;

enum Message<M: Maps> {
    Call(Call<M>),
    Stop,
}

/// Where the engine's effects go.
pub struct Outlets {
    /// Relayed (user-mode) connections.
    pub relay: Relay,
    /// Followers of `firewall-ctl events`.
    pub events: broadcast::Sender<Event>,
    /// Where the relay's work is started (tokio tasks).
    pub runtime: tokio::runtime::Handle,
}

/// The way to the engine. Cheap to clone.
pub struct EngineHandle<M: Maps> {
    tx: mpsc::UnboundedSender<Message<M>>,
}

impl<M: Maps> Clone for EngineHandle<M> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

fn gone() -> ApiError {
    ApiError::new(ErrorKind::Terminating, "the engine has stopped")
}

impl<M: Maps + Send + 'static> EngineHandle<M> {
    /// Starts the owner thread. It runs until `stop` (or until every handle
    /// is dropped).
    pub fn spawn(engine: Engine<M>, outlets: Outlets) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = Self { tx };
        let for_thread = handle.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || run(engine, rx, outlets, for_thread))?;
        Ok(handle)
    }

    /// Runs `f` on the engine and waits for its answer.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine<M>) -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.await.map_err(|_| gone())
    }

    /// `call` for a thread that is not a runtime worker and may wait (the
    /// FTP proxy's own thread).
    pub fn call_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine<M>) -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        let (tx, rx) = std_mpsc::sync_channel(1);
        self.submit(f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().map_err(|_| gone())
    }

    /// Queues `f`; `deliver` gets its result once the effects are out.
    fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine<M>) -> R + Send + 'static,
        deliver: impl FnOnce(R) + Send + 'static,
    ) -> Result<(), ApiError> {
        self.tx
            .send(Message::Call(Box::new(move |e| {
                let r = f(e);
                Box::new(move || deliver(r))
            })))
            .map_err(|_| gone())
    }

    /// Runs `f` on the engine without waiting (events to hand over).
    pub fn send(&self, f: impl FnOnce(&mut Engine<M>) + Send + 'static) {
        let _ = self.submit(f, |()| {});
    }

    /// Ends the owner thread once the calls queued before this one ran.
    pub fn stop(&self) {
        let _ = self.tx.send(Message::Stop);
    }

    /// The hook a relay job raises its connections' events through.
    fn hook(&self) -> ConnectionHook {
        let handle = self.clone();
        Arc::new(move |owner, kind, address| {
            let handle = handle.clone();
            Box::pin(async move {
                handle
                    .call(move |e| e.on_connection_event(owner, kind, address))
                    .await?
            })
        })
    }
}

fn run<M: Maps + Send + 'static>(
    mut engine: Engine<M>,
    mut rx: mpsc::UnboundedReceiver<Message<M>>,
    outlets: Outlets,
    handle: EngineHandle<M>,
) {
    // The relay starts its endpoints as tasks of the daemon's runtime.
    let _runtime = outlets.runtime.enter();
    let mut replies: Vec<Reply> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        let mut stop = false;
        // Whatever queued up meanwhile runs before the effects go out (they
        // keep their order either way).
        while let Some(m) = next {
            match m {
                Message::Call(f) => replies.push(f(&mut engine)),
                Message::Stop => {
                    stop = true;
                    break;
                }
            }
            next = rx.try_recv().ok();
        }
        // Carrying out may itself change the engine (a relay endpoint that
        // fails to start is killed): until nothing is left.
        loop {
            let effects = engine.take_effects();
            if effects.is_empty() {
                break;
            }
            carry_out(&mut engine, effects, &outlets, &handle);
        }
        for reply in replies.drain(..) {
            reply();
        }
        if stop {
            return;
        }
    }
}

/// Hands the relay its work and the followers their events.
fn carry_out<M: Maps + Send + 'static>(
    engine: &mut Engine<M>,
    effects: Effects,
    outlets: &Outlets,
    handle: &EngineHandle<M>,
) {
    let relay = &outlets.relay;
    for cmd in effects.relay {
        match cmd {
            RelayCmd::Start(mut job) => {
                let owner = job.owner;
                if job.event.is_some() {
                    job.hook = Some(handle.hook());
                }
                if let Err(e) = relay.start(job) {
                    log::error!("relay for {owner} failed to start: {e}");
                    let _ = engine.kill(owner).or_else(|_| engine.cancel(owner));
                }
            }
            RelayCmd::SetTarget { owner, target } => relay.set_target(owner, target),
            RelayCmd::Stop { owner } => relay.stop(owner),
            RelayCmd::ClientBusy { client, busy } => relay.set_client_busy(client, busy),
            RelayCmd::Emulate(job) => relay.emulate(job),
            RelayCmd::StopConn { owner, conn } => relay.stop_conn(owner, conn),
            RelayCmd::Withdraw { owner, reason } => relay.withdraw(owner, reason),
        }
    }
    for e in effects.events {
        record(&e);
        let _ = outlets.events.send(e);
    }
}

/// An event as a structured log record (target `firewall::events`, debug).
fn record(e: &Event) {
    match e {
        Event::Established {
            connection,
            parent,
            session,
            protocol,
            from,
            to,
            context,
        } => tracing::debug!(
            target: "firewall::events",
            event = "established",
            connection,
            parent,
            session,
            protocol = protocol.name(),
            %from,
            %to,
            context = context.as_deref(),
        ),
        Event::Terminating {
            connection,
            session,
            reason,
        } => tracing::debug!(
            target: "firewall::events",
            event = "terminating",
            connection,
            session,
            reason = reason.as_str(),
        ),
    }
}
