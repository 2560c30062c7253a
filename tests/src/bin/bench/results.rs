//! The figures of a run, and the report and chart made of them.

use crate::*;

/// One measured figure: its repetitions and their summary.
#[derive(Serialize, serde::Deserialize, Clone)]
pub(crate) struct Figure {
    pub(crate) section: String,
    pub(crate) name: String,
    pub(crate) setup: String,
    pub(crate) unit: String,
    pub(crate) values: Vec<f64>,
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

#[derive(Serialize, serde::Deserialize, Default)]
pub(crate) struct Results {
    pub(crate) started: String,
    pub(crate) quick: bool,
    pub(crate) machine: BTreeMap<String, String>,
    pub(crate) figures: Vec<Figure>,
    pub(crate) notes: Vec<String>,
}

impl Results {
    pub(crate) fn add(
        &mut self,
        section: &str,
        name: &str,
        setup: &str,
        unit: &str,
        mut values: Vec<f64>,
    ) {
        values.retain(|v| v.is_finite());
        let mut sorted = values.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let median = if sorted.is_empty() {
            f64::NAN
        } else {
            sorted[sorted.len() / 2]
        };
        let fig = Figure {
            section: section.into(),
            name: name.into(),
            setup: setup.into(),
            unit: unit.into(),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            median,
            values,
        };
        println!(
            "  {:<44} {:<10} {:>12.3} {:<10} [{:.3} – {:.3}]",
            fig.name, fig.setup, fig.median, fig.unit, fig.min, fig.max
        );
        self.figures.push(fig);
    }

    pub(crate) fn get(&self, name: &str, setup: &str) -> Option<&Figure> {
        self.figures
            .iter()
            .find(|f| f.name == name && f.setup == setup)
    }
}

pub(crate) fn fmt_fig(f: &Figure) -> String {
    let digits = if f.median >= 100.0 {
        0
    } else if f.median >= 10.0 {
        1
    } else {
        2
    };
    format!(
        "{:.*} [{:.*}–{:.*}]",
        digits, f.median, digits, f.min, digits, f.max
    )
}

pub(crate) fn report(r: &Results) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Benchmark report\n");
    let _ =
        writeln!(
        o,
        "Run {} on {} CPUs ({}), kernel {}, {} build{}. Medians of the repetitions, [min–max].\n",
        r.started,
        r.machine.get("cpus").map_or("?", |s| s.as_str()),
        r.machine.get("cpu").map_or("?", |s| s.trim()),
        r.machine.get("kernel").map_or("?", |s| s.as_str()),
        r.machine.get("build").map_or("?", |s| s.as_str()),
        if r.quick { ", quick mode (small sizes, 2 repetitions)" } else { "" }
    );
    let _ = writeln!(o, "## 1. Secondary-connection data path (lab, veth)\n");
    let _ = writeln!(
        o,
        "Same lab, same traffic; ratios are to netfilter (ftp helper + masquerade) measured in this run.\n"
    );
    let _ = writeln!(
        o,
        "| Metric | kernel (XDP) | kernel (TC) | user (relay) | netfilter | plain forwarding |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for name in [
        "TCP bulk (FTP data)",
        "UDP 64-byte frames delivered, per generating core",
        "CPU time per delivered UDP frame (all CPUs)",
    ] {
        let nf = r.get(name, "netfilter").map(|f| f.median);
        let unit = r.get(name, "netfilter").map_or("", |f| f.unit.as_str());
        let mut row = format!("| {name} ({unit}) |");
        for setup in ["kernel", "kernel-tc", "user", "netfilter", "plain"] {
            match r.get(name, setup) {
                Some(f) => {
                    let ratio = nf
                        .filter(|n| *n > 0.0)
                        .map(|n| format!(" = **{:.2}×** nf", f.median / n))
                        .unwrap_or_default();
                    let _ = write!(
                        row,
                        " {}{} |",
                        fmt_fig(f),
                        if setup == "netfilter" {
                            String::new()
                        } else {
                            ratio
                        }
                    );
                }
                None => row.push_str(" – |"),
            }
        }
        let _ = writeln!(o, "{row}");
    }
    for (title, section) in [
        (
            "## 2. Per-packet cost of the XDP program (BPF_PROG_RUN)",
            "xdp cost",
        ),
        ("## 3. Control plane", "control plane"),
        ("## 4. Scale", "scale"),
    ] {
        let _ = writeln!(o, "\n{title}\n");
        let _ = writeln!(o, "| Figure | Level | Value |");
        let _ = writeln!(o, "|---|---|---|");
        for f in r.figures.iter().filter(|f| f.section == section) {
            let _ = writeln!(
                o,
                "| {} | {} | {} {} |",
                f.name,
                f.setup,
                fmt_fig(f),
                f.unit
            );
        }
    }
    sessions::report(r, &mut o);
    crate::primary::report(r, &mut o);
    let _ = writeln!(o, "\n## Targets\n");
    let med = |n: &str, s: &str| r.get(n, s).map(|f| f.median).unwrap_or(f64::NAN);
    let pps_ratio = med(
        "UDP 64-byte frames delivered, per generating core",
        "kernel",
    ) / med(
        "UDP 64-byte frames delivered, per generating core",
        "netfilter",
    );
    let tcp_ratio = med("TCP bulk (FTP data)", "kernel") / med("TCP bulk (FTP data)", "netfilter");
    let tcp_ratio_tc =
        med("TCP bulk (FTP data)", "kernel-tc") / med("TCP bulk (FTP data)", "netfilter");
    let pps_ratio_tc = med(
        "UDP 64-byte frames delivered, per generating core",
        "kernel-tc",
    ) / med(
        "UDP 64-byte frames delivered, per generating core",
        "netfilter",
    );
    let hit = med("established flow, outbound (SNAT)", "kernel")
        .max(med("established flow, reply (DNAT)", "kernel"));
    let calls = med("BindForClient in-process", "kernel");
    let api_p99 = med("BindForClient through the API p99", "kernel");
    let inproc_p99 = med("BindForClient in-process p99", "kernel");
    let mem = med("FLOWS + PINHOLES map memory", "1M");
    let scale_ratio = med("established flow hit", "1M") / med("established flow hit", "1k");
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    // (target, value, as measured, met): a figure of a section that did not
    // run is NaN, and its target is not measured rather than missed.
    let api_added = api_p99 - inproc_p99;
    let rows: [(&str, f64, String, bool); 9] = [
        (
            "Kernel mode (XDP) ≥ 3× netfilter's small-packet rate per generating core",
            pps_ratio,
            format!("{pps_ratio:.2}×"),
            pps_ratio >= 3.0,
        ),
        (
            "Kernel mode (TC) ≥ 3× netfilter's small-packet rate per generating core",
            pps_ratio_tc,
            format!("{pps_ratio_tc:.2}×"),
            pps_ratio_tc >= 3.0,
        ),
        (
            "Kernel mode (XDP) ≥ netfilter's TCP bulk throughput",
            tcp_ratio,
            format!("{tcp_ratio:.2}×"),
            tcp_ratio >= 1.0,
        ),
        (
            "Kernel mode (TC) ≥ netfilter's TCP bulk throughput",
            tcp_ratio_tc,
            format!("{tcp_ratio_tc:.2}×"),
            tcp_ratio_tc >= 1.0,
        ),
        (
            "Established-flow hit ≤ 100 ns per packet",
            hit,
            format!("{hit:.0} ns"),
            hit <= 100.0,
        ),
        (
            "≥ 100 000 BindForClient calls/s in-process",
            calls,
            format!("{calls:.0}/s"),
            calls >= 100_000.0,
        ),
        (
            "The API adds < 100 µs at p99",
            api_added,
            format!("{api_added:.0} µs"),
            api_added < 100.0,
        ),
        (
            "1 M pinholes + 1 M flows in ≤ 512 MiB",
            mem,
            format!("{mem:.0} MiB"),
            mem <= 512.0,
        ),
        (
            "Lookup at 1 M within 2× of 1 k",
            scale_ratio,
            format!("{scale_ratio:.2}×"),
            scale_ratio <= 2.0,
        ),
    ];
    let _ = writeln!(o, "| Target | Measured | |");
    let _ = writeln!(o, "|---|---|---|");
    for (t, value, m, ok) in rows {
        if value.is_nan() {
            let _ = writeln!(o, "| {t} | not measured in this run | – |");
        } else {
            let _ = writeln!(o, "| {t} | {m} | {} |", verdict(ok));
        }
    }
    for (t, m, ok) in sessions::targets(r)
        .into_iter()
        .chain(crate::primary::targets(r))
    {
        let _ = writeln!(o, "| {t} | {m} | {} |", verdict(ok));
    }
    if !r.notes.is_empty() {
        let _ = writeln!(o, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(o, "- {n}");
        }
    }
    o
}

