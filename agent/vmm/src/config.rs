//! The specification of one VM, as the agent hands it to a VMM process.
//!
//! The agent validates a spec before it persists it (see [`VmConfig::validate`]); the VMM
//! validates it again on start, so a hand-edited file cannot crash a VMM half-way.

use std::path::PathBuf;

pub use crate::dirty::DirtyTracking;
use serde::{Deserialize, Serialize};

/// Largest vCPU count a VMM accepts (the LAPIC ids of the MP layout fit in a byte).
pub const MAX_VCPUS: u8 = 254;
/// Smallest guest memory a VMM accepts, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;

/// How the VMM enters the guest kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EntryProtocol {
    /// Pick from the image: bzImage -> Linux boot protocol; ELF with a PVH note -> PVH;
    /// other ELF -> Linux 64-bit boot protocol.
    #[default]
    Auto,
    /// Linux/x86 boot protocol (boot_params with an e820 map, 64-bit entry).
    Linux,
    /// PVH: 32-bit protected mode at the PVH note's entry, `hvm_start_info` in RBX.
    Pvh,
    /// NovaCron direct: long mode set up by the VMM, ELF `e_entry` at CPL0, `hvm_start_info`
    /// in RBX. Used by the project's test guest so that almost nothing runs at CPL0.
    Long64,
}

/// One VM, as a VMM process runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Stable id (assigned by the agent).
    pub id: String,
    /// Human name, unique on the host.
    pub name: String,
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Back guest memory with huge pages (MAP_HUGETLB); falls back to THP advice if false.
    #[serde(default)]
    pub hugepages: bool,
    /// Kernel image: bzImage, ELF vmlinux, PVH ELF, or the NovaCron test guest.
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Entry protocol.
    #[serde(default)]
    pub entry: EntryProtocol,
    /// Serial console log file.
    pub console_log: PathBuf,
    /// Debug console (port 0xe9) output file.
    pub debugcon_log: PathBuf,
    /// Rotate the console log when it grows past this many bytes (0 = never).
    #[serde(default = "default_console_max")]
    pub console_log_max_bytes: u64,
    /// How the guest's dirty pages are tracked during a migration.
    #[serde(default)]
    pub dirty_tracking: DirtyTracking,
    /// Dirty-ring entries per vCPU with [`DirtyTracking::Ring`] (0 = the default,
    /// [`crate::dirty::DEFAULT_RING_ENTRIES`]); a power of two.
    #[serde(default)]
    pub dirty_ring_entries: u32,
}

fn default_console_max() -> u64 {
    4 << 20
}

/// A spec that cannot run, naming the field and what was expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A field is out of range or malformed.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What was wrong and what was expected.
        reason: String,
    },
}

impl VmConfig {
    /// Checks everything that can be checked without touching KVM: counts, sizes, and that the
    /// kernel and initramfs exist and are regular, readable files.
    pub fn validate(&self, host_available_mib: Option<u64>) -> Result<(), ConfigError> {
        let bad = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.name.is_empty()
            || self.name.len() > 63
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return bad(
                "name",
                format!(
                    "{:?}: expected 1 to 63 characters of [A-Za-z0-9._-]",
                    self.name
                ),
            );
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(
                "vcpus",
                format!("{}: expected 1 to {MAX_VCPUS}", self.vcpus),
            );
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return bad(
                "memory_mib",
                format!(
                    "{} MiB: expected at least {MIN_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            );
        }
        if let Some(avail) = host_available_mib {
            if self.memory_mib > avail {
                return bad(
                    "memory_mib",
                    format!(
                        "{} MiB: the host can give at most {avail} MiB now",
                        self.memory_mib
                    ),
                );
            }
        }
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initramfs {
            check_file("initramfs", initrd)?;
        }
        if self.cmdline.len() >= 4096 {
            return bad(
                "cmdline",
                format!("{} bytes: expected fewer than 4096", self.cmdline.len()),
            );
        }
        Ok(())
    }
}

fn check_file(field: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { field, reason };
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid(format!("{}: {e}; expected a readable file", path.display())))?;
    if !meta.is_file() {
        return Err(invalid(format!(
            "{}: not a regular file; expected a kernel image file",
            path.display()
        )));
    }
    if meta.len() == 0 {
        return Err(invalid(format!("{}: file is empty", path.display())));
    }
    std::fs::File::open(path)
        .map_err(|e| invalid(format!("{}: {e}; expected a readable file", path.display())))?;
    Ok(())
}

/// Memory the host can give a new VM now, in MiB (MemAvailable from /proc/meminfo).
pub fn host_available_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kernel: PathBuf) -> VmConfig {
        VmConfig {
            id: "id".into(),
            name: "vm-1".into(),
            vcpus: 1,
            memory_mib: 64,
            hugepages: false,
            kernel,
            initramfs: None,
            cmdline: String::new(),
            entry: EntryProtocol::Auto,
            console_log: "/tmp/c".into(),
            debugcon_log: "/tmp/d".into(),
            console_log_max_bytes: 0,
            dirty_tracking: Default::default(),
            dirty_ring_entries: 0,
        }
    }

    #[test]
    fn rejects_each_bad_field_by_name() {
        let kernel = std::env::current_exe().unwrap();
        assert!(spec(kernel.clone()).validate(Some(1 << 20)).is_ok());
        let field = |c: VmConfig| match c.validate(Some(1024)) {
            Err(ConfigError::Invalid { field, .. }) => field,
            Ok(()) => "ok",
        };
        assert_eq!(
            field(VmConfig {
                vcpus: 0,
                ..spec(kernel.clone())
            }),
            "vcpus"
        );
        assert_eq!(
            field(VmConfig {
                vcpus: 255,
                ..spec(kernel.clone())
            }),
            "vcpus"
        );
        assert_eq!(
            field(VmConfig {
                memory_mib: 2048,
                ..spec(kernel.clone())
            }),
            "memory_mib"
        );
        assert_eq!(
            field(VmConfig {
                memory_mib: 1,
                ..spec(kernel.clone())
            }),
            "memory_mib"
        );
        assert_eq!(
            field(VmConfig {
                name: "a b".into(),
                ..spec(kernel.clone())
            }),
            "name"
        );
        assert_eq!(field(spec("/nonexistent/kernel".into())), "kernel");
        assert_eq!(field(spec("/tmp".into())), "kernel");
        assert_eq!(
            field(VmConfig {
                initramfs: Some("/nonexistent".into()),
                ..spec(kernel)
            }),
            "initramfs"
        );
    }
}
