//! Shared fixtures for NovaCron's end-to-end tests: a test-guest VM in this process, and
//! polling helpers that fail loudly with what they were waiting for.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_testguest::abi::GuestStatus;
use novacron_vmm::config::{EntryProtocol, VmConfig};
use novacron_vmm::vm::Vm;

/// Fails the test at once, with the reason, if this host cannot run KVM guests. Also sends
/// the VMM's logs to the test output when `RUST_LOG` is set.
pub fn require_kvm() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests need read-write /dev/kvm (run as root on a KVM host): {e}");
    }
}

/// A VM spec for the test guest with `memory_mib` of RAM and the given guest command line.
pub fn test_guest_config(dir: &Path, name: &str, memory_mib: u64, cmdline: &str) -> VmConfig {
    VmConfig {
        id: format!("test-{name}"),
        name: name.into(),
        vcpus: 1,
        memory_mib,
        hugepages: false,
        kernel: novacron_testguest::guest_elf_path().to_path_buf(),
        initramfs: None,
        cmdline: cmdline.into(),
        entry: EntryProtocol::Long64,
        console_log: dir.join(format!("{name}.console.log")),
        debugcon_log: dir.join(format!("{name}.debugcon.log")),
        console_log_max_bytes: 0,
        dirty_tracking: Default::default(),
        dirty_ring_entries: 0,
    }
}

/// A VM running in this process with its vCPU threads.
pub struct RunningVm {
    /// The VM.
    pub vm: Arc<Vm>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RunningVm {
    /// Builds the VM and starts its vCPUs (running unless `incoming`).
    pub fn start(config: VmConfig, incoming: bool) -> RunningVm {
        let (vm, vcpus) = Vm::create(config, incoming).expect("VM is created");
        let threads = vm.spawn_vcpus(vcpus).expect("vCPU threads start");
        if !incoming {
            vm.resume().expect("VM starts");
        }
        RunningVm { vm, threads }
    }

    /// Polls the guest's status page until `pred` holds; panics with `what` and the last
    /// status after `timeout`.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&GuestStatus) -> bool,
    ) -> GuestStatus {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.vm.guest_status() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}; last status {last:?}; VM state {:?}",
            self.vm.state()
        );
    }

    /// Stops the VM and joins its vCPU threads.
    pub fn shutdown(self) {
        self.vm.stop(true, Duration::ZERO);
        for t in self.threads {
            t.join().expect("vCPU thread exits cleanly");
        }
    }
}

/// Polls `path` until it contains `needle`; panics with the file's text after `timeout`.
pub fn wait_file_contains(path: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if Instant::now() > deadline {
            panic!(
                "{needle:?} did not appear in {} within {timeout:?}; it holds:\n{text}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Recomputes the test guest's working-set checksum from guest memory on the host side,
/// checking every page's content but the one in flight; returns (checksum, bad pages).
/// Call it on a paused VM.
pub fn host_checksum(vm: &Vm, status: &GuestStatus) -> (u64, u64) {
    use novacron_testguest::abi;
    use vm_memory::{Bytes, GuestAddress};
    let mut page = vec![0u8; abi::PAGE_SIZE];
    let mut sum = 0u64;
    let mut bad = 0u64;
    for i in 0..status.ws_pages {
        if status.writing == i + 1 {
            // Paused mid-page: its old generation's term is still in the checksum.
            sum = sum.wrapping_add(abi::checksum_term_seeded(
                status.seed,
                i,
                status.writing_old_gen,
            ));
            continue;
        }
        let gpa = status.ws_start + i * abi::PAGE_SIZE as u64;
        vm.memory()
            .read_slice(&mut page, GuestAddress(gpa))
            .expect("working set is guest RAM");
        match abi::check_page(status.seed, i, &page) {
            Some(generation) => {
                sum = sum.wrapping_add(abi::checksum_term_seeded(status.seed, i, generation))
            }
            None => bad += 1,
        }
    }
    (sum, bad)
}

/// A UDP relay on loopback between a client and `target`, which a test can cut at any moment
/// (every packet is dropped from then on), to break a QUIC connection mid-way.
pub struct Relay {
    /// Where clients send.
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    /// Starts relaying to `target`.
    pub fn start(target: std::net::SocketAddr) -> Relay {
        use std::net::UdpSocket;
        use std::sync::atomic::{AtomicBool, Ordering};
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind relay front");
        let back = UdpSocket::bind("127.0.0.1:0").expect("bind relay back");
        back.connect(target).expect("connect relay back");
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        let (front2, back2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let (c1, s1, cl1) = (cut.clone(), stop.clone(), client.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s1.load(Ordering::Acquire) {
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    *cl1.lock().unwrap() = Some(from);
                    if !c1.load(Ordering::Acquire) {
                        let _ = back.send(&buf[..n]);
                    }
                }
            }
        });
        let (c2, s2) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s2.load(Ordering::Acquire) {
                if let Ok(n) = back2.recv(&mut buf) {
                    let to = *client.lock().unwrap();
                    if let (false, Some(to)) = (c2.load(Ordering::Acquire), to) {
                        let _ = front2.send_to(&buf[..n], to);
                    }
                }
            }
        });
        Relay { addr, cut, stop }
    }

    /// Drops every packet from now on.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}
