//! The core of the agent: the VMs of this host, their VMM processes, and their state on disk.
//!
//! [`VmManager`] knows nothing of gRPC; the service in [`crate::service`] is a thin adapter.
//!
//! On-disk layout, one directory per VM under `<state_dir>/vms/<id>/`:
//!
//! | file            | written by | content                                                  |
//! |-----------------|------------|----------------------------------------------------------|
//! | `spec.json`     | agent      | [`VmConfig`] plus agent metadata (created time, desired)  |
//! | `spec-vmm.json` | agent      | the [`VmConfig`] handed to the VMM at each start          |
//! | `vmm.pid`       | agent      | pid of the last VMM process started for the VM            |
//! | `vmm.log`       | VMM        | the VMM's stdout and stderr                               |
//! | `control.sock`  | VMM        | the control socket ([`novacron_vmm::control`])             |
//! | `exit.json`     | VMM        | [`ExitRecord`]: why the last run ended                     |
//! | `console.log`   | VMM        | serial console output (rotated to `console.log.1`)        |
//! | `debugcon.log`  | VMM        | port 0xe9 output                                          |
//!
//! A VM exists once its `spec.json` exists (it is written with a rename). VMM processes run
//! in their own sessions and outlive the agent; a restarted agent re-attaches to every VMM
//! whose pid is alive and whose control socket answers with the right VM id.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use novacron_vmm::config::{EntryProtocol, VmConfig};
use novacron_vmm::control::{
    Client, ClientError, ExitReason, ExitRecord, GuestStatusWire, Request, Response, RunState,
};

/// How long a start waits for the new VMM's control socket to answer.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Default vCPU count when a create request gives 0.
pub const DEFAULT_VCPUS: u32 = 1;
/// Default memory when a create request gives 0, in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 128;

/// A VM directory's record of the outgoing migration under way (`to_agent`).
pub(crate) const MIGRATION_FILE: &str = "migration.json";
/// How long a prepared incoming VM waits for its migration to connect.
pub(crate) const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);

const POLL_PID_INTERVAL: Duration = Duration::from_millis(500);
const CONSOLE_POLL_INTERVAL: Duration = Duration::from_millis(100);
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
const VMM_LOG_TAIL_BYTES: u64 = 2048;

/// What the manager needs from the agent configuration.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// State directory (VMs live in `<state_dir>/vms`).
    pub state_dir: PathBuf,
    /// Program started as `<vmm_binary> vmm --config ... --control ... --exit-file ...`.
    pub vmm_binary: PathBuf,
    /// Console rotation threshold handed to each VMM.
    pub console_log_max_bytes: u64,
    /// Default grace period of a non-forced stop.
    pub stop_timeout_ms: u64,
    /// How long a start waits for the VMM's control socket.
    pub start_timeout: Duration,
    /// Memory active VMs may have in total, MiB (0 = no limit of the agent's own).
    pub max_memory_mib: u64,
    /// Dirty-page tracking of the VMs this agent starts.
    pub dirty_tracking: novacron_vmm::config::DirtyTracking,
    /// Live migration identity and peers (`None`: migration is not configured).
    pub migration: Option<Arc<crate::migration::MigrationContext>>,
}

/// Lifecycle state of a VM as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined, never started.
    Created,
    /// A VMM process was started and has not answered yet.
    Starting,
    /// vCPUs are running.
    Running,
    /// vCPUs are paused.
    Paused,
    /// The last run ended normally (requested stop or guest power-off/reset).
    Stopped,
    /// The last run ended in a failure (crash, triple fault, VMM error, VMM lost).
    Failed,
    /// A VMM waits for (or is receiving) an incoming live migration; the VM becomes
    /// `running` when the migration commits, and disappears if it is discarded.
    Incoming,
}

impl VmState {
    /// The lower-case name used on the API.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
            VmState::Incoming => "incoming",
        }
    }

    /// Whether a VMM process exists for the VM.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Incoming
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request to create a VM. Zero / empty values mean the documented defaults.
#[derive(Debug, Clone, Default)]
pub struct CreateParams {
    /// Unique name.
    pub name: String,
    /// vCPUs (`None` = [`DEFAULT_VCPUS`]; 0 is refused).
    pub vcpus: Option<u32>,
    /// Memory in MiB (0 = [`DEFAULT_MEMORY_MIB`]).
    pub memory_mib: u64,
    /// Absolute kernel path (must be unset with `test_guest`).
    pub kernel: Option<PathBuf>,
    /// Absolute initramfs path.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// "auto" (or ""), "linux", "pvh" or "long64".
    pub entry: String,
    /// Use the built-in test guest (entry long64).
    pub test_guest: bool,
    /// Back memory with huge pages.
    pub hugepages: bool,
    /// Start once created.
    pub start: bool,
}

/// A snapshot of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmInfo {
    /// Stable id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Current state.
    pub state: VmState,
    /// vCPU count.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs, if any.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Entry protocol ("auto", "linux", "pvh", "long64").
    pub entry: &'static str,
    /// Huge pages.
    pub hugepages: bool,
    /// Whether the kernel is the built-in test guest.
    pub test_guest: bool,
    /// VMM pid while a VMM runs.
    pub pid: Option<u32>,
    /// vCPU thread ids while a VMM runs.
    pub vcpu_tids: Vec<i32>,
    /// Console log path.
    pub console_log: PathBuf,
    /// Creation time, seconds since the epoch.
    pub created_at_unix: i64,
    /// Why the last run ended (snake_case [`ExitReason`], `killed`, or `vmm_lost`).
    pub exit_reason: Option<String>,
    /// Detail of the last exit.
    pub exit_detail: String,
}

/// Everything the manager can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// A request field is unusable.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// No VM has this id or name.
    #[error("no VM with id or name {0:?}")]
    NotFound(String),
    /// The name (or id) is taken.
    #[error("a VM named {0:?} already exists")]
    AlreadyExists(String),
    /// The VM is in the wrong state for the request.
    #[error("{0}")]
    WrongState(String),
    /// The VMM refused a request (e.g. the guest agent is not registered).
    #[error("VM {name}: the VMM refused: {message}")]
    VmmRefused {
        /// VM name.
        name: String,
        /// The VMM's message.
        message: String,
    },
    /// The VMM process could not be started or ended during start.
    #[error("VM {name} failed to start: {detail}")]
    StartFailed {
        /// VM name.
        name: String,
        /// What happened (exit record or VMM log tail).
        detail: String,
    },
    /// Talking to the VMM failed.
    #[error("VM {name}: {source}")]
    Vmm {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: ClientError,
    },
    /// The VMM answered with something that does not fit the request.
    #[error("VM {name}: unexpected answer from the VMM: {answer}")]
    UnexpectedAnswer {
        /// VM name.
        name: String,
        /// The answer.
        answer: String,
    },
    /// Talking to another agent for a migration failed, or it refused.
    #[error("{message}")]
    Peer {
        /// The other agent.
        agent: String,
        /// How it failed.
        kind: crate::migration::PeerFailure,
        /// What happened.
        message: String,
    },
    /// File-system trouble in the state directory.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ManagerError {
    let context = context.into();
    move |source| ManagerError::Io { context, source }
}

