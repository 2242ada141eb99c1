//! Dirty-page tracking for live migration: which guest pages changed since the last harvest.
//!
//! Three KVM mechanisms, chosen per VM by [`DirtyTracking`]:
//!
//! * **Log**: `KVM_GET_DIRTY_LOG` returns a slot's bitmap and write-protects the dirty pages
//!   again in the same call.
//! * **Manual protect** (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): `KVM_GET_DIRTY_LOG` only reads
//!   the bitmap; `KVM_CLEAR_DIRTY_LOG` re-protects exactly the pages harvested.
//! * **Ring** (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`): each vCPU pushes the pages it dirties into
//!   a ring shared with user space; the VMM collects entries, marks them harvested, and
//!   `KVM_RESET_DIRTY_RINGS` re-protects them. Cost follows the dirty pages, not the memory
//!   size. A full ring stops its vCPU with `KVM_EXIT_DIRTY_RING_FULL` until the vCPU thread
//!   harvests it, which is also where a per-VM dirty-rate limit can hold a vCPU back.
//!
//! Whatever the mechanism, pages are re-protected *before* the harvest reports them, so a
//! guest write that lands after a page was reported is always seen by a later harvest. The
//! VMM's own writes into guest memory are tracked separately by vm-memory's bitmap and merged
//! by the caller.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};

/// The two ioctls kvm-ioctls does not wrap.
mod nr {
    use kvm_bindings::kvm_clear_dirty_log;
    use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};
    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}
use nr::{KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

/// A ring entry the kernel has filled.
const GFN_F_DIRTY: u32 = 1;
/// A ring entry user space has harvested (the next reset re-protects its page).
const GFN_F_RESET: u32 = 2;
const PAGE: u64 = 4096;

/// Ring entries per vCPU when the config leaves it at 0: 16,384 entries (256 KiB), so a vCPU
/// dirtying 100,000 pages/s exits to harvest about six times a second.
pub const DEFAULT_RING_ENTRIES: u32 = 16_384;

/// How a VM tracks the pages its guest dirties.
///
/// The default is the log. On the PVM host all three harvest in well under a millisecond
/// (`cargo bench --bench dirty`), and the ring kept the guest writing faster under tracking
/// and holds a dirty-rate limit page by page; but one migration test on the ring (a 256-entry
/// ring that fills many times a round) ended with a destination checksum mismatch in about
/// one run of four, a missed dirty page whose cause is not found yet (suspect: the host's
/// re-protection on `KVM_RESET_DIRTY_RINGS`). Until it is, the ring is opt-in and warns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyTracking {
    /// `KVM_GET_DIRTY_LOG`, which re-protects as it reads.
    #[default]
    Log,
    /// `KVM_GET_DIRTY_LOG` plus `KVM_CLEAR_DIRTY_LOG` (manual protect).
    ManualProtect,
    /// The per-vCPU dirty ring (experimental: see above).
    Ring,
}

impl std::str::FromStr for DirtyTracking {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "log" => Ok(DirtyTracking::Log),
            "manual-protect" => Ok(DirtyTracking::ManualProtect),
            "ring" => Ok(DirtyTracking::Ring),
            other => Err(format!(
                "{other:?}: expected one of log, manual-protect, ring"
            )),
        }
    }
}

/// Failure of a dirty-tracking operation.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The host's KVM lacks the capability the configured mechanism needs.
    #[error("dirty tracking {mode:?} needs {cap}, which this host's KVM does not offer")]
    Unsupported {
        /// The configured mechanism.
        mode: DirtyTracking,
        /// The missing capability.
        cap: &'static str,
    },
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Ioctl {
        /// The operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The ring size is not a power of two or beyond what KVM allows.
    #[error("dirty ring of {entries} entries: expected a power of two from 256 to {max}")]
    RingSize {
        /// Requested entries.
        entries: u32,
        /// Largest the host allows.
        max: u32,
    },
}

