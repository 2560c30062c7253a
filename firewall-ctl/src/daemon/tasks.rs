//! The daemon's background tasks: the engine's timers, and what the datapath
//! and the relay report, handed to the engine's owner.

use std::{
    net::Ipv4Addr,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use firewall_common::pinhole::event_kind;

use super::{udp_sweep, Shared};
use crate::{
    datapath::{self, FlowTable, UdpMappings},
    engine::Readings,
    mapops::Scan,
    relay::RelayEvent,
    sweeper,
};
use firewall_core::udp_mappings;

/// Entries of the flow table the timers read per tick: how the flows of
/// primary connections (which the datapath tracks without the engine)
/// expire, and the safety net for flows no timer knows (lost events, an
/// earlier daemon's flows). A full pass over N entries takes N / SCAN_BATCH
/// ticks: 64 s for the default table, full.
pub(super) const SCAN_BATCH: usize = 4096;
pub(super) const TICK: Duration = Duration::from_secs(1);

/// The engine's timers, once a second. The engine names the flows its due
/// timers need; they and a bounded batch of the table are read here, away
/// from the engine, which then applies what it learnt.
pub(super) async fn tick(shared: Arc<Shared>) {
    let flows = match FlowTable::open(&shared.pins) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            log::error!("engine timers: cannot open the flow table: {e:#}");
            return;
        }
    };
    let mappings = match UdpMappings::open(&shared.pins) {
        Ok(m) => udp_sweep::Sweep::new(m),
        Err(e) => {
            log::error!("engine timers: cannot open the UDP mappings: {e:#}");
            return;
        }
    };
    let mut scan = Scan::default();
    loop {
        tokio::time::sleep(TICK).await;
        let started = std::time::Instant::now();
        let result = tick_once(&shared, &flows, &mut scan).await;
        let result = match result {
            Ok(seen) => mappings.run(&shared, seen).await,
            Err(e) => Err(e),
        };
        let work = &shared.work;
        work.sweeps.fetch_add(1, Relaxed);
        work.sweep_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
        if let Err(e) = result {
            work.sweep_errors.fetch_add(1, Relaxed);
            log::warn!("engine timers: {e:#}");
        }
    }
}

/// One tick of the engine's timers; what the batch of the flow table it
/// read says of the UDP mappings' activity (`udp_mappings::refreshes`).
async fn tick_once(
    shared: &Shared,
    flows: &Arc<FlowTable>,
    scan: &mut Scan,
) -> anyhow::Result<udp_mappings::Activity> {
    let now = crate::netif::monotonic_ns();
    let nat_addr = shared.config().external_addresses[0].octets();
    let keys = shared.engine.call(move |e| e.timers_due(now)).await?;
    let table = flows.clone();
    let mut cursor = std::mem::take(scan);
    let (readings, batch, cursor) = tokio::task::spawn_blocking(move || {
        let mut readings = Readings::new();
        for k in keys {
            match table.get(&k) {
                Ok(v) => {
                    readings.insert(k, v);
                }
                Err(e) => log::debug!("engine timers: reading {k:?}: {e:#}"),
            }
        }
        let batch = (|| {
            let mut batch = table.scan(&mut cursor, SCAN_BATCH)?;
            for k in sweeper::missing_peers(&batch) {
                if let Some(v) = table.get(&k)? {
                    batch.push((k, v));
                }
            }
            anyhow::Ok(batch)
        })();
        (readings, batch, cursor)
    })
    .await?;
    *scan = cursor;
    let batch = batch?;
    let seen = udp_mappings::refreshes(&batch, nat_addr);
    shared
        .engine
        .call(move |e| e.timers_apply(now, &readings, &batch))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(seen)
}

/// Hands the relay's connection events to the engine.
pub(super) async fn read_relay_events(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<RelayEvent>,
    shared: Arc<Shared>,
) {
    while let Some(ev) = rx.recv().await {
        let mut batch = vec![ev];
        // Whatever else queued up meanwhile, in one go.
        while let Ok(ev) = rx.try_recv() {
            batch.push(ev);
        }
        shared.engine.send(move |e| {
            for ev in batch {
                e.on_relay_event(ev);
            }
        });
    }
}

/// How often the daemon reads the datapath's events. The datapath submits
/// them without waking the reader: a wake-up is an irq_work interrupt, which
/// cost 5 of the 6.8 µs of a connection's first packet here (measured in the
/// benchmark); bookkeeping a few milliseconds late costs nothing.
const EVENT_POLL: Duration = Duration::from_millis(10);

/// Hands the datapath's establishment events to the engine.
pub(super) async fn read_datapath_events(
    mut rb: aya::maps::RingBuf<aya::maps::MapData>,
    shared: Arc<Shared>,
) {
    let mut every = tokio::time::interval(EVENT_POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let mut batch = Vec::new();
        while let Some(item) = rb.next() {
            batch.extend(datapath::decode_event(&item));
        }
        if batch.is_empty() {
            continue;
        }
        let (neigh, conns): (Vec<_>, Vec<_>) = batch.into_iter().partition(|e| {
            e.kind == event_kind::NEED_NEIGHBOUR || e.kind == event_kind::REDIRECT_FAILED
        });
        let (failed, neigh): (Vec<_>, Vec<_>) = neigh
            .into_iter()
            .partition(|e| e.kind == event_kind::REDIRECT_FAILED);
        for e in failed {
            log::warn!("datapath: redirect to ifindex {} failed", e.owner);
        }
        for e in neigh {
            shared
                .neighbours
                .resolve(e.owner as u32, Ipv4Addr::from(e.forward.dst_addr));
        }
        if !conns.is_empty() {
            shared.engine.send(move |e| {
                for ev in &conns {
                    e.on_datapath_event(ev);
                }
            });
        }
    }
}

/// Forwards the datapath's aya-log records to the daemon's logger.
pub(super) async fn poll_ebpf_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    use tokio::io::unix::AsyncFd;
    // SAFETY: the logger owns the ring buffer fd and moves into the AsyncFd,
    // which keeps it open for as long as it is registered.
    let mut fd =
        match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!("cannot poll the eBPF log: {e}");
                return;
            }
        };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
