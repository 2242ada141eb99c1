//! What /proc gives without eBPF: per-thread scheduler statistics of the vCPU threads
//! (`/proc/<pid>/task/<tid>/schedstat`, `.../stat`, `.../status`), the VMM's resident size
//! and page faults, and the host's CPU and memory.

use std::path::PathBuf;

/// Scheduler numbers of a VM's vCPU threads, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadSched {
    /// Time on CPU, ns (schedstat field 1).
    pub cpu_ns: u64,
    /// Time runnable but waiting on a run queue, ns (schedstat field 2).
    pub wait_ns: u64,
    /// Times scheduled in (schedstat field 3).
    pub timeslices: u64,
    /// Involuntary context switches (status `nonvoluntary_ctxt_switches`).
    pub involuntary: u64,
    /// Voluntary context switches (status `voluntary_ctxt_switches`).
    pub voluntary: u64,
    /// Threads that could be read.
    pub threads: u32,
}

fn task(pid: u32, tid: i32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/task/{tid}/{file}"))
}

/// Sums the scheduler statistics of `tids` (threads of `pid`); unreadable threads are skipped.
pub fn vcpu_sched(pid: u32, tids: &[i32]) -> ThreadSched {
    let mut out = ThreadSched::default();
    for &tid in tids {
        let Ok(s) = std::fs::read_to_string(task(pid, tid, "schedstat")) else {
            continue;
        };
        let f: Vec<u64> = s
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if f.len() < 3 {
            continue;
        }
        out.cpu_ns += f[0];
        out.wait_ns += f[1];
        out.timeslices += f[2];
        out.threads += 1;
        if let Ok(st) = std::fs::read_to_string(task(pid, tid, "status")) {
            for line in st.lines() {
                if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                    out.involuntary += v.trim().parse::<u64>().unwrap_or(0);
                } else if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                    out.voluntary += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    out
}

/// Fields of `/proc/<pid>/stat` after the command name (index 0 = state, field 3).
fn stat_fields(text: &str) -> Option<Vec<&str>> {
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// Minor and major page faults of the whole VMM process (`/proc/<pid>/stat` fields 10, 12):
/// on a KVM host these are mostly the guest's memory being faulted in by the host.
pub fn process_faults(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f = stat_fields(&text)?;
    Some((f.get(7)?.parse().ok()?, f.get(9)?.parse().ok()?))
}

/// Resident set size of a process, bytes (`/proc/<pid>/statm`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

/// The CPU modes of `/proc/stat`, in its order.
pub const CPU_MODES: [&str; 8] = [
    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
];

/// Host CPU and memory.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostStats {
    /// Seconds spent in each of [`CPU_MODES`], all CPUs together.
    pub cpu_seconds: [f64; 8],
    /// Online CPUs.
    pub cpus: u32,
    /// MemTotal, bytes.
    pub mem_total_bytes: u64,
    /// MemAvailable, bytes.
    pub mem_available_bytes: u64,
}

/// Reads `/proc/stat` and `/proc/meminfo`.
pub fn host() -> HostStats {
    let mut h = HostStats::default();
    let tick = clock_ticks();
    if let Ok(text) = std::fs::read_to_string("/proc/stat") {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("cpu ") {
                for (i, v) in rest.split_whitespace().take(8).enumerate() {
                    h.cpu_seconds[i] = v.parse::<f64>().unwrap_or(0.0) / tick;
                }
            } else if line.starts_with("cpu") {
                h.cpus += 1;
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
        for line in text.lines() {
            let kib = |l: &str| -> u64 {
                l.split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
                    * 1024
            };
            if let Some(v) = line.strip_prefix("MemTotal:") {
                h.mem_total_bytes = kib(v);
            } else if let Some(v) = line.strip_prefix("MemAvailable:") {
                h.mem_available_bytes = kib(v);
            }
        }
    }
    h
}

/// Whether process `tgid` is a kernel thread (no command line, no memory map).
pub fn is_kernel_thread(tgid: u32) -> bool {
    tgid == 0
        || std::fs::read(format!("/proc/{tgid}/cmdline"))
            .map(|c| c.is_empty())
            .unwrap_or(false)
}

/// The command name of process `tgid`.
pub fn comm(tgid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{tgid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_threads_and_host_are_readable() {
        let pid = std::process::id();
        let s = vcpu_sched(pid, &[pid as i32]);
        assert_eq!(s.threads, 1);
        assert!(s.cpu_ns > 0, "{s:?}");
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(process_faults(pid).is_some());
        let h = host();
        assert!(
            h.cpus > 0 && h.mem_total_bytes >= h.mem_available_bytes,
            "{h:?}"
        );
        assert!(h.cpu_seconds.iter().sum::<f64>() > 0.0);
        assert!(!is_kernel_thread(pid));
        assert!(is_kernel_thread(2), "kthreadd is a kernel thread");
    }
}
