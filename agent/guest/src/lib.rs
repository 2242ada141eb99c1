//! NovaCron's own freestanding test guest and its guest-agent ABI.
//!
//! The guest is C and assembly built by `build.rs` with the host gcc into a 64-bit ELF
//! loaded at 1 MiB. It has two entries: the ELF entry point (64-bit, used by the NovaCron
//! VMM) and a PVH 32-bit entry advertised by a Xen ELF note (used by
//! `qemu-system-x86_64 -kernel`). It writes self-describing pages at a controlled rate and
//! reports through a status page shared with the VMM; [`abi`] mirrors that contract so
//! host-side code can drive the guest and verify its memory independently.
//!
//! The same workload is also built as a static Linux program ([`linux_workload_path`]).
//! See `docs/design/test-guest.md`.

#![deny(missing_docs)]

use std::path::Path;

pub mod abi;

/// Path of the built guest ELF (in the build's `OUT_DIR`).
pub fn guest_elf_path() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/novacron-testguest.elf"))
}

/// The guest ELF image, embedded at compile time.
pub fn guest_elf() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/novacron-testguest.elf"))
}

/// Path of the same workload built as a static x86-64 Linux program (e.g. for an initramfs).
///
/// It takes the `nc.*` settings from its arguments (and, as PID 1, from `/proc/cmdline`),
/// prints the same report lines on stdout and exits 0 iff its last verification passed
/// (as PID 1 it powers the machine off instead). Linux-only extra setting: `nc.dump=PATH`
/// writes the working set to `PATH` after the final verification.
pub fn linux_workload_path() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/novacron-workload"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    struct Phdr {
        p_type: u32,
        offset: usize,
        vaddr: u64,
        paddr: u64,
        filesz: usize,
        align: u64,
    }

    fn phdrs(elf: &[u8]) -> Vec<Phdr> {
        let phoff = u64_at(elf, 0x20) as usize;
        let phentsize = u16_at(elf, 0x36) as usize;
        (0..u16_at(elf, 0x38) as usize)
            .map(|k| {
                let p = phoff + k * phentsize;
                Phdr {
                    p_type: u32_at(elf, p),
                    offset: u64_at(elf, p + 8) as usize,
                    vaddr: u64_at(elf, p + 0x10),
                    paddr: u64_at(elf, p + 0x18),
                    filesz: u64_at(elf, p + 0x20) as usize,
                    align: u64_at(elf, p + 0x30),
                }
            })
            .collect()
    }

    fn symbol(elf: &[u8], name: &str) -> Option<u64> {
        let shoff = u64_at(elf, 0x28) as usize;
        let shentsize = u16_at(elf, 0x3a) as usize;
        let shnum = u16_at(elf, 0x3c) as usize;
        let sh = |k: usize| shoff + k * shentsize;
        for k in 0..shnum {
            if u32_at(elf, sh(k) + 4) != 2 {
                continue; // not SHT_SYMTAB
            }
            let off = u64_at(elf, sh(k) + 0x18) as usize;
            let size = u64_at(elf, sh(k) + 0x20) as usize;
            let strtab = sh(u32_at(elf, sh(k) + 0x28) as usize);
            let stroff = u64_at(elf, strtab + 0x18) as usize;
            for s in (off..off + size).step_by(24) {
                let n = stroff + u32_at(elf, s) as usize;
                let end = n + elf[n..].iter().position(|&c| c == 0)?;
                if &elf[n..end] == name.as_bytes() {
                    return Some(u64_at(elf, s + 8));
                }
            }
        }
        None
    }

    #[test]
    fn elf_header_and_entry_is_64bit_entry() {
        let elf = guest_elf();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(elf[5], 1, "little endian");
        assert_eq!(u16_at(elf, 0x10), 2, "ET_EXEC");
        assert_eq!(u16_at(elf, 0x12), 62, "EM_X86_64");
        let entry = u64_at(elf, 0x18);
        assert_eq!(Some(entry), symbol(elf, "nc_entry64"));
        assert_eq!(entry, abi::GUEST_LOAD_ADDR, "64-bit entry opens the image");
        assert_eq!(std::fs::read(guest_elf_path()).unwrap(), elf);
    }

    #[test]
    fn loads_at_1mib_physical_equals_virtual() {
        let elf = guest_elf();
        let loads: Vec<_> = phdrs(elf).into_iter().filter(|p| p.p_type == 1).collect();
        assert!(!loads.is_empty());
        for p in &loads {
            assert_eq!(p.vaddr, p.paddr);
            assert!(p.paddr >= abi::GUEST_LOAD_ADDR);
        }
        assert_eq!(
            loads.iter().map(|p| p.paddr).min(),
            Some(abi::GUEST_LOAD_ADDR)
        );
    }

    #[test]
    fn has_pvh_note_with_32bit_entry() {
        let elf = guest_elf();
        let notes: Vec<_> = phdrs(elf).into_iter().filter(|p| p.p_type == 4).collect();
        assert_eq!(notes.len(), 1, "one PT_NOTE");
        let n = &notes[0];
        assert_eq!(n.align, 4, "QEMU aligns the note name by p_align");
        let note = &elf[n.offset..n.offset + n.filesz];
        let (namesz, descsz, ty) = (u32_at(note, 0), u32_at(note, 4), u32_at(note, 8));
        assert_eq!((namesz, descsz, ty), (4, 4, abi::XEN_ELFNOTE_PHYS32_ENTRY));
        assert_eq!(&note[12..16], b"Xen\0");
        let entry32 = u32_at(note, 16);
        assert_eq!(Some(u64::from(entry32)), symbol(elf, "nc_entry32"));
        assert_ne!(u64::from(entry32), u64_at(elf, 0x18));
    }

    #[test]
    fn linux_workload_is_built() {
        let b = std::fs::read(linux_workload_path()).unwrap();
        assert_eq!(&b[..4], b"\x7fELF");
        assert_eq!(u16_at(&b, 0x12), 62);
    }
}