fn last_os(op: &'static str) -> DirtyError {
    DirtyError::Ioctl {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Turns on the VM-wide capability `mode` needs. Must run before any vCPU exists (the ring
/// capability is refused afterwards). Returns the mechanism in effect (the log when the host
/// has no dirty ring) and the ring entries per vCPU for [`DirtyTracking::Ring`].
pub(crate) fn enable(
    vm_fd: &VmFd,
    mode: DirtyTracking,
    entries: u32,
) -> Result<(DirtyTracking, u32), DirtyError> {
    match enable_cap(vm_fd, mode, entries) {
        Err(DirtyError::Unsupported { cap, .. }) if mode == DirtyTracking::Ring => {
            tracing::warn!("this host's KVM has no {cap}; tracking dirty pages with the log");
            Ok((DirtyTracking::Log, 0))
        }
        Ok(entries) => {
            if mode == DirtyTracking::Ring {
                tracing::warn!(
                    "dirty ring enabled: experimental, a missed page was seen in testing; \
                     use dirty_tracking = \"log\" for migrations that must not lose a write"
                );
            }
            Ok((mode, entries))
        }
        Err(e) => Err(e),
    }
}

fn enable_cap(vm_fd: &VmFd, mode: DirtyTracking, entries: u32) -> Result<u32, DirtyError> {
    match mode {
        DirtyTracking::Log => Ok(0),
        DirtyTracking::ManualProtect => {
            if vm_fd.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()) == 0 {
                return Err(DirtyError::Unsupported {
                    mode,
                    cap: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                });
            }
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            // Not KVM_DIRTY_LOG_INITIALLY_SET: the first round sends every backed page
            // anyway, and an initially-set log would report all of them again in round 1.
            cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
            vm_fd.enable_cap(&cap).map_err(|e| DirtyError::Ioctl {
                op: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
                source: e.into(),
            })?;
            Ok(0)
        }
        DirtyTracking::Ring => {
            // ACQ_REL is the variant with defined memory ordering on every architecture;
            // on x86 both behave the same, so take whichever the host has.
            let (cap, name) =
                if vm_fd.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into()) > 0 {
                    (
                        KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                        "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
                    )
                } else {
                    (KVM_CAP_DIRTY_LOG_RING, "KVM_CAP_DIRTY_LOG_RING")
                };
            let max_bytes = vm_fd.check_extension_raw(cap.into());
            if max_bytes <= 0 {
                return Err(DirtyError::Unsupported { mode, cap: name });
            }
            let entry = std::mem::size_of::<kvm_dirty_gfn>() as u32;
            let max = max_bytes as u32 / entry;
            let entries = if entries == 0 {
                DEFAULT_RING_ENTRIES.min(max)
            } else {
                entries
            };
            if !entries.is_power_of_two() || !(256..=max).contains(&entries) {
                return Err(DirtyError::RingSize { entries, max });
            }
            let mut c = kvm_enable_cap {
                cap,
                ..Default::default()
            };
            c.args[0] = u64::from(entries * entry);
            vm_fd.enable_cap(&c).map_err(|e| DirtyError::Ioctl {
                op: "KVM_ENABLE_CAP(DIRTY_LOG_RING)",
                source: e.into(),
            })?;
            Ok(entries)
        }
    }
}

/// One vCPU's ring, mapped from its vCPU fd.
struct Ring {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// The next entry to look at (free-running; the slot is `fetch % entries`).
    fetch: u32,
}

// SAFETY: the mapping is owned by this struct (unmapped on drop) and only touched under the
// Mutex that holds it; the kernel side synchronises through the entries' flags.
unsafe impl Send for Ring {}

impl Ring {
    fn map(vcpu: &VcpuFd, entries: u32) -> Result<Ring, DirtyError> {
        use std::os::fd::AsRawFd;
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: maps `len` bytes of the vCPU fd's dirty-ring area at the offset KVM defines
        // for it; the result is checked and owned by the returned Ring.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE as i64,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last_os("mmap(dirty ring)"));
        }
        Ok(Ring {
            base: NonNull::new(ptr.cast()).expect("mmap returned a non-null address"),
            entries,
            fetch: 0,
        })
    }

    /// Collects the entries the kernel has published since the last call, marking each one
    /// harvested; returns how many. The pages are re-protected only by the next
    /// `KVM_RESET_DIRTY_RINGS`.
    fn collect(&mut self, out: &mut Vec<(u32, u64)>) -> usize {
        let mut n = 0;
        loop {
            let index = (self.fetch % self.entries) as usize;
            // SAFETY: `index < entries`, so the entry lies inside the mapping, which lives as
            // long as `self`.
            let entry = unsafe { self.base.as_ptr().add(index) };
            // SAFETY: `flags` is a naturally aligned u32 inside the mapping that the kernel
            // updates concurrently; accessing it through an atomic is how the ABI expects it
            // to be read (acquire pairs with the kernel's release when it publishes).
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            if flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
                return n;
            }
            // SAFETY: the kernel published the entry (DIRTY seen with acquire ordering), so
            // its slot and offset are initialised and no longer written by the kernel.
            let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            out.push((slot, offset));
            flags.store(GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping created in `map`, which nothing else references.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), len);
        }
    }
}

/// Counters of the tracking work, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct DirtyStats {
    /// `KVM_EXIT_DIRTY_RING_FULL` exits handled.
    pub ring_full_exits: AtomicU64,
    /// Ring entries collected.
    pub ring_entries: AtomicU64,
    /// Time vCPUs were held back by the dirty-rate limit, in µs.
    pub limit_wait_us: AtomicU64,
}

/// Per-VM dirty-ring state: the rings, and pages harvested by vCPU threads (on ring-full
/// exits) that the next [`DirtyRings::take`] reports.
pub(crate) struct DirtyRings {
    rings: Vec<Mutex<Ring>>,
    /// One bitmap per memory slot, pages harvested and already re-protected.
    pending: Vec<Vec<AtomicU64>>,
    /// Guest pages per second each vCPU may dirty (0 = no limit), enforced at ring-full exits.
    limit_per_vcpu: AtomicU64,
    last_full: Vec<Mutex<Option<Instant>>>,
}

