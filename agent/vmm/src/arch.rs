//! x86-64 platform setup: the guest-physical layout, CPUID, boot MSRs, and the register
//! state for each entry protocol (long mode set up by the VMM, PVH 32-bit, Linux 64-bit).

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory as this VMM maps it: anonymous mappings with a dirty bitmap of the VMM's own
/// writes (KVM's dirty log covers the guest's).
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Guest-physical layout (low memory is shared by all entry protocols).
pub mod layout {
    /// Boot GDT.
    pub const GDT_START: u64 = 0x500;
    /// PVH `hvm_start_info`.
    pub const PVH_INFO_START: u64 = 0x6000;
    /// PVH memory map entries.
    pub const PVH_MEMMAP_START: u64 = 0x6100;
    /// Linux zero page (`boot_params`).
    pub const ZERO_PAGE_START: u64 = 0x7000;
    /// Initial stack pointer for entry protocols that need one.
    pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
    /// Boot page tables: PML4, PDPT, then four page directories (identity map of 4 GiB).
    pub const PML4_START: u64 = 0x9000;
    /// Page-directory-pointer table.
    pub const PDPT_START: u64 = 0xa000;
    /// First of four page directories.
    pub const PD_START: u64 = 0xb000;
    /// Kernel command line.
    pub const CMDLINE_START: u64 = 0x20000;
    /// Largest command line, including the terminating NUL.
    pub const CMDLINE_MAX_SIZE: usize = 4096;
    /// Start of the extended BIOS data area; RAM below it is usable.
    pub const EBDA_START: u64 = 0x9fc00;
    /// Kernels load here (1 MiB).
    pub const HIMEM_START: u64 = 0x10_0000;
    /// Start of the 32-bit MMIO hole (no RAM between here and 4 GiB).
    pub const MMIO_GAP_START: u64 = 0xc000_0000;
    /// End of the 32-bit MMIO hole.
    pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
    /// The local APICs' MMIO base.
    pub const LAPIC_BASE: u32 = 0xfee0_0000;
    /// The IOAPIC's MMIO base.
    pub const IOAPIC_BASE: u32 = 0xfec0_0000;
}

/// The byte that makes `bytes` sum to zero (mod 256): the checksum of ACPI and MP tables.
pub fn table_checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Failure to set up the platform of one vCPU.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures into guest memory failed.
    #[error("writing {what} into guest memory: {source}")]
    Memory {
        /// What was written.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Kvm { op, source }
}

/// The guest memory ranges for `size` bytes of RAM: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(layout::MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(layout::MMIO_GAP_END), (size - low) as usize));
    }
    ranges
}

/// The CPUID a VMM should show: what KVM supports, with topology and identity filled in for
/// vCPU `index` of `count`, the hypervisor bit set, and the PMU hidden (not virtualised here).
pub fn cpuid(kvm: &Kvm, index: u8, count: u8) -> Result<CpuId, ArchError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX: initial APIC id, logical processor count, CLFLUSH line size (8 qwords).
                entry.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
                entry.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: the count in EBX is valid
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; keep the cache description.
                entry.eax = (entry.eax & 0x03ff_ffff) | (u32::from(count.saturating_sub(1)) << 26);
            }
            6 => entry.ecx &= !(1 << 3), // no energy-performance bias MSR
            0xa => {
                // No architectural PMU: counters are not virtualised by this VMM.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0xb | 0x1f => {
                entry.edx = u32::from(index); // x2APIC id
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

/// MSRs every vCPU starts with (as Firecracker and Cloud Hypervisor set them).
pub fn boot_msrs() -> Msrs {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, 1),          // fast strings
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ];
    Msrs::from_entries(&entries).expect("fixed MSR list fits a kvm_msrs")
}

/// Programs CPUID, MSRs, FPU and the LAPIC's LINT pins of one vCPU.
pub fn configure_vcpu(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), ArchError> {
    vcpu.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    let msrs = boot_msrs();
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != msrs.as_slice().len() {
        tracing::debug!(
            set,
            wanted = msrs.as_slice().len(),
            "KVM accepted fewer boot MSRs"
        );
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    set_lint(vcpu)
}

/// LINT0 as ExtINT (the PIC), LINT1 as NMI: what firmware leaves for a legacy OS.
fn set_lint(vcpu: &VcpuFd) -> Result<(), ArchError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let get = |regs: &[i8], off: usize| {
        u32::from_le_bytes([
            regs[off] as u8,
            regs[off + 1] as u8,
            regs[off + 2] as u8,
            regs[off + 3] as u8,
        ])
    };
    let put = |regs: &mut [i8], off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as i8;
        }
    };
    let mode = |reg: u32, m: u32| (reg & !0x700) | (m << 8);
    let lvt0 = get(&lapic.regs, APIC_LVT0);
    put(&mut lapic.regs, APIC_LVT0, mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get(&lapic.regs, APIC_LVT1);
    put(&mut lapic.regs, APIC_LVT1, mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

/// GDT entry from flags, base and limit (the classic packing).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from((entry >> 47) & 1 == 0),
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_MP: u64 = 0x2;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_NE: u64 = 0x20;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const X86_CR4_OSFXSR: u64 = 0x200;
const X86_CR4_OSXMMEXCPT: u64 = 0x400;
const EFER_SCE: u64 = 0x1;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Writes the boot GDT (null, code, data, TSS) and returns the code and data segments for
/// 64-bit (`long`) or 32-bit flat protected mode.
fn write_gdt(
    mem: &GuestMem,
    long: bool,
) -> Result<(kvm_segment, kvm_segment, kvm_segment), ArchError> {
    let code_flags = if long { 0xa09b } else { 0xc09b };
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT_START + i as u64 * 8))
            .map_err(|source| ArchError::Memory {
                what: "boot GDT",
                source,
            })?;
    }
    Ok((
        segment_from_gdt(gdt[1], 1),
        segment_from_gdt(gdt[2], 2),
        segment_from_gdt(gdt[3], 3),
    ))
}

