//! The VMM process: builds the VM from its config, serves the control socket, runs vCPUs
//! until the guest stops, and records why it ended.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::VmConfig;
use crate::control::RunState;
use crate::control::{ExitReason, ExitRecord, Request, Response, VmmInfo};
use crate::migrate;
use crate::state;
use crate::vm::Vm;

/// Where a VMM process finds its inputs and leaves its outputs.
#[derive(Debug, Clone)]
pub struct ProcessArgs {
    /// JSON [`crate::config::VmConfig`].
    pub config: PathBuf,
    /// Control socket to create.
    pub control: PathBuf,
    /// Where to write the [`crate::control::ExitRecord`] before exiting.
    pub exit_file: PathBuf,
    /// Start in the incoming state (wait for RestoreState instead of booting).
    pub incoming: bool,
}

/// Runs a VMM until its VM ends; returns the process exit code (0 for a requested stop or
/// guest power-off or reset, 1 for a VM failure, 2 for a VMM start-up error).
pub fn run(args: ProcessArgs) -> i32 {
    let started = Instant::now();
    let vm = match start(&args) {
        Ok(vm) => vm,
        Err(detail) => {
            tracing::error!(%detail, "VMM failed to start");
            write_exit(
                &args.exit_file,
                &ExitRecord {
                    reason: ExitReason::VmmError,
                    detail,
                },
            );
            let _ = std::fs::remove_file(&args.control);
            return 2;
        }
    };
    tracing::info!(id = %vm.config.id, startup_us = started.elapsed().as_micros() as u64, "VMM running");
    let record = vm.wait_end();
    if record.reason == ExitReason::Migrated {
        // Keep answering `migration_status` for a moment, so the agent reads the final
        // statistics before the control socket goes away.
        std::thread::sleep(Duration::from_millis(300));
    }
    // Let requests that are being answered (a stop, say) get their reply out.
    let deadline = Instant::now() + Duration::from_millis(500);
    while IN_FLIGHT.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    write_exit(&args.exit_file, &record);
    let _ = std::fs::remove_file(&args.control);
    if record.reason.is_failure() {
        tracing::error!(reason = ?record.reason, detail = %record.detail, "VM failed");
        1
    } else {
        0
    }
}

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

fn start(args: &ProcessArgs) -> Result<Arc<Vm>, String> {
    let text = std::fs::read_to_string(&args.config)
        .map_err(|e| format!("reading VM config {}: {e}", args.config.display()))?;
    let config: VmConfig = serde_json::from_str(&text)
        .map_err(|e| format!("VM config {}: {e}", args.config.display()))?;
    config.validate(None).map_err(|e| e.to_string())?;
    let (vm, vcpus) = Vm::create(config, args.incoming).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control)
        .map_err(|e| format!("binding control socket {}: {e}", args.control.display()))?;
    let _handles = vm.spawn_vcpus(vcpus).map_err(|e| e.to_string())?;
    let server_vm = Arc::clone(&vm);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || serve(listener, server_vm))
        .map_err(|e| format!("starting control thread: {e}"))?;
    if !args.incoming {
        vm.resume().map_err(|e| e.to_string())?;
    }
    Ok(vm)
}

fn serve(listener: UnixListener, vm: Arc<Vm>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let vm = Arc::clone(&vm);
        let _ = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || connection(stream, vm));
    }
}

fn connection(stream: UnixStream, vm: Arc<Vm>) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut writer = stream;
    for line in BufReader::new(read_half).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(&vm, req),
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        };
        let mut out = serde_json::to_vec(&response).expect("responses serialize");
        out.push(b'\n');
        let sent = writer.write_all(&out);
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        if sent.is_err() {
            return;
        }
    }
}

/// The migration of this VMM, if one was started.
static MIGRATION: std::sync::Mutex<Option<Arc<migrate::Handle>>> = std::sync::Mutex::new(None);

