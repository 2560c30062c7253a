//! Data filters: code that sees (and may modify, hold back or end) the bytes of
//! a user-mode connection, as `IFWXDataFilter` does.
//!
//! Filters of one connection form a chain ordered by priority class, from the
//! client side (`Nat`) to the Internet side (`Emulation`). Bytes from the
//! internal side pass the chain in that order, bytes from the external side in
//! the reverse order. A connection with a data filter is never offloaded to
//! the kernel.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use serde::{Deserialize, Serialize};

/// Where a filter sits, from the client side to the Internet side (FwxDataFilterPriorityClass).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PriorityClass {
    /// SecureNAT address editors (filters that call BindForClient).
    Nat,
    Internal,
    PostTrust,
    /// Virus scanners.
    Middle,
    PreTrust,
    External,
    /// Emulators, the data source.
    Emulation,
}

/// Which way bytes travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// From the internal host (the client) toward the external side.
    FromInternal,
    /// From the external side toward the internal host.
    FromExternal,
}

/// What a filter does with bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Pass these bytes on (possibly modified, possibly fewer: a filter may
    /// hold bytes back and pass them later).
    Forward(Vec<u8>),
    /// End the connection (both sides are reset); the reason is logged.
    Close(String),
}

/// A data filter of one connection.
pub trait DataFilter: Send {
    fn name(&self) -> &str;
    /// Bytes travelling `dir`.
    fn on_data(&mut self, dir: Direction, data: Vec<u8>) -> Action;
    /// The `dir` side finished sending: a last chance to pass held bytes.
    fn on_end(&mut self, _dir: Direction) -> Action {
        Action::Forward(Vec::new())
    }
}

/// Creates a data filter for each connection it is attached to (the
/// factories registered for a protocol, as `SetDataFilterFactory` does).
pub trait DataFilterFactory: Send + Sync {
    fn name(&self) -> &str;
    fn priority(&self) -> PriorityClass;
    fn create(&self) -> Box<dyn DataFilter>;
}

/// The filters of one connection, in priority order.
pub struct Chain {
    filters: Vec<(PriorityClass, Box<dyn DataFilter>)>,
}

impl Chain {
    pub fn new(factories: &[Arc<dyn DataFilterFactory>]) -> Self {
        let mut filters: Vec<(PriorityClass, Box<dyn DataFilter>)> = factories
            .iter()
            .map(|f| (f.priority(), f.create()))
            .collect();
        // Stable: within one class, the order of attachment (the spec leaves it open).
        filters.sort_by_key(|(p, _)| *p);
        Self { filters }
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    fn order(
        &mut self,
        dir: Direction,
    ) -> Box<dyn Iterator<Item = &mut (PriorityClass, Box<dyn DataFilter>)> + '_> {
        match dir {
            Direction::FromInternal => Box::new(self.filters.iter_mut()),
            Direction::FromExternal => Box::new(self.filters.iter_mut().rev()),
        }
    }

    /// Passes bytes through every filter in order for `dir`.
    pub fn data(&mut self, dir: Direction, data: Vec<u8>) -> Action {
        let mut bytes = data;
        for (_, f) in self.order(dir) {
            match f.on_data(dir, bytes) {
                Action::Forward(b) => bytes = b,
                close => return close,
            }
        }
        Action::Forward(bytes)
    }

    /// The end of `dir`: each filter may release what it held, which the
    /// filters after it see as data.
    pub fn end(&mut self, dir: Direction) -> Action {
        let mut pending: Vec<u8> = Vec::new();
        for (_, f) in self.order(dir) {
            if !pending.is_empty() {
                match f.on_data(dir, std::mem::take(&mut pending)) {
                    Action::Forward(b) => pending = b,
                    close => return close,
                }
            }
            match f.on_end(dir) {
                Action::Forward(b) => pending.extend(b),
                close => return close,
            }
        }
        Action::Forward(pending)
    }
}

/// The sample data filter: ends transfers whose first bytes mark a Windows
/// executable ("MZ", or "ZM"), in either direction — the way an operator
/// scans FTP transfers (ISA's ExeBlock sample).
pub struct ExecutableBlocker {
    /// The first bytes of each direction, until two are known.
    head: [Vec<u8>; 2],
    decided: [bool; 2],
    blocked: Arc<AtomicU64>,
}

fn index(dir: Direction) -> usize {
    match dir {
        Direction::FromInternal => 0,
        Direction::FromExternal => 1,
    }
}

impl DataFilter for ExecutableBlocker {
    fn name(&self) -> &str {
        "block-executables"
    }