fn invalid(field: &str, reason: impl Into<String>) -> ManagerError {
    ManagerError::InvalidArgument {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// What the agent persists as `spec.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SpecRecord {
    /// The VM as the VMM runs it.
    pub(crate) vm: VmConfig,
    /// Seconds since the epoch.
    pub(crate) created_at_unix: i64,
    /// Nanoseconds since the epoch (orders VMs created within one second).
    #[serde(default)]
    pub(crate) created_at_unix_ns: u64,
    /// Kernel is the built-in test guest.
    #[serde(default)]
    pub(crate) test_guest: bool,
    /// What the user last asked for.
    #[serde(default)]
    pub(crate) desired: Desired,
    /// The VM arrived by an incoming migration that has not committed yet: if its VMM
    /// ends, the VM and its directory are removed.
    #[serde(default)]
    pub(crate) incoming: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Desired {
    #[default]
    Stopped,
    Running,
}

#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub(crate) state: VmState,
    pub(crate) pid: Option<u32>,
    pub(crate) vcpu_tids: Vec<i32>,
    pub(crate) exit_reason: Option<String>,
    pub(crate) exit_detail: String,
    /// Bumped at each start, so a monitor of an old run cannot touch a newer one.
    pub(crate) run: u64,
    /// Set when the agent SIGKILLs the VMM on purpose: the outcome to record (and persist
    /// as `exit.json`) since the VMM cannot write one.
    pub(crate) kill_note: Option<ExitRecord>,
}

pub(crate) struct VmEntry {
    pub(crate) id: String,
    pub(crate) dir: PathBuf,
    pub(crate) record: Mutex<SpecRecord>,
    pub(crate) status: watch::Sender<Status>,
    /// Serialises lifecycle operations on this VM.
    pub(crate) op: Arc<tokio::sync::Mutex<()>>,
    pub(crate) deleted: AtomicBool,
}

impl VmEntry {
    /// A VM as loaded or created: not running until started or re-attached.
    pub(crate) fn new(id: String, dir: PathBuf, record: SpecRecord) -> Self {
        VmEntry {
            id,
            dir,
            record: Mutex::new(record),
            status: watch::Sender::new(Status {
                state: VmState::Created,
                pid: None,
                vcpu_tids: Vec::new(),
                exit_reason: None,
                exit_detail: String::new(),
                run: 0,
                kill_note: None,
            }),
            op: Arc::new(tokio::sync::Mutex::new(())),
            deleted: AtomicBool::new(false),
        }
    }

    pub(crate) fn name(&self) -> String {
        self.record.lock().unwrap().vm.name.clone()
    }
    pub(crate) fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    fn exit_file(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
    pub(crate) fn snapshot(&self) -> VmInfo {
        let rec = self.record.lock().unwrap().clone();
        let st = self.status.borrow().clone();
        VmInfo {
            id: self.id.clone(),
            name: rec.vm.name,
            state: st.state,
            vcpus: u32::from(rec.vm.vcpus),
            memory_mib: rec.vm.memory_mib,
            kernel: rec.vm.kernel,
            initramfs: rec.vm.initramfs,
            cmdline: rec.vm.cmdline,
            entry: entry_name(rec.vm.entry),
            hugepages: rec.vm.hugepages,
            test_guest: rec.test_guest,
            pid: st.pid,
            vcpu_tids: st.vcpu_tids,
            console_log: rec.vm.console_log,
            created_at_unix: rec.created_at_unix,
            exit_reason: st.exit_reason,
            exit_detail: st.exit_detail,
        }
    }
    pub(crate) fn check_live(&self) -> Result<(), ManagerError> {
        if self.deleted.load(Ordering::SeqCst) {
            return Err(ManagerError::NotFound(self.id.clone()));
        }
        Ok(())
    }
    fn set_desired(&self, desired: Desired) {
        let rec = {
            let mut rec = self.record.lock().unwrap();
            if rec.desired == desired {
                return;
            }
            rec.desired = desired;
            rec.clone()
        };
        if let Err(e) = write_json_atomic(&self.dir.join("spec.json"), &rec) {
            warn!(vm = %self.id, "persisting desired state: {e}");
        }
    }
}

pub(crate) struct Inner {
    pub(crate) cfg: ManagerConfig,
    pub(crate) vms_dir: PathBuf,
    /// In creation order.
    pub(crate) vms: Mutex<Vec<Arc<VmEntry>>>,
    pub(crate) create_lock: tokio::sync::Mutex<()>,
    /// Set when the agent shuts down: ends console streams.
    pub(crate) shutdown: watch::Sender<bool>,
}

/// The VMs of this host. Cheap to clone (shared state).
#[derive(Clone)]
pub struct VmManager {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for VmManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmManager")
            .field("state_dir", &self.inner.cfg.state_dir)
            .finish_non_exhaustive()
    }
}

impl VmManager {
    /// Opens the state directory (creating it), loads every VM, and re-attaches to every VMM
    /// that is still running. Must be called within a tokio runtime.
    pub async fn open(cfg: ManagerConfig) -> Result<Self, ManagerError> {
        let vms_dir = cfg.state_dir.join("vms");
        std::fs::create_dir_all(&vms_dir)
            .map_err(io_err(format!("creating {}", vms_dir.display())))?;
        let inner = Arc::new(Inner {
            cfg,
            vms_dir,
            vms: Mutex::new(Vec::new()),
            create_lock: tokio::sync::Mutex::new(()),
            shutdown: watch::Sender::new(false),
        });
        let mgr = VmManager { inner };
        mgr.load_all().await?;
        Ok(mgr)
    }

    /// Ends every console stream (the agent is shutting down). VMs are not touched.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// The configuration the manager runs with.
    pub fn config(&self) -> &ManagerConfig {
        &self.inner.cfg
    }

    async fn load_all(&self) -> Result<(), ManagerError> {
        let dir = &self.inner.vms_dir;
        let mut entries = Vec::new();
        for dent in std::fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let dent = dent.map_err(io_err(format!("reading {}", dir.display())))?;
            let path = dent.path();
            let name = dent.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // Leftover of an interrupted create or delete.
                warn!("removing leftover {}", path.display());
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            let spec = path.join("spec.json");
            let rec: SpecRecord = match std::fs::read(&spec)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    warn!("skipping {}: {e}", spec.display());
                    continue;
                }
            };
            if rec.vm.id != name {
                warn!(
                    "skipping {}: its id {:?} does not match the directory",
                    spec.display(),
                    rec.vm.id
                );
                continue;
            }
            entries.push((rec, path));
        }
        entries.sort_by(|a, b| {
            let key = |r: &SpecRecord| (r.created_at_unix, r.created_at_unix_ns, r.vm.id.clone());
            key(&a.0).cmp(&key(&b.0))
        });
        for (rec, path) in entries {
            let entry = Arc::new(VmEntry::new(rec.vm.id.clone(), path, rec));
            self.recover(&entry).await;
            if let Some(why) = gone_reason(&entry) {
                info!(vm = %entry.id, "{why}; removing it");
                let trash = self.inner.vms_dir.join(format!(".deleting-{}", entry.id));
                if std::fs::rename(&entry.dir, &trash).is_ok() {
                    let _ = std::fs::remove_dir_all(&trash);
                }
                continue;
            }
            self.inner.vms.lock().unwrap().push(entry.clone());
            self.resume_migration_duties(&entry).await;
        }
        Ok(())
    }

    /// After loading: watches an incoming VM, and follows an outgoing migration that a
    /// VMM runs (it went on while the agent was down).
    async fn resume_migration_duties(&self, entry: &Arc<VmEntry>) {
        let (state, run) = {
            let st = entry.status.borrow();
            (st.state, st.run)
        };
        if state == VmState::Incoming {
            spawn_incoming_watch(self.clone(), entry.clone(), run);
            return;
        }
        if !matches!(state, VmState::Running | VmState::Paused) {
            let _ = std::fs::remove_file(entry.dir.join(MIGRATION_FILE));
            return;
        }
        if let Ok(Response::Migration { progress: Some(p) }) =
            control_call(entry.control(), Request::MigrationStatus, CONTROL_TIMEOUT).await
        {
            if is_outgoing_active(&p.phase) || p.phase == "in-doubt" {
                info!(vm = %entry.id, phase = %p.phase, "an outgoing migration is under way; following it");
                let mgr = self.clone();
                let entry = entry.clone();
                tokio::spawn(async move {
                    crate::migration::follow(mgr, entry, None, None).await;
                });
                return;
            }
        }
        let _ = std::fs::remove_file(entry.dir.join(MIGRATION_FILE));
    }

    /// Works out the state of a VM loaded from disk; re-attaches to a live VMM.
    async fn recover(&self, entry: &Arc<VmEntry>) {
        let pid = std::fs::read_to_string(entry.dir.join("vmm.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let Some(pid) = pid else {
            if entry.exit_file().exists() {
                finalize(entry, 0, None);
            }
            return;
        };
        if pid_alive(pid) && is_vmm_of(pid, &entry.control()) {
            let info = control_call(entry.control(), Request::Info, CONTROL_TIMEOUT).await;
            entry.status.send_modify(|st| {
                st.pid = Some(pid);
                st.state = VmState::Starting;
            });
            match info {
                Ok(Response::Info(info)) if info.id == entry.id => {
                    apply_info(entry, 0, &info);
                    info!(vm = %entry.id, pid, state = %entry.status.borrow().state, "re-attached to running VMM");
                }
                other => {
                    warn!(vm = %entry.id, pid, "VMM is alive but did not answer Info ({other:?}); watching it");
                }
            }
            spawn_pid_monitor(self.clone(), entry.clone(), 0, pid);
        } else {
            finalize(entry, 0, None);
        }
    }

    pub(crate) fn lookup(&self, id_or_name: &str) -> Result<Arc<VmEntry>, ManagerError> {
        if id_or_name.is_empty() {
            return Err(invalid("id_or_name", "empty; expected a VM id or name"));
        }
        let vms = self.inner.vms.lock().unwrap();
        vms.iter()
            .find(|e| e.id == id_or_name)
            .or_else(|| {
                vms.iter()
                    .find(|e| e.record.lock().unwrap().vm.name == id_or_name)
            })
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(id_or_name.to_string()))
    }

    /// All VMs, in creation order.
    pub fn list(&self) -> Vec<VmInfo> {
        let vms = self.inner.vms.lock().unwrap().clone();
        vms.iter().map(|e| e.snapshot()).collect()
    }

    /// One VM by id or name.
    pub fn get(&self, id_or_name: &str) -> Result<VmInfo, ManagerError> {
        Ok(self.lookup(id_or_name)?.snapshot())
    }

    /// Validates and persists a new VM (and starts it if asked). The VM exists once its
    /// spec is on disk; if anything fails before that, nothing is left behind. If the start
    /// fails the VM remains, in state `failed`, and the error is returned.
    pub async fn create(&self, p: CreateParams) -> Result<VmInfo, ManagerError> {
        let entry = {
            let _guard = self.inner.create_lock.lock().await;
            let spec = self.build_spec(&p)?;
            let id = self.new_id();
            {
                let vms = self.inner.vms.lock().unwrap();
                if vms
                    .iter()
                    .any(|e| e.id == p.name || e.record.lock().unwrap().vm.name == p.name)
                {
                    return Err(ManagerError::AlreadyExists(p.name.clone()));
                }
            }
            let dir = self.inner.vms_dir.join(&id);
            let vm = VmConfig {
                id: id.clone(),
                console_log: dir.join("console.log"),
                debugcon_log: dir.join("debugcon.log"),
                ..spec
            };
            vm.validate(novacron_vmm::config::host_available_mib())
                .map_err(
                    |novacron_vmm::config::ConfigError::Invalid { field, reason }| {
                        invalid(field, reason)
                    },
                )?;
            let rec = SpecRecord {
                vm,
                created_at_unix: unix_now(),
                created_at_unix_ns: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                    .unwrap_or(0),
                test_guest: p.test_guest,
                desired: Desired::Stopped,
                incoming: false,
            };
            // Build the directory under a hidden name, then rename it into place: a VM
            // directory either exists complete or not at all.
            let tmp = self.inner.vms_dir.join(format!(".creating-{id}"));
            let result = (|| {
                std::fs::create_dir(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
                write_json_atomic(&tmp.join("spec.json"), &rec)?;
                std::fs::rename(&tmp, &dir).map_err(io_err(format!("creating {}", dir.display())))
            })();
            if let Err(e) = result {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            info!(vm = %id, name = %rec.vm.name, "created VM");
            let entry = Arc::new(VmEntry::new(id, dir, rec));
            self.inner.vms.lock().unwrap().push(entry.clone());
            entry
        };
        if p.start {
            let _op = entry.op.lock().await;
            entry.check_live()?;
            self.start_locked(&entry, false).await?;
        }
        Ok(entry.snapshot())
    }

    fn build_spec(&self, p: &CreateParams) -> Result<VmConfig, ManagerError> {
        let vcpus = p.vcpus.unwrap_or(DEFAULT_VCPUS);
        let vcpus = u8::try_from(vcpus)
            .ok()
            .filter(|v| (1..=novacron_vmm::config::MAX_VCPUS).contains(v))
            .ok_or_else(|| {
                invalid(
                    "vcpus",
                    format!("{vcpus}: expected 1 to {}", novacron_vmm::config::MAX_VCPUS),
                )
            })?;
        let memory_mib = if p.memory_mib == 0 {
            DEFAULT_MEMORY_MIB
        } else {
            p.memory_mib
        };
        let mut entry = parse_entry(&p.entry)?;
        let kernel = if p.test_guest {
            if p.kernel.is_some() {
                return Err(invalid(
                    "kernel",
                    "given together with test_guest; expected one or the other",
                ));
            }
            if !matches!(entry, EntryProtocol::Auto | EntryProtocol::Long64) {
                return Err(invalid(
                    "entry",
                    format!(
                        "{:?} with test_guest; the test guest only boots with long64",
                        p.entry
                    ),
                ));
            }
            entry = EntryProtocol::Long64;
            PathBuf::from(novacron_testguest::guest_elf_path())
        } else {
            let k = p.kernel.clone().ok_or_else(|| {
                invalid(
                    "kernel",
                    "missing; expected a kernel image path or test_guest",
                )
            })?;
            check_absolute("kernel", &k)?;
            k
        };
        if let Some(initrd) = &p.initramfs {
            check_absolute("initramfs", initrd)?;
        }
        Ok(VmConfig {
            id: String::new(),
            name: p.name.clone(),
            vcpus,
            memory_mib,
            hugepages: p.hugepages,
            kernel,
            initramfs: p.initramfs.clone(),
            cmdline: p.cmdline.clone(),
            entry,
            console_log: PathBuf::new(),
            debugcon_log: PathBuf::new(),
            console_log_max_bytes: self.inner.cfg.console_log_max_bytes,
            dirty_tracking: self.inner.cfg.dirty_tracking,
            dirty_ring_entries: 0,
        })
    }

    pub(crate) fn new_id(&self) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let mut h = RandomState::new().build_hasher();
            h.write_u128(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
            );
            h.write_u32(std::process::id());
            h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
            let id = format!("{:016x}", h.finish());
            let taken = self.inner.vms.lock().unwrap().iter().any(|e| e.id == id)
                || self.inner.vms_dir.join(&id).exists();
            if !taken {
                return id;
            }
        }
    }

    /// Starts a VM that is created, stopped or failed; returns once its VMM answers on the
    /// control socket (or fails with the VMM's exit record / log tail).
    pub async fn start(&self, id_or_name: &str) -> Result<VmInfo, ManagerError> {
        let entry = self.lookup(id_or_name)?;
        let _op = entry.op.lock().await;
        entry.check_live()?;
        self.start_locked(&entry, false).await?;
        Ok(entry.snapshot())
    }

    /// Memory of the active VMs other than `except`, MiB.
    fn active_memory_mib(&self, except: Option<&str>) -> u64 {
        let vms = self.inner.vms.lock().unwrap().clone();
        vms.iter()
            .filter(|e| Some(e.id.as_str()) != except && e.status.borrow().state.is_active())
            .map(|e| e.record.lock().unwrap().vm.memory_mib)
            .sum()
    }

    /// Refuses `memory_mib` more for VM `id` if it would exceed `max_memory_mib`.
    pub(crate) fn check_memory_budget(&self, id: &str, memory_mib: u64) -> Result<(), String> {
        let max = self.inner.cfg.max_memory_mib;
        if max == 0 {
            return Ok(());
        }
        let used = self.active_memory_mib(Some(id));
        if used + memory_mib > max {
            return Err(format!(
                "not enough memory: the VM needs {memory_mib} MiB, this agent can give {} MiB \
                 now (max_memory_mib {max}, {used} MiB in use)",
                max.saturating_sub(used)
            ));
        }
        Ok(())
    }

    /// Starts a VMM for the VM (`incoming`: waiting for a migration instead of booting).
    pub(crate) async fn start_locked(
        &self,
        entry: &Arc<VmEntry>,
        incoming: bool,
    ) -> Result<(), ManagerError> {
        let name = entry.name();
        let state = entry.status.borrow().state;
        if state.is_active() {
            return Err(ManagerError::WrongState(format!(
                "VM {name} is {state}; only a created, stopped or failed VM can be started"
            )));
        }
        let mut vm = entry.record.lock().unwrap().vm.clone();
        vm.console_log_max_bytes = self.inner.cfg.console_log_max_bytes;
        vm.validate(None).map_err(
            |novacron_vmm::config::ConfigError::Invalid { field, reason }| invalid(field, reason),
        )?;
        self.check_memory_budget(&entry.id, vm.memory_mib)
            .map_err(|reason| ManagerError::WrongState(format!("VM {name}: {reason}")))?;
        let dir = &entry.dir;
        for stale in ["exit.json", "control.sock"] {
            match std::fs::remove_file(dir.join(stale)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing stale {stale}"))(e)),
            }
        }
        let vmm_spec = dir.join("spec-vmm.json");
        write_json_atomic(&vmm_spec, &vm)?;
        let log_path = dir.join("vmm.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log
            .try_clone()
            .map_err(io_err("duplicating vmm.log handle"))?;
        let program = &self.inner.cfg.vmm_binary;
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg("vmm")
            .arg("--config")
            .arg(&vmm_spec)
            .arg("--control")
            .arg(entry.control())
            .arg("--exit-file")
            .arg(entry.exit_file());
        if incoming {
            cmd.arg("--incoming");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(false);
        // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
        // which is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| ManagerError::StartFailed {
            name: name.clone(),
            detail: format!("spawning VMM {}: {e}", program.display()),
        })?;
        let pid = child.id().unwrap_or(0);
        if let Err(e) = write_atomic(&dir.join("vmm.pid"), format!("{pid}\n").as_bytes()) {
            warn!(vm = %entry.id, "writing vmm.pid: {e}");
        }
        entry.set_desired(Desired::Running);
        let mut run = 0;
        entry.status.send_modify(|st| {
            st.run += 1;
            run = st.run;
            st.state = VmState::Starting;
            st.pid = Some(pid);
            st.vcpu_tids.clear();
            st.exit_reason = None;
            st.exit_detail.clear();
            st.kill_note = None;
        });
        info!(vm = %entry.id, name = %name, pid, "started VMM");
        spawn_child_monitor(self.clone(), entry.clone(), run, child, log_start);

        // Wait until the control socket answers or the process ends.
        let deadline = Instant::now() + self.inner.cfg.start_timeout;
        let mut rx = entry.status.subscribe();
        loop {
            {
                let st = rx.borrow_and_update();
                if st.run != run || st.state != VmState::Starting {
                    return match st.state {
                        VmState::Failed => Err(ManagerError::StartFailed {
                            name,
                            detail: st.exit_detail.clone(),
                        }),
                        _ => Ok(()),
                    };
                }
            }
            match control_call(entry.control(), Request::Info, Duration::from_secs(2)).await {
                Ok(Response::Info(info)) if info.id == entry.id => {
                    if apply_info(entry, run, &info) {
                        return Ok(());
                    }
                }
                Ok(Response::Info(info)) => {
                    warn!(vm = %entry.id, "VMM reports id {:?}", info.id);
                }
                Ok(other) => debug!(vm = %entry.id, "Info answered {other:?}"),
                Err(e) => debug!(vm = %entry.id, "VMM not answering yet: {e}"),
            }
            if Instant::now() >= deadline {
                let secs = self.inner.cfg.start_timeout.as_secs_f64();
                let note =
                    format!("VMM did not answer on its control socket within {secs:.1} s; killed");
                let rec = ExitRecord {
                    reason: ExitReason::VmmError,
                    detail: note.clone(),
                };
                kill_and_wait(entry, run, pid, rec, Duration::from_secs(5)).await;
                return Err(ManagerError::StartFailed { name, detail: note });
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// Stops a running, paused or starting VM: `force` ends it at once, otherwise the guest
    /// is asked to power off and forced after `timeout_ms` (default from the config).
    /// Returns once the VMM process has ended.
    pub async fn stop(
        &self,
        id_or_name: &str,
        force: bool,
        timeout_ms: Option<u64>,
    ) -> Result<VmInfo, ManagerError> {
        let entry = self.lookup(id_or_name)?;
        let _op = entry.op.lock().await;
        entry.check_live()?;
        self.stop_locked(&entry, force, timeout_ms).await?;
        Ok(entry.snapshot())
    }

    pub(crate) async fn stop_locked(
        &self,
        entry: &Arc<VmEntry>,
        force: bool,
        timeout_ms: Option<u64>,
    ) -> Result<(), ManagerError> {
        let name = entry.name();
        let (state, run, pid) = {
            let st = entry.status.borrow();
            (st.state, st.run, st.pid)
        };
        if !state.is_active() {
            return Err(ManagerError::WrongState(format!(
                "VM {name} is {state}; only a running or paused VM can be stopped"
            )));
        }
        entry.set_desired(Desired::Stopped);
        let timeout_ms = timeout_ms
            .filter(|t| *t > 0)
            .unwrap_or(self.inner.cfg.stop_timeout_ms);
        let grace = Duration::from_millis(timeout_ms);
        let answer = control_call(
            entry.control(),
            Request::Stop { force, timeout_ms },
            grace + CONTROL_TIMEOUT,
        )
        .await;
        let pid = pid.unwrap_or(0);
        match answer {
            Ok(Response::Ok) => {}
            Ok(Response::Error { message }) if !force => {
                return Err(ManagerError::VmmRefused { name, message });
            }
            Ok(other) if !force => {
                return Err(ManagerError::UnexpectedAnswer {
                    name,
                    answer: format!("{other:?}"),
                });
            }
            Err(e) if !force => {
                // The VMM may have closed the channel because it is exiting.
                if !wait_for_end(entry, run, Duration::from_secs(1)).await {
                    return Err(ManagerError::Vmm { name, source: e });
                }
            }
            other => {
                warn!(vm = %entry.id, "forced stop: VMM answered {other:?}; killing it");
                kill_and_wait(
                    entry,
                    run,
                    pid,
                    ExitRecord {
                        reason: ExitReason::Stopped,
                        detail: "force-stopped: the VMM did not take the stop request; killed"
                            .into(),
                    },
                    Duration::from_secs(5),
                )
                .await;
            }
        }
        if !wait_for_end(entry, run, grace + Duration::from_secs(10)).await {
            warn!(vm = %entry.id, pid, "VMM did not exit after stop; killing it");
            kill_and_wait(
                entry,
                run,
                pid,
                ExitRecord {
                    reason: ExitReason::Stopped,
                    detail: format!(
                        "the VMM did not exit within {timeout_ms} ms + 10 s of a stop; killed"
                    ),
                },
                Duration::from_secs(5),
            )
            .await;
        }
        let st = entry.status.borrow().clone();
        if st.run == run && st.state.is_active() {
            return Err(ManagerError::WrongState(format!(
                "VM {name}: VMM pid {pid} is still running after the stop"
            )));
        }
        Ok(())
    }

    /// Pauses a running VM (no-op if already paused).
    pub async fn pause(&self, id_or_name: &str) -> Result<VmInfo, ManagerError> {
        self.pause_resume(id_or_name, true).await
    }

    /// Resumes a paused VM (no-op if already running).
    pub async fn resume(&self, id_or_name: &str) -> Result<VmInfo, ManagerError> {
        self.pause_resume(id_or_name, false).await
    }

    async fn pause_resume(&self, id_or_name: &str, pause: bool) -> Result<VmInfo, ManagerError> {
        let entry = self.lookup(id_or_name)?;
        let _op = entry.op.lock().await;
        entry.check_live()?;
        let name = entry.name();
        let (state, run) = {
            let st = entry.status.borrow();
            (st.state, st.run)
        };
        let (from, to, req) = if pause {
            (VmState::Running, VmState::Paused, Request::Pause)
        } else {
            (VmState::Paused, VmState::Running, Request::Resume)
        };
        if state == to {
            return Ok(entry.snapshot());
        }
        if state != from {
            return Err(ManagerError::WrongState(format!(
                "VM {name} is {state}; only a {from} VM can be {}",
                if pause { "paused" } else { "resumed" }
            )));
        }
        self.expect_ok(&entry, req).await?;
        entry.status.send_if_modified(|st| {
            if st.run == run && st.state == from {
                st.state = to;
                true
            } else {
                false
            }
        });
        Ok(entry.snapshot())
    }

    pub(crate) async fn expect_ok(
        &self,
        entry: &VmEntry,
        req: Request,
    ) -> Result<(), ManagerError> {
        let name = entry.name();
        match control_call(entry.control(), req, CONTROL_TIMEOUT).await {
            Ok(Response::Ok) => Ok(()),
            Ok(Response::Error { message }) => Err(ManagerError::VmmRefused { name, message }),
            Ok(other) => Err(ManagerError::UnexpectedAnswer {
                name,
                answer: format!("{other:?}"),
            }),
            Err(source) => Err(ManagerError::Vmm { name, source }),
        }
    }

    fn require_vmm(entry: &VmEntry, what: &str) -> Result<(), ManagerError> {
        let state = entry.status.borrow().state;
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(ManagerError::WrongState(format!(
                "VM {} is {state}; {what} needs a running or paused VM",
                entry.name()
            )));
        }
        Ok(())
    }

    /// Posts a command to the test guest's agent device.
    pub async fn guest_command(
        &self,
        id_or_name: &str,
        cmd: u32,
        arg: u64,
    ) -> Result<VmInfo, ManagerError> {
        let entry = self.lookup(id_or_name)?;
        Self::require_vmm(&entry, "a guest command")?;
        self.expect_ok(&entry, Request::GuestCommand { cmd, arg })
            .await?;
        Ok(entry.snapshot())
    }

    /// Reads the test guest's status page (`None` before the guest registered it).
    pub async fn guest_status(
        &self,
        id_or_name: &str,
    ) -> Result<Option<GuestStatusWire>, ManagerError> {
        let entry = self.lookup(id_or_name)?;
        Self::require_vmm(&entry, "reading the guest status")?;
        let name = entry.name();
        match control_call(entry.control(), Request::GuestStatus, CONTROL_TIMEOUT).await {
            Ok(Response::GuestStatus { status }) => Ok(status),
            Ok(Response::Error { message }) => Err(ManagerError::VmmRefused { name, message }),
            Ok(other) => Err(ManagerError::UnexpectedAnswer {
                name,
                answer: format!("{other:?}"),
            }),
            Err(source) => Err(ManagerError::Vmm { name, source }),
        }
    }

    /// Deletes a VM and its directory. A running, paused or starting VM is refused unless
    /// `force` is set, in which case it is force-stopped first. Returns the VM id.
    pub async fn delete(&self, id_or_name: &str, force: bool) -> Result<String, ManagerError> {
        let entry = self.lookup(id_or_name)?;
        let _op = entry.op.lock().await;
        entry.check_live()?;
        let state = entry.status.borrow().state;
        if state.is_active() {
            if !force {
                return Err(ManagerError::WrongState(format!(
                    "VM {} is {state}; stop it first or delete with force",
                    entry.name()
                )));
            }
            self.stop_locked(&entry, true, None).await?;
        }
        let trash = self.inner.vms_dir.join(format!(".deleting-{}", entry.id));
        std::fs::rename(&entry.dir, &trash)
            .map_err(io_err(format!("deleting {}", entry.dir.display())))?;
        entry.deleted.store(true, Ordering::SeqCst);
        self.inner
            .vms
            .lock()
            .unwrap()
            .retain(|e| !Arc::ptr_eq(e, &entry));
        if let Err(e) = std::fs::remove_dir_all(&trash) {
            warn!("removing {}: {e}", trash.display());
        }
        info!(vm = %entry.id, "deleted VM");
        Ok(entry.id.clone())
    }

    /// Streams the VM's console log: from its start or its current end, and with `follow`
    /// keeps tailing it (across rotations) until the receiver is dropped or the VM deleted.
    pub fn console(
        &self,
        id_or_name: &str,
        follow: bool,
        from_start: bool,
    ) -> Result<mpsc::Receiver<std::io::Result<Vec<u8>>>, ManagerError> {
        let entry = self.lookup(id_or_name)?;
        let path = entry.record.lock().unwrap().vm.console_log.clone();
        let (tx, rx) = mpsc::channel(16);
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                r = tail_console(&path, &entry, follow, from_start, &tx) => {
                    if let Err(e) = r {
                        let _ = tx.send(Err(e)).await;
                    }
                }
                _ = async { shutdown.wait_for(|down| *down).await.map(|_| ()) } => {}
            }
        });
        Ok(rx)
    }
}

