//! TCP endpoints: accept, admit, raise the accept/connect event, connect
//! the other side, pump.

use super::*;

impl Relay {
    pub(super) async fn serve_tcp(self, listener: TcpListener, service: Service) {
        let Service {
            owner,
            admit,
            target,
            source,
            multiple,
            filters,
            event,
            ..
        } = service;
        // Bytes read from the accepted socket come from this side.
        let accepted_from = match admit {
            Admit::Peers(_) => Direction::FromExternal,
            Admit::Client(_) => Direction::FromInternal,
        };
        loop {
            let (peer, from) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    log::warn!("relay {owner}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let from = v4(from);
            if !admit.allows(*from.ip()) {
                reset(SockRef::from(&peer));
                self.refuse(owner, from, "not an allowed peer");
                continue;
            }
            let Some(to) = *target.borrow() else {
                reset(SockRef::from(&peer));
                self.refuse(owner, from, "the client address is still the placeholder");
                continue;
            };
            let client = match admit {
                Admit::Peers(_) => *to.ip(),
                Admit::Client(_) => *from.ip(),
            };
            if self.tasks().busy.contains(&client) {
                reset(SockRef::from(&peer));
                self.refuse(owner, from, "the client is at its connection quota");
                continue;
            }
            if !self.claim(owner) {
                reset(SockRef::from(&peer));
                return;
            }
            // The accept (bind) or connect (redirect) event: filters may abort
            // the connection or attach data filters to it.
            let mut attached = Vec::new();
            let mut emulator = None;
            if let Some((kind, hook)) = &event {
                let address = if matches!(admit, Admit::Peers(_)) {
                    from
                } else {
                    to
                };
                match hook(owner, *kind, address).await {
                    Ok(d) if d.denied_by.is_none() && d.emulated_by.is_none() => {
                        attached = d.data_filters
                    }
                    Ok(d) if d.denied_by.is_none() && d.emulator.is_some() => emulator = d.emulator,
                    outcome => {
                        // Denied, or a handler failed: the accept fails
                        // either way, and uses up a single-use opening.
                        let (reason, why) = match outcome {
                            Err(e) => {
                                log::warn!("relay {owner}: {}", e.message);
                                ("filter-failed", "a filter failed handling the connection")
                            }
                            Ok(d) if d.denied_by.is_none() => (
                                "emulated-without-source",
                                "emulated by a filter that gave no data source",
                            ),
                            Ok(_) => ("denied", "denied by a filter"),
                        };
                        reset(SockRef::from(&peer));
                        self.refuse(owner, from, why);
                        if !multiple {
                            let _ = SockRef::from(&listener).shutdown(std::net::Shutdown::Read);
                            self.send(RelayEvent::Denied {
                                owner,
                                from,
                                reason,
                            });
                            std::future::pending::<()>().await;
                        }
                        continue;
                    }
                }
            }
            let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let relay = self.clone();
            let chain = Chain::new(&filters).with(attached);
            let task = tokio::spawn(async move {
                match emulator {
                    // An emulated accept: the client is never connected.
                    Some(e) => relay.run_emulation(owner, conn, peer, from, to, e).await,
                    None => {
                        let route = Route { from, to, source };
                        relay
                            .tcp_connection((owner, conn), peer, route, chain, accepted_from)
                            .await
                    }
                }
            });
            self.tasks()
                .conns
                .insert((owner, conn), task.abort_handle());
            if !multiple {
                // Single use: stop listening but keep the port bound (reserved);
                // later SYNs are answered with a reset.
                let _ = SockRef::from(&listener).shutdown(std::net::Shutdown::Read);
                std::future::pending::<()>().await;
            }
        }
    }

    /// One accepted connection: the other side connected from `source`.
    async fn tcp_connection(
        self,
        (owner, conn): (u64, u64),
        peer: TcpStream,
        route: Route,
        mut chain: Chain,
        accepted_from: Direction,
    ) {
        let Route { from, to, source } = route;
        let client = match connect_from(source, to).await {
            Ok(c) => c,
            Err(e) => {
                log::info!("relay {owner}: connecting {from} to {to} failed: {e}");
                reset(SockRef::from(&peer));
                self.send(RelayEvent::Closed { owner, conn });
                return;
            }
        };
        keepalive(&peer);
        keepalive(&client);
        let bytes = self.established(owner, conn, from, to);
        if !chain.is_empty() {
            if let Some(sockets) = sockets_of(&peer, &client, accepted_from) {
                chain.set_sockets(&sockets);
            }
        }
        if chain.is_empty() {
            pump(peer, client, bytes).await;
        } else if let Err(reason) = pump_filtered(peer, client, bytes, chain, accepted_from).await {
            log::warn!("relay {owner}: a data filter ended the connection from {from}: {reason}");
            self.send(RelayEvent::Blocked {
                owner,
                conn,
                reason,
            });
        }
        self.tasks().conns.remove(&(owner, conn));
        self.send(RelayEvent::Closed { owner, conn });
    }
}

/// Connects to `to` from `source` (port 0: any), within CONNECT_TIMEOUT.
pub(super) async fn connect_from(source: SocketAddrV4, to: SocketAddrV4) -> io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::V4(source))?;
    tokio::time::timeout(CONNECT_TIMEOUT, s.connect(SocketAddr::V4(to)))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// The sockets of a relayed TCP connection as its data filters see them: the
/// accepted socket is external for binds, internal for redirects.
fn sockets_of(accepted: &TcpStream, made: &TcpStream, accepted_from: Direction) -> Option<Sockets> {
    Some(oriented(
        accepted_from,
        (
            v4(accepted.local_addr().ok()?),
            v4(accepted.peer_addr().ok()?),
        ),
        (v4(made.local_addr().ok()?), v4(made.peer_addr().ok()?)),
    ))
}

/// Sockets from the (own address, peer) of the socket that received the
/// connection and of the one the relay made: the receiving one is external
/// for binds (`FromExternal`), internal for redirects.
pub(super) fn oriented(
    received_from: Direction,
    received: (SocketAddrV4, SocketAddrV4),
    made: (SocketAddrV4, SocketAddrV4),
) -> Sockets {
    let (ext, int) = match received_from {
        Direction::FromExternal => (received, made),
        Direction::FromInternal => (made, received),
    };
    Sockets {
        external_name: ext.0,
        external_peer: ext.1,
        internal_name: int.0,
        internal_peer: int.1,
    }
}

/// Where an accepted connection goes: from the peer to the target, the
/// relay's side connecting from `source`.
struct Route {
    from: SocketAddrV4,
    to: SocketAddrV4,
    source: SocketAddrV4,
}
