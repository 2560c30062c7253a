fn main() {
    // Fetching atomics (fetch-and-add, compare-and-exchange) are selected only
    // with ALU32 (BPF ISA v3, Linux >= 5.12); rustc already passes `--cpu`.
    println!("cargo:rustc-link-arg=--cpu-features=+alu32");
}