impl VmManager {
    /// Called by a VMM's monitor once run `run` has ended: a VM that migrated away, or
    /// whose incoming migration was discarded (or whose incoming VMM died), is removed
    /// with its directory.
    pub(crate) fn after_end(&self, entry: &Arc<VmEntry>, run: u64) {
        if entry.status.borrow().run != run {
            return;
        }
        if let Some(why) = gone_reason(entry) {
            self.remove_entry(entry, &why);
        }
    }

    /// Removes a VM from the list and deletes its directory (idempotent).
    pub(crate) fn remove_entry(&self, entry: &Arc<VmEntry>, why: &str) {
        if entry.deleted.swap(true, Ordering::SeqCst) {
            return;
        }
        self.inner
            .vms
            .lock()
            .unwrap()
            .retain(|e| !Arc::ptr_eq(e, entry));
        let trash = self.inner.vms_dir.join(format!(".deleting-{}", entry.id));
        match std::fs::rename(&entry.dir, &trash) {
            Ok(()) => {
                if let Err(e) = std::fs::remove_dir_all(&trash) {
                    warn!("removing {}: {e}", trash.display());
                }
            }
            Err(e) => warn!("removing {}: {e}", entry.dir.display()),
        }
        info!(vm = %entry.id, "removed VM: {why}");
    }
}

