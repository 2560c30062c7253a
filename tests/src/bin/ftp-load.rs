//! Runs the benchmark's FTP session load by hand, for profiling:
//! `ftp-load NETNS SERVER:PORT FILE SIZE epsv|port CONCURRENCY SECONDS`.

use std::time::Duration;

use firewall_tests::{
    ftp_load::{run, DataMode, Load},
    lab::Ns,
};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 7 {
        anyhow::bail!("usage: ftp-load NETNS SERVER:PORT FILE SIZE epsv|port CONCURRENCY SECONDS");
    }
    let load = Load {
        server: a[1].parse()?,
        file: a[2].clone(),
        size: a[3].parse()?,
        mode: if a[4] == "port" {
            DataMode::Active
        } else {
            DataMode::Passive
        },
        concurrency: a[5].parse()?,
        sessions: None,
        duration: Some(Duration::from_secs(a[6].parse()?)),
        step_timeout: Duration::from_secs(10),
    };
    let out = run(&Ns { name: a[0].clone() }, &load)?;
    println!(
        "{} sessions in {:.2} s = {:.0}/s, {} failed",
        out.completed,
        out.elapsed.as_secs_f64(),
        out.per_second(),
        out.failed
    );
    for e in &out.errors {
        println!("  {e}");
    }
    Ok(())
}
