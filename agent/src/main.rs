//! `novacron-agent`: the NovaCron node agent daemon, and (as `novacron-agent vmm`) the VMM
//! process it starts for each VM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use novacron_agent::config::{AgentConfig, DEFAULT_CONFIG_TOML};

const DEFAULT_CONFIG_PATH: &str = "/etc/novacron/agent.toml";

/// NovaCron node agent: runs one VMM process per VM and serves a gRPC API on a unix socket.
#[derive(Debug, Parser)]
#[command(name = "novacron-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the daemon (the default when no subcommand is given).
    Run(RunArgs),
    /// Run one VMM process (started by the agent; not for direct use).
    Vmm(VmmArgs),
    /// Print the documented default configuration (TOML) to stdout.
    PrintDefaultConfig,
    /// Manage the cluster CA and agent certificates used by live migration.
    #[command(subcommand)]
    Certs(CertsCmd),
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Create a cluster CA (`ca.pem`, `ca.key`) in DIR; refuses to overwrite one.
    Init {
        /// The cluster directory (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The cluster name (1 to 63 characters of [a-z0-9-]).
        #[arg(long, value_name = "NAME")]
        cluster: String,
    },
    /// Issue `<agent>.pem` and `<agent>.key` with the CA in DIR.
    Issue {
        /// The cluster directory holding `ca.pem` and `ca.key`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The agent name (1 to 63 characters of [a-z0-9-]).
        #[arg(long, value_name = "NAME")]
        agent: String,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Configuration file. If not given and /etc/novacron/agent.toml does not exist, the
    /// built-in defaults are used.
    #[arg(long, short = 'c', value_name = "PATH")]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct VmmArgs {
    /// VM specification (JSON `VmConfig`).
    #[arg(long, value_name = "PATH")]
    config: PathBuf,
    /// Control socket to create.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// Where to write the exit record.
    #[arg(long, value_name = "PATH")]
    exit_file: PathBuf,
    /// Wait for incoming state (restore/migration) instead of booting.
    #[arg(long)]
    incoming: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Vmm(args)) => run_vmm(args),
        Some(Cmd::PrintDefaultConfig) => {
            print!("{DEFAULT_CONFIG_TOML}");
            ExitCode::SUCCESS
        }
        Some(Cmd::Run(args)) => run_daemon(args),
        Some(Cmd::Certs(cmd)) => run_certs(cmd),
        None => run_daemon(RunArgs { config: None }),
    }
}

fn run_certs(cmd: CertsCmd) -> ExitCode {
    use novacron_migration::certs::ClusterDir;
    let written = match &cmd {
        CertsCmd::Init { dir, cluster } => ClusterDir::new(dir).init(cluster),
        CertsCmd::Issue { dir, agent } => ClusterDir::new(dir).issue(agent),
    };
    match written {
        Ok(paths) => {
            for p in paths {
                println!("wrote {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One VMM process: synchronous, threads only; no tokio runtime.
fn run_vmm(args: VmmArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    std::process::exit(novacron_vmm::process::run(
        novacron_vmm::process::ProcessArgs {
            config: args.config,
            control: args.control,
            exit_file: args.exit_file,
            incoming: args.incoming,
        },
    ))
}

fn run_daemon(args: RunArgs) -> ExitCode {
    let cfg = match &args.config {
        Some(path) => AgentConfig::load(path),
        None if std::path::Path::new(DEFAULT_CONFIG_PATH).exists() => {
            AgentConfig::load(std::path::Path::new(DEFAULT_CONFIG_PATH))
        }
        None => Ok(AgentConfig::default()),
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = match EnvFilter::try_from_default_env() {
        Ok(f) => f,
        Err(_) => match EnvFilter::try_new(&cfg.log_level) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: config: invalid log_level {:?}: {e}", cfg.log_level);
                return ExitCode::from(2);
            }
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match daemon(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn daemon(cfg: AgentConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(novacron_agent::daemon::serve(
        cfg,
        novacron_agent::daemon::shutdown_signal(),
    ))?;
    // Do not wait for blocking control-socket calls still in flight.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
