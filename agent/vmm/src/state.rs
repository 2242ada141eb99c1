//! A VM's state: every vCPU's architectural state, the in-kernel irqchip, PIT and clock, and
//! the devices, serialized with `rkyv` inside a frame that carries a magic, a version, the
//! length and a CRC32; guest memory travels separately (a file for a saved VM, page frames
//! for a live migration).
//!
//! The loader checks magic, version, length and checksum, then rkyv's own validation of the
//! archive, before it trusts a byte; then that vCPU count and memory layout fit the VM.
//! KVM's structs are plain old data: they travel as their exact bytes (`zerocopy`), so the
//! format follows the kernel ABI rather than a copy of it.
//!
//! A saved VM on disk is a directory with `state.bin` (the framed state) and `memory.bin`
//! (the RAM regions back to back).

use std::io::{Read, Write};
use std::path::Path;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use zerocopy::{FromBytes, IntoBytes};

use crate::vm::{VcpuRequest, Vm, VmError};

/// Magic at the start of a state frame.
pub const STATE_MAGIC: [u8; 8] = *b"NCVMSTAT";
/// Version of the state format (2: rkyv; 1 was JSON).
pub const STATE_VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// Largest state frame a loader accepts (254 vCPUs with XSAVE fit easily).
pub const MAX_STATE_LEN: u64 = 64 << 20;

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
    /// The state is not a NovaCron state, or is damaged.
    #[error("state rejected: {0}")]
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
    0x10,        // TSC
    0x1b,        // APIC base
    0x3b,        // TSC adjust
    0x174,       // SYSENTER CS
    0x175,       // SYSENTER ESP
    0x176,       // SYSENTER EIP
    0x1a0,       // misc enable
    0x277,       // PAT
    0x2ff,       // MTRR default type
    0x6e0,       // TSC deadline
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // kernel GS base
    0xc000_0103, // TSC aux
    0x4b56_4d00, // kvmclock wall clock
    0x4b56_4d01, // kvmclock system time
    0x4b56_4d02, // async PF
    0x4b56_4d03, // steal time
    0x4b56_4d04, // PV EOI
];

/// Architectural state of one vCPU: KVM structs as their exact bytes.
#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VcpuState {
    regs: Vec<u8>,
    sregs: Vec<u8>,
    xsave: Vec<u8>,
    xcrs: Vec<u8>,
    msrs: Vec<(u32, u64)>,
    lapic: Vec<u8>,
    events: Vec<u8>,
    mp_state: Vec<u8>,
    debugregs: Vec<u8>,
}

/// State of the whole VM but its memory.
#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VmState {
    vcpus: Vec<VcpuState>,
    pic_master: Vec<u8>,
    pic_slave: Vec<u8>,
    ioapic: Vec<u8>,
    pit: Vec<u8>,
    clock: Vec<u8>,
    /// UART registers (vm-superio's `SerialState`) and its receive FIFO.
    serial_regs: [u8; 9],
    serial_in: Vec<u8>,
    agent_status_gpa: Option<u64>,
    memory_regions: Vec<(u64, u64)>,
}

fn bytes_of<T: IntoBytes + zerocopy::Immutable>(v: &T) -> Vec<u8> {
    v.as_bytes().to_vec()
}

fn from_bytes<T: FromBytes>(what: &str, b: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(b).map_err(|_| {
        StateError::Corrupt(format!(
            "{what}: {} bytes, expected {}",
            b.len(),
            std::mem::size_of::<T>()
        ))
    })
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
        regs: bytes_of(&vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?),
        sregs: bytes_of(&vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?),
        xsave: bytes_of(&vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?),
        xcrs: bytes_of(&vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?),
        msrs: read_msrs(vcpu)?,
        lapic: bytes_of(&vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?),
        events: bytes_of(&vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?),
        mp_state: bytes_of(&vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?),
        debugregs: bytes_of(&vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?),
    })
}

/// Writes a saved state into a vCPU that is out of KVM_RUN (order as KVM needs it: special
/// registers before the LAPIC, MSRs after, events last).
pub(crate) fn restore_vcpu(vcpu: &mut VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let sregs: kvm_sregs = from_bytes("sregs", &s.sregs)?;
    let regs: kvm_regs = from_bytes("regs", &s.regs)?;
    let xsave: kvm_xsave = from_bytes("xsave", &s.xsave)?;
    let xcrs: kvm_xcrs = from_bytes("xcrs", &s.xcrs)?;
    let lapic: kvm_lapic_state = from_bytes("lapic", &s.lapic)?;
    let mp_state: kvm_mp_state = from_bytes("mp_state", &s.mp_state)?;
    let debugregs: kvm_debugregs = from_bytes("debugregs", &s.debugregs)?;
    let events: kvm_vcpu_events = from_bytes("events", &s.events)?;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    // SAFETY: the xsave area was produced by KVM_GET_XSAVE on a vCPU with the same CPUID; it
    // is a plain 4 KiB buffer that KVM validates.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
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
    vcpu.set_mp_state(mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_debug_regs(&debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_vcpu_events(&events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))
}

fn irqchip(vm: &Vm, chip_id: u32) -> Result<Vec<u8>, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.vm_fd
        .get_irqchip(&mut chip)
        .map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(bytes_of(&chip))
}

