//! Loading a guest kernel and writing what its entry protocol expects: the Linux zero page
//! with an e820 map, or a PVH `hvm_start_info` with a memory map, plus command line and
//! initramfs.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::{layout, BootCpuState, GuestMem};
use crate::config::EntryProtocol;

/// Failure to load a kernel or its boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initramfs file could not be read.
    #[error("reading {what} {path}: {source}")]
    Read {
        /// kernel or initramfs.
        what: &'static str,
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not a format this VMM boots.
    #[error("kernel {path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What was found and what was expected.
        reason: String,
    },
    /// linux-loader refused the image.
    #[error("loading kernel {path}: {source}")]
    Load {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initramfs does not fit into guest memory below the kernel's limit.
    #[error("initramfs of {size} bytes does not fit below {limit:#x} in guest memory")]
    InitramfsTooLarge {
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The command line is too long.
    #[error("command line of {0} bytes is too long (at most 4095)")]
    CmdlineTooLong(usize),
    /// Writing into guest memory failed.
    #[error("writing {what} into guest memory: {source}")]
    Memory {
        /// What was written.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The kernel image formats this VMM recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// An ELF64 executable (vmlinux, PVH kernels, the test guest).
    Elf,
    /// A Linux bzImage.
    BzImage,
}

/// Recognises an image from its first bytes.
pub fn detect_format(path: &Path) -> Result<ImageFormat, BootError> {
    let bytes = std::fs::read(path).map_err(|source| BootError::Read {
        what: "kernel",
        path: path.display().to_string(),
        source,
    })?;
    if bytes.len() >= 4 && &bytes[..4] == b"\x7fELF" {
        return Ok(ImageFormat::Elf);
    }
    if bytes.len() >= 0x206 && &bytes[0x202..0x206] == b"HdrS" {
        return Ok(ImageFormat::BzImage);
    }
    Err(BootError::Format {
        path: path.display().to_string(),
        reason: "neither an ELF executable nor a bzImage (no \\x7fELF magic, no HdrS header)"
            .into(),
    })
}

/// What the boot vCPU needs after loading.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// Register state of the boot vCPU.
    pub cpu: BootCpuState,
    /// The protocol that was chosen.
    pub protocol: EntryProtocol,
}

/// Loads `kernel` (and `initramfs`) into `mem` and writes the boot data for `entry`.
pub fn load(
    mem: &GuestMem,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    entry: EntryProtocol,
    rsdp: Option<u64>,
) -> Result<Loaded, BootError> {
    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let kpath = kernel.display().to_string();
    let format = detect_format(kernel)?;
    let mut file = File::open(kernel).map_err(|source| BootError::Read {
        what: "kernel",
        path: kpath.clone(),
        source,
    })?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let load_err = |source| BootError::Load {
        path: kpath.clone(),
        source,
    };
    let result = match format {
        ImageFormat::Elf => Elf::load(mem, None, &mut file, himem).map_err(load_err)?,
        ImageFormat::BzImage => BzImage::load(mem, None, &mut file, himem).map_err(load_err)?,
    };
    let protocol = match (entry, format, result.pvh_boot_cap) {
        (EntryProtocol::Auto, ImageFormat::BzImage, _) => EntryProtocol::Linux,
        (EntryProtocol::Auto, ImageFormat::Elf, PvhBootCapability::PvhEntryPresent(_)) => {
            EntryProtocol::Pvh
        }
        (EntryProtocol::Auto, ImageFormat::Elf, _) => EntryProtocol::Linux,
        (EntryProtocol::Pvh | EntryProtocol::Long64, ImageFormat::BzImage, _) => {
            return Err(BootError::Format {
                path: kpath,
                reason: format!("a bzImage cannot be entered with the {entry:?} protocol; expected an ELF image"),
            })
        }
        (other, _, _) => other,
    };

    write_cmdline(mem, cmdline)?;
    let initrd = match initramfs {
        Some(path) => Some(load_initramfs(
            mem,
            path,
            result.setup_header.map(|h| h.initrd_addr_max),
        )?),
        None => None,
    };

    let cpu = match protocol {
        EntryProtocol::Pvh => {
            let PvhBootCapability::PvhEntryPresent(entry_addr) = result.pvh_boot_cap else {
                return Err(BootError::Format {
                    path: kpath,
                    reason:
                        "no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); expected a PVH-capable ELF"
                            .into(),
                });
            };
            write_pvh_start_info(mem, cmdline, initrd, rsdp)?;
            BootCpuState::Protected32 {
                rip: entry_addr.0,
                rbx: layout::PVH_INFO_START,
            }
        }
        EntryProtocol::Long64 => {
            write_pvh_start_info(mem, cmdline, initrd, rsdp)?;
            BootCpuState::Long {
                rip: result.kernel_load.0,
                rbx: layout::PVH_INFO_START,
                rsi: 0,
            }
        }
        EntryProtocol::Linux | EntryProtocol::Auto => {
            write_zero_page(mem, cmdline, initrd, result.setup_header, rsdp)?;
            let rip = match format {
                // The 64-bit entry of a bzImage is 0x200 past where its protected-mode code loads.
                ImageFormat::BzImage => result.kernel_load.0 + 0x200,
                ImageFormat::Elf => result.kernel_load.0,
            };
            BootCpuState::Long {
                rip,
                rbx: 0,
                rsi: layout::ZERO_PAGE_START,
            }
        }
    };
    Ok(Loaded { cpu, protocol })
}

fn write_cmdline(mem: &GuestMem, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|source| BootError::Memory {
            what: "command line",
            source,
        })
}

