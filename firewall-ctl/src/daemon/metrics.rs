//! Prometheus metrics (`[metrics] listen`): GET /metrics over HTTP, in the
//! OpenMetrics text format. Each scrape renders what `status` reads (the
//! per-CPU counters summed, map fill levels) and the engine's census of its
//! objects; the engine is asked only for counts it holds in memory, so a
//! scrape never stalls it behind a map walk.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::{Registry, Unit},
};
use tokio::{net::TcpListener, sync::Semaphore};

use super::Shared;
use crate::{
    api::{ApiError, ErrorKind, Status},
    engine::Census,
};

/// Scrapes served at once; more wait for their turn (the endpoint has no
/// authentication, so nobody may make the daemon render without bound).
const MAX_SCRAPERS: usize = 8;
/// A scraper that sends nothing, or reads nothing, for this long is dropped.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// API requests answered, by op and result (`ok` or the error's kind).
#[derive(Default)]
pub(super) struct ApiCalls(Mutex<BTreeMap<(&'static str, &'static str), u64>>);

impl ApiCalls {
    pub(super) fn record(&self, op: &'static str, result: Result<(), ErrorKind>) {
        let result = match result {
            Ok(()) => "ok",
            Err(kind) => kind.as_str(),
        };
        let mut calls = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *calls.entry((op, result)).or_insert(0) += 1;
    }

    fn snapshot(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The daemon's own work, counted as it happens.
#[derive(Default)]
pub(super) struct Work {
    /// Runs of the timers/sweeper tick, their time, and the failed ones.
    pub sweeps: AtomicU64,
    pub sweep_nanos: AtomicU64,
    pub sweep_errors: AtomicU64,
    /// UDP mappings ended quiet.
    pub udp_mappings_ended: AtomicU64,
    /// NAT ports freed whose owner no UDP mapping named.
    pub udp_orphan_ports_freed: AtomicU64,
    /// Events an API follower was too slow for (dropped for it).
    pub events_lagged: AtomicU64,
}

/// Everything one scrape shows.
pub(super) struct Snapshot {
    pub status: Status,
    pub census: Census,
    pub api_calls: BTreeMap<(&'static str, &'static str), u64>,
    pub events_lost: u64,
    pub sweeps: u64,
    pub sweep_seconds: f64,
    pub sweep_errors: u64,
    pub udp_mappings_ended: u64,
    pub udp_orphan_ports_freed: u64,
    pub events_lagged: u64,
}

/// Serves /metrics until the task is aborted.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(respond(req, &shared).await) }
            });
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(SCRAPE_TIMEOUT, conn).await {
                log::debug!("metrics: connection: {e}");
            }
            drop(permit);
        });
    }
}

async fn respond(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<Full<Bytes>> {
    let plain = |code: StatusCode, text: String| {
        Response::builder()
            .status(code)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(text)))
            .expect("a valid response")
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "only /metrics is served\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "/metrics answers GET and HEAD\n".into(),
        );
    }
    match snapshot(shared).await {
        Ok(s) => Response::builder()
            .header("content-type", CONTENT_TYPE)
            .body(Full::new(Bytes::from(render(&s))))
            .expect("a valid response"),
        Err(e) => {
            log::warn!("metrics: {e}");
            plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
    }
}

async fn snapshot(shared: &Arc<Shared>) -> Result<Snapshot, ApiError> {
    let status = super::api_server::status(shared).await?;
    let census = shared.engine.call(|e| e.census()).await?;
    let pins = shared.pins.clone();
    let events_lost =
        super::api_server::blocking(move || crate::datapath::Stats::open(&pins)?.events_lost())
            .await?;
    let work = &shared.work;
    Ok(Snapshot {
        status,
        census,
        api_calls: shared.api_calls.snapshot(),
        events_lost,
        sweeps: work.sweeps.load(Relaxed),
        sweep_seconds: work.sweep_nanos.load(Relaxed) as f64 / 1e9,
        sweep_errors: work.sweep_errors.load(Relaxed),
        udp_mappings_ended: work.udp_mappings_ended.load(Relaxed),
        udp_orphan_ports_freed: work.udp_orphan_ports_freed.load(Relaxed),
        events_lagged: work.events_lagged.load(Relaxed),
    })
}

type Labels = Vec<(&'static str, String)>;

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register(name, help, g);
}

