//! The Intel MultiProcessor Specification table (v1.4), so that a guest without ACPI finds
//! every vCPU, the IOAPIC and the ISA interrupt routing. Linux scans the last KiB of base
//! memory for the floating pointer; the table sits at the start of the EBDA, which the memory
//! maps mark as not RAM.

use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::{self, IOAPIC_BASE, LAPIC_BASE};
use crate::arch::{table_checksum, GuestMem};

/// Where the floating pointer goes; the configuration table follows it.
pub const MPTABLE_START: u64 = layout::EBDA_START;
/// LAPIC version reported per CPU.
const APIC_VERSION: u8 = 0x14;
/// ISA IRQs routed through the IOAPIC.
const ISA_IRQS: u8 = 16;

/// Failure to write the table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Writing into guest memory failed.
    #[error("writing the MP table into guest memory: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// The floating pointer and configuration table for `cpus` vCPUs (APIC ids 0..cpus), as bytes.
pub fn build(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus.saturating_add(1);
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        entries.push(0u8); // MP_PROCESSOR
        entries.push(cpu); // APIC id
        entries.push(APIC_VERSION);
        entries.push(if cpu == 0 { 0x3 } else { 0x1 }); // enabled, BSP for CPU 0
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6
        entries.extend_from_slice(&((1u32 << 0) | (1 << 9)).to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    // The ISA bus.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_BASE.to_le_bytes());
    count += 1;
    // ISA IRQ i -> IOAPIC pin i, bus-default polarity and trigger.
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0: ExtINT from the PIC; LINT1: NMI, on every LAPIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"NOVACRON");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_BASE.to_le_bytes());
    table.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = table_checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((MPTABLE_START + 16) as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0u8; 5]);
    fp[10] = table_checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

/// Writes the MP table for `cpus` vCPUs.
pub fn write(mem: &GuestMem, cpus: u8) -> Result<(), MptableError> {
    mem.write_slice(&build(cpus), GuestAddress(MPTABLE_START))
        .map_err(MptableError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_hold() {
        for cpus in [1u8, 2, 254] {
            let t = build(cpus);
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + 16 + 2);
            // CPU 0 is the bootstrap processor, the others are enabled application processors.
            assert_eq!(table[44 + 3], 0x3);
            if cpus > 1 {
                assert_eq!(table[44 + 20 + 1], 1);
                assert_eq!(table[44 + 20 + 3], 0x1);
            }
        }
    }
}
