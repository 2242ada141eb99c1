//! `novacronctl hosts|vms|migrations|events|cluster`: the site coordinator's API, as tables or
//! JSON.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use novacron_proto::coordinator::v1 as pb;
use pb::coordinator_client::CoordinatorClient;

use crate::table;

/// Host commands.
#[derive(Debug, Subcommand)]
pub enum HostsCmd {
    /// List hosts.
    List {
        /// Linearizable read (through the leader's quorum).
        #[arg(long)]
        consistent: bool,
    },
    /// Show one host.
    Get {
        /// Host id.
        id: String,
    },
    /// Register (or update) a host.
    Register {
        /// Host id.
        id: String,
        /// The agent's address.
        #[arg(long)]
        address: String,
        /// vCPUs offered.
        #[arg(long)]
        vcpus: u32,
        /// Memory offered, MiB.
        #[arg(long, value_name = "MiB")]
        memory: u64,
        /// Labels KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
    },
    /// Take no new VMs; VMs are to move away.
    Drain {
        /// Host id.
        id: String,
    },
}

/// VM record commands.
#[derive(Debug, Subcommand)]
pub enum VmsCmd {
    /// List VM records.
    List {
        /// Linearizable read.
        #[arg(long)]
        consistent: bool,
    },
    /// Show one VM (id or name).
    Get {
        /// VM id or name.
        vm: String,
    },
    /// Create a VM record, placed by the scheduler.
    Create {
        /// Unique name.
        name: String,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory, MiB.
        #[arg(long, default_value_t = 128, value_name = "MiB")]
        memory: u64,
        /// Labels KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// Required host labels KEY=VALUE (repeatable).
        #[arg(long = "selector", value_parser = parse_kv)]
        selector: Vec<(String, String)>,
        /// Anti-affinity group.
        #[arg(long, default_value = "")]
        anti_affinity: String,
        /// Desired state running.
        #[arg(long)]
        start: bool,
        /// Boot the agents' built-in test guest (instead of --kernel).
        #[arg(long)]
        test_guest: bool,
        /// Absolute kernel path on the hosts.
        #[arg(long, default_value = "")]
        kernel: String,
        /// Absolute initramfs path on the hosts.
        #[arg(long, default_value = "")]
        initramfs: String,
        /// Kernel command line (for the test guest: its workload, e.g. "nc.mem=8").
        #[arg(long, default_value = "")]
        cmdline: String,
    },
    /// Desire the VM running.
    Start {
        /// VM id.
        id: String,
    },
    /// Desire the VM stopped.
    Stop {
        /// VM id.
        id: String,
    },
    /// Delete a stopped VM record.
    Delete {
        /// VM id.
        id: String,
    },
    /// Print the VM records, then each change as it happens (Ctrl-C to stop).
    Watch {
        /// Only this VM (id or name).
        vm: Option<String>,
    },
}

/// Migration operations.
#[derive(Debug, Subcommand)]
pub enum MigrationsCmd {
    /// List migrations.
    List,
    /// Show one migration.
    Get {
        /// "migrations/ID" or "ID".
        name: String,
    },
    /// Start moving a VM (target chosen by the scheduler unless --to).
    Start {
        /// VM id.
        vm: String,
        /// Target host.
        #[arg(long, default_value = "")]
        to: String,
        /// Follow it with a progress bar until done.
        #[arg(long)]
        watch: bool,
    },
    /// Follow a migration with a progress bar until it is done.
    Watch {
        /// "migrations/ID" or "ID".
        name: String,
    },
    /// Cancel a migration that is not done.
    Cancel {
        /// "migrations/ID" or "ID".
        name: String,
    },
}

/// Cluster membership.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Leader, term, indexes and members as the contacted node sees them.
    Status,
    /// Add a voter.
    Add {
        /// Node id.
        id: u64,
        /// Its address.
        address: String,
    },
    /// Remove a voter.
    Remove {
        /// Node id.
        id: u64,
    },
}