/// Places the initramfs page-aligned as high as allowed in low memory; returns (addr, size).
fn load_initramfs(
    mem: &GuestMem,
    path: &Path,
    addr_max: Option<u32>,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::Read {
        what: "initramfs",
        path: path.display().to_string(),
        source,
    })?;
    let size = data.len() as u64;
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0);
    let mut limit = low_end;
    if let Some(max) = addr_max.filter(|m| *m != 0) {
        limit = limit.min(u64::from(max) + 1);
    }
    let start = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= layout::HIMEM_START + (16 << 20))
        .ok_or(BootError::InitramfsTooLarge { size, limit })?;
    mem.write_slice(&data, GuestAddress(start))
        .map_err(|source| BootError::Memory {
            what: "initramfs",
            source,
        })?;
    Ok((start, size))
}

/// RAM ranges for the guest's memory map: below the EBDA, then from 1 MiB on.
fn e820_ranges(mem: &GuestMem) -> Vec<(u64, u64)> {
    let mut out = vec![(0, layout::EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().0.max(layout::HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            out.push((start, end - start));
        }
    }
    out
}

/// Writes `hvm_start_info` (version 1), its memory map and module list.
fn write_pvh_start_info(
    mem: &GuestMem,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
    const E820_RAM: u32 = 1;
    const E820_RESERVED: u32 = 2;
    let mem_err = |source| BootError::Memory {
        what: "PVH start info",
        source,
    };
    let mut map: Vec<(u64, u64, u32)> = Vec::new();
    for (addr, size) in e820_ranges(mem) {
        map.push((addr, size, E820_RAM));
        if addr == 0 {
            map.push((
                layout::EBDA_START,
                layout::HIMEM_START - layout::EBDA_START,
                E820_RESERVED,
            ));
        }
    }
    let mut memmap = Vec::new();
    for (addr, size, kind) in &map {
        memmap.extend_from_slice(&addr.to_le_bytes());
        memmap.extend_from_slice(&size.to_le_bytes());
        memmap.extend_from_slice(&kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    // The module list (one initramfs entry) follows the memory map.
    let modlist_addr = layout::PVH_MEMMAP_START + memmap.len() as u64;
    let mut modlist = Vec::new();
    if let Some((addr, size)) = initrd {
        modlist.extend_from_slice(&addr.to_le_bytes());
        modlist.extend_from_slice(&size.to_le_bytes());
        modlist.extend_from_slice(&0u64.to_le_bytes());
        modlist.extend_from_slice(&0u64.to_le_bytes());
    }
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC_VALUE.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes()); // nr_modules
    info.extend_from_slice(&(if initrd.is_some() { modlist_addr } else { 0 }).to_le_bytes());
    let cmdline_addr = if cmdline.is_empty() {
        0
    } else {
        layout::CMDLINE_START
    };
    info.extend_from_slice(&cmdline_addr.to_le_bytes());
    info.extend_from_slice(&rsdp.unwrap_or(0).to_le_bytes());
    info.extend_from_slice(&layout::PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&info, GuestAddress(layout::PVH_INFO_START))
        .map_err(mem_err)?;
    mem.write_slice(&memmap, GuestAddress(layout::PVH_MEMMAP_START))
        .map_err(mem_err)?;
    mem.write_slice(&modlist, GuestAddress(modlist_addr))
        .map_err(mem_err)
}

/// `boot_params` as bytes for guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a bindgen-generated, packed, plain-old-data struct of integers and
// arrays of integers: every bit pattern is valid and it has no padding or pointers.
unsafe impl ByteValued for ZeroPage {}

fn write_zero_page(
    mem: &GuestMem,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
    const E820_RAM: u32 = 1;
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.acpi_rsdp_addr = rsdp.unwrap_or(0);
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let ranges = e820_ranges(mem);
    for (i, (addr, size)) in ranges.iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = ranges.len().min(params.e820_table.len()) as u8;
    mem.write_obj(ZeroPage(params), GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|source| BootError::Memory {
            what: "zero page",
            source,
        })
}
