//! Emulated connections (EmulateConnection, and emulation at accept): a
//! filter's emulator answers on the one real socket of the connection.

use super::{tcp::connect_from, *};

impl Relay {
    /// Sets the target of a placeholder endpoint.
    /// Starts an emulated connection (EmulateConnection): connects to the
    /// client and lets the filter's emulator answer in place of `remote`.
    pub fn emulate(&self, job: Emulation) {
        let (owner, conn) = (job.owner, self.next_conn.fetch_add(1, Ordering::Relaxed));
        let relay = self.clone();
        let mut t = self.tasks();
        let task = tokio::spawn(async move { relay.emulated_connection(conn, job).await });
        t.conns.insert((owner, conn), task.abort_handle());
    }

    async fn emulated_connection(self, conn: u64, job: Emulation) {
        let Emulation {
            owner,
            multiple,
            remote,
            target,
            source,
            peer,
        } = job;
        match connect_from(source, target).await {
            Err(e) => {
                log::info!("relay {owner}: emulation: connecting to {target} failed: {e}");
                if !multiple {
                    self.send(RelayEvent::Denied {
                        owner,
                        from: remote,
                        reason: "emulation-failed",
                    });
                }
            }
            Ok(client) => {
                return self
                    .run_emulation(owner, conn, client, remote, target, peer)
                    .await
            }
        }
        self.tasks().conns.remove(&(owner, conn));
        self.send(RelayEvent::Closed { owner, conn });
    }

    /// An emulator talking to the one real socket of an emulated connection
    /// (the client's, or the external peer's for an emulated accept).
    pub(super) async fn run_emulation(
        self,
        owner: u64,
        conn: u64,
        mut stream: TcpStream,
        from: SocketAddrV4,
        to: SocketAddrV4,
        mut peer: Box<dyn EmulatedPeer>,
    ) {
        let bytes = self.established(owner, conn, from, to);
        match emulate_exchange(&mut stream, peer.as_mut(), &bytes).await {
            Ok(()) => {
                let _ = stream.shutdown().await;
            }
            Err(reason) => {
                log::info!(
                    "relay {owner}: emulator {} ended the connection: {reason}",
                    peer.name()
                );
                reset(SockRef::from(&stream));
            }
        }
        self.tasks().conns.remove(&(owner, conn));
        self.send(RelayEvent::Closed { owner, conn });
    }
}

/// Plays an emulated connection: the emulator's answers go to the client,
/// the client's bytes to the emulator. `Err` carries why it ended abnormally.
async fn emulate_exchange(
    client: &mut TcpStream,
    peer: &mut dyn EmulatedPeer,
    bytes: &AtomicU64,
) -> Result<(), String> {
    let mut answer = peer.on_connected();
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        let out = match answer {
            Action::Forward(b) => b,
            Action::Close(reason) => return Err(reason),
        };
        if !out.is_empty() {
            client.write_all(&out).await.map_err(|e| e.to_string())?;
            bytes.fetch_add(out.len() as u64, Ordering::Relaxed);
        }
        let n = client.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return match peer.on_client_end() {
                Action::Forward(b) => {
                    client.write_all(&b).await.map_err(|e| e.to_string())?;
                    bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Ok(())
                }
                Action::Close(reason) => Err(reason),
            };
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        answer = peer.on_client_data(buf[..n].to_vec());
    }
}
