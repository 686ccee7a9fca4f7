//! Embeds the eBPF object built by `cargo xtask build-ebpf`, and refuses to build without it.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let obj = manifest.join("../target/ebpf/bpfel-unknown-none/release/redirect");
    println!("cargo:rerun-if-changed={}", obj.display());
    if !obj.exists() {
        println!(
            "cargo:error=the eBPF object {} is missing: run `cargo xtask build-ebpf` first",
            obj.display()
        );
        std::process::exit(1);
    }
    println!("cargo:rustc-env=REDIRECT_EBPF_OBJECT={}", obj.display());
}
