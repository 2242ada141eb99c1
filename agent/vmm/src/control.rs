//! The control channel between the agent and one VMM process.
//!
//! A unix stream socket per VMM; each message is one line of JSON. The agent sends a
//! [`Request`], the VMM answers with exactly one [`Response`] line, in order. The channel is
//! deliberately plain: it stays local to the host, and an operator can drive a VMM with
//! `socat` when debugging.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use novacron_testguest::abi::GuestStatus;

/// Run state of a VMM as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waiting for incoming state (restore or migration); no vCPU has run.
    Incoming,
    /// vCPUs are running.
    Running,
    /// vCPUs are paused; memory and state are stable.
    Paused,
    /// The guest has stopped (powered off, reset, or failed); the process is about to exit.
    Stopped,
}

/// A command from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness and identity.
    Info,
    /// Pause all vCPUs (returns once every vCPU is out of KVM_RUN).
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// Stop the VM: `force` ends it at once; otherwise the guest is asked to power off and
    /// forced after `timeout_ms`.
    Stop {
        /// End at once.
        force: bool,
        /// Grace period for a guest power-off.
        timeout_ms: u64,
    },
    /// Post a command to the test guest's agent device (see `novacron_testguest::abi`).
    GuestCommand {
        /// Command code.
        cmd: u32,
        /// Argument.
        arg: u64,
    },
    /// Read the test guest's status page.
    GuestStatus,
    /// Switch KVM dirty-page logging on or off for all guest memory.
    DirtyLog {
        /// On or off.
        enable: bool,
    },
    /// Fetch and clear the dirty bitmap; returns the count of dirty pages since the last call.
    DirtyLogFetch,
    /// Save memory and device state into a directory (the VM must be paused).
    SaveState {
        /// Target directory (created).
        dir: String,
    },
    /// Restore memory and device state from a directory (only in the incoming state); the
    /// VM is left paused.
    RestoreState {
        /// Source directory.
        dir: String,
    },
    /// Live-migrate this VM to a destination VMM (returns at once; poll
    /// [`Request::MigrationStatus`]).
    MigrateOut {
        /// Where to and how.
        params: crate::migrate::OutgoingParams,
    },
    /// Listen for an incoming migration (only in the incoming state); answers with the
    /// bound address.
    MigrateIn {
        /// Where to listen and whom to accept.
        params: crate::migrate::IncomingParams,
    },
    /// Progress or final statistics of the current (or last) migration.
    MigrationStatus,
    /// Cancel the current migration (honoured until its commit).
    MigrationCancel,
}

/// Identity and counters of a VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmInfo {
    /// The VM id.
    pub id: String,
    /// The VMM process id.
    pub pid: u32,
    /// Thread ids of the vCPU threads, by vCPU index.
    pub vcpu_tids: Vec<i32>,
    /// Current run state.
    pub state: RunState,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Exits handled in user space, total.
    pub exits: u64,
    /// When the guest first reported progress through its agent device (CLOCK_MONOTONIC, ns).
    #[serde(default)]
    pub first_progress_monotonic_ns: Option<u64>,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done, nothing to return.
    Ok,
    /// Answer to [`Request::Info`].
    Info(VmmInfo),
    /// Answer to [`Request::GuestStatus`] (`None` before the guest registered its page).
    GuestStatus {
        /// The parsed status page.
        status: Option<GuestStatusWire>,
    },
    /// Answer to [`Request::DirtyLogFetch`].
    Dirty {
        /// Pages dirtied since the previous fetch.
        pages: u64,
    },
    /// Answer to [`Request::MigrateIn`].
    MigrationListening {
        /// The bound address.
        address: String,
    },
    /// Answer to [`Request::MigrationStatus`].
    Migration {
        /// `None` if no migration ever ran in this VMM.
        progress: Option<crate::migrate::Progress>,
    },
    /// The request failed; nothing was changed.
    Error {
        /// What failed and why.
        message: String,
    },
}

/// The test guest's status as it crosses the control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuestStatusWire {
    /// Bumped on each guest update.
    pub seq: u64,
    /// Pages written since start.
    pub pages_written: u64,
    /// Running checksum of the working set.
    pub checksum: u64,
    /// Working-set size in pages.
    pub ws_pages: u64,
    /// Target pages/s (0 = unlimited).
    pub rate: u64,
    /// Pattern code.
    pub pattern: u32,
    /// Completed verifications.
    pub verify_count: u64,
    /// Bad pages found by the last verification.
    pub verify_bad_pages: u64,
    /// Checksum recomputed by the last verification.
    pub verify_checksum: u64,
    /// Guest milliseconds since the workload started.
    pub elapsed_ms: u64,
    /// Last command the guest acknowledged.
    pub cmd_ack: u64,
}

impl From<GuestStatus> for GuestStatusWire {
    fn from(s: GuestStatus) -> Self {
        GuestStatusWire {
            seq: s.seq,
            pages_written: s.pages_written,
            checksum: s.checksum,
            ws_pages: s.ws_pages,
            rate: s.rate,
            pattern: s.pattern,
            verify_count: s.verify_count,
            verify_bad_pages: s.verify_bad_pages,
            verify_checksum: s.verify_checksum,
            elapsed_ms: s.elapsed_ms,
            cmd_ack: s.cmd_ack,
        }
    }
}

/// Failure to talk to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the control socket failed (the VMM is gone or not yet listening).
    #[error("connecting to VMM control socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("VMM control channel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The VMM sent something that is not a response.
    #[error("malformed response from VMM: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The VMM closed the channel without answering.
    #[error("VMM closed the control channel")]
    Closed,
}

/// A blocking client for one VMM's control socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects with a timeout on every read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends one request and waits for its response.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(serde_json::from_str(&answer)?)
    }
}

/// Why a VMM process ended, written to its exit file before it exits so that an agent that
/// was not its parent (it restarted meanwhile) still learns the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Outcome.
    pub reason: ExitReason,
    /// Human-readable detail (for failures: the vCPU registers).
    pub detail: String,
}

/// Outcome of a VM run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest powered itself off.
    GuestPoweroff,
    /// The guest asked for a reset (i8042 or triple-fault-free reboot request).
    GuestReset,
    /// Stopped by the agent.
    Stopped,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM could not go on (KVM_EXIT_INTERNAL_ERROR, FAIL_ENTRY, unexpected exit).
    InternalError,
    /// The guest reported a panic.
    GuestPanic,
    /// The VMM itself failed.
    VmmError,
    /// The VM was live-migrated away; the destination runs it.
    Migrated,
    /// An incoming migration was discarded before it committed; nothing runs here.
    IncomingDiscarded,
}

impl ExitReason {
    /// Whether this outcome is a failure of the VM (as opposed to a requested stop).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            ExitReason::TripleFault
                | ExitReason::InternalError
                | ExitReason::GuestPanic
                | ExitReason::VmmError
        )
    }
}