/// The exposition, named by Prometheus' conventions: one prefix, base
/// units, `_total` counters, no addresses as labels.
pub(super) fn render(s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("firewall");
    r.register(
        "build",
        "The firewall's version",
        Info::new(vec![("version", s.status.version.clone())]),
    );

    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    for c in &s.status.counters {
        let reason = c
            .name
            .strip_prefix(&format!("{}_", c.verdict))
            .unwrap_or(&c.name)
            .to_string();
        let labels = vec![("verdict", c.verdict.clone()), ("reason", reason)];
        packets.get_or_create(&labels).inc_by(c.packets);
        bytes.get_or_create(&labels).inc_by(c.bytes);
    }
    r.register(
        "datapath_packets",
        "Packets the datapath decided on, by verdict (pass to the stack, drop, redirect) and reason",
        packets,
    );
    r.register_with_unit(
        "datapath",
        "Bytes of the packets the datapath decided on, by verdict and reason",
        Unit::Bytes,
        bytes,
    );
    counter(
        &mut r,
        "datapath_events_lost",
        "Events the datapath could not send (its ring buffer was full)",
        s.events_lost,
    );

    let entries = Family::<Labels, Gauge>::default();
    let capacity = Family::<Labels, Gauge>::default();
    for m in &s.status.maps {
        let labels = vec![("map", m.name.clone())];
        entries.get_or_create(&labels).set(m.entries as i64);
        capacity.get_or_create(&labels).set(m.capacity as i64);
    }
    r.register("map_entries", "Entries in a BPF map", entries);
    r.register("map_capacity", "Entries a BPF map can hold", capacity);
    gauge(
        &mut r,
        "primary_flows",
        "Flow entries (one per direction) of primary connections",
        s.status.wall.primary_flows,
    );

    gauge(
        &mut r,
        "sessions",
        "Client sessions open",
        s.census.sessions,
    );
    let objects = Family::<Labels, Gauge>::default();
    for ((kind, mode, state), n) in &s.census.objects {
        let labels = vec![
            ("kind", kind.name().to_string()),
            ("mode", mode.name().to_string()),
            ("state", state.name().to_string()),
        ];
        objects.get_or_create(&labels).set(*n as i64);
    }
    r.register(
        "connections",
        "Connection objects and firewall actions, by kind, mode (kernel or user) and state",
        objects,
    );
    let ended = Family::<Labels, Counter>::default();
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(&s.status.flows_expired) {
        for (reason, n) in fields {
            if let Some(n) = n.as_u64() {
                ended.get_or_create(&vec![("reason", reason)]).inc_by(n);
            }
        }
    }
    r.register(
        "connections_ended",
        "Connections and pinholes the daemon ended on its own, by reason",
        ended,
    );

    let calls = Family::<Labels, Counter>::default();
    for ((op, result), n) in &s.api_calls {
        let labels = vec![("op", op.to_string()), ("result", result.to_string())];
        calls.get_or_create(&labels).inc_by(*n);
    }
    r.register(
        "api_requests",
        "API requests answered, by op and result (ok, or the error's kind)",
        calls,
    );
    gauge(
        &mut r,
        "api_connections",
        "API connections open",
        s.status.api_connections,
    );
    counter(
        &mut r,
        "api_events_lagged",
        "Events dropped for an API follower that read too slowly",
        s.events_lagged,
    );

    let ftp = &s.status.ftp;
    for (name, help, v) in [
        (
            "ftp_control_connections",
            "FTP control connections intercepted",
            ftp.control_connections,
        ),
        (
            "ftp_active_opened",
            "PORT/EPRT rewritten (a BindForClient)",
            ftp.active_opened,
        ),
        (
            "ftp_passive_opened",
            "227/229 rewritten (a RedirectConnections)",
            ftp.passive_opened,
        ),
        (
            "ftp_bounces_refused",
            "PORT/EPRT/227/229 naming a third address (FTP bounce), refused",
            ftp.bounces_refused,
        ),
        (
            "ftp_commands_refused",
            "FTP commands and replies refused for syntax, low ports, IPv6 or length",
            ftp.commands_refused,
        ),
        (
            "ftp_failed_calls",
            "FTP filter calls that failed (answered 425)",
            ftp.failed_calls,
        ),
        (
            "ftp_kernel_lines",
            "FTP control lines the kernel forwarded from one of the proxy's sockets to the other",
            ftp.kernel_lines,
        ),
        (
            "ftp_kernel_slots_exhausted",
            "FTP control connections whose lines all went through the daemon: every kernel slot was taken",
            ftp.kernel_slots_exhausted,
        ),
    ] {
        counter(&mut r, name, help, v);
    }
    let line_bytes_counter = Counter::<u64>::default();
    line_bytes_counter.inc_by(ftp.kernel_line_bytes);
    r.register_with_unit(
        "ftp_kernel_line",
        "Bytes of the FTP control lines the kernel forwarded",
        Unit::Bytes,
        line_bytes_counter,
    );
    gauge(
        &mut r,
        "ftp_kernel_line_connections",
        "FTP control connections whose plain lines the kernel forwards now",
        ftp.kernel_line_connections,
    );
    counter(
        &mut r,
        "executables_blocked",
        "Secondary connections ended for carrying a Windows executable",
        s.status.executables_blocked,
    );

    counter(
        &mut r,
        "sweeper_runs",
        "Runs of the timers and flow sweeper",
        s.sweeps,
    );
    counter(
        &mut r,
        "sweeper_errors",
        "Runs of the timers and flow sweeper that failed",
        s.sweep_errors,
    );
    counter(
        &mut r,
        "udp_mappings_ended",
        "UDP mappings ended after their quiet time",
        s.udp_mappings_ended,
    );
    counter(
        &mut r,
        "udp_orphan_ports_freed",
        "NAT ports freed whose owner no UDP mapping named (left by a daemon stopped mid-sweep)",
        s.udp_orphan_ports_freed,
    );
    let secs = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    secs.inc_by(s.sweep_seconds);
    r.register_with_unit(
        "sweeper",
        "Time the timers and flow sweeper took",
        Unit::Seconds,
        secs,
    );

    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
