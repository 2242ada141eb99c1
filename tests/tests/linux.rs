//! Debian's stock cloud kernel, started by this VMM: the ELF vmlinux entered through its PVH
//! note, with an initramfs of busybox and the workload. On this PVM host guest CPL0 code is
//! emulated and Linux cannot finish booting, so the test checks what it can: the banner, the
//! command line the VMM passed, the memory map the VMM built, and early setup. On VT-x/AMD-V
//! hosts the same kernel goes on to run the workload
//! (`linux_runs_the_workload_to_a_verified_poweroff`, ignored here for want of VT-x/AMD-V).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use novacron_tests::{require_kvm, wait_file_contains, RunningVm};
use novacron_vmm::config::{EntryProtocol, VmConfig};
use vm_memory::{Bytes, GuestAddress};

fn guest_files() -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/novacron-guest");
    let vmlinux = dir.join("vmlinux");
    let initramfs = dir.join("initramfs.cpio.gz");
    assert!(
        vmlinux.exists() && initramfs.exists(),
        "{} and {} are missing: run ./deploy/setup.sh (the test command does)",
        vmlinux.display(),
        initramfs.display()
    );
    (vmlinux, initramfs)
}

fn linux_config(dir: &std::path::Path, cmdline: &str) -> VmConfig {
    let (vmlinux, initramfs) = guest_files();
    VmConfig {
        id: "linux".into(),
        name: "linux".into(),
        vcpus: 2,
        memory_mib: 256,
        hugepages: false,
        kernel: vmlinux,
        initramfs: Some(initramfs),
        cmdline: cmdline.into(),
        entry: EntryProtocol::Auto,
        console_log: dir.join("console.log"),
        debugcon_log: dir.join("debugcon.log"),
        console_log_max_bytes: 0,
        dirty_tracking: Default::default(),
        dirty_ring_entries: 0,
    }
}

#[test]
fn debian_kernel_prints_its_banner_and_gets_through_early_setup() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 novacron.test=banner";
    let vm = RunningVm::start(linux_config(dir.path(), cmdline), false);
    let console = dir.path().join("console.log");
    let t0 = Instant::now();
    let limit = Duration::from_secs(400);
    // The console fills a byte at a time (the kernel's CPL0 code is emulated here): wait for
    // the whole token, not a prefix of the line.
    let text = wait_file_contains(&console, "Linux version 6.", limit);
    eprintln!("banner after {:?}", t0.elapsed());
    assert!(text.contains("Linux version 6."), "{text}");
    let text = wait_file_contains(&console, "novacron.test=banner", limit);
    eprintln!("command line after {:?}", t0.elapsed());
    assert!(text.contains("Command line:"), "{text}");
    // The e820 map the VMM wrote: low RAM, then RAM from 1 MiB to the end of 256 MiB.
    let text = wait_file_contains(
        &console,
        "[mem 0x0000000000100000-0x000000000fffffff] usable",
        limit,
    );
    eprintln!("memory map after {:?}", t0.elapsed());
    assert!(
        text.contains("[mem 0x0000000000000000-0x000000000009fbff] usable"),
        "{text}"
    );
    // Both vCPUs found through the VMM's ACPI MADT (this kernel has no MP-table support).
    let text = wait_file_contains(&console, "smpboot: Allowing 2 CPUs", limit);
    assert!(
        text.contains("ACPI: Using ACPI (MADT) for SMP configuration"),
        "{text}"
    );
    assert!(text.contains("smpboot: Allowing 2 CPUs"), "{text}");
    wait_file_contains(&console, "Hypervisor detected: KVM", limit);
    // Early setup done: the kernel has sized its memory from the VMM's map.
    let text = wait_file_contains(&console, "] Memory: ", limit);
    eprintln!("early setup (Memory:) after {:?}", t0.elapsed());
    assert!(
        text.contains("Kernel command line: console=ttyS0"),
        "{text}"
    );
    // On PVM hosts the emulator gives up soon after (KVM_EXIT_INTERNAL_ERROR); if it does,
    // the VMM must report it with the registers, not hide it.
    if vm.vm.wait_end_timeout(Duration::from_secs(60)) {
        let end = vm.vm.wait_end();
        assert_eq!(
            end.reason,
            novacron_vmm::control::ExitReason::InternalError,
            "{end:?}"
        );
        assert!(
            end.detail.contains("rip=0xffffffff"),
            "registers missing: {end:?}"
        );
    }
    vm.shutdown();
}

