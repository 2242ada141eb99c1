//! One KVM virtual machine: guest memory in KVM memory slots, the in-kernel irqchip and PIT,
//! the port-I/O devices, and the vCPU threads with a pause gate.
//!
//! Pausing: the controller raises the pause flag and kicks every vCPU thread with a signal
//! until each has left KVM_RUN and parked on the gate. A parked vCPU serves requests that need
//! its file descriptor (state save and restore) from the controller.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_EXIT_DIRTY_RING_FULL, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi;
use crate::arch::{self, GuestMem};
use crate::boot;
use crate::config::DirtyTracking;
use crate::config::VmConfig;
use crate::control::{ExitReason, ExitRecord, RunState};
use crate::devices::{agent_ports, Devices, IoOutcome, RotatingLog, SERIAL_IRQ};
use crate::dirty::{self, DirtyRings, DirtyStats};
use crate::mptable;
use crate::state::{self, VcpuState};

/// Failure to build or operate a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("mapping {size} bytes of guest memory: {reason}")]
    Memory {
        /// Requested size.
        size: u64,
        /// Cause.
        reason: String,
    },
    /// Platform setup failed.
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    /// Writing the ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A log file could not be opened.
    #[error("opening {path}: {source}")]
    Log {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU thread could not be started.
    #[error("starting vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The request does not fit the VM's current state.
    #[error("VM is {state:?}; {what}")]
    WrongState {
        /// Current state.
        state: RunState,
        /// What the request needs.
        what: &'static str,
    },
    /// The vCPUs did not park in time.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// The test guest has not registered its status page.
    #[error("the guest has no agent device status page (not the NovaCron test guest, or not booted yet)")]
    NoGuestAgent,
    /// Saving or restoring state failed.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// Dirty-page tracking failed.
    #[error(transparent)]
    Dirty(#[from] dirty::DirtyError),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// A request served by a parked vCPU thread.
pub(crate) enum VcpuRequest {
    Save(mpsc::Sender<Result<VcpuState, VmError>>),
    Restore(Box<VcpuState>, mpsc::Sender<Result<(), VmError>>),
}

struct Gate {
    state: RunState,
    parked: usize,
    requests: Vec<Option<VcpuRequest>>,
}

/// One memory slot as registered with KVM.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    pub(crate) index: u32,
    pub(crate) gpa: u64,
    pub(crate) size: u64,
    pub(crate) host: u64,
}

/// A VM and its vCPU threads.
pub struct Vm {
    pub(crate) config: VmConfig,
    pub(crate) vm_fd: VmFd,
    pub(crate) mem: GuestMem,
    pub(crate) slots: Vec<Slot>,
    pub(crate) devices: Mutex<Devices>,
    dirty_log: AtomicBool,
    pause_flag: AtomicBool,
    ending: AtomicBool,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    end: Mutex<Option<ExitRecord>>,
    end_cv: Condvar,
    exits: AtomicU64,
    vcpu_threads: Mutex<Vec<(i32, libc::pthread_t)>>,
    /// The dirty rings, with [`DirtyTracking::Ring`].
    rings: Option<DirtyRings>,
    /// The dirty-tracking mechanism in effect (the configured one, or the log as fallback).
    tracking: DirtyTracking,
    dirty_stats: DirtyStats,
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Vm {
    /// Creates the VM: memory, irqchip, PIT, devices and vCPUs, with the kernel loaded unless
    /// `incoming` (then memory stays empty for a restore). vCPUs start paused.
    pub fn create(config: VmConfig, incoming: bool) -> Result<(Arc<Vm>, Vec<VcpuFd>), VmError> {
        let t0 = Instant::now();
        let step = |what: &str| tracing::debug!(us = t0.elapsed().as_micros() as u64, "{what}");
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| VmError::Thread(std::io::Error::from_raw_os_error(e.errno())))?;
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        step("VM created");
        vm_fd
            .set_tss_address(0xfffb_d000)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(0xfffb_c000)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        step("irqchip and PIT created");
        // Before any vCPU exists: KVM refuses the dirty ring afterwards.
        let (tracking, ring_entries) =
            dirty::enable(&vm_fd, config.dirty_tracking, config.dirty_ring_entries)?;

        let size = config.memory_mib << 20;
        let mem = map_memory(size, config.hugepages)?;
        step("memory mapped");
        let slots = register_slots(&vm_fd, &mem, false)?;
        step("memory mapped and registered");

        let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Thread)?;
        vm_fd
            .register_irqfd(&serial_evt, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let open = |path: &std::path::Path, max| {
            RotatingLog::open(path, max).map_err(|source| VmError::Log {
                path: path.display().to_string(),
                source,
            })
        };
        let console = open(&config.console_log, config.console_log_max_bytes)?;
        let debugcon = open(&config.debugcon_log, config.console_log_max_bytes)?;

        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for i in 0..config.vcpus {
            let vcpu = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let cpuid = arch::cpuid(&kvm, i, config.vcpus)?;
            arch::configure_vcpu(&vcpu, &cpuid)?;
            vcpus.push(vcpu);
        }
        step("vCPUs created");
        let rings = match tracking {
            DirtyTracking::Ring => {
                let pages: Vec<u64> = slots.iter().map(|s| s.size / 4096).collect();
                Some(DirtyRings::new(&vcpus, ring_entries, &pages)?)
            }
            _ => None,
        };
        let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0);
        if !incoming {
            let rsdp = acpi::write(&mem, config.vcpus)?;
            let loaded = boot::load(
                &mem,
                &config.kernel,
                config.initramfs.as_deref(),
                &config.cmdline,
                config.entry,
                Some(rsdp),
            )?;
            tracing::info!(protocol = ?loaded.protocol, cpu = ?loaded.cpu, "kernel loaded");
            arch::setup_boot_regs(&vcpus[0], &mem, loaded.cpu)?;
            mptable::write(&mem, config.vcpus)?;
            step("kernel loaded");
        }
        let devices = Devices::new(serial_evt, console, debugcon, tsc_khz);
        let n = vcpus.len();
        let vm = Arc::new(Vm {
            config,
            vm_fd,
            mem,
            slots,
            devices: Mutex::new(devices),
            dirty_log: AtomicBool::new(false),
            pause_flag: AtomicBool::new(true),
            ending: AtomicBool::new(false),
            gate: Mutex::new(Gate {
                state: if incoming {
                    RunState::Incoming
                } else {
                    RunState::Paused
                },
                parked: 0,
                requests: (0..n).map(|_| None).collect(),
            }),
            gate_cv: Condvar::new(),
            end: Mutex::new(None),
            end_cv: Condvar::new(),
            exits: AtomicU64::new(0),
            vcpu_threads: Mutex::new(Vec::new()),
            rings,
            tracking,
            dirty_stats: DirtyStats::default(),
        });
        Ok((vm, vcpus))
    }

    /// Starts one thread per vCPU (parked until [`Vm::resume`]).
    pub fn spawn_vcpus(
        self: &Arc<Self>,
        vcpus: Vec<VcpuFd>,
    ) -> Result<Vec<JoinHandle<()>>, VmError> {
        let mut handles = Vec::new();
        let (tid_tx, tid_rx) = mpsc::channel();
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let vm = Arc::clone(self);
            let tx = tid_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // SAFETY: gettid and pthread_self have no preconditions.
                    let ids = unsafe { (libc::gettid(), libc::pthread_self()) };
                    let _ = tx.send((index, ids));
                    vm.vcpu_loop(index, vcpu);
                })
                .map_err(VmError::Thread)?;
            handles.push(handle);
        }
        let mut threads = vec![(0, 0); handles.len()];
        for _ in 0..handles.len() {
            let (index, ids) = tid_rx.recv().expect("vCPU thread reports its id");
            threads[index] = ids;
        }
        *self.vcpu_threads.lock().unwrap() = threads;
        Ok(handles)
    }

    /// Thread ids of the vCPU threads.
    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.vcpu_threads
            .lock()
            .unwrap()
            .iter()
            .map(|t| t.0)
            .collect()
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        if self.ending.load(Ordering::Acquire) {
            return RunState::Stopped;
        }
        self.gate.lock().unwrap().state
    }

    /// Exits handled in user space so far.
    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    fn vcpu_loop(&self, index: usize, mut vcpu: VcpuFd) {
        loop {
            if (self.pause_flag.load(Ordering::Acquire) || self.ending.load(Ordering::Acquire))
                && !self.park(index, &mut vcpu)
            {
                return;
            }
            let exit = match vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    let regs = arch::dump_registers(&vcpu);
                    self.finish(
                        ExitReason::InternalError,
                        format!("vcpu{index}: KVM_RUN failed: {e}; {regs}"),
                    );
                    return;
                }
            };
            self.exits.fetch_add(1, Ordering::Relaxed);
            let outcome = match exit {
                VcpuExit::IoOut(port, data) => self.devices.lock().unwrap().pio_write(port, data),
                VcpuExit::IoIn(port, data) => {
                    self.devices.lock().unwrap().pio_read(port, data);
                    IoOutcome::Continue
                }
                VcpuExit::MmioRead(_, data) => {
                    data.fill(0xff);
                    IoOutcome::Continue
                }
                VcpuExit::MmioWrite(..) | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {
                    IoOutcome::Continue
                }
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => match &self.rings {
                    Some(rings) => match rings.ring_full(&self.vm_fd, index, &self.dirty_stats) {
                        Ok(()) => IoOutcome::Continue,
                        Err(e) => IoOutcome::End(
                            ExitReason::InternalError,
                            format!("vcpu{index}: harvesting its full dirty ring: {e}"),
                        ),
                    },
                    None => IoOutcome::End(
                        ExitReason::InternalError,
                        format!("vcpu{index}: dirty ring full without a dirty ring"),
                    ),
                },
                VcpuExit::Hlt => IoOutcome::End(
                    ExitReason::GuestPoweroff,
                    format!("vcpu{index} halted with the in-kernel irqchip off"),
                ),
                VcpuExit::Shutdown => IoOutcome::End(
                    ExitReason::TripleFault,
                    format!("vcpu{index}: triple fault (KVM_EXIT_SHUTDOWN)"),
                ),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                        IoOutcome::End(ExitReason::GuestReset, "system reset event".into())
                    }
                    _ => IoOutcome::End(ExitReason::GuestPoweroff, format!("system event {kind}")),
                },
                VcpuExit::InternalError => IoOutcome::End(
                    ExitReason::InternalError,
                    format!("vcpu{index}: KVM_EXIT_INTERNAL_ERROR"),
                ),
                VcpuExit::FailEntry(reason, cpu) => IoOutcome::End(
                    ExitReason::InternalError,
                    format!(
                        "vcpu{index}: KVM_EXIT_FAIL_ENTRY reason {reason:#x} on host cpu {cpu}"
                    ),
                ),
                other => IoOutcome::End(
                    ExitReason::InternalError,
                    format!("vcpu{index}: unexpected exit {other:?}"),
                ),
            };
            if let IoOutcome::End(reason, mut detail) = outcome {
                match reason {
                    ExitReason::GuestPanic => {
                        detail = format!("guest panic: {}", self.guest_message())
                    }
                    ExitReason::TripleFault | ExitReason::InternalError => {
                        detail = format!("{detail}; registers: {}", arch::dump_registers(&vcpu));
                    }
                    _ => {}
                }
                self.finish(reason, detail);
                return;
            }
        }
    }

    /// Parks a vCPU while paused, serving requests; false when the VM is ending.
    fn park(&self, index: usize, vcpu: &mut VcpuFd) -> bool {
        let mut gate = self.gate.lock().unwrap();
        gate.parked += 1;
        self.gate_cv.notify_all();
        loop {
            if self.ending.load(Ordering::Acquire) {
                gate.parked -= 1;
                self.gate_cv.notify_all();
                return false;
            }
            if let Some(req) = gate.requests[index].take() {
                match req {
                    VcpuRequest::Save(reply) => {
                        let _ = reply.send(state::save_vcpu(vcpu).map_err(VmError::from));
                    }
                    VcpuRequest::Restore(s, reply) => {
                        let _ = reply.send(state::restore_vcpu(vcpu, &s).map_err(VmError::from));
                    }
                }
                continue;
            }
            if !self.pause_flag.load(Ordering::Acquire) {
                gate.parked -= 1;
                return true;
            }
            gate = self.gate_cv.wait(gate).unwrap();
        }
    }

    fn kick_all(&self) {
        for (_, thread) in self.vcpu_threads.lock().unwrap().iter() {
            // SAFETY: the thread handle belongs to a vCPU thread of this process that lives as
            // long as the VM (threads are joined only after `ending` is set); the signal has a
            // no-op handler installed in `create`.
            unsafe {
                libc::pthread_kill(*thread, kick_signal());
            }
        }
    }

    fn wait_parked<'a>(
        &'a self,
        mut gate: MutexGuard<'a, Gate>,
        timeout: Duration,
    ) -> Result<MutexGuard<'a, Gate>, VmError> {
        let deadline = Instant::now() + timeout;
        let n = gate.requests.len();
        while gate.parked < n {
            if Instant::now() > deadline {
                return Err(VmError::PauseTimeout(timeout));
            }
            drop(gate);
            self.kick_all();
            gate = self.gate.lock().unwrap();
            gate = self
                .gate_cv
                .wait_timeout(gate, Duration::from_millis(1))
                .unwrap()
                .0;
        }
        Ok(gate)
    }

    /// Pauses every vCPU; returns once none is in KVM_RUN.
    pub fn pause(&self) -> Result<(), VmError> {
        let gate = self.gate.lock().unwrap();
        match gate.state {
            RunState::Running => {}
            RunState::Paused => return Ok(()),
            state => {
                return Err(VmError::WrongState {
                    state,
                    what: "only a running VM can be paused",
                })
            }
        }
        self.pause_flag.store(true, Ordering::Release);
        let mut gate = self.wait_parked(gate, Duration::from_secs(5))?;
        gate.state = RunState::Paused;
        Ok(())
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) -> Result<(), VmError> {
        let mut gate = self.gate.lock().unwrap();
        match gate.state {
            RunState::Paused => {}
            RunState::Running => return Ok(()),
            state => {
                return Err(VmError::WrongState {
                    state,
                    what: "only a paused VM can be resumed",
                })
            }
        }
        gate.state = RunState::Running;
        self.pause_flag.store(false, Ordering::Release);
        self.gate_cv.notify_all();
        Ok(())
    }

    /// Runs `req` on every parked vCPU (the VM must be paused or incoming).
    pub(crate) fn on_vcpus<T>(
        &self,
        mut make: impl FnMut(usize, mpsc::Sender<Result<T, VmError>>) -> VcpuRequest,
    ) -> Result<Vec<T>, VmError> {
        let gate = self.gate.lock().unwrap();
        if !matches!(gate.state, RunState::Paused | RunState::Incoming) {
            return Err(VmError::WrongState {
                state: gate.state,
                what: "the VM must be paused",
            });
        }
        let mut gate = self.wait_parked(gate, Duration::from_secs(5))?;
        let mut replies = Vec::new();
        for i in 0..gate.requests.len() {
            let (tx, rx) = mpsc::channel();
            gate.requests[i] = Some(make(i, tx));
            replies.push(rx);
        }
        self.gate_cv.notify_all();
        drop(gate);
        replies
            .into_iter()
            .map(|rx| rx.recv().expect("parked vCPU answers"))
            .collect()
    }

    /// Marks the VM paused after a restore from the incoming state.
    pub(crate) fn set_restored(&self) {
        self.gate.lock().unwrap().state = RunState::Paused;
    }

    /// Ends the VM (first reason wins) and wakes everyone who waits for it.
    pub fn finish(&self, reason: ExitReason, detail: String) {
        let mut end = self.end.lock().unwrap();
        if end.is_none() {
            tracing::info!(?reason, %detail, "VM ending");
            *end = Some(ExitRecord { reason, detail });
        }
        self.ending.store(true, Ordering::Release);
        drop(end);
        self.end_cv.notify_all();
        self.gate_cv.notify_all();
        self.kick_all();
    }

    /// Blocks until the VM has ended; returns why.
    pub fn wait_end(&self) -> ExitRecord {
        let mut end = self.end.lock().unwrap();
        while end.is_none() {
            end = self.end_cv.wait(end).unwrap();
        }
        end.clone().expect("checked above")
    }

    /// Waits up to `timeout` for the VM to end; true if it did.
    pub fn wait_end_timeout(&self, timeout: Duration) -> bool {
        let end = self.end.lock().unwrap();
        let (end, _) = self
            .end_cv
            .wait_timeout_while(end, timeout, |e| e.is_none())
            .unwrap();
        end.is_some()
    }

    /// Stops the VM: at once with `force`, else by asking the test guest to power off (other
    /// guests have no power-off device) and forcing after `timeout`.
    pub fn stop(&self, force: bool, timeout: Duration) {
        if !force
            && self
                .post_guest_command(agent_ports::CMD_POWEROFF, 0)
                .is_ok()
        {
            let _ = self.resume();
            if self.wait_end_timeout(timeout) {
                return;
            }
        }
        self.finish(
            ExitReason::Stopped,
            if force {
                "forced stop"
            } else {
                "stop (guest did not power off in time)"
            }
            .into(),
        );
    }

    fn status_gpa(&self) -> Result<u64, VmError> {
        self.devices
            .lock()
            .unwrap()
            .agent
            .status_gpa
            .ok_or(VmError::NoGuestAgent)
    }

    /// Reads the test guest's status page.
    pub fn guest_status(&self) -> Result<Option<novacron_testguest::abi::GuestStatus>, VmError> {
        let Ok(gpa) = self.status_gpa() else {
            return Ok(None);
        };
        let mut page = vec![0u8; 4096];
        self.mem
            .read_slice(&mut page, GuestAddress(gpa))
            .map_err(|e| VmError::Memory {
                size: 4096,
                reason: e.to_string(),
            })?;
        Ok(novacron_testguest::abi::GuestStatus::parse(&page).ok())
    }

    fn guest_message(&self) -> String {
        let Ok(gpa) = self.status_gpa() else {
            return String::new();
        };
        let mut msg = vec![0u8; 256];
        if self
            .mem
            .read_slice(
                &mut msg,
                GuestAddress(gpa + agent_ports::OFF_MESSAGE as u64),
            )
            .is_err()
        {
            return String::new();
        }
        let end = msg.iter().position(|b| *b == 0).unwrap_or(msg.len());
        String::from_utf8_lossy(&msg[..end]).into_owned()
    }

    /// Posts a command to the test guest (argument first, then the sequence number the guest
    /// polls, so it never sees a half-written command). Writes go through guest memory's dirty
    /// bitmap, so a migration sees them.
    pub fn post_guest_command(&self, cmd: u32, arg: u64) -> Result<u64, VmError> {
        let gpa = self.status_gpa()?;
        let w = |e: vm_memory::GuestMemoryError| VmError::Memory {
            size: 8,
            reason: e.to_string(),
        };
        let seq: u64 = self
            .mem
            .read_obj(GuestAddress(gpa + agent_ports::OFF_CMD_SEQ as u64))
            .map_err(w)?;
        self.mem
            .write_obj(cmd, GuestAddress(gpa + agent_ports::OFF_CMD as u64))
            .map_err(w)?;
        self.mem
            .write_obj(arg, GuestAddress(gpa + agent_ports::OFF_CMD_ARG as u64))
            .map_err(w)?;
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(seq + 1, GuestAddress(gpa + agent_ports::OFF_CMD_SEQ as u64))
            .map_err(w)?;
        Ok(seq + 1)
    }

    /// When the guest first reported progress (CLOCK_MONOTONIC, ns).
    pub fn first_progress_ns(&self) -> Option<u64> {
        self.devices.lock().unwrap().agent.first_progress_ns
    }

    /// Switches KVM dirty logging on every slot.
    pub fn set_dirty_log(&self, enable: bool) -> Result<(), VmError> {
        for slot in &self.slots {
            set_slot(&self.vm_fd, slot, enable)?;
        }
        self.dirty_log.store(enable, Ordering::Release);
        if let (false, Some(rings)) = (enable, &self.rings) {
            // Nothing harvested now is wanted; leave the rings empty for the next time.
            rings.take(&self.vm_fd, &self.dirty_stats)?;
            rings.set_limit(0);
        }
        Ok(())
    }

    /// Fetches and clears the pages dirtied since the previous call, as page indices
    /// (guest-physical address / 4096): KVM's log of guest writes merged with the VMM's own
    /// writes (vm-memory's bitmap).
    pub fn take_dirty_pages(&self) -> Result<Vec<u64>, VmError> {
        if !self.dirty_log.load(Ordering::Acquire) {
            return Err(VmError::WrongState {
                state: self.state(),
                what: "dirty logging is off",
            });
        }
        let mut ring_bits = match &self.rings {
            Some(rings) => rings.take(&self.vm_fd, &self.dirty_stats)?,
            None => Vec::new(),
        };
        let mut pages = Vec::new();
        for (slot, region) in self.slots.iter().zip(self.mem.iter()) {
            let kvm_bits = match self.tracking {
                DirtyTracking::Log => self
                    .vm_fd
                    .get_dirty_log(slot.index, slot.size as usize)
                    .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?,
                DirtyTracking::ManualProtect => {
                    dirty::get_and_clear(&self.vm_fd, slot.index, slot.size)?
                }
                DirtyTracking::Ring => std::mem::take(&mut ring_bits[slot.index as usize]),
            };
            let mmap: &vm_memory::MmapRegion<AtomicBitmap> = region;
            // Word by word (64 pages at a time) and only the set bits: the cost follows the
            // dirty pages, not the memory size, which matters most for the final harvest
            // inside the downtime.
            let vmm_bits = mmap.bitmap().get_and_reset();
            let first = slot.gpa / 4096;
            let slot_pages = slot.size / 4096;
            for (w, (&k, &v)) in kvm_bits.iter().zip(vmm_bits.iter()).enumerate() {
                let mut word = k | v;
                while word != 0 {
                    let bit = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let page = w as u64 * 64 + bit;
                    if page < slot_pages {
                        pages.push(first + page);
                    }
                }
            }
        }
        Ok(pages)
    }

    /// Limits how fast the guest may dirty memory, in pages/s (0 = no limit). Only the dirty
    /// ring can hold a vCPU back page-accurately; returns false (and changes nothing) with
    /// the other mechanisms, whose callers throttle vCPUs instead.
    pub fn set_dirty_rate_limit(&self, pages_per_sec: u64) -> bool {
        match &self.rings {
            Some(rings) => {
                rings.set_limit(pages_per_sec);
                true
            }
            None => false,
        }
    }

    /// The dirty-tracking mechanism in effect.
    pub fn dirty_tracking(&self) -> DirtyTracking {
        self.tracking
    }

    /// Counters of the dirty-tracking work so far.
    pub fn dirty_stats(&self) -> &DirtyStats {
        &self.dirty_stats
    }

    /// Page indices (guest-physical address / 4096) of guest RAM that this process has ever
    /// backed, from `/proc/self/pagemap`: a page neither present nor swapped out has never
    /// been written and reads as zero, so a migration's first round can skip it (the
    /// destination's fresh memory is zero too). Falls back to every page if pagemap cannot
    /// be read.
    pub fn backed_pages(&self) -> Vec<u64> {
        use std::io::{Read, Seek, SeekFrom};
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let all = |gpa: u64, size: u64| (gpa / 4096)..(gpa + size) / 4096;
        let mut out = Vec::new();
        let mut pagemap = std::fs::File::open("/proc/self/pagemap").ok();
        for slot in &self.slots {
            let pages = (slot.size / 4096) as usize;
            let mut entries = vec![0u8; pages * 8];
            let read = pagemap.as_mut().is_some_and(|f| {
                f.seek(SeekFrom::Start(slot.host / 4096 * 8)).is_ok()
                    && f.read_exact(&mut entries).is_ok()
            });
            if !read {
                out.extend(all(slot.gpa, slot.size));
                continue;
            }
            let first = slot.gpa / 4096;
            for (i, e) in entries.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                if e & (PRESENT | SWAPPED) != 0 {
                    out.push(first + i as u64);
                }
            }
        }
        out
    }

    /// Fetches and clears the dirty pages since the previous call; returns how many.
    pub fn fetch_dirty(&self) -> Result<u64, VmError> {
        Ok(self.take_dirty_pages()?.len() as u64)
    }
}