/// A coordinator command.
#[derive(Debug)]
pub enum Command {
    /// hosts ...
    Hosts(HostsCmd),
    /// vms ...
    Vms(VmsCmd),
    /// migrations ...
    Migrations(MigrationsCmd),
    /// events
    Events {
        /// From this sequence number (0 = the oldest kept).
        from: u64,
        /// Stop after this many events (0 = follow forever).
        limit: u64,
    },
    /// cluster ...
    Cluster(ClusterCmd),
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("invalid {s:?}: expected KEY=VALUE"))
}

/// A novacronctl context: where the coordinators are and how to authenticate to them.
///
/// ```toml
/// endpoints = ["10.0.0.1:7400", "10.0.0.2:7400"]   # tried in order
/// ca = "/etc/novacron/cluster/ca.pem"               # the cluster CA
/// token = "eyJ..."                                  # `novacron-coordinator token`
/// # cert = "me.pem"; key = "me.key"                 # optional client certificate
/// # server_name = "coordinator"                     # name checked in the server's certificate
/// ```
///
/// Relative paths are relative to the context file. `novacron-coordinator context` prints one.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Coordinator endpoints "host:port", tried in order.
    pub endpoints: Vec<String>,
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// Bearer token.
    #[serde(default)]
    pub token: Option<String>,
    /// Client certificate (PEM), optional.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name the coordinators' certificates must carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    "coordinator".into()
}

/// Where the context comes from when neither `--context` nor `$NOVACRON_CONTEXT` names one:
/// `$XDG_CONFIG_HOME/novacron/context.toml`, else `~/.config/novacron/context.toml`.
pub fn default_context_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("novacron").join("context.toml"))
}

impl Context {
    /// Reads a context file; relative paths in it become relative to its directory.
    pub fn load(path: &Path) -> anyhow::Result<Context> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("context file {}: {e}", path.display()))?;
        let mut c: Context = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "context file {}: {e}expected endpoints = [\"HOST:PORT\", ...], ca = \"PATH\", token = \"...\"",
                path.display()
            )
        })?;
        if c.endpoints.is_empty() {
            anyhow::bail!(
                "context file {}: endpoints is empty: expected at least one \"HOST:PORT\"",
                path.display()
            );
        }
        if c.cert.is_some() != c.key.is_some() {
            anyhow::bail!(
                "context file {}: cert and key go together: expected both or neither",
                path.display()
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [Some(&mut c.ca), c.cert.as_mut(), c.key.as_mut()]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
    }

    /// The context to use: `explicit` (from `--context` or `$NOVACRON_CONTEXT`) or the
    /// default file; `endpoint` (from `--coordinator`) replaces its endpoints.
    pub fn resolve(explicit: Option<&Path>, endpoint: Option<&str>) -> anyhow::Result<Context> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => match default_context_path() {
                Some(p) if p.exists() => p,
                other => anyhow::bail!(
                    "no coordinator context: pass --context FILE, set NOVACRON_CONTEXT or create {} \
                     (`novacron-coordinator context --endpoint HOST:PORT --role viewer --subject NAME` prints one)",
                    other.map_or("~/.config/novacron/context.toml".into(), |p| p.display().to_string())
                ),
            },
        };
        let mut c = Context::load(&path)?;
        if let Some(e) = endpoint {
            c.endpoints = vec![e.to_string()];
        }
        Ok(c)
    }
}