#[test]
#[ignore = "needs VT-x/AMD-V: on PVM hosts Linux stops in the CPL0 emulator before user space"]
fn linux_runs_the_workload_to_a_verified_poweroff() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let cmdline = "console=ttyS0 panic=-1 nc.mem=16 nc.stop_after_pages=20000";
    let vm = RunningVm::start(linux_config(dir.path(), cmdline), false);
    let console = dir.path().join("console.log");
    let text = wait_file_contains(
        &console,
        "novacron-guest: verify ",
        Duration::from_secs(120),
    );
    assert!(text.contains("novacron-guest: verify ok"), "{text}");
    assert!(
        vm.vm.wait_end_timeout(Duration::from_secs(60)),
        "the guest did not power off"
    );
    vm.shutdown();
}

#[test]
fn a_bzimage_is_loaded_per_the_linux_boot_protocol() {
    // Running the bzImage's decompressor takes minutes in this host's CPL0 emulator, so this
    // checks what the VMM writes: entry point, zero page, e820 map, command line, initramfs.
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut config = linux_config(dir.path(), "console=ttyS0 novacron.test=bzimage");
    config.kernel = config.kernel.with_file_name("vmlinuz");
    let (vm, vcpus) = novacron_vmm::vm::Vm::create(config, false).expect("bzImage loads");
    let regs = vcpus[0].get_regs().unwrap();
    let sregs = vcpus[0].get_sregs().unwrap();
    assert_eq!(regs.rip, 0x100000 + 0x200, "64-bit entry of a bzImage");
    assert_eq!(regs.rsi, novacron_vmm::arch::layout::ZERO_PAGE_START);
    assert_eq!(sregs.efer & 0x500, 0x500, "long mode active");
    let mem = vm.memory();
    let zp = novacron_vmm::arch::layout::ZERO_PAGE_START;
    let read = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, GuestAddress(zp + off)).unwrap();
        b
    };
    assert_eq!(
        &read(0x202, 4),
        b"HdrS",
        "setup header copied from the image"
    );
    assert_eq!(read(0x210, 1)[0], 0xff, "type_of_loader");
    let cmd_ptr = u32::from_le_bytes(read(0x228, 4).try_into().unwrap()) as u64;
    let expected = b"console=ttyS0 novacron.test=bzimage\0";
    let mut cmdline = vec![0u8; expected.len()];
    mem.read_slice(&mut cmdline, GuestAddress(cmd_ptr)).unwrap();
    assert_eq!(cmdline, expected);
    let ramdisk = u32::from_le_bytes(read(0x218, 4).try_into().unwrap()) as u64;
    let ramdisk_size = u32::from_le_bytes(read(0x21c, 4).try_into().unwrap()) as u64;
    let initrd = std::fs::read(guest_files().1).unwrap();
    assert_eq!(ramdisk_size, initrd.len() as u64);
    let mut head = vec![0u8; 64];
    mem.read_slice(&mut head, GuestAddress(ramdisk)).unwrap();
    assert_eq!(head, initrd[..64]);
    assert!(ramdisk + ramdisk_size <= 256 << 20);
    let e820_entries = read(0x1e8, 1)[0];
    assert_eq!(e820_entries, 2);
    let entry = |i: u64| {
        let b = read(0x2d0 + i * 20, 20);
        (
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            u64::from_le_bytes(b[8..16].try_into().unwrap()),
            u32::from_le_bytes(b[16..20].try_into().unwrap()),
        )
    };
    assert_eq!(entry(0), (0, 0x9fc00, 1));
    assert_eq!(entry(1), (0x100000, (256 << 20) - 0x100000, 1));
}
