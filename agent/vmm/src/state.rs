//! Saving and restoring a VM: every vCPU's architectural state, the in-kernel irqchip, PIT
//! and clock, the devices, and guest memory.
//!
//! On disk a saved VM is a directory with `state.bin` (a header with magic, version, length
//! and CRC32, then the state as JSON) and `memory.bin` (the guest's RAM regions back to back).
//! The loader checks magic, version, length and checksum before it trusts a byte. The live
//! migration issue will move the same state into `rkyv` on the wire.

use std::io::{Read, Write};
use std::path::Path;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::vm::{VcpuRequest, Vm, VmError};

/// Magic at the start of `state.bin`.
pub const STATE_MAGIC: [u8; 8] = *b"NCVMSTAT";
/// Version of the state format.
pub const STATE_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// Failure to save or restore state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM get/set ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading or writing a state file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not a NovaCron state file, or is damaged.
    #[error("state file rejected: {0}")]
    Corrupt(String),
    /// The state does not fit this VM (other vCPU count or memory size).
    #[error("state does not fit this VM: {0}")]
    Mismatch(String),
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { op, source }
}

/// MSRs saved per vCPU (the ones a guest changes and KVM does not keep elsewhere).
const SAVED_MSRS: &[u32] = &[
    0x10, // TSC
    0x1b, // APIC base
    0x3b, // TSC adjust
    0x174,
    0x175,
    0x176, // SYSENTER
    0x1a0, // misc enable
    0x277, // PAT
    0x2ff, // MTRR default type
    0x6e0, // TSC deadline
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084, // STAR, LSTAR, CSTAR, SFMASK
    0xc000_0102, // kernel GS base
    0xc000_0103, // TSC aux
    0x4b56_4d00,
    0x4b56_4d01, // kvmclock wall clock, system time
    0x4b56_4d02,
    0x4b56_4d03,
    0x4b56_4d04, // async PF, steal time, PV EOI
];

/// Architectural state of one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    msrs: Vec<(u32, u64)>,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
}

/// State of the whole VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    vcpus: Vec<VcpuState>,
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
    serial: SerialRegs,
    agent_status_gpa: Option<u64>,
    memory_regions: Vec<(u64, u64)>,
}

/// The UART's registers (vm-superio's `SerialState`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SerialRegs {
    regs: [u8; 9],
    in_buffer: Vec<u8>,
}

fn read_msrs(vcpu: &VcpuFd) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::new();
    // KVM stops at the first MSR it does not know; query one by one so one unsupported MSR
    // does not hide the rest.
    for index in SAVED_MSRS {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: *index,
            ..Default::default()
        }])
        .expect("one entry fits");
        if vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))? == 1 {
            out.push((*index, msrs.as_slice()[0].data));
        }
    }
    Ok(out)
}

/// Reads the state of a vCPU that is out of KVM_RUN.
pub(crate) fn save_vcpu(vcpu: &VcpuFd) -> Result<VcpuState, StateError> {
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
        msrs: read_msrs(vcpu)?,
        lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
    })
}

/// Writes a saved state into a vCPU that is out of KVM_RUN (order as KVM needs it: special
/// registers before the LAPIC, MSRs after, events last).
pub(crate) fn restore_vcpu(vcpu: &mut VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    // SAFETY: the xsave area was produced by KVM_GET_XSAVE on a vCPU of the same CPUID; it is
    // a plain 4 KiB buffer that KVM validates.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|(index, data)| kvm_msr_entry {
            index: *index,
            data: *data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| StateError::Corrupt(format!("MSR list: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(StateError::Mismatch(format!(
            "KVM accepted {set} of {} MSRs (first refused: {:#x})",
            entries.len(),
            entries[set].index
        )));
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))
}