/// Why a VM whose VMM is not active must not stay on this agent, if it must not.
fn gone_reason(entry: &VmEntry) -> Option<String> {
    let st = entry.status.borrow().clone();
    if st.state.is_active() {
        return None;
    }
    match st.exit_reason.as_deref() {
        Some("migrated") => Some(format!("migrated away ({})", st.exit_detail)),
        Some("incoming_discarded") => {
            Some(format!("incoming migration discarded ({})", st.exit_detail))
        }
        r if entry.record.lock().unwrap().incoming => Some(format!(
            "its incoming VMM ended ({}) before the migration committed",
            r.unwrap_or("never started")
        )),
        _ => None,
    }
}

/// Whether an outgoing migration in this phase is still running.
pub(crate) fn is_outgoing_active(phase: &str) -> bool {
    matches!(
        phase,
        "connecting" | "pre-copy" | "switch-over" | "committing"
    )
}

/// Polls an incoming VMM's Info until it runs (the migration committed) or ends; cancels a
/// migration that did not connect within [`PREPARE_TIMEOUT`].
pub(crate) fn spawn_incoming_watch(_mgr: VmManager, entry: Arc<VmEntry>, run: u64) {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut cancelled = false;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            {
                let st = entry.status.borrow();
                if st.run != run || st.state != VmState::Incoming {
                    return;
                }
            }
            if entry.deleted.load(Ordering::SeqCst) {
                return;
            }
            if let Ok(Response::Info(info)) =
                control_call(entry.control(), Request::Info, Duration::from_secs(2)).await
            {
                if info.id == entry.id {
                    apply_info(&entry, run, &info);
                }
            }
            if !cancelled && started.elapsed() > PREPARE_TIMEOUT {
                if let Ok(Response::Migration { progress: Some(p) }) =
                    control_call(entry.control(), Request::MigrationStatus, CONTROL_TIMEOUT).await
                {
                    if p.phase == "listening" {
                        warn!(vm = %entry.id, "no migration connected within {PREPARE_TIMEOUT:?}; discarding the prepared VM");
                        let _ = control_call(
                            entry.control(),
                            Request::MigrationCancel,
                            CONTROL_TIMEOUT,
                        )
                        .await;
                        cancelled = true;
                    }
                }
            }
        }
    });
}