fn start_migration(vm: &Arc<Vm>, req: Request) -> Response {
    let mut current = MIGRATION.lock().unwrap();
    if let Some(h) = current.as_ref() {
        let phase = h.progress.lock().unwrap().phase.clone();
        // A completed incoming migration leaves a VM that may migrate on; a completed
        // outgoing one ends this VMM.
        if !matches!(phase.as_str(), "rolled-back" | "discarded" | "completed") {
            return Response::Error {
                message: format!("a migration is already under way (phase {phase})"),
            };
        }
    }
    let handle = Arc::new(migrate::Handle::default());
    let vm = Arc::clone(vm);
    let response = match req {
        Request::MigrateOut { params } => {
            if vm.state() != RunState::Running {
                return Response::Error {
                    message: format!("VM is {:?}; only a running VM can be migrated", vm.state()),
                };
            }
            let h = Arc::clone(&handle);
            let spawned = std::thread::Builder::new()
                .name("migrate-out".into())
                .spawn(move || migrate::migrate_out(vm, params, h));
            match spawned {
                Ok(_) => Response::Ok,
                Err(e) => Response::Error {
                    message: format!("starting the migration thread: {e}"),
                },
            }
        }
        Request::MigrateIn { params } => {
            if vm.state() != RunState::Incoming {
                return Response::Error {
                    message: format!(
                        "VM is {:?}; only an incoming VMM can receive a migration",
                        vm.state()
                    ),
                };
            }
            match migrate::migrate_in(vm, params, Arc::clone(&handle)) {
                Ok((address, run)) => match std::thread::Builder::new()
                    .name("migrate-in".into())
                    .spawn(run)
                {
                    Ok(_) => Response::MigrationListening {
                        address: address.to_string(),
                    },
                    Err(e) => Response::Error {
                        message: format!("starting the migration thread: {e}"),
                    },
                },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            }
        }
        _ => unreachable!("only migration requests"),
    };
    if !matches!(response, Response::Error { .. }) {
        *current = Some(handle);
    }
    response
}

fn handle(vm: &Arc<Vm>, req: Request) -> Response {
    let done = |r: Result<(), crate::vm::VmError>| match r {
        Ok(()) => Response::Ok,
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    };
    match req {
        Request::Info => Response::Info(VmmInfo {
            id: vm.config.id.clone(),
            pid: std::process::id(),
            vcpu_tids: vm.vcpu_tids(),
            state: vm.state(),
            memory_bytes: vm.config.memory_mib << 20,
            exits: vm.exits(),
            first_progress_monotonic_ns: vm.first_progress_ns(),
        }),
        Request::Pause => done(vm.pause()),
        Request::Resume => done(vm.resume()),
        Request::Stop { force, timeout_ms } => {
            vm.stop(force, Duration::from_millis(timeout_ms));
            Response::Ok
        }
        Request::GuestCommand { cmd, arg } => done(vm.post_guest_command(cmd, arg).map(|_| ())),
        Request::GuestStatus => match vm.guest_status() {
            Ok(status) => Response::GuestStatus {
                status: status.map(Into::into),
            },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::DirtyLog { enable } => done(vm.set_dirty_log(enable)),
        Request::DirtyLogFetch => match vm.fetch_dirty() {
            Ok(pages) => Response::Dirty { pages },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::SaveState { dir } => done(state::save(vm, Path::new(&dir))),
        Request::RestoreState { dir } => done(state::restore(vm, Path::new(&dir))),
        req @ (Request::MigrateOut { .. } | Request::MigrateIn { .. }) => start_migration(vm, req),
        Request::MigrationStatus => Response::Migration {
            progress: MIGRATION
                .lock()
                .unwrap()
                .as_ref()
                .map(|h| h.progress.lock().unwrap().clone()),
        },
        Request::MigrationCancel => match MIGRATION.lock().unwrap().as_ref() {
            Some(h) => {
                h.cancel();
                Response::Ok
            }
            None => Response::Error {
                message: "no migration is under way".into(),
            },
        },
    }
}

/// Writes the exit record atomically (temporary file, then rename).
fn write_exit(path: &Path, record: &ExitRecord) {
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec_pretty(record).expect("exit records serialize");
    if let Err(e) = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, path)) {
        tracing::error!(path = %path.display(), error = %e, "cannot write exit record");
    }
}
