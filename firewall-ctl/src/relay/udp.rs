//! UDP endpoints: a mapping per peer, each with its own connected socket
//! toward the target and its own data filters; idle mappings close.

use super::{tcp::oriented, *};

impl Relay {
    pub(super) async fn serve_udp(self, socket: Arc<UdpSocket>, service: Service) {
        let Service {
            owner,
            admit,
            target,
            source,
            multiple,
            idle,
            filters,
            event,
        } = service;
        let peer_side = match admit {
            Admit::Peers(_) => Direction::FromExternal,
            Admit::Client(_) => Direction::FromInternal,
        };
        let target_side = match peer_side {
            Direction::FromExternal => Direction::FromInternal,
            Direction::FromInternal => Direction::FromExternal,
        };
        // One connected socket toward the target per peer, with its filters.
        type Mapping = (Arc<UdpSocket>, u64, Option<Arc<Mutex<Chain>>>);
        let mut peers: HashMap<SocketAddrV4, Mapping> = HashMap::new();
        let mut used = false;
        let mut buf = vec![0u8; DATAGRAM];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    log::debug!("relay {owner}: recv: {e}");
                    continue;
                }
            };
            let from = v4(from);
            peers.retain(|_, (_, c, _)| self.tasks().conns.contains_key(&(owner, *c)));
            if let Some((inner, conn, chain)) = peers.get(&from) {
                match filter_datagram(chain.as_ref(), peer_side, &buf[..n]) {
                    Ok(d) if d.is_empty() => {}
                    Ok(d) => {
                        let _ = inner.send(&d).await;
                    }
                    Err(reason) => {
                        self.send(RelayEvent::Blocked {
                            owner,
                            conn: *conn,
                            reason,
                        });
                        self.stop_conn(owner, *conn);
                        self.send(RelayEvent::Closed { owner, conn: *conn });
                    }
                }
                continue;
            }
            if !admit.allows(*from.ip()) {
                self.refuse(owner, from, "not an allowed peer");
                continue;
            }
            if used && !multiple {
                self.refuse(owner, from, "single use: another peer was admitted");
                continue;
            }
            let Some(to) = *target.borrow() else {
                self.refuse(owner, from, "the client address is still the placeholder");
                continue;
            };
            // A new destination (redirects: fwx_Udp_Destination): filters may
            // refuse it (its datagrams are dropped) or attach data filters.
            let mut attached = Vec::new();
            if let Some((kind, hook)) = &event {
                match hook(owner, *kind, to).await {
                    Ok(d) if d.denied_by.is_some() => {
                        self.refuse(owner, from, "denied by a filter");
                        continue;
                    }
                    Ok(d) => attached = d.data_filters,
                    Err(e) => {
                        log::warn!("relay {owner}: {}", e.message);
                        self.refuse(owner, from, "a filter failed handling the destination");
                        continue;
                    }
                }
            }
            let inner = match async {
                let s = UdpSocket::bind(SocketAddr::V4(source)).await?;
                s.connect(SocketAddr::V4(to)).await?;
                Ok::<_, io::Error>(Arc::new(s))
            }
            .await
            {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("relay {owner}: UDP socket toward {to}: {e}");
                    continue;
                }
            };
            if !self.claim(owner) {
                return;
            }
            used = true;
            let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let chain = (!filters.is_empty() || !attached.is_empty()).then(|| {
                let mut chain = Chain::new(&filters).with(attached);
                if let (Ok(here), Ok(there)) = (socket.local_addr(), inner.local_addr()) {
                    chain.set_sockets(&oriented(peer_side, (v4(here), from), (v4(there), to)));
                }
                Arc::new(Mutex::new(chain))
            });
            let first = filter_datagram(chain.as_ref(), peer_side, &buf[..n]);
            if let Ok(d) = &first {
                if !d.is_empty() {
                    let _ = inner.send(d).await;
                }
            }
            let bytes = self.established(owner, conn, from, to);
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            if let Err(reason) = first {
                self.send(RelayEvent::Blocked {
                    owner,
                    conn,
                    reason,
                });
                self.send(RelayEvent::Closed { owner, conn });
                continue;
            }
            let relay = self.clone();
            let (out, back, back_chain) = (socket.clone(), inner.clone(), chain.clone());
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; DATAGRAM];
                loop {
                    let got = match idle {
                        Some(d) => match tokio::time::timeout(d, back.recv(&mut buf)).await {
                            Ok(r) => r,
                            Err(_) => break,
                        },
                        None => back.recv(&mut buf).await,
                    };
                    match got {
                        Ok(n) => match filter_datagram(back_chain.as_ref(), target_side, &buf[..n])
                        {
                            Ok(d) => {
                                bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                                if !d.is_empty() {
                                    let _ = out.send_to(&d, SocketAddr::V4(from)).await;
                                }
                            }
                            Err(reason) => {
                                relay.send(RelayEvent::Blocked {
                                    owner,
                                    conn,
                                    reason,
                                });
                                break;
                            }
                        },
                        // ICMP errors from the target (port unreachable) are not fatal.
                        Err(_) => continue,
                    }
                }
                relay.tasks().conns.remove(&(owner, conn));
                relay.send(RelayEvent::Closed { owner, conn });
            });
            self.tasks()
                .conns
                .insert((owner, conn), task.abort_handle());
            peers.insert(from, (inner, conn, chain));
        }
    }
}

/// A datagram through a connection's filters (none: unchanged).
fn filter_datagram(
    chain: Option<&Arc<Mutex<Chain>>>,
    dir: Direction,
    data: &[u8],
) -> Result<Vec<u8>, String> {
    match chain {
        None => Ok(data.to_vec()),
        Some(c) => match c
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .data(dir, data.to_vec())
        {
            Action::Forward(d) => Ok(d),
            Action::Close(reason) => Err(reason),
        },
    }
}