/// Maps anonymous guest memory, optionally with huge pages, with a dirty bitmap of the VMM's
/// own writes.
fn map_memory(size: u64, hugepages: bool) -> Result<GuestMem, VmError> {
    let mut regions = Vec::new();
    for (addr, len) in arch::ram_ranges(size) {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if hugepages {
            flags |= libc::MAP_HUGETLB;
        }
        let bitmap = AtomicBitmap::new(len, std::num::NonZeroUsize::new(4096).expect("non-zero"));
        let region = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| VmError::Memory {
                size,
                reason: e.to_string(),
            })?;
        if !hugepages {
            // Transparent huge pages where the host allows them (as QEMU asks): a guest then
            // takes one fault per 2 MiB instead of 512, which on hosts with shadow paging is
            // the difference between ~10k and millions of first writes per second. Advice
            // only: failure (THP disabled) changes nothing.
            // SAFETY: the range is exactly the mapping just created and owned by `region`;
            // MADV_HUGEPAGE does not change its contents or validity.
            unsafe {
                libc::madvise(region.as_ptr().cast(), len, libc::MADV_HUGEPAGE);
            }
        }
        regions.push(
            GuestRegionMmap::new(region, addr).ok_or_else(|| VmError::Memory {
                size,
                reason: "invalid guest region".into(),
            })?,
        );
    }
    GuestMem::from_regions(regions).map_err(|e| VmError::Memory {
        size,
        reason: format!("{e:?}"),
    })
}

fn set_slot(vm_fd: &VmFd, slot: &Slot, dirty_log: bool) -> Result<(), VmError> {
    let region = kvm_userspace_memory_region {
        slot: slot.index,
        guest_phys_addr: slot.gpa,
        memory_size: slot.size,
        userspace_addr: slot.host,
        flags: if dirty_log {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
    };
    // SAFETY: `host` is the start of a mapping of `size` bytes owned by the VM's guest memory,
    // which lives as long as the VM fd (both are fields of the same `Vm`).
    unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}

fn register_slots(vm_fd: &VmFd, mem: &GuestMem, dirty_log: bool) -> Result<Vec<Slot>, VmError> {
    let mut slots = Vec::new();
    for (index, region) in mem.iter().enumerate() {
        let slot = Slot {
            index: index as u32,
            gpa: region.start_addr().0,
            size: region.len(),
            host: region.as_ptr() as u64,
        };
        set_slot(vm_fd, &slot, dirty_log)?;
        slots.push(slot);
    }
    Ok(slots)
}