/// Sends the context's bearer token with every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A coordinator client with the context's token.
pub type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// Connects to the first reachable endpoint of `ctx` over TLS.
pub async fn connect(ctx: &Context) -> anyhow::Result<Client> {
    let read = |p: &Path, what: &str| {
        std::fs::read(p)
            .map_err(|e| anyhow::anyhow!("{what} {} (from the context): {e}", p.display()))
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&ctx.ca, "CA")?))
        .domain_name(ctx.server_name.clone());
    if let (Some(cert), Some(key)) = (&ctx.cert, &ctx.key) {
        tls = tls.identity(Identity::from_pem(
            read(cert, "client certificate")?,
            read(key, "client key")?,
        ));
    }
    let bearer = Bearer(
        ctx.token
            .as_deref()
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "the context's token holds characters not allowed in gRPC metadata"
                        )
                    })
            })
            .transpose()?,
    );
    let mut errors = vec![];
    for endpoint in &ctx.endpoints {
        let host = endpoint
            .strip_prefix("https://")
            .or_else(|| endpoint.strip_prefix("http://"))
            .unwrap_or(endpoint);
        let url = format!("https://{host}");
        let ep = Endpoint::from_shared(url.clone())
            .map_err(|e| anyhow::anyhow!("invalid coordinator endpoint {endpoint:?}: {e}"))?
            .tls_config(tls.clone())
            .map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?
            .connect_timeout(Duration::from_secs(5));
        match ep.connect().await {
            Ok(ch) => return Ok(CoordinatorClient::with_interceptor(ch, bearer)),
            Err(e) => errors.push(format!("{url}: {e}{}", source_chain(&e))),
        }
    }
    anyhow::bail!("cannot connect to a coordinator: {}", errors.join("; "))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

fn host_state(s: i32) -> &'static str {
    match pb::HostState::try_from(s) {
        Ok(pb::HostState::Up) => "up",
        Ok(pb::HostState::Draining) => "draining",
        Ok(pb::HostState::Down) => "down",
        _ => "unknown",
    }
}

