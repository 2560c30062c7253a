//! Time, as the engine sees it: CLOCK_MONOTONIC nanoseconds (the clock of
//! the datapath's `bpf_ktime_get_coarse_ns`), passed in so that the engine
//! reads no clock of its own and its tests can move time at will.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

pub trait Clock: Send + Sync {
    /// Now, in nanoseconds of the monotonic clock.
    fn now_ns(&self) -> u64;
}

/// A clock that moves only when told (tests, simulations).
#[derive(Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn at(ns: u64) -> Self {
        Self(Arc::new(AtomicU64::new(ns)))
    }
    pub fn set(&self, ns: u64) {
        self.0.store(ns, Ordering::Relaxed);
    }
    pub fn advance(&self, ns: u64) {
        self.0.fetch_add(ns, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
