//! Test support: packet building and checking, network namespace switching,
//! the BPF_PROG_RUN fixture network, and a harness around the real daemon.

pub mod daemon;
pub mod fixture;
pub mod ftp;
pub mod ftp_load;
pub mod netns;
pub mod notify;
pub mod packet;
pub mod tftp;
pub mod traffic;

pub use firewall_lab as lab;

use std::sync::{Mutex, MutexGuard};

/// The firewall pins under one global directory, so lab tests that run the
/// daemon take turns.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fails the test with a message naming a missing prerequisite, instead of skipping.
pub fn require_root() {
    assert!(
        firewall_lab::is_root(),
        "these tests need root (BPF, network namespaces): run `cargo xtask test` as root"
    );
}