/// Identity-maps the first 4 GiB with 2 MiB pages, user-accessible (the test guest runs its
/// workload at CPL3 in this map).
fn write_page_tables(mem: &GuestMem) -> Result<(), ArchError> {
    const P_RW_US: u64 = 0x7;
    const PS: u64 = 0x80;
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|source| ArchError::Memory {
                what: "boot page tables",
                source,
            })
    };
    w(layout::PDPT_START | P_RW_US, layout::PML4_START)?;
    let mut pd = Vec::with_capacity(4 * 4096);
    for gib in 0..4u64 {
        w(
            (layout::PD_START + gib * 0x1000) | P_RW_US,
            layout::PDPT_START + gib * 8,
        )?;
        for i in 0..512u64 {
            pd.extend_from_slice(&(((gib << 30) + (i << 21)) | P_RW_US | PS).to_le_bytes());
        }
    }
    mem.write_slice(&pd, GuestAddress(layout::PD_START))
        .map_err(|source| ArchError::Memory {
            what: "boot page tables",
            source,
        })
}

/// Where and how a vCPU starts.
#[derive(Debug, Clone, Copy)]
pub enum BootCpuState {
    /// 64-bit long mode at `rip`, with `rbx` and `rsi` as the protocol wants (PVH start info
    /// for NovaCron direct entry; boot_params for Linux).
    Long {
        /// Entry point.
        rip: u64,
        /// RBX at entry.
        rbx: u64,
        /// RSI at entry.
        rsi: u64,
    },
    /// 32-bit flat protected mode, paging off (PVH), `hvm_start_info` in EBX.
    Protected32 {
        /// Entry point.
        rip: u64,
        /// EBX at entry.
        rbx: u64,
    },
}

/// Sets the boot vCPU's registers for `state`, writing the GDT and page tables it needs.
pub fn setup_boot_regs(
    vcpu: &VcpuFd,
    mem: &GuestMem,
    state: BootCpuState,
) -> Result<(), ArchError> {
    let long = matches!(state, BootCpuState::Long { .. });
    let (code, data, tss) = write_gdt(mem, long)?;
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE;
    sregs.cr4 = 0;
    sregs.efer = 0;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match state {
        BootCpuState::Long { rip, rbx, rsi } => {
            write_page_tables(mem)?;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
            sregs.cr0 |= X86_CR0_PG | X86_CR0_MP;
            sregs.efer = EFER_LME | EFER_LMA | EFER_SCE;
            regs.rip = rip;
            regs.rbx = rbx;
            regs.rsi = rsi;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
        }
        BootCpuState::Protected32 { rip, rbx } => {
            regs.rip = rip;
            regs.rbx = rbx;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

/// A one-paragraph dump of a vCPU's registers, for failure reports.
pub fn dump_registers(vcpu: &VcpuFd) -> String {
    let mut out = String::new();
    match vcpu.get_regs() {
        Ok(r) => out.push_str(&format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9,
            r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
        )),
        Err(e) => out.push_str(&format!("(KVM_GET_REGS failed: {e})")),
    }
    match vcpu.get_sregs() {
        Ok(s) => out.push_str(&format!(
            " cs={:#x}(dpl{} l{}) ss={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            s.cs.selector, s.cs.dpl, s.cs.l, s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        )),
        Err(e) => out.push_str(&format!(" (KVM_GET_SREGS failed: {e})")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trips_into_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.l, 1);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.type_, 0xb);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data.db, 1);
        assert_eq!(data.present, 1);
    }

    #[test]
    fn ram_ranges_skip_the_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big.len(), 2);
        assert_eq!(big[1].0, GuestAddress(layout::MMIO_GAP_END));
        assert_eq!(big[0].1 + big[1].1, 4 << 30);
    }
}