fn phase(p: i32) -> &'static str {
    match pb::MigrationPhase::try_from(p) {
        Ok(pb::MigrationPhase::Pending) => "pending",
        Ok(pb::MigrationPhase::Running) => "running",
        Ok(pb::MigrationPhase::Succeeded) => "succeeded",
        Ok(pb::MigrationPhase::Failed) => "failed",
        Ok(pb::MigrationPhase::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn res(r: &Option<pb::Resources>) -> Value {
    let r = r.unwrap_or_default();
    json!({"vcpus": r.vcpus, "memory_mib": r.memory_mib})
}

fn read_json(r: &Option<pb::ReadMeta>) -> Value {
    r.as_ref().map_or(Value::Null, |r| {
        json!({"applied_index": r.applied_index, "served_by_leader": r.served_by_leader,
               "leader_id": r.leader_id, "node_id": r.node_id, "linearizable": r.linearizable})
    })
}

/// A host as JSON.
pub fn host_json(h: &pb::Host) -> Value {
    json!({
        "id": h.id, "address": h.address, "state": host_state(h.state),
        "capacity": res(&h.capacity), "allocated": res(&h.allocated),
        "labels": h.labels.iter().collect::<BTreeMap<_, _>>(), "vm_ids": h.vm_ids,
        "last_heartbeat_age_ms": h.last_heartbeat_age_ms,
        "cpu_utilisation": h.cpu_utilisation, "memory_used_mib": h.memory_used_mib,
    })
}

/// A VM record as JSON.
pub fn vm_json(v: &pb::Vm) -> Value {
    let desired = match pb::VmDesiredState::try_from(v.desired) {
        Ok(pb::VmDesiredState::Running) => "running",
        Ok(pb::VmDesiredState::Stopped) => "stopped",
        _ => "unknown",
    };
    json!({
        "id": v.id, "name": v.name, "desired": desired, "host_id": v.host_id,
        "resources": res(&v.resources), "labels": v.labels.iter().collect::<BTreeMap<_, _>>(),
        "anti_affinity_group": v.anti_affinity_group, "migration_id": v.migration_id,
        "created_index": v.created_index,
    })
}

/// A migration operation as JSON.
pub fn op_json(o: &pb::Operation) -> Value {
    let m = o.metadata.clone().unwrap_or_default();
    json!({
        "name": o.name, "done": o.done, "error": o.error, "vm_id": m.vm_id,
        "source_host": m.source_host, "target_host": m.target_host, "phase": phase(m.phase),
        "bytes_done": m.bytes_done, "bytes_total": m.bytes_total, "requested_by": m.requested_by,
    })
}

/// Hosts as a table.
pub fn hosts_table(hosts: &[pb::Host]) -> String {
    let rows: Vec<[String; 7]> = hosts
        .iter()
        .map(|h| {
            let c = h.capacity.unwrap_or_default();
            let a = h.allocated.unwrap_or_default();
            [
                h.id.clone(),
                host_state(h.state).into(),
                h.address.clone(),
                format!("{}/{}", a.vcpus, c.vcpus),
                format!("{}/{}MiB", a.memory_mib, c.memory_mib),
                h.vm_ids.len().to_string(),
                if h.last_heartbeat_age_ms == 0 {
                    "-".into()
                } else {
                    format!("{:.1}s", h.last_heartbeat_age_ms as f64 / 1000.0)
                },
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATE",
            "ADDRESS",
            "VCPUS",
            "MEMORY",
            "VMS",
            "HEARTBEAT",
        ],
        &rows,
    )
}

/// VM records as a table.
pub fn vms_table(vms: &[pb::Vm]) -> String {
    let rows: Vec<[String; 6]> = vms
        .iter()
        .map(|v| {
            let j = vm_json(v);
            let r = v.resources.unwrap_or_default();
            [
                v.id.clone(),
                v.name.clone(),
                j["desired"].as_str().unwrap_or_default().to_string(),
                v.host_id.clone(),
                format!("{}/{}MiB", r.vcpus, r.memory_mib),
                if v.migration_id.is_empty() {
                    "-".into()
                } else {
                    v.migration_id.clone()
                },
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "DESIRED", "HOST", "RESOURCES", "MIGRATION"],
        &rows,
    )
}

/// Migration operations as a table.
pub fn ops_table(ops: &[pb::Operation]) -> String {
    let rows: Vec<[String; 6]> = ops
        .iter()
        .map(|o| {
            let m = o.metadata.clone().unwrap_or_default();
            [
                o.name.clone(),
                m.vm_id.clone(),
                format!("{} -> {}", m.source_host, m.target_host),
                phase(m.phase).into(),
                progress_pct(&m),
                o.error.clone(),
            ]
        })
        .collect();
    table(
        &["NAME", "VM", "ROUTE", "PHASE", "PROGRESS", "ERROR"],
        &rows,
    )
}

fn progress_pct(m: &pb::MigrationMetadata) -> String {
    if m.bytes_total == 0 {
        "-".into()
    } else {
        format!("{:.0}%", 100.0 * m.bytes_done as f64 / m.bytes_total as f64)
    }
}

/// A one-line progress bar for a migration.
pub fn progress_bar(o: &pb::Operation) -> String {
    let m = o.metadata.clone().unwrap_or_default();
    let frac = if m.bytes_total == 0 {
        0.0
    } else {
        (m.bytes_done as f64 / m.bytes_total as f64).clamp(0.0, 1.0)
    };
    let filled = (frac * 30.0).round() as usize;
    format!(
        "{} [{}{}] {:>5.1}% {} -> {} {}",
        o.name,
        "#".repeat(filled),
        "-".repeat(30 - filled),
        frac * 100.0,
        m.source_host,
        m.target_host,
        phase(m.phase)
    )
}

fn print(json: bool, v: Value, human: String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{human}");
    }
    Ok(())
}

fn kv(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}

async fn watch(c: &mut Client, name: &str, json: bool) -> anyhow::Result<()> {
    loop {
        let op = c
            .wait_migration(pb::WaitRequest {
                name: name.into(),
                timeout_ms: 1000,
            })
            .await?
            .into_inner();
        if !json {
            print!("\r{}", progress_bar(&op));
            std::io::stdout().flush()?;
        }
        if op.done {
            if json {
                println!("{}", serde_json::to_string_pretty(&op_json(&op))?);
            } else {
                println!();
            }
            if !op.error.is_empty() {
                anyhow::bail!("migration {} ended: {}", op.name, op.error);
            }
            return Ok(());
        }
    }
}

/// Runs a coordinator command against the context's coordinators.
pub async fn run(ctx: &Context, json: bool, cmd: Command) -> anyhow::Result<()> {
    let mut c = connect(ctx).await?;
    match cmd {
        Command::Hosts(h) => match h {
            HostsCmd::List { consistent } => {
                let r = c
                    .list_hosts(pb::ListRequest { consistent })
                    .await?
                    .into_inner();
                print(
                    json,
                    json!({"hosts": r.hosts.iter().map(host_json).collect::<Vec<_>>(), "read": read_json(&r.read)}),
                    hosts_table(&r.hosts),
                )
            }
            HostsCmd::Get { id } => {
                let r = c
                    .get_host(pb::GetRequest {
                        id,
                        consistent: false,
                    })
                    .await?
                    .into_inner();
                let h = r.host.unwrap_or_default();
                print(json, host_json(&h), hosts_table(&[h]))
            }
            HostsCmd::Register {
                id,
                address,
                vcpus,
                memory,
                labels,
            } => {
                let r = c
                    .register_host(pb::RegisterHostRequest {
                        id,
                        address,
                        capacity: Some(pb::Resources {
                            vcpus,
                            memory_mib: memory,
                        }),
                        labels: labels.into_iter().collect(),
                        vms: vec![],
                    })
                    .await?
                    .into_inner();
                let h = r.host.unwrap_or_default();
                print(json, host_json(&h), hosts_table(&[h]))
            }
            HostsCmd::Drain { id } => {
                let h = c
                    .drain_host(pb::HostRef { id })
                    .await?
                    .into_inner()
                    .host
                    .unwrap_or_default();
                print(json, host_json(&h), hosts_table(&[h]))
            }
        },
        Command::Vms(v) => {
            let vm = match v {
                VmsCmd::List { consistent } => {
                    let r = c
                        .list_vms(pb::ListRequest { consistent })
                        .await?
                        .into_inner();
                    return print(
                        json,
                        json!({"vms": r.vms.iter().map(vm_json).collect::<Vec<_>>(), "read": read_json(&r.read)}),
                        vms_table(&r.vms),
                    );
                }
                VmsCmd::Watch { vm } => {
                    let mut s = c
                        .watch_vms(pb::WatchVmsRequest {
                            vm: vm.unwrap_or_default(),
                        })
                        .await?
                        .into_inner();
                    while let Some(ch) = s.message().await? {
                        let kind = match ch.kind() {
                            pb::VmChangeKind::Existing => "existing",
                            pb::VmChangeKind::SnapshotEnd => "snapshot-end",
                            pb::VmChangeKind::Created => "created",
                            pb::VmChangeKind::Updated => "updated",
                            pb::VmChangeKind::Deleted => "deleted",
                            pb::VmChangeKind::Unspecified => "unspecified",
                        };
                        match (json, &ch.vm) {
                            (true, v) => println!(
                                "{}",
                                json!({"kind": kind, "event_seq": ch.event_seq,
                                       "vm": v.as_ref().map(vm_json)})
                            ),
                            (false, None) => println!("-- {kind}"),
                            (false, Some(v)) => {
                                let r = v.resources.unwrap_or_default();
                                println!(
                                    "{kind:<9} {:<10} {:<16} {:<8} {:<12} {}/{}MiB {}",
                                    v.id,
                                    v.name,
                                    vm_json(v)["desired"].as_str().unwrap_or_default(),
                                    v.host_id,
                                    r.vcpus,
                                    r.memory_mib,
                                    if v.migration_id.is_empty() {
                                        "-"
                                    } else {
                                        &v.migration_id
                                    }
                                );
                            }
                        }
                    }
                    return Ok(());
                }
                VmsCmd::Get { vm } => c
                    .get_vm(pb::GetRequest {
                        id: vm,
                        consistent: false,
                    })
                    .await?
                    .into_inner(),
                VmsCmd::Create {
                    name,
                    vcpus,
                    memory,
                    labels,
                    selector,
                    anti_affinity,
                    start,
                    test_guest,
                    kernel,
                    initramfs,
                    cmdline,
                } => c
                    .create_vm(pb::CreateVmRequest {
                        name,
                        resources: Some(pb::Resources {
                            vcpus,
                            memory_mib: memory,
                        }),
                        labels: labels.into_iter().collect(),
                        host_selector: selector.into_iter().collect(),
                        anti_affinity_group: anti_affinity,
                        start,
                        boot: Some(pb::BootSpec {
                            test_guest,
                            kernel,
                            initramfs,
                            cmdline,
                            entry: String::new(),
                        }),
                    })
                    .await?
                    .into_inner(),
                VmsCmd::Start { id } => c.start_vm(pb::VmRef { id }).await?.into_inner(),
                VmsCmd::Stop { id } => c.stop_vm(pb::VmRef { id }).await?.into_inner(),
                VmsCmd::Delete { id } => c.delete_vm(pb::VmRef { id }).await?.into_inner(),
            };
            let v = vm.vm.unwrap_or_default();
            print(json, vm_json(&v), vms_table(&[v]))
        }
        Command::Migrations(m) => match m {
            MigrationsCmd::List => {
                let r = c
                    .list_migrations(pb::ListRequest { consistent: false })
                    .await?
                    .into_inner();
                print(
                    json,
                    json!({"migrations": r.operations.iter().map(op_json).collect::<Vec<_>>()}),
                    ops_table(&r.operations),
                )
            }
            MigrationsCmd::Get { name } => {
                let o = c
                    .get_migration(pb::GetRequest {
                        id: name,
                        consistent: false,
                    })
                    .await?
                    .into_inner();
                print(json, op_json(&o), ops_table(&[o]))
            }
            MigrationsCmd::Start { vm, to, watch: w } => {
                let o = c
                    .start_migration(pb::StartMigrationRequest {
                        vm_id: vm,
                        target_host: to,
                    })
                    .await?
                    .into_inner();
                if w {
                    watch(&mut c, &o.name, json).await
                } else {
                    print(json, op_json(&o), ops_table(&[o]))
                }
            }
            MigrationsCmd::Watch { name } => watch(&mut c, &name, json).await,
            MigrationsCmd::Cancel { name } => {
                let o = c
                    .cancel_migration(pb::OperationRef { name })
                    .await?
                    .into_inner();
                print(json, op_json(&o), ops_table(&[o]))
            }
        },
        Command::Events { from, limit } => {
            let mut s = c
                .watch_events(pb::WatchEventsRequest { from_seq: from })
                .await?
                .into_inner();
            let mut n = 0;
            while let Some(e) = s.message().await? {
                if json {
                    println!(
                        "{}",
                        json!({"seq": e.seq, "log_index": e.log_index, "kind": e.kind,
                               "object_id": e.object_id, "message": e.message})
                    );
                } else {
                    println!(
                        "{:>6}  {:<20} {:<12} {}",
                        e.seq, e.kind, e.object_id, e.message
                    );
                }
                n += 1;
                if limit != 0 && n >= limit {
                    break;
                }
            }
            Ok(())
        }
        Command::Cluster(cc) => {
            let s = match cc {
                ClusterCmd::Status => c.cluster_status(pb::ClusterStatusRequest {}).await?,
                ClusterCmd::Add { id, address } => {
                    c.add_member(pb::AddMemberRequest { id, address }).await?
                }
                ClusterCmd::Remove { id } => {
                    c.remove_member(pb::RemoveMemberRequest { id }).await?
                }
            }
            .into_inner();
            let members: Vec<Value> = s
                .members
                .iter()
                .map(|m| json!({"id": m.id, "address": m.address, "voter": m.voter}))
                .collect();
            let human = kv(&[
                ("node", s.node_id.to_string()),
                ("state", s.state.clone()),
                ("leader", s.leader_id.to_string()),
                ("term", s.term.to_string()),
                ("last log index", s.last_log_index.to_string()),
                ("applied index", s.applied_index.to_string()),
                (
                    "members",
                    s.members
                        .iter()
                        .map(|m| {
                            format!(
                                "{}={}{}",
                                m.id,
                                m.address,
                                if m.voter { "" } else { " (learner)" }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            ]);
            print(
                json,
                json!({"node_id": s.node_id, "state": s.state, "leader_id": s.leader_id,
                       "term": s.term, "last_log_index": s.last_log_index,
                       "applied_index": s.applied_index, "members": members}),
                human,
            )
        }
    }
}