fn irqchip(vm: &Vm, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.vm_fd
        .get_irqchip(&mut chip)
        .map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Reads the state of every vCPU of a paused VM.
pub fn save_vcpus(vm: &Vm) -> Result<Vec<VcpuState>, VmError> {
    vm.on_vcpus(|_, tx| VcpuRequest::Save(tx))
}

/// Saves a paused VM into `dir`.
pub fn save(vm: &Vm, dir: &Path) -> Result<(), VmError> {
    let vcpus = save_vcpus(vm)?;
    let serial = vm.devices.lock().unwrap().serial.state();
    let state = VmState {
        vcpus,
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.vm_fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.vm_fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        serial: SerialRegs {
            regs: [
                serial.baud_divisor_low,
                serial.baud_divisor_high,
                serial.interrupt_enable,
                serial.interrupt_identification,
                serial.line_control,
                serial.line_status,
                serial.modem_control,
                serial.modem_status,
                serial.scratch,
            ],
            in_buffer: serial.in_buffer,
        },
        agent_status_gpa: vm.devices.lock().unwrap().agent.status_gpa,
        memory_regions: vm.mem.iter().map(|r| (r.start_addr().0, r.len())).collect(),
    };
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| StateError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let payload = serde_json::to_vec(&state).map_err(|e| StateError::Corrupt(e.to_string()))?;
    let state_path = dir.join("state.bin");
    std::fs::write(&state_path, encode(&payload)).map_err(io(&state_path))?;
    let mem_path = dir.join("memory.bin");
    let mut file = std::fs::File::create(&mem_path).map_err(io(&mem_path))?;
    let mut buf = vec![0u8; 1 << 20];
    for region in vm.mem.iter() {
        let mut off = 0u64;
        while off < region.len() {
            let n = ((region.len() - off) as usize).min(buf.len());
            region
                .read_slice(&mut buf[..n], MemoryRegionAddress(off))
                .map_err(|e| StateError::Corrupt(format!("reading guest memory: {e}")))?;
            file.write_all(&buf[..n]).map_err(io(&mem_path))?;
            off += n as u64;
        }
    }
    file.flush().map_err(io(&mem_path))?;
    Ok(())
}

/// Frames a payload: magic, version, length, CRC32, payload.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks a framed payload and returns it.
pub fn decode(bytes: &[u8]) -> Result<&[u8], StateError> {
    if bytes.len() < HEADER_LEN {
        return Err(StateError::Corrupt(format!(
            "{} bytes is shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[..8] != STATE_MAGIC {
        return Err(StateError::Corrupt(
            "bad magic: not a NovaCron state file".into(),
        ));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != STATE_VERSION {
        return Err(StateError::Corrupt(format!(
            "version {version}; this VMM reads version {STATE_VERSION}"
        )));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(StateError::Corrupt(format!(
            "payload is {} bytes, header says {len}",
            payload.len()
        )));
    }
    if crc32fast::hash(payload) != crc {
        return Err(StateError::Corrupt("checksum mismatch".into()));
    }
    Ok(payload)
}

/// Restores a VM in the incoming state from `dir`; the VM is left paused.
pub fn restore(vm: &Vm, dir: &Path) -> Result<(), VmError> {
    let state_path = dir.join("state.bin");
    let bytes = std::fs::read(&state_path).map_err(|source| StateError::Io {
        path: state_path.display().to_string(),
        source,
    })?;
    let state: VmState = serde_json::from_slice(decode(&bytes)?)
        .map_err(|e| StateError::Corrupt(format!("state payload: {e}")))?;
    let ours: Vec<(u64, u64)> = vm.mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    if state.memory_regions != ours {
        return Err(StateError::Mismatch(format!(
            "memory layout {:?}, this VM has {ours:?}",
            state.memory_regions
        ))
        .into());
    }
    if state.vcpus.len() != usize::from(vm.config.vcpus) {
        return Err(StateError::Mismatch(format!(
            "{} vCPUs, this VM has {}",
            state.vcpus.len(),
            vm.config.vcpus
        ))
        .into());
    }
    let mem_path = dir.join("memory.bin");
    let mut file = std::fs::File::open(&mem_path).map_err(|source| StateError::Io {
        path: mem_path.display().to_string(),
        source,
    })?;
    let mut buf = vec![0u8; 1 << 20];
    for region in vm.mem.iter() {
        let mut off = 0u64;
        while off < region.len() {
            let n = ((region.len() - off) as usize).min(buf.len());
            file.read_exact(&mut buf[..n])
                .map_err(|source| StateError::Io {
                    path: mem_path.display().to_string(),
                    source,
                })?;
            region
                .write_slice(&buf[..n], MemoryRegionAddress(off))
                .map_err(|e| StateError::Corrupt(format!("writing guest memory: {e}")))?;
            off += n as u64;
        }
    }
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.vm_fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.vm_fd.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let mut clock = state.clock;
    clock.flags = 0;
    vm.vm_fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    {
        let mut devices = vm.devices.lock().unwrap();
        let r = state.serial.regs;
        let serial_state = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: state.serial.in_buffer.clone(),
        };
        devices.restore_serial(&serial_state)?;
        devices.agent.status_gpa = state.agent_status_gpa;
    }
    let mut vcpus = state.vcpus.into_iter();
    vm.on_vcpus(|_, tx| VcpuRequest::Restore(Box::new(vcpus.next().expect("count checked")), tx))?;
    vm.set_restored();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_rejects_damage() {
        let framed = encode(b"{\"a\":1}");
        assert_eq!(decode(&framed).unwrap(), b"{\"a\":1}");
        let mut bad = framed.clone();
        bad[0] = b'X';
        assert!(decode(&bad).unwrap_err().to_string().contains("magic"));
        let mut bad = framed.clone();
        bad[8] = 9;
        assert!(decode(&bad).unwrap_err().to_string().contains("version 9"));
        let mut bad = framed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(decode(&bad).unwrap_err().to_string().contains("checksum"));
        assert!(decode(&framed[..framed.len() - 1])
            .unwrap_err()
            .to_string()
            .contains("header says"));
        assert!(decode(&framed[..5]).is_err());
    }
}
