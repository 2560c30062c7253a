//! The engine's books checked against each other and against the maps:
//! what the engine's property test asserts after every step, and a check
//! for debugging a daemon.

use super::*;

impl<M: Maps> Engine<M> {
    /// Whether the engine's records agree: every pinhole in the maps is a
    /// live kernel-mode object's and every object's pinhole is in the maps;
    /// an ended object holds no pinhole, port or quota count; the ports in
    /// use are exactly the objects' leases (the pool holding nothing else,
    /// as when it started empty); the quota and pending counts are the
    /// objects'; every owned flow is in its owner's list. The first
    /// disagreement, in words.
    pub fn check_books(&self) -> Result<(), String> {
        let pinholes = self.maps.pinholes().map_err(|e| e.to_string())?;
        for (k, _) in &pinholes {
            if !self.objects.values().any(|o| {
                o.pinhole == Some(*k) && o.state != State::Terminated && o.mode == Mode::Kernel
            }) {
                return Err(format!("orphaned pinhole {k:?}"));
            }
        }
        for (id, o) in &self.objects {
            if let Some(k) = o.pinhole {
                if !pinholes.iter().any(|(p, _)| *p == k) {
                    return Err(format!("object {id} lost its pinhole"));
                }
            }
            if o.state == State::Terminated
                && (o.pinhole.is_some() || !o.leases.is_empty() || o.counted)
            {
                return Err(format!(
                    "ended object {id} still holds a pinhole, a port or a count"
                ));
            }
        }
        let leased: usize = self.objects.values().map(|o| o.leases.len()).sum();
        let in_use = self.ports.total_in_use();
        if leased != in_use {
            return Err(format!(
                "{leased} ports leased, {in_use} in use: leaked or lost"
            ));
        }
        let mut counted: HashMap<(Ipv4Addr, Transport), usize> = HashMap::new();
        for o in self.objects.values().filter(|o| o.counted) {
            let client = self
                .sessions
                .get(&o.session)
                .map(|s| s.client)
                .ok_or_else(|| format!("a counted object of unknown session {}", o.session))?;
            *counted.entry((client, o.transport)).or_default() += 1;
        }
        if counted != self.established_count {
            return Err(format!(
                "quota counts {:?}, counted objects {counted:?}",
                self.established_count
            ));
        }
        let mut pending: HashMap<u64, usize> = HashMap::new();
        for o in self.objects.values() {
            if o.state == State::Listening && o.parent.is_none() {
                *pending.entry(o.session).or_default() += 1;
            }
        }
        if pending != self.pending {
            return Err(format!(
                "pending counts {:?}, waiting objects {pending:?}",
                self.pending
            ));
        }
        for (k, id) in &self.flow_owner {
            if !self.objects.get(id).is_some_and(|o| o.flows.contains(k)) {
                return Err(format!("flow owner {id} unknown"));
            }
        }
        Ok(())
    }

    /// Whether the engine holds nothing: no object, count or port.
    pub fn is_idle(&self) -> bool {
        self.objects.is_empty()
            && self.established_count.is_empty()
            && self.pending.is_empty()
            && self.ports.total_in_use() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{bound, engine, pinhole};

    #[test]
    fn a_disagreement_is_named() {
        let (mut e, s) = engine();
        let id = bound(&mut e, s, "10.1.0.2:5001");
        assert_eq!(e.check_books(), Ok(()));
        assert!(!e.is_idle());
        let k = pinhole(&e, id);
        let v = e.maps_mut().pinholes.remove(&k).unwrap();
        assert!(e.check_books().unwrap_err().contains("lost its pinhole"));
        let mut stray = k;
        stray.port += 1;
        e.maps_mut().pinholes.insert(k, v);
        e.maps_mut().pinholes.insert(stray, v);
        assert!(e.check_books().unwrap_err().contains("orphaned pinhole"));
        e.maps_mut().pinholes.remove(&stray);
        e.kill(id).unwrap();
        assert_eq!(e.check_books(), Ok(()));
    }
}
