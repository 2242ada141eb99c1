//! Minimal ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) so that a guest finds every vCPU and
//! the IOAPIC: kernels built without MP-table support (Debian's cloud kernel among them) learn
//! about CPUs only from the MADT. The FADT declares a hardware-reduced platform, so the guest
//! expects no PM timer, SCI or fixed-function registers, as with Firecracker.

use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::{IOAPIC_BASE, LAPIC_BASE};
use crate::arch::{table_checksum, GuestMem};

/// Where the RSDP goes (inside the BIOS area Linux scans; the memory maps mark it reserved).
pub const RSDP_START: u64 = 0xe_0000;
const OEM_ID: &[u8; 6] = b"NOVACR";
const OEM_TABLE_ID: &[u8; 8] = b"NOVACRON";
const CREATOR_ID: &[u8; 4] = b"NVCR";

/// Failure to write the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// Writing into guest memory failed.
    #[error("writing ACPI tables into guest memory: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// A system description table: the 36-byte header, then `body`; length and checksum filled.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = table_checksum(&t);
    t
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_BASE.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259 PICs
    for cpu in 0..cpus {
        body.extend_from_slice(&[0, 8, cpu, cpu]); // processor local APIC: UID, APIC id
        body.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    body.extend_from_slice(&[1, 12, cpus.saturating_add(1), 0]); // IOAPIC id after the CPUs
    body.extend_from_slice(&IOAPIC_BASE.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    sdt(b"APIC", 5, &body)
}

fn fadt(dsdt: u64) -> Vec<u8> {
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
    let mut body = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    body[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    body[at(109)..at(111)].copy_from_slice(&IAPC_VGA_NOT_PRESENT.to_le_bytes());
    body[at(112)..at(116)].copy_from_slice(&HW_REDUCED_ACPI.to_le_bytes());
    body[at(131)] = 3; // FADT minor version: ACPI 6.3
    body[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    body[at(268)..at(276)].copy_from_slice(b"NOVACRON"); // hypervisor vendor identity
    sdt(b"FACP", 6, &body)
}

/// The tables for `cpus` vCPUs laid out from [`RSDP_START`], as (address, bytes) pieces.
pub fn build(cpus: u8) -> Vec<(u64, Vec<u8>)> {
    let align = |a: u64| (a + 0x3f) & !0x3f;
    let xsdt_at = RSDP_START + 0x40;
    let dsdt = sdt(b"DSDT", 2, &[]);
    let madt = madt(cpus);
    // XSDT with two entries is 36 + 16 bytes.
    let fadt_at = align(xsdt_at + 52);
    let fadt_len = 276;
    let madt_at = align(fadt_at + fadt_len);
    let dsdt_at = align(madt_at + madt.len() as u64);
    let fadt = fadt(dsdt_at);
    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&fadt_at.to_le_bytes());
    xsdt_body.extend_from_slice(&madt_at.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &xsdt_body);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes, below
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+ (XSDT)
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_at.to_le_bytes());
    rsdp.push(0); // extended checksum, below
    rsdp.extend_from_slice(&[0; 3]);
    rsdp[8] = table_checksum(&rsdp[..20]);
    rsdp[32] = table_checksum(&rsdp);
    vec![
        (RSDP_START, rsdp),
        (xsdt_at, xsdt),
        (fadt_at, fadt),
        (madt_at, madt),
        (dsdt_at, dsdt),
    ]
}

/// Writes the tables for `cpus` vCPUs; returns the RSDP's address.
pub fn write(mem: &GuestMem, cpus: u8) -> Result<u64, AcpiError> {
    for (addr, bytes) in build(cpus) {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(AcpiError::Memory)?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_are_well_formed_and_linked() {
        let tables = build(4);
        let (rsdp_at, rsdp) = &tables[0];
        assert_eq!(*rsdp_at, RSDP_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let find = |addr: u64| {
            tables
                .iter()
                .find(|(a, _)| *a == addr)
                .map(|(_, t)| t)
                .unwrap()
        };
        let xsdt = find(xsdt_at);
        assert_eq!(&xsdt[..4], b"XSDT");
        for (_, t) in &tables[1..] {
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
            assert_eq!(sum(t), 0, "{:?}", std::str::from_utf8(&t[..4]));
        }
        let fadt = find(u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt.len(), 276);
        let dsdt = find(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[..4], b"DSDT");
        let madt = find(u64::from_le_bytes(xsdt[44..52].try_into().unwrap()));
        assert_eq!(&madt[..4], b"APIC");
        // Four local APIC entries, then the IOAPIC.
        assert_eq!(madt.len(), 44 + 4 * 8 + 12);
        assert_eq!(madt[44 + 3 * 8 + 3], 3, "APIC id of the fourth CPU");
        assert_eq!(madt[44 + 4 * 8], 1, "IOAPIC entry type");
    }
}
