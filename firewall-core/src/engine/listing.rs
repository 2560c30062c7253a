//! Objects as listed.

use super::*;

impl<M: Maps> Engine<M> {
    // ----- listing -----

    pub fn objects(&self) -> Vec<ObjectInfo> {
        self.objects
            .iter()
            .map(|(id, o)| self.info_of(*id, o))
            .collect()
    }

    /// One object as listed (an ended one until it is forgotten).
    pub fn info(&self, id: u64) -> Option<ObjectInfo> {
        self.objects.get(&id).map(|o| self.info_of(id, o))
    }

    fn info_of(&self, id: u64, o: &Object) -> ObjectInfo {
        let (packets, mut bytes) = o
            .flows
            .iter()
            .filter_map(|k| self.maps.get_flow(k).ok().flatten())
            .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
        // User mode counts payload bytes relayed (no packets).
        if let Some(r) = &o.relayed {
            bytes += r.load(Ordering::Relaxed);
        }

        ObjectInfo {
            id,
            session: o.session,
            kind: o.kind,
            state: o.state,
            parent: o.parent,
            protocol: o.transport,
            protocol_name: o.protocol_name.clone(),
            flags: o.flags,
            mode: o.mode,
            endpoint: o.endpoint,
            target: o
                .target
                .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
            peer: o.peer,
            packets,
            bytes,
            reason: o.reason.clone(),
        }
    }
}

/// How many connection objects there are of each kind, mode and state (for
/// metrics: counted in the engine's memory, no map read).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub sessions: u64,
    pub objects: BTreeMap<(Kind, Mode, State), u64>,
}

impl<M: Maps> Engine<M> {
    pub fn census(&self) -> Census {
        let mut objects = BTreeMap::new();
        for o in self.objects.values() {
            *objects.entry((o.kind, o.mode, o.state)).or_insert(0) += 1;
        }
        Census {
            sessions: self.sessions.len() as u64,
            objects,
        }
    }
}

impl Kind {
    /// The name in the API's JSON (and metrics' labels).
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Bind => "bind",
            Kind::Accepted => "accepted",
            Kind::Redirect => "redirect",
            Kind::Redirected => "redirected",
            Kind::FutureConnect => "future-connect",
        }
    }
}

impl Mode {
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            Mode::User => "user",
        }
    }
}

impl State {
    pub const fn name(self) -> &'static str {
        match self {
            State::Listening => "listening",
            State::Established => "established",
            State::Terminated => "terminated",
        }
    }
}

#[cfg(test)]
mod census_tests {
    use super::*;

    #[test]
    fn names_are_the_json_names() {
        for k in [
            Kind::Bind,
            Kind::Accepted,
            Kind::Redirect,
            Kind::Redirected,
            Kind::FutureConnect,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
        for m in [Mode::Kernel, Mode::User] {
            assert_eq!(serde_json::to_value(m).unwrap(), m.name());
        }
        for s in [State::Listening, State::Established, State::Terminated] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
    }
}