/// Two bar groups (TCP Gbit/s, UDP Mpps) for the four setups, with min–max whiskers.
pub(crate) fn chart(r: &Results) -> String {
    let setups = ["kernel", "kernel-tc", "user", "netfilter", "plain"];
    let colors = ["#1f77b4", "#17becf", "#ff7f0e", "#7f7f7f", "#2ca02c"];
    let panels = [
        ("TCP bulk (FTP data)", "TCP bulk, Gbit/s"),
        (
            "UDP 64-byte frames delivered, per generating core",
            "64-byte UDP, Mpps per core",
        ),
    ];
    let (w, h, pw) = (760.0, 360.0, 360.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (p, (name, title)) in panels.iter().enumerate() {
        let x0 = 20.0 + p as f64 * (pw + 20.0);
        let figs: Vec<Option<&Figure>> = setups.iter().map(|st| r.get(name, st)).collect();
        let top = figs
            .iter()
            .flatten()
            .map(|f| f.max)
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"22\" font-size=\"14\" text-anchor=\"middle\">{title}</text>",
            x0 + pw / 2.0
        );
        let (base, height) = (h - 50.0, h - 90.0);
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>",
            x0 + pw
        );
        for (i, f) in figs.iter().enumerate() {
            let Some(f) = f else { continue };
            let slot = pw / setups.len() as f64;
            let bw = slot - 14.0;
            let x = x0 + 7.0 + i as f64 * slot;
            let y = |v: f64| base - v / top * height;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                y(f.median),
                base - y(f.median),
                colors[i]
            );
            let cx = x + bw / 2.0;
            let _ = writeln!(
                s,
                "<line x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                y(f.min),
                y(f.max)
            );
            let _ = writeln!(
                s,
                "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.2}</text>",
                y(f.max) - 4.0,
                f.median
            );
            let _ = writeln!(
                s,
                "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                base + 16.0,
                setups[i]
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