fn parse_entry(s: &str) -> Result<EntryProtocol, ManagerError> {
    Ok(match s {
        "" | "auto" => EntryProtocol::Auto,
        "linux" => EntryProtocol::Linux,
        "pvh" => EntryProtocol::Pvh,
        "long64" => EntryProtocol::Long64,
        other => {
            return Err(invalid(
                "entry",
                format!("{other:?}: expected one of auto, linux, pvh, long64"),
            ))
        }
    })
}

pub(crate) fn entry_name(e: EntryProtocol) -> &'static str {
    match e {
        EntryProtocol::Auto => "auto",
        EntryProtocol::Linux => "linux",
        EntryProtocol::Pvh => "pvh",
        EntryProtocol::Long64 => "long64",
    }
}

fn check_absolute(field: &str, p: &Path) -> Result<(), ManagerError> {
    if !p.is_absolute() {
        return Err(invalid(
            field,
            format!("{}: expected an absolute path", p.display()),
        ));
    }
    Ok(())
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ManagerError> {
    let tmp = path.with_extension("tmp");
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(format!("writing {}", path.display()))(e));
    }
    Ok(())
}

pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), ManagerError> {
    let mut data = serde_json::to_vec_pretty(value).map_err(|e| ManagerError::Io {
        context: format!("serialising {}", path.display()),
        source: std::io::Error::other(e),
    })?;
    data.push(b'\n');
    write_atomic(path, &data)
}

