//! `novacronctl`: the command line for a NovaCron node agent.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tonic::transport::Channel;

use novacron_ctl::coordinator;
use novacron_ctl::{
    connect, migration_progress_line, migration_summary, vm_details, vm_table, MigrationJson,
    VmJson,
};
use novacron_proto::agent::v1 as pb;
use pb::agent_service_client::AgentServiceClient;

/// Drive a NovaCron node agent over its unix socket.
#[derive(Debug, Parser)]
#[command(name = "novacronctl", version, about, long_about = None)]
struct Cli {
    /// The agent's API socket.
    #[arg(
        long,
        global = true,
        env = "NOVACRON_SOCKET",
        default_value = "/run/novacron/agent.sock",
        value_name = "PATH"
    )]
    socket: PathBuf,
    /// The site coordinator's gRPC endpoint (hosts, vms, migrations, events, cluster);
    /// overrides the context's endpoints.
    #[arg(
        long,
        global = true,
        env = "NOVACRON_COORDINATOR",
        value_name = "HOST:PORT"
    )]
    coordinator: Option<String>,
    /// The coordinator context (endpoints, CA, token); default
    /// ~/.config/novacron/context.toml.
    #[arg(long, global = true, env = "NOVACRON_CONTEXT", value_name = "FILE")]
    context: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable aligned columns.
    Table,
    /// JSON.
    Json,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// Manage VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Hosts known to the site coordinator.
    #[command(subcommand)]
    Hosts(coordinator::HostsCmd),
    /// VM records of the site coordinator (what should run where).
    #[command(subcommand)]
    Vms(coordinator::VmsCmd),
    /// Migration operations of the site coordinator.
    #[command(subcommand)]
    Migrations(coordinator::MigrationsCmd),
    /// The site coordinator's event stream.
    Events {
        /// From this sequence number (0 = the oldest kept).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Stop after this many events (0 = follow).
        #[arg(long, default_value_t = 0)]
        limit: u64,
    },
    /// The coordinator cluster's membership.
    #[command(subcommand)]
    Cluster(coordinator::ClusterCmd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Entry {
    /// Pick from the image.
    Auto,
    /// Linux/x86 boot protocol.
    Linux,
    /// PVH.
    Pvh,
    /// NovaCron direct 64-bit entry.
    Long64,
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Create a VM.
    Create {
        /// Unique name: 1 to 63 characters of [A-Za-z0-9._-].
        name: String,
        /// vCPU count.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = 128, value_name = "MiB")]
        memory: u64,
        /// Kernel image (bzImage, vmlinux, PVH ELF).
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "test_guest",
            conflicts_with = "test_guest"
        )]
        kernel: Option<PathBuf>,
        /// Use the built-in NovaCron test guest as the kernel (entry long64).
        #[arg(long)]
        test_guest: bool,
        /// Initramfs image.
        #[arg(long, value_name = "PATH")]
        initramfs: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, default_value = "", value_name = "STR")]
        cmdline: String,
        /// Entry protocol.
        #[arg(long, value_enum, default_value_t = Entry::Auto)]
        entry: Entry,
        /// Back guest memory with huge pages.
        #[arg(long)]
        hugepages: bool,
        /// Start the VM once created.
        #[arg(long)]
        start: bool,
    },
    /// List VMs.
    List,
    /// Show one VM.
    Get {
        /// VM id or name.
        vm: String,
    },
    /// Start a VM.
    Start {
        /// VM id or name.
        vm: String,
    },
    /// Stop a VM (asks the guest to power off, forced after the timeout).
    Stop {
        /// VM id or name.
        vm: String,
        /// End the VM at once.
        #[arg(long)]
        force: bool,
        /// Grace period before forcing (default: the agent's stop_timeout_ms).
        #[arg(long, value_name = "N")]
        timeout_ms: Option<u64>,
    },
    /// Pause a VM's vCPUs.
    Pause {
        /// VM id or name.
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM id or name.
        vm: String,
    },
    /// Delete a stopped VM and its files.
    Delete {
        /// VM id or name.
        vm: String,
        /// Force-stop a running VM first.
        #[arg(long)]
        force: bool,
    },
    /// Write the VM's serial console output to stdout.
    Console {
        /// VM id or name.
        vm: String,
        /// Keep streaming new output (until interrupted).
        #[arg(long, short = 'f')]
        follow: bool,
        /// Start at the beginning of the log instead of its end.
        #[arg(long)]
        from_start: bool,
    },
    /// Show the test guest's status page.
    GuestStatus {
        /// VM id or name.
        vm: String,
    },
    /// Live-migrate a running VM to another agent (a name in the agent's
    /// [migration.peers]). Shows progress on a terminal, then the final statistics.
    Migrate {
        /// VM id or name.
        vm: String,
        /// The destination agent.
        #[arg(long, value_name = "AGENT")]
        to: String,
        /// Longest acceptable downtime in ms (default 50).
        #[arg(long, value_name = "N")]
        downtime_ms: Option<u64>,
        /// Give up after this many seconds (default 300).
        #[arg(long, value_name = "N")]
        time_limit_s: Option<u64>,
        /// At the time limit, switch over anyway instead of giving up.
        #[arg(long)]
        force_at_time_limit: bool,
        /// Parallel data streams (default 4).
        #[arg(long, value_name = "N")]
        streams: Option<u32>,
        /// Cap on bytes per second on the wire.
        #[arg(long, value_name = "BYTES")]
        bandwidth_limit: Option<u64>,
        /// Cap on the guest's dirty rate during the migration, pages per second.
        #[arg(long, value_name = "PAGES")]
        dirty_rate_limit: Option<u64>,
    },
    /// Cancel a VM's outgoing migration (honoured until its commit).
    MigrateCancel {
        /// VM id or name.
        vm: String,
    },
    /// Post a command to the test guest's agent device.
    GuestCommand {
        /// VM id or name.
        vm: String,
        /// Command code.
        #[arg(long, value_name = "N")]
        cmd: u32,
        /// Argument.
        #[arg(long, value_name = "N", default_value_t = 0)]
        arg: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("error: {}", status.message()),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn absolute(p: Option<PathBuf>) -> anyhow::Result<String> {
    Ok(match p {
        Some(p) => std::path::absolute(&p)?.display().to_string(),
        None => String::new(),
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.output == Output::Json;
    let (context, endpoint) = (cli.context.clone(), cli.coordinator.clone());
    let coord = |c| async move {
        let ctx = coordinator::Context::resolve(context.as_deref(), endpoint.as_deref())?;
        coordinator::run(&ctx, json, c).await
    };
    let cmd = match cli.command {
        Top::Vm(cmd) => cmd,
        Top::Hosts(c) => return coord(coordinator::Command::Hosts(c)).await,
        Top::Vms(c) => return coord(coordinator::Command::Vms(c)).await,
        Top::Migrations(c) => return coord(coordinator::Command::Migrations(c)).await,
        Top::Events { from, limit } => {
            return coord(coordinator::Command::Events { from, limit }).await
        }
        Top::Cluster(c) => return coord(coordinator::Command::Cluster(c)).await,
    };
    let mut c: AgentServiceClient<Channel> = connect(&cli.socket).await?;
    let out = cli.output;
    let r = |s: String| pb::VmRef { id_or_name: s };
    match cmd {
        VmCmd::Create {
            name,
            vcpus,
            memory,
            kernel,
            test_guest,
            initramfs,
            cmdline,
            entry,
            hugepages,
            start,
        } => {
            let entry = match entry {
                Entry::Auto => "auto",
                Entry::Linux => "linux",
                Entry::Pvh => "pvh",
                Entry::Long64 => "long64",
            };
            let req = pb::CreateVmRequest {
                name,
                vcpus: Some(vcpus),
                memory_mib: memory,
                // The agent may run with another working directory.
                kernel: absolute(kernel)?,
                initramfs: absolute(initramfs)?,
                cmdline,
                entry: entry.into(),
                test_guest,
                hugepages,
                start,
            };
            print_vm(out, c.create_vm(req).await?.into_inner())
        }
        VmCmd::List => {
            let vms = c.list_vms(pb::ListVmsRequest {}).await?.into_inner().vms;
            match out {
                Output::Table => print!("{}", vm_table(&vms)),
                Output::Json => {
                    let vms: Vec<VmJson> = vms.into_iter().map(VmJson::from).collect();
                    println!("{}", serde_json::to_string_pretty(&vms)?);
                }
            }
            Ok(())
        }
        VmCmd::Get { vm } => print_vm(out, c.get_vm(r(vm)).await?.into_inner()),
        VmCmd::Start { vm } => print_vm(out, c.start_vm(r(vm)).await?.into_inner()),
        VmCmd::Stop {
            vm,
            force,
            timeout_ms,
        } => {
            let req = pb::StopVmRequest {
                id_or_name: vm,
                force,
                timeout_ms: timeout_ms.unwrap_or(0),
            };
            print_vm(out, c.stop_vm(req).await?.into_inner())
        }
        VmCmd::Pause { vm } => print_vm(out, c.pause_vm(r(vm)).await?.into_inner()),
        VmCmd::Resume { vm } => print_vm(out, c.resume_vm(r(vm)).await?.into_inner()),
        VmCmd::Delete { vm, force } => {
            let req = pb::DeleteVmRequest {
                id_or_name: vm,
                force,
            };
            let id = c.delete_vm(req).await?.into_inner().id;
            match out {
                Output::Table => println!("deleted {id}"),
                Output::Json => println!("{}", serde_json::json!({ "deleted": id })),
            }
            Ok(())
        }
        VmCmd::Console {
            vm,
            follow,
            from_start,
        } => {
            let req = pb::ConsoleRequest {
                id_or_name: vm,
                follow,
                from_start,
            };
            let mut stream = c.stream_console(req).await?.into_inner();
            let mut stdout = std::io::stdout().lock();
            while let Some(chunk) = stream.message().await? {
                stdout.write_all(&chunk.data)?;
                stdout.flush()?;
            }
            Ok(())
        }
        VmCmd::GuestStatus { vm } => {
            let s = c.get_guest_status(r(vm)).await?.into_inner();
            print_guest_status(out, &s)
        }
        VmCmd::Migrate {
            vm,
            to,
            downtime_ms,
            time_limit_s,
            force_at_time_limit,
            streams,
            bandwidth_limit,
            dirty_rate_limit,
        } => {
            let req = pb::MigrateVmRequest {
                id_or_name: vm.clone(),
                to_agent: to.clone(),
                downtime_limit_ms: downtime_ms.unwrap_or(0),
                time_limit_s: time_limit_s.unwrap_or(0),
                force_at_time_limit,
                streams: streams.unwrap_or(0),
                bandwidth_limit: bandwidth_limit.unwrap_or(0),
                dirty_rate_limit: dirty_rate_limit.unwrap_or(0),
            };
            migrate(out, &vm, &to, c.migrate_vm(req).await?.into_inner()).await
        }
        VmCmd::MigrateCancel { vm } => print_vm(out, c.cancel_migration(r(vm)).await?.into_inner()),
        VmCmd::GuestCommand { vm, cmd, arg } => {
            let req = pb::GuestCommandRequest {
                id_or_name: vm,
                cmd,
                arg,
            };
            print_vm(out, c.guest_command(req).await?.into_inner())
        }
    }
}

/// Follows a migration's progress stream: one line updated in place on a terminal
/// (stderr), then the final statistics on stdout. Fails unless the migration completed.
async fn migrate(
    out: Output,
    vm: &str,
    to: &str,
    mut stream: tonic::Streaming<pb::MigrationProgress>,
) -> anyhow::Result<()> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last: Option<pb::MigrationProgress> = None;
    while let Some(p) = stream.message().await? {
        if tty && !p.done {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{}", migration_progress_line(&p));
            let _ = err.flush();
        }
        let done = p.done;
        last = Some(p);
        if done {
            break;
        }
    }
    if tty {
        eprint!("\r\x1b[2K");
    }
    let last = last
        .ok_or_else(|| anyhow::anyhow!("the agent ended the migration stream without a result"))?;
    if !last.done {
        anyhow::bail!(
            "the agent ended the migration stream early (last phase {}); see `novacronctl vm get {vm}`",
            last.phase
        );
    }
    let stats = MigrationJson::new(vm, to, &last);
    match out {
        Output::Table => print!("{}", migration_summary(&stats)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&stats)?),
    }
    if last.phase != "completed" {
        anyhow::bail!(
            "migration of {vm} to {to} {}: {}",
            last.phase,
            if last.error.is_empty() {
                "no detail"
            } else {
                &last.error
            }
        );
    }
    Ok(())
}

fn print_vm(out: Output, vm: pb::Vm) -> anyhow::Result<()> {
    match out {
        Output::Table => print!("{}", vm_details(&vm)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&VmJson::from(vm))?),
    }
    Ok(())
}

