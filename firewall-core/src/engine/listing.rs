//! Objects as listed.

use super::*;

impl<M: Maps> Engine<M> {
    // ----- listing -----

    pub fn objects(&self) -> Vec<ObjectInfo> {
        self.objects
            .iter()
            .map(|(id, o)| {
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
                    id: *id,
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
            })
            .collect()
    }
}