/// One request/response on a VMM's control socket, off the async threads.
pub(crate) async fn control_call(
    socket: PathBuf,
    req: Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    tokio::task::spawn_blocking(move || Client::connect(&socket, timeout)?.call(&req))
        .await
        .unwrap_or_else(|e| Err(ClientError::Io(std::io::Error::other(e))))
}

/// Updates the status from an Info answer if it still belongs to run `run`;
/// returns whether the VM is now past `starting`.
pub(crate) fn apply_info(entry: &VmEntry, run: u64, info: &novacron_vmm::control::VmmInfo) -> bool {
    let mut settled = false;
    // An incoming VMM is paused while it loads the migrated state; the VM is the agent's
    // only once it runs (the migration committed).
    let incoming = entry.record.lock().unwrap().incoming;
    entry.status.send_if_modified(|st| {
        if st.run != run || !st.state.is_active() {
            return false;
        }
        st.pid = Some(info.pid);
        st.vcpu_tids = info.vcpu_tids.clone();
        let new = match info.state {
            RunState::Incoming => VmState::Incoming,
            RunState::Running => VmState::Running,
            RunState::Paused if incoming => VmState::Incoming,
            RunState::Paused => VmState::Paused,
            // About to exit; the monitor records the outcome.
            RunState::Stopped => VmState::Running,
        };
        settled = new != VmState::Starting;
        st.state = new;
        true
    });
    if settled && info.state == RunState::Running {
        // An incoming migration committed: the VM is an ordinary VM of this agent now.
        let rec = {
            let mut rec = entry.record.lock().unwrap();
            if !rec.incoming {
                return settled;
            }
            rec.incoming = false;
            rec.desired = Desired::Running;
            rec.clone()
        };
        info!(vm = %entry.id, "incoming migration committed; the VM runs here");
        if let Err(e) = write_json_atomic(&entry.dir.join("spec.json"), &rec) {
            warn!(vm = %entry.id, "persisting the migrated VM: {e}");
        }
    }
    settled
}

/// Records the end of run `run` (runs count from 1; 0 is a VM loaded from disk) from
/// `exit.json`, unless a newer run has started meanwhile.
fn finalize(entry: &VmEntry, run: u64, exit_status: Option<std::process::ExitStatus>) {
    finalize_with_log(entry, run, exit_status, 0)
}

fn finalize_with_log(
    entry: &VmEntry,
    run: u64,
    exit_status: Option<std::process::ExitStatus>,
    log_start: u64,
) {
    let mut record: Option<Result<ExitRecord, String>> = match std::fs::read(entry.exit_file()) {
        Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(e.to_string())),
    };
    if record.is_none() {
        let note = {
            let st = entry.status.borrow();
            (st.run == run).then(|| st.kill_note.clone()).flatten()
        };
        if let Some(note) = note {
            // Persist the outcome the agent chose, so a restarted agent reports the same.
            if let Err(e) = write_json_atomic(&entry.exit_file(), &note) {
                warn!(vm = %entry.id, "writing exit record: {e}");
            }
            record = Some(Ok(note));
        }
    }
    let status_text = match exit_status {
        Some(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        None => "exit status unknown (not our child)".to_string(),
    };
    let (state, reason, detail) = match record {
        Some(Ok(rec)) => {
            let state = if rec.reason.is_failure() {
                VmState::Failed
            } else {
                VmState::Stopped
            };
            (state, reason_name(rec.reason), rec.detail)
        }
        Some(Err(e)) => (
            VmState::Failed,
            "vmm_error".to_string(),
            format!(
                "unreadable exit record {}: {e}",
                entry.exit_file().display()
            ),
        ),
        None => {
            let tail = log_tail(&entry.dir.join("vmm.log"), log_start);
            (
                VmState::Failed,
                "vmm_lost".to_string(),
                format!(
                    "VMM process exited without an exit record ({status_text}); vmm.log: {}",
                    if tail.is_empty() {
                        "(empty)".to_string()
                    } else {
                        tail
                    }
                ),
            )
        }
    };
    let _ = std::fs::remove_file(entry.control());
    let changed = entry.status.send_if_modified(|st| {
        if st.run != run {
            return false;
        }
        st.state = state;
        st.pid = None;
        st.vcpu_tids.clear();
        st.exit_reason = Some(reason.clone());
        st.exit_detail = detail.clone();
        true
    });
    if changed {
        if state == VmState::Failed {
            warn!(vm = %entry.id, reason = %reason, "VM failed: {detail}");
        } else {
            info!(vm = %entry.id, reason = %reason, "VM stopped");
        }
    }
}

fn reason_name(r: ExitReason) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{r:?}"))
}

/// The last bytes of a log written since `from`, as trimmed text.
fn log_tail(path: &Path, from: u64) -> String {
    let Ok(data) = std::fs::read(path) else {
        return String::new();
    };
    let from = usize::try_from(from).unwrap_or(0).min(data.len());
    let start = data
        .len()
        .saturating_sub(VMM_LOG_TAIL_BYTES as usize)
        .max(from);
    String::from_utf8_lossy(&data[start..]).trim().to_string()
}

fn spawn_child_monitor(
    mgr: VmManager,
    entry: Arc<VmEntry>,
    run: u64,
    mut child: tokio::process::Child,
    log_start: u64,
) {
    tokio::spawn(async move {
        let status = child.wait().await.ok();
        finalize_with_log(&entry, run, status, log_start);
        mgr.after_end(&entry, run);
    });
}

/// Watches a VMM that is not our child (the agent restarted): polls its pid every 500 ms.
fn spawn_pid_monitor(mgr: VmManager, entry: Arc<VmEntry>, run: u64, pid: u32) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL_PID_INTERVAL).await;
            if entry.deleted.load(Ordering::SeqCst) {
                return;
            }
            if entry.status.borrow().run != run {
                return;
            }
            if !pid_alive(pid) {
                finalize(&entry, run, None);
                mgr.after_end(&entry, run);
                return;
            }
            if entry.status.borrow().state == VmState::Starting {
                if let Ok(Response::Info(info)) =
                    control_call(entry.control(), Request::Info, Duration::from_secs(1)).await
                {
                    if info.id == entry.id {
                        apply_info(&entry, run, &info);
                    }
                }
            }
        }
    });
}