    fn on_data(&mut self, dir: Direction, data: Vec<u8>) -> Action {
        let i = index(dir);
        if self.decided[i] {
            return Action::Forward(data);
        }
        self.head[i].extend(data);
        if self.head[i].len() < 2 {
            // Hold the one byte until the second tells.
            return Action::Forward(Vec::new());
        }
        self.decided[i] = true;
        if matches!(&self.head[i][..2], b"MZ" | b"ZM") {
            self.blocked.fetch_add(1, Ordering::Relaxed);
            return Action::Close(format!(
                "a Windows executable ({}) travelling {dir:?}",
                String::from_utf8_lossy(&self.head[i][..2])
            ));
        }
        Action::Forward(std::mem::take(&mut self.head[i]))
    }

    fn on_end(&mut self, dir: Direction) -> Action {
        // A one-byte stream is no executable.
        let i = index(dir);
        self.decided[i] = true;
        Action::Forward(std::mem::take(&mut self.head[i]))
    }
}

/// Makes an `ExecutableBlocker` per connection and counts what they blocked.
pub struct ExecutableBlockerFactory {
    pub blocked: Arc<AtomicU64>,
}

impl DataFilterFactory for ExecutableBlockerFactory {
    fn name(&self) -> &str {
        "block-executables"
    }

    fn priority(&self) -> PriorityClass {
        // Where ISA puts virus scanners.
        PriorityClass::Middle
    }

    fn create(&self) -> Box<dyn DataFilter> {
        Box::new(ExecutableBlocker {
            head: [Vec::new(), Vec::new()],
            decided: [false; 2],
            blocked: self.blocked.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocker() -> (Chain, Arc<AtomicU64>) {
        let blocked = Arc::new(AtomicU64::new(0));
        let f: Arc<dyn DataFilterFactory> = Arc::new(ExecutableBlockerFactory {
            blocked: blocked.clone(),
        });
        (Chain::new(&[f]), blocked)
    }

    #[test]
    fn executables_are_stopped_text_passes() {
        let (mut c, blocked) = blocker();
        assert!(matches!(
            c.data(Direction::FromExternal, b"MZ\x90\x00rest".to_vec()),
            Action::Close(_)
        ));
        assert_eq!(blocked.load(Ordering::Relaxed), 1);
        let (mut c, _) = blocker();
        assert_eq!(
            c.data(Direction::FromExternal, b"hello".to_vec()),
            Action::Forward(b"hello".to_vec())
        );
        assert_eq!(
            c.data(Direction::FromExternal, b"MZ later is fine".to_vec()),
            Action::Forward(b"MZ later is fine".to_vec())
        );
        // Each direction is judged on its own first bytes.
        assert!(matches!(
            c.data(Direction::FromInternal, b"ZM".to_vec()),
            Action::Close(_)
        ));
    }

    #[test]
    fn a_split_signature_is_held_then_judged() {
        let (mut c, _) = blocker();
        assert_eq!(
            c.data(Direction::FromExternal, b"M".to_vec()),
            Action::Forward(vec![]),
            "held"
        );
        assert!(matches!(
            c.data(Direction::FromExternal, b"Z....".to_vec()),
            Action::Close(_)
        ));
        let (mut c, _) = blocker();
        assert_eq!(
            c.data(Direction::FromExternal, b"M".to_vec()),
            Action::Forward(vec![])
        );
        assert_eq!(
            c.data(Direction::FromExternal, b"ail".to_vec()),
            Action::Forward(b"Mail".to_vec()),
            "released with the rest"
        );
        // A stream of one byte is released at its end.
        let (mut c, _) = blocker();
        assert_eq!(
            c.data(Direction::FromInternal, b"M".to_vec()),
            Action::Forward(vec![])
        );
        assert_eq!(
            c.end(Direction::FromInternal),
            Action::Forward(b"M".to_vec())
        );
    }

    /// A filter that tags bytes, to see the order.
    struct Tag(&'static str, PriorityClass);
    impl DataFilter for Tag {
        fn name(&self) -> &str {
            self.0
        }
        fn on_data(&mut self, _dir: Direction, mut data: Vec<u8>) -> Action {
            data.extend_from_slice(self.0.as_bytes());
            Action::Forward(data)
        }
    }
    impl DataFilterFactory for Tag {
        fn name(&self) -> &str {
            self.0
        }
        fn priority(&self) -> PriorityClass {
            self.1
        }
        fn create(&self) -> Box<dyn DataFilter> {
            Box::new(Tag(self.0, self.1))
        }
    }

    #[test]
    fn the_chain_runs_in_priority_order_per_direction() {
        let fs: Vec<Arc<dyn DataFilterFactory>> = vec![
            Arc::new(Tag("E", PriorityClass::External)),
            Arc::new(Tag("N", PriorityClass::Nat)),
            Arc::new(Tag("M", PriorityClass::Middle)),
        ];
        let mut c = Chain::new(&fs);
        assert_eq!(
            c.data(Direction::FromInternal, b">".to_vec()),
            Action::Forward(b">NME".to_vec()),
            "client side first"
        );
        assert_eq!(
            c.data(Direction::FromExternal, b"<".to_vec()),
            Action::Forward(b"<EMN".to_vec()),
            "Internet side first"
        );
    }
}