impl DirtyRings {
    /// Maps one ring per vCPU; `slot_pages` gives each slot's size in pages.
    pub(crate) fn new(
        vcpus: &[VcpuFd],
        entries: u32,
        slot_pages: &[u64],
    ) -> Result<DirtyRings, DirtyError> {
        let rings = vcpus
            .iter()
            .map(|v| Ring::map(v, entries).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        let pending = slot_pages
            .iter()
            .map(|&p| (0..p.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
            .collect();
        Ok(DirtyRings {
            last_full: (0..rings.len()).map(|_| Mutex::new(None)).collect(),
            rings,
            pending,
            limit_per_vcpu: AtomicU64::new(0),
        })
    }

    /// Harvests the given rings (all when `only` is None), re-protects the pages, and only
    /// then marks them pending.
    fn harvest(
        &self,
        vm_fd: &VmFd,
        only: Option<usize>,
        stats: &DirtyStats,
    ) -> Result<usize, DirtyError> {
        let mut entries = Vec::new();
        for (i, ring) in self.rings.iter().enumerate() {
            if only.is_none_or(|o| o == i) {
                ring.lock().unwrap().collect(&mut entries);
            }
        }
        if entries.is_empty() {
            return Ok(0);
        }
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only acts on this VM's rings.
        let ret = unsafe { ioctl(vm_fd, KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            return Err(last_os("KVM_RESET_DIRTY_RINGS"));
        }
        for &(slot, offset) in &entries {
            // Address space 0 only (bits 16.. of `slot` name the address space).
            let Some(bits) = self.pending.get((slot & 0xffff) as usize) else {
                continue;
            };
            if let Some(word) = bits.get((offset / 64) as usize) {
                word.fetch_or(1 << (offset % 64), Ordering::Relaxed);
            }
        }
        stats
            .ring_entries
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        Ok(entries.len())
    }

    /// A vCPU's ring is full: harvest it (from that vCPU's thread) and, under a dirty-rate
    /// limit, hold the vCPU back until its budget allows the pages it just dirtied.
    pub(crate) fn ring_full(
        &self,
        vm_fd: &VmFd,
        vcpu: usize,
        stats: &DirtyStats,
    ) -> Result<(), DirtyError> {
        stats.ring_full_exits.fetch_add(1, Ordering::Relaxed);
        let n = self.harvest(vm_fd, Some(vcpu), stats)?;
        let limit = self.limit_per_vcpu.load(Ordering::Relaxed);
        let mut last = self.last_full[vcpu].lock().unwrap();
        let now = Instant::now();
        if limit > 0 {
            if let Some(prev) = *last {
                // `n` pages in `elapsed`: at most `limit` per second means at least n/limit s.
                let need = Duration::from_secs_f64(n as f64 / limit as f64);
                let elapsed = now.duration_since(prev);
                if need > elapsed {
                    let wait = (need - elapsed).min(Duration::from_millis(500));
                    std::thread::sleep(wait);
                    stats
                        .limit_wait_us
                        .fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
                }
            }
        }
        *last = Some(Instant::now());
        Ok(())
    }

    /// Sets the per-VM dirty-rate limit in pages/s (0 = none), split evenly over the vCPUs.
    pub(crate) fn set_limit(&self, pages_per_sec: u64) {
        let per = pages_per_sec.div_ceil(self.rings.len().max(1) as u64);
        self.limit_per_vcpu.store(per, Ordering::Relaxed);
    }

    /// Harvests every ring and returns, per slot, the pending pages' bitmap words, clearing
    /// them.
    pub(crate) fn take(
        &self,
        vm_fd: &VmFd,
        stats: &DirtyStats,
    ) -> Result<Vec<Vec<u64>>, DirtyError> {
        self.harvest(vm_fd, None, stats)?;
        Ok(self
            .pending
            .iter()
            .map(|bits| bits.iter().map(|w| w.swap(0, Ordering::Relaxed)).collect())
            .collect())
    }
}

/// Reads one slot's dirty bitmap with manual protect and re-protects the pages it reports.
pub(crate) fn get_and_clear(vm_fd: &VmFd, slot: u32, size: u64) -> Result<Vec<u64>, DirtyError> {
    let bits = vm_fd
        .get_dirty_log(slot, size as usize)
        .map_err(|e| DirtyError::Ioctl {
            op: "KVM_GET_DIRTY_LOG",
            source: e.into(),
        })?;
    if bits.iter().all(|&w| w == 0) {
        return Ok(bits);
    }
    let clear = kvm_clear_dirty_log {
        slot,
        // The whole slot: `first_page` must be a multiple of 64 and `num_pages` may end at
        // the slot's end.
        num_pages: (size / PAGE) as u32,
        first_page: 0,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bits.as_ptr() as *mut libc::c_void,
        },
    };
    // SAFETY: `clear` points at a bitmap of `num_pages` bits that lives across the call;
    // KVM only reads it.
    let ret = unsafe { ioctl_with_ref(vm_fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret < 0 {
        return Err(last_os("KVM_CLEAR_DIRTY_LOG"));
    }
    Ok(bits)
}
