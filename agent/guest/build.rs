//! Builds the freestanding test guest ELF and the static Linux workload with the host gcc.
//!
//! Plain gcc (not a rustup target) so that a fresh Debian with `build-essential` is enough.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &[
    "src/c/ncga.h",
    "src/c/workload.h",
    "src/c/workload.c",
    "src/c/guest_main.c",
    "src/c/linux_main.c",
    "src/c/entry.S",
    "src/c/guest.ld",
];

const GUEST_CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    // Otherwise gcc turns our memset loop into a call to memset.
    "-fno-tree-loop-distribute-patterns",
    "-O2",
    "-Wall",
    "-Wextra",
];

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is gcc installed?)"));
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("cargo:warning={line}");
    }
    assert!(out.status.success(), "{cmd:?} failed: {}", out.status);
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cc = env::var("NOVACRON_GUEST_CC").unwrap_or_else(|_| "gcc".to_owned());
    let src = manifest.join("src/c");
    println!("cargo:rerun-if-env-changed=NOVACRON_GUEST_CC");
    for s in SOURCES {
        println!("cargo:rerun-if-changed={s}");
    }

    let guest = out.join("novacron-testguest.elf");
    let mut objs = Vec::new();
    for (file, obj) in [
        ("entry.S", "entry.o"),
        ("workload.c", "workload.o"),
        ("guest_main.c", "guest_main.o"),
    ] {
        let obj = out.join(obj);
        run(Command::new(&cc)
            .args(GUEST_CFLAGS)
            .arg("-I")
            .arg(&src)
            .arg("-c")
            .arg(src.join(file))
            .arg("-o")
            .arg(&obj));
        objs.push(obj);
    }
    run(Command::new(&cc)
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
            "-Wl,-z,max-page-size=4096",
        ])
        .arg("-T")
        .arg(src.join("guest.ld"))
        .args(&objs)
        .arg("-lgcc")
        .arg("-o")
        .arg(&guest));

    let linux = out.join("novacron-workload");
    run(Command::new(&cc)
        .args(["-std=gnu11", "-static", "-O2", "-Wall", "-Wextra"])
        .arg("-I")
        .arg(&src)
        .arg(src.join("workload.c"))
        .arg(src.join("linux_main.c"))
        .arg("-o")
        .arg(&linux));

    check_exists(&guest);
    check_exists(&linux);
}

fn check_exists(p: &Path) {
    assert!(p.is_file(), "{} was not produced", p.display());
}
