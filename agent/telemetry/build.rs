//! Compiles the C eBPF programs in `<repo>/ebpf/` with clang-19 (`-target bpf -O2 -g`),
//! strips DWARF but keeps `.BTF`/`.BTF.ext` (needed for CO-RE), and leaves the object in
//! `OUT_DIR` for `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

fn tool(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_string())
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let ebpf = manifest.join("../../ebpf");
    let src = ebpf.join("telemetry.bpf.c");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("telemetry.bpf.o");
    for f in ["telemetry.bpf.c", "vmlinux.h"] {
        println!("cargo:rerun-if-changed={}", ebpf.join(f).display());
    }
    println!("cargo:rerun-if-env-changed=NOVACRON_CLANG");
    println!("cargo:rerun-if-env-changed=NOVACRON_LLVM_STRIP");
    let clang = tool("NOVACRON_CLANG", "clang-19");
    let status = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-D__TARGET_ARCH_x86", "-Wall", "-Werror"])
        .arg("-I")
        .arg(&ebpf)
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("running {clang} (install Debian's clang-19 and libbpf-dev, see deploy/setup.sh): {e}")
        });
    assert!(status.success(), "{clang} failed on {}", src.display());
    let strip = tool("NOVACRON_LLVM_STRIP", "llvm-strip-19");
    let status = Command::new(&strip)
        .arg("-g")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {strip} (install Debian's llvm-19): {e}"));
    assert!(status.success(), "{strip} -g failed on {}", out.display());
}
