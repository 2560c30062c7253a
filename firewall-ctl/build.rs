use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // The eBPF object is built with the nightly toolchain (build-std=core) and
    // embedded into firewall-ctl; see docs/building.md.
    let ebpf = Package {
        name: "firewall-ebpf",
        root_dir: "../firewall-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