/// Reads the state of every vCPU of a paused VM.
pub fn save_vcpus(vm: &Vm) -> Result<Vec<VcpuState>, VmError> {
    vm.on_vcpus(|_, tx| VcpuRequest::Save(tx))
}

/// Captures the state of a paused VM (everything but memory) as a framed archive.
pub fn capture(vm: &Vm) -> Result<Vec<u8>, VmError> {
    let vcpus = save_vcpus(vm)?;
    let (serial, agent_status_gpa) = {
        let devices = vm.devices.lock().unwrap();
        (devices.serial.state(), devices.agent.status_gpa)
    };
    let state = VmState {
        vcpus,
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: bytes_of(&vm.vm_fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?),
        clock: bytes_of(&vm.vm_fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?),
        serial_regs: [
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
        serial_in: serial.in_buffer,
        agent_status_gpa,
        memory_regions: vm.mem.iter().map(|r| (r.start_addr().0, r.len())).collect(),
    };
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(&state)
        .map_err(|e| StateError::Corrupt(format!("serializing state: {e}")))?;
    Ok(encode(&payload))
}

/// Checks a framed state and loads it into a VM whose vCPUs are parked (incoming or paused);
/// the VM is left paused. Memory must be loaded separately.
pub fn apply(vm: &Vm, framed: &[u8]) -> Result<(), VmError> {
    let payload = decode(framed)?;
    // rkyv validates the archive's structure (bytecheck) before anything is read from it.
    let state: VmState = rkyv::from_bytes::<VmState, rkyv::rancor::Error>(payload)
        .map_err(|e| StateError::Corrupt(format!("state archive: {e}")))?;
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
    // Decode everything before touching KVM, so a bad state changes nothing.
    let chips: Vec<kvm_irqchip> = [&state.pic_master, &state.pic_slave, &state.ioapic]
        .iter()
        .map(|b| from_bytes("irqchip", b))
        .collect::<Result<_, _>>()?;
    let pit: kvm_pit_state2 = from_bytes("pit", &state.pit)?;
    let mut clock: kvm_clock_data = from_bytes("clock", &state.clock)?;
    for chip in &chips {
        vm.vm_fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.vm_fd.set_pit2(&pit).map_err(kvm("KVM_SET_PIT2"))?;
    clock.flags = 0;
    vm.vm_fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    {
        let mut devices = vm.devices.lock().unwrap();
        let r = state.serial_regs;
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
            in_buffer: state.serial_in.clone(),
        };
        devices.restore_serial(&serial_state)?;
        devices.agent.status_gpa = state.agent_status_gpa;
    }
    let mut vcpus = state.vcpus.into_iter();
    vm.on_vcpus(|_, tx| VcpuRequest::Restore(Box::new(vcpus.next().expect("count checked")), tx))?;
    vm.set_restored();
    Ok(())
}

/// Saves a paused VM into `dir`.
pub fn save(vm: &Vm, dir: &Path) -> Result<(), VmError> {
    let framed = capture(vm)?;
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| StateError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let state_path = dir.join("state.bin");
    std::fs::write(&state_path, framed).map_err(io(&state_path))?;
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
            "bad magic: not a NovaCron state".into(),
        ));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != STATE_VERSION {
        return Err(StateError::Corrupt(format!(
            "version {version}; this VMM reads version {STATE_VERSION}"
        )));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if len > MAX_STATE_LEN {
        return Err(StateError::Corrupt(format!(
            "length {len} exceeds the {MAX_STATE_LEN}-byte limit"
        )));
    }
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
    let framed = std::fs::read(&state_path).map_err(|source| StateError::Io {
        path: state_path.display().to_string(),
        source,
    })?;
    // Check the state before memory is touched.
    decode(&framed)?;
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
    apply(vm, &framed)
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
        let mut huge = framed.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&huge).unwrap_err().to_string().contains("limit"));
    }

    #[test]
    fn kvm_structs_round_trip_as_bytes() {
        let regs = kvm_regs {
            rip: 0x1234,
            rflags: 2,
            ..Default::default()
        };
        let back: kvm_regs = from_bytes("regs", &bytes_of(&regs)).unwrap();
        assert_eq!(back.rip, 0x1234);
        assert!(from_bytes::<kvm_regs>("regs", &[0u8; 3])
            .unwrap_err()
            .to_string()
            .contains("expected"));
    }
}
