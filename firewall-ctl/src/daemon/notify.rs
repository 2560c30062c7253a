//! systemd's notification protocol (`Type=notify`): READY once the wall
//! stands and the API answers, STATUS now and then, WATCHDOG while the
//! engine answers, STOPPING when the daemon begins to stop. Without
//! NOTIFY_SOCKET (not under systemd) every call does nothing.

use std::{sync::Arc, time::Duration};

use sd_notify::NotifyState;

use super::Shared;

/// How often STATUS is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(10);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("systemd notification failed: {e}");
    }
}

/// Serving: at start, and again after a reload (applied or refused).
pub(super) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub(super) fn reloading() {
    send(&[NotifyState::Reloading, NotifyState::Status("reloading")]);
}

pub(super) fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub(super) fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Keeps STATUS current and, when systemd asks for it (WatchdogSec=),
/// pets the watchdog at half its interval — only while the engine answers a
/// call, so a daemon whose engine is stuck gets restarted.
pub(super) async fn keep_alive(shared: Arc<Shared>) {
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    let mut since_status = Duration::MAX;
    loop {
        let census = tokio::time::timeout(every, shared.engine.call(|e| e.census())).await;
        match census {
            Ok(Ok(c)) => {
                let mut states = Vec::new();
                if watchdog.is_some() {
                    states.push(NotifyState::Watchdog);
                }
                let status;
                if since_status >= STATUS_EVERY {
                    status = format!(
                        "up: {} sessions, {} connection objects",
                        c.sessions,
                        c.objects.values().sum::<u64>()
                    );
                    states.push(NotifyState::Status(&status));
                    since_status = Duration::ZERO;
                }
                if !states.is_empty() {
                    send(&states);
                }
            }
            _ => log::warn!("the engine did not answer within {every:?}: watchdog not petted"),
        }
        tokio::time::sleep(every).await;
        since_status = since_status.saturating_add(every);
    }
}