/// Waits until run `run` is no longer active; returns whether it ended in time.
pub(crate) async fn wait_for_end(entry: &VmEntry, run: u64, timeout: Duration) -> bool {
    let mut rx = entry.status.subscribe();
    let ended = |st: &Status| st.run != run || !st.state.is_active();
    tokio::time::timeout(timeout, rx.wait_for(ended))
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false)
}

/// SIGKILLs a VMM (recording why) and waits for its monitor to record the end.
pub(crate) async fn kill_and_wait(
    entry: &VmEntry,
    run: u64,
    pid: u32,
    note: ExitRecord,
    timeout: Duration,
) {
    entry.status.send_modify(|st| {
        if st.run == run {
            st.kill_note = Some(note);
        }
    });
    if pid != 0 && pid_alive(pid) {
        kill(pid, libc::SIGKILL);
    }
    if !wait_for_end(entry, run, timeout).await {
        warn!(vm = %entry.id, pid, "VMM still not gone after SIGKILL");
    }
}

fn kill(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; pid is a positive process id
    // (never 0 or -1, which would address process groups).
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        debug!(pid, sig, "kill: {}", std::io::Error::last_os_error());
    }
}

/// Whether a process exists and is not a zombie.
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ..." where comm may contain spaces and parentheses.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

/// Whether process `pid` is a VMM serving `control` (its command line names the socket).
pub(crate) fn is_vmm_of(pid: u32, control: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = control.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == want)
}