fn print_guest_status(out: Output, s: &pb::GuestStatus) -> anyhow::Result<()> {
    let fields: [(&str, u64); 12] = [
        ("registered", u64::from(s.registered)),
        ("seq", s.seq),
        ("pages_written", s.pages_written),
        ("checksum", s.checksum),
        ("ws_pages", s.ws_pages),
        ("rate", s.rate),
        ("pattern", u64::from(s.pattern)),
        ("verify_count", s.verify_count),
        ("verify_bad_pages", s.verify_bad_pages),
        ("verify_checksum", s.verify_checksum),
        ("elapsed_ms", s.elapsed_ms),
        ("cmd_ack", s.cmd_ack),
    ];
    match out {
        Output::Table => {
            if !s.registered {
                println!("the guest has not registered its status page");
                return Ok(());
            }
            for (k, v) in &fields[1..] {
                if k.contains("checksum") {
                    println!("{:<17} {v:#018x}", k.to_uppercase());
                } else {
                    println!("{:<17} {v}", k.to_uppercase());
                }
            }
        }
        Output::Json => {
            let mut m = serde_json::Map::new();
            m.insert("registered".into(), s.registered.into());
            for (k, v) in &fields[1..] {
                m.insert((*k).into(), (*v).into());
            }
            println!("{}", serde_json::Value::Object(m));
        }
    }
    Ok(())
}
