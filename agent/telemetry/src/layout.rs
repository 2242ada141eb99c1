//! The layout of the eBPF maps, mirrored from `ebpf/telemetry.bpf.c` (keep both in step).

/// VM slots in the per-VM arrays.
pub const MAX_VMS: u32 = 64;
/// `kvm_userspace_exit` reasons tracked per VM (KVM_EXIT_* codes; larger ones fold into the last).
pub const EXIT_REASONS: u32 = 64;
/// log2(ns) histogram buckets: bucket i counts values in [2^i, 2^(i+1)) ns; the last is open.
pub const HIST_BUCKETS: u32 = 40;
/// Counters per VM slot.
pub const COUNTERS: u32 = 20;

/// Index of each per-VM counter.
#[allow(missing_docs)]
pub mod counter {
    pub const PIO: u32 = 0;
    pub const MMIO: u32 = 1;
    pub const EMULATE: u32 = 2;
    pub const FPU: u32 = 3;
    pub const KVM_EXIT: u32 = 4;
    pub const HALT_WAKEUP: u32 = 5;
    pub const HALT_WAIT_NS: u32 = 6;
    pub const PAGE_FAULT: u32 = 7;
    pub const ONCPU_NS: u32 = 8;
    pub const PREEMPT_INVOL: u32 = 9;
    pub const SWITCH_OUT: u32 = 10;
    pub const WAKEUPS: u32 = 11;
    pub const BLK_RQ: u32 = 12;
    pub const BLK_BYTES: u32 = 13;
    pub const PRE_SAME_VM: u32 = 16;
    pub const PRE_OTHER_VM: u32 = 17;
    pub const PRE_KERNEL: u32 = 18;
    pub const PRE_HOST: u32 = 19;
}

/// Index of each global health counter.
#[allow(missing_docs)]
pub mod health {
    pub const MAP_UPDATE_FAILED: u32 = 0;
    pub const EVENTS_DROPPED: u32 = 1;
    pub const UNKNOWN_SLOT: u32 = 2;
    pub const COUNT: u32 = 4;
}

/// `watched` value kind: a vCPU thread.
pub const KIND_VCPU: u32 = 1;
/// `watched` value kind: the VMM process (its tgid).
pub const KIND_VMM: u32 = 2;

/// Value of the `watched` map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    /// The VM's slot.
    pub slot: u32,
    /// [`KIND_VCPU`] or [`KIND_VMM`].
    pub kind: u32,
}

/// Key of the `preemptors` map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PreemptKey {
    /// The preempted VM's slot.
    pub slot: u32,
    /// The preempting task's process id.
    pub tgid: u32,
}

/// Value of the `preemptors` map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreemptVal {
    /// Involuntary preemptions of the VM's vCPUs by that process.
    pub count: u64,
    /// That process's cgroup v2 id (when first seen).
    pub cgroup_id: u64,
}

// SAFETY: plain `repr(C)` structs of integers without padding, valid for any bit pattern.
unsafe impl aya::Pod for Watch {}
// SAFETY: as above.
unsafe impl aya::Pod for PreemptKey {}
// SAFETY: as above.
unsafe impl aya::Pod for PreemptVal {}

/// Names of the KVM_EXIT_* codes (index = code), for the `reason` label.
pub const EXIT_REASON_NAMES: [&str; 41] = [
    "unknown",
    "exception",
    "io",
    "hypercall",
    "debug",
    "hlt",
    "mmio",
    "irq_window_open",
    "shutdown",
    "fail_entry",
    "intr",
    "set_tpr",
    "tpr_access",
    "s390_sieic",
    "s390_reset",
    "dcr",
    "nmi",
    "internal_error",
    "osi",
    "papr_hcall",
    "s390_ucontrol",
    "watchdog",
    "s390_tsch",
    "epr",
    "system_event",
    "s390_stsi",
    "ioapic_eoi",
    "hyperv",
    "arm_nisv",
    "x86_rdmsr",
    "x86_wrmsr",
    "dirty_ring_full",
    "ap_reset_hold",
    "x86_bus_lock",
    "xen",
    "riscv_sbi",
    "riscv_csr",
    "notify",
    "loongarch_iocsr",
    "memory_fault",
    "tdx",
];

/// The `reason` label of exit code `code` (codes beyond the table are "other").
pub fn exit_reason_name(code: usize) -> &'static str {
    EXIT_REASON_NAMES.get(code).copied().unwrap_or("other")
}