async fn tail_console(
    path: &Path,
    entry: &VmEntry,
    follow: bool,
    from_start: bool,
    tx: &mpsc::Sender<std::io::Result<Vec<u8>>>,
) -> std::io::Result<()> {
    let mut file: Option<(tokio::fs::File, u64)> = None;
    let mut pos: u64 = 0;
    let mut first = true;
    loop {
        if file.is_none() {
            match tokio::fs::File::open(path).await {
                Ok(mut f) => {
                    let meta = f.metadata().await?;
                    pos = if first && !from_start { meta.len() } else { 0 };
                    f.seek(std::io::SeekFrom::Start(pos)).await?;
                    file = Some((f, meta.ino()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            first = false;
        }
        if let Some((f, _)) = file.as_mut() {
            if !drain(f, &mut pos, tx).await? {
                return Ok(());
            }
        }
        if !follow || entry.deleted.load(Ordering::SeqCst) {
            return Ok(());
        }
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = tokio::time::sleep(CONSOLE_POLL_INTERVAL) => {}
        }
        if let Some((f, ino)) = file.as_mut() {
            match tokio::fs::metadata(path).await {
                Ok(m) if m.ino() == *ino => {
                    if m.len() < pos {
                        // Truncated in place: start over.
                        pos = 0;
                        f.seek(std::io::SeekFrom::Start(0)).await?;
                    }
                }
                Ok(_) | Err(_) => {
                    // Rotated (or removed): finish the old file, then reopen from the start.
                    if !drain(f, &mut pos, tx).await? {
                        return Ok(());
                    }
                    file = None;
                }
            }
        }
    }
}

/// Sends everything from the current position to EOF; false if the receiver is gone.
async fn drain(
    f: &mut tokio::fs::File,
    pos: &mut u64,
    tx: &mpsc::Sender<std::io::Result<Vec<u8>>>,
) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(true);
        }
        *pos += n as u64;
        if tx.send(Ok(buf[..n].to_vec())).await.is_err() {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        kernel: PathBuf,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let kernel = dir.path().join("vmlinux");
            std::fs::write(&kernel, [0x7fu8; 512]).unwrap();
            Fixture { dir, kernel }
        }
        fn cfg(&self) -> ManagerConfig {
            ManagerConfig {
                state_dir: self.dir.path().join("state"),
                // Never run by these tests: nothing here starts a VM.
                vmm_binary: PathBuf::from("/nonexistent/vmm"),
                console_log_max_bytes: 1234,
                stop_timeout_ms: 100,
                start_timeout: Duration::from_secs(1),
                max_memory_mib: 0,
                dirty_tracking: Default::default(),
                migration: None,
            }
        }
        async fn open(&self) -> VmManager {
            VmManager::open(self.cfg()).await.unwrap()
        }
        fn params(&self, name: &str) -> CreateParams {
            CreateParams {
                name: name.into(),
                kernel: Some(self.kernel.clone()),
                ..Default::default()
            }
        }
        fn vm_dirs(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("state/vms"))
                .unwrap()
                .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }

    fn field_of(e: ManagerError) -> String {
        match e {
            ManagerError::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn create_persists_spec_with_defaults() {
        let f = Fixture::new();
        let m = f.open().await;
        let vm = m.create(f.params("db-1")).await.unwrap();
        assert_eq!(vm.state, VmState::Created);
        assert_eq!(vm.vcpus, DEFAULT_VCPUS);
        assert_eq!(vm.memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(vm.entry, "auto");
        assert_eq!(vm.pid, None);
        assert_eq!(vm.id.len(), 16);
        assert!(vm.id.chars().all(|c| c.is_ascii_hexdigit()));
        let dir = f.dir.path().join("state/vms").join(&vm.id);
        assert_eq!(vm.console_log, dir.join("console.log"));
        let rec: SpecRecord =
            serde_json::from_slice(&std::fs::read(dir.join("spec.json")).unwrap()).unwrap();
        assert_eq!(rec.vm.name, "db-1");
        assert_eq!(rec.vm.id, vm.id);
        assert_eq!(rec.vm.console_log_max_bytes, 1234);
        assert_eq!(rec.vm.debugcon_log, dir.join("debugcon.log"));
        assert_eq!(rec.desired, Desired::Stopped);
        assert_eq!(f.vm_dirs(), vec![vm.id.clone()]);
    }

    #[tokio::test]
    async fn invalid_requests_name_the_field_and_leave_nothing() {
        let f = Fixture::new();
        let m = f.open().await;
        let cases: Vec<(CreateParams, &str)> = vec![
            (f.params(""), "name"),
            (f.params("has space"), "name"),
            (f.params(&"x".repeat(64)), "name"),
            (f.params("a/b"), "name"),
            (
                CreateParams {
                    vcpus: Some(255),
                    ..f.params("v")
                },
                "vcpus",
            ),
            (
                CreateParams {
                    vcpus: Some(100_000),
                    ..f.params("v")
                },
                "vcpus",
            ),
            (
                CreateParams {
                    vcpus: Some(0),
                    ..f.params("v")
                },
                "vcpus",
            ),
            (
                CreateParams {
                    memory_mib: 1,
                    ..f.params("v")
                },
                "memory_mib",
            ),
            (
                CreateParams {
                    memory_mib: u64::MAX / 2,
                    ..f.params("v")
                },
                "memory_mib",
            ),
            (
                CreateParams {
                    kernel: None,
                    ..f.params("v")
                },
                "kernel",
            ),
            (
                CreateParams {
                    kernel: Some("/nonexistent/bzImage".into()),
                    ..f.params("v")
                },
                "kernel",
            ),
            (
                CreateParams {
                    kernel: Some("vmlinux".into()),
                    ..f.params("v")
                },
                "kernel",
            ),
            (
                CreateParams {
                    initramfs: Some(f.dir.path().join("nope")),
                    ..f.params("v")
                },
                "initramfs",
            ),
            (
                CreateParams {
                    entry: "bios".into(),
                    ..f.params("v")
                },
                "entry",
            ),
            (
                CreateParams {
                    cmdline: "x".repeat(5000),
                    ..f.params("v")
                },
                "cmdline",
            ),
            (
                CreateParams {
                    test_guest: true,
                    ..f.params("v")
                },
                "kernel",
            ),
            (
                CreateParams {
                    test_guest: true,
                    kernel: None,
                    entry: "linux".into(),
                    ..f.params("v")
                },
                "entry",
            ),
        ];
        for (p, want) in cases {
            let e = m.create(p.clone()).await.unwrap_err();
            let msg = e.to_string();
            assert_eq!(field_of(e), want, "{p:?}: {msg}");
            assert!(msg.starts_with(&format!("invalid {want}: ")), "{msg}");
        }
        assert!(f.vm_dirs().is_empty(), "{:?}", f.vm_dirs());
        assert!(m.list().is_empty());
    }

    #[tokio::test]
    async fn duplicate_names_are_refused() {
        let f = Fixture::new();
        let m = f.open().await;
        let a = m.create(f.params("same")).await.unwrap();
        let e = m.create(f.params("same")).await.unwrap_err();
        assert!(
            matches!(&e, ManagerError::AlreadyExists(n) if n == "same"),
            "{e:?}"
        );
        // A name equal to another VM's id would make lookups ambiguous.
        let e = m.create(f.params(&a.id)).await.unwrap_err();
        assert!(matches!(e, ManagerError::AlreadyExists(_)), "{e:?}");
        assert_eq!(m.list().len(), 1);
        assert_eq!(f.vm_dirs().len(), 1);
        // Concurrent creates of one name: exactly one wins.
        let (r1, r2) = tokio::join!(m.create(f.params("race")), m.create(f.params("race")));
        assert!(r1.is_ok() != r2.is_ok(), "{r1:?} {r2:?}");
    }

    #[tokio::test]
    async fn unknown_vms_are_not_found() {
        let f = Fixture::new();
        let m = f.open().await;
        m.create(f.params("known")).await.unwrap();
        assert!(matches!(m.get("unknown"), Err(ManagerError::NotFound(_))));
        assert!(matches!(
            m.start("unknown").await,
            Err(ManagerError::NotFound(_))
        ));
        assert!(matches!(
            m.stop("unknown", true, None).await,
            Err(ManagerError::NotFound(_))
        ));
        assert!(matches!(
            m.pause("unknown").await,
            Err(ManagerError::NotFound(_))
        ));
        assert!(matches!(
            m.resume("unknown").await,
            Err(ManagerError::NotFound(_))
        ));
        assert!(matches!(
            m.delete("unknown", true).await,
            Err(ManagerError::NotFound(_))
        ));
        assert!(matches!(
            m.guest_status("unknown").await,
            Err(ManagerError::NotFound(_))
        ));
        assert!(matches!(
            m.guest_command("unknown", 1, 2).await,
            Err(ManagerError::NotFound(_))
        ));
        assert!(matches!(
            m.console("unknown", false, true),
            Err(ManagerError::NotFound(_))
        ));
        assert!(matches!(
            m.get(""),
            Err(ManagerError::InvalidArgument { .. })
        ));
    }

    #[tokio::test]
    async fn lookups_by_id_and_name_and_wrong_states() {
        let f = Fixture::new();
        let m = f.open().await;
        let vm = m.create(f.params("n1")).await.unwrap();
        assert_eq!(m.get(&vm.id).unwrap().name, "n1");
        assert_eq!(m.get("n1").unwrap().id, vm.id);
        for e in [
            m.stop("n1", false, None).await.unwrap_err(),
            m.pause("n1").await.unwrap_err(),
            m.resume("n1").await.unwrap_err(),
            m.guest_status("n1").await.unwrap_err(),
            m.guest_command("n1", 1, 1).await.unwrap_err(),
        ] {
            assert!(
                matches!(&e, ManagerError::WrongState(msg) if msg.contains("created")),
                "{e:?}"
            );
        }
    }

    #[tokio::test]
    async fn delete_removes_the_directory() {
        let f = Fixture::new();
        let m = f.open().await;
        let vm = m.create(f.params("gone")).await.unwrap();
        assert_eq!(m.delete("gone", false).await.unwrap(), vm.id);
        assert!(f.vm_dirs().is_empty());
        assert!(matches!(m.get(&vm.id), Err(ManagerError::NotFound(_))));
        // The name is free again.
        m.create(f.params("gone")).await.unwrap();
    }

    #[tokio::test]
    async fn reopen_loads_vms_and_their_last_outcome() {
        let f = Fixture::new();
        let (never, stopped, crashed, lost) = {
            let m = f.open().await;
            let a = m.create(f.params("never")).await.unwrap();
            let b = m.create(f.params("stopped")).await.unwrap();
            let c = m.create(f.params("crashed")).await.unwrap();
            let d = m.create(f.params("lost")).await.unwrap();
            (a.id, b.id, c.id, d.id)
        };
        let vms = f.dir.path().join("state/vms");
        let exit = |id: &str, reason: ExitReason, detail: &str| {
            std::fs::write(vms.join(id).join("vmm.pid"), "999999999\n").unwrap();
            let rec = ExitRecord {
                reason,
                detail: detail.into(),
            };
            std::fs::write(
                vms.join(id).join("exit.json"),
                serde_json::to_vec(&rec).unwrap(),
            )
            .unwrap();
        };
        exit(&stopped, ExitReason::GuestPoweroff, "bye");
        exit(&crashed, ExitReason::TripleFault, "rip=0xfff0");
        // A VMM that ran and vanished without an exit record (pid cannot exist).
        std::fs::write(vms.join(&lost).join("vmm.pid"), "999999999\n").unwrap();
        std::fs::write(vms.join(&lost).join("vmm.log"), "VMM said goodbye\n").unwrap();
        // Garbage and leftovers are skipped or cleaned.
        std::fs::create_dir(vms.join("junk")).unwrap();
        std::fs::create_dir(vms.join(".creating-abc")).unwrap();

        let m = f.open().await;
        let names: Vec<String> = m.list().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["never", "stopped", "crashed", "lost"]);
        let v = m.get(&never).unwrap();
        assert_eq!((v.state, v.exit_reason), (VmState::Created, None));
        let v = m.get(&stopped).unwrap();
        assert_eq!(v.state, VmState::Stopped);
        assert_eq!(v.exit_reason.as_deref(), Some("guest_poweroff"));
        let v = m.get(&crashed).unwrap();
        assert_eq!(v.state, VmState::Failed);
        assert_eq!(v.exit_reason.as_deref(), Some("triple_fault"));
        assert_eq!(v.exit_detail, "rip=0xfff0");
        let v = m.get(&lost).unwrap();
        assert_eq!(v.state, VmState::Failed);
        assert!(
            v.exit_detail.contains("without an exit record"),
            "{}",
            v.exit_detail
        );
        assert!(
            v.exit_detail.contains("VMM said goodbye"),
            "{}",
            v.exit_detail
        );
        assert!(!vms.join(".creating-abc").exists());
        // Duplicate detection covers loaded VMs.
        assert!(matches!(
            m.create(f.params("never")).await,
            Err(ManagerError::AlreadyExists(_))
        ));
    }

    #[tokio::test]
    async fn start_with_missing_vmm_binary_fails_cleanly() {
        let f = Fixture::new();
        let m = f.open().await;
        m.create(f.params("nostart")).await.unwrap();
        let e = m.start("nostart").await.unwrap_err();
        assert!(
            matches!(&e, ManagerError::StartFailed { detail, .. } if detail.contains("/nonexistent/vmm")),
            "{e:?}"
        );
        // Nothing ran, so the VM is still startable.
        assert_eq!(m.get("nostart").unwrap().state, VmState::Created);
    }

    #[tokio::test]
    async fn console_without_follow_reads_what_is_there() {
        let f = Fixture::new();
        let m = f.open().await;
        let vm = m.create(f.params("con")).await.unwrap();
        std::fs::write(&vm.console_log, b"hello\nworld\n").unwrap();
        let mut rx = m.console("con", false, true).unwrap();
        let mut out = Vec::new();
        while let Some(chunk) = rx.recv().await {
            out.extend(chunk.unwrap());
        }
        assert_eq!(out, b"hello\nworld\n");
        let mut rx = m.console("con", false, false).unwrap();
        assert!(
            rx.recv().await.is_none(),
            "from the end without follow: nothing"
        );
    }

    #[test]
    fn pid_helpers() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(999_999_999));
        assert!(!is_vmm_of(
            std::process::id(),
            Path::new("/nonexistent/control.sock")
        ));
    }
}
