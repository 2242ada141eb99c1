//! The migration engine: the thin I/O layer that drives the pure state machines of
//! `novacron_migration::protocol` with this VMM's memory, dirty log and vCPUs, over QUIC.
//!
//! Source: pre-copy rounds over N data streams (each stream's task reads, compresses and
//! sends its batches, so compression runs on more than one core), convergence control with
//! vCPU throttling, switch-over, commit. Destination: applies page batches in round order
//! (a page is only overwritten by a batch of the same or a later round, because batches of
//! different rounds travel on different streams and may arrive out of order), loads the
//! device state, resumes on Commit.
//!
//! See `docs/design/migration.md` for the protocol steps.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_migration::certs::ClusterDir;
use novacron_migration::frame::{self, Frame, PageBatch, PageData, MAX_PAYLOAD, PAGE_SIZE};
use novacron_migration::protocol::{
    Convergence, Decision, DestAction, Destination, Policy, RoundStats, Source, SourceAction,
    TimeLimitAction,
};
use novacron_migration::transport;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::control::ExitReason;
use crate::state;
use crate::vm::Vm;

/// Pages per batch frame (256 KiB of page data).
const BATCH_PAGES: usize = 64;
/// How long a finished source waits for its connection close to leave.
const CLOSE_GRACE: Duration = Duration::from_millis(20);

/// Failure of a migration (the VM is rolled back to run on the source).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Certificates could not be loaded.
    #[error("certificates: {0}")]
    Certs(#[from] novacron_migration::certs::CertError),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] transport::TransportError),
    /// A frame could not be decoded.
    #[error("frame: {0}")]
    Frame(#[from] frame::FrameError),
    /// The protocol ended without a commit.
    #[error("{0}")]
    Protocol(#[from] novacron_migration::protocol::ProtocolError),
    /// The VM could not be operated.
    #[error("VM: {0}")]
    Vm(#[from] crate::vm::VmError),
    /// The peer closed the control stream.
    #[error("the peer closed the control stream")]
    Closed,
    /// Anything else, with what failed.
    #[error("{0}")]
    Other(String),
}

/// What a source migration needs to know.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutgoingParams {
    /// The destination VMM's migration address.
    pub address: SocketAddr,
    /// The destination agent's name (its certificate must name it).
    pub dest_agent: String,
    /// The token the destination expects.
    pub token: [u8; 16],
    /// Directory with `ca.pem` and this agent's certificate.
    pub cert_dir: PathBuf,
    /// This agent's name.
    pub agent: String,
    /// Parallel data streams.
    #[serde(default = "default_streams")]
    pub streams: usize,
    /// Longest acceptable downtime, ms.
    #[serde(default = "default_downtime_ms")]
    pub downtime_limit_ms: u64,
    /// Give up (or force) after this many seconds.
    #[serde(default = "default_time_limit_s")]
    pub time_limit_s: u64,
    /// At the time limit, switch over anyway instead of cancelling.
    #[serde(default)]
    pub force_at_time_limit: bool,
    /// Throttle vCPUs when the guest dirties memory faster than the link carries it.
    #[serde(default = "yes")]
    pub auto_converge: bool,
    /// Cap on the guest's dirty rate during the migration, pages/s (0 = none).
    #[serde(default)]
    pub dirty_rate_limit: u64,
    /// Cap on the bytes per second put on the wire (0 = none).
    #[serde(default)]
    pub bandwidth_limit: u64,
}

/// QUIC send priority of the control stream (data streams keep the default, 0).
const CONTROL_PRIORITY: i32 = 8;

fn default_streams() -> usize {
    4
}
fn default_downtime_ms() -> u64 {
    50
}
fn default_time_limit_s() -> u64 {
    300
}
fn yes() -> bool {
    true
}

/// What an incoming migration needs to know.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IncomingParams {
    /// Where to listen (port 0 picks one; the bound address is reported in the progress).
    pub listen: SocketAddr,
    /// The token the source must present.
    pub token: [u8; 16],
    /// Directory with `ca.pem` and this agent's certificate.
    pub cert_dir: PathBuf,
    /// This agent's name.
    pub agent: String,
}

/// Where a migration stands, for progress reports and final statistics.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// connecting, pre-copy, switch-over, committing, completed, rolled-back, in-doubt,
    /// listening, receiving, discarded.
    pub phase: String,
    /// Bound address of an incoming migration.
    pub listen_address: Option<String>,
    /// Current round.
    pub round: u32,
    /// Pages still to send (the dirty set found at the end of the last round).
    pub pages_left: u64,
    /// Guest dirty rate in the last round, pages/s.
    pub dirty_rate: f64,
    /// Link throughput in the last round, bytes on the wire per second.
    pub throughput: f64,
    /// Predicted downtime for switching over now, ms.
    pub predicted_downtime_ms: f64,
    /// Current vCPU throttle, percent.
    pub throttle: u8,
    /// Pages sent per round.
    pub pages_per_round: Vec<u64>,
    /// Bytes on the wire (page frames).
    pub wire_bytes: u64,
    /// Bytes of page data before compression.
    pub raw_bytes: u64,
    /// Total time so far, ms.
    pub total_ms: f64,
    /// vCPUs paused on the source until the destination reported them running, ms.
    pub downtime_ms: Option<f64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

impl Progress {
    /// Compression ratio (raw / wire) of the page data.
    pub fn compression_ratio(&self) -> f64 {
        if self.wire_bytes == 0 {
            1.0
        } else {
            self.raw_bytes as f64 / self.wire_bytes as f64
        }
    }
}

/// A running migration, shared with the control thread.
#[derive(Debug, Default)]
pub struct Handle {
    /// Progress and statistics.
    pub progress: Mutex<Progress>,
    cancel: AtomicBool,
    cancelled: tokio::sync::Notify,
}

impl Handle {
    /// Asks the migration to stop; honoured until the commit, ignored after.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
        self.cancelled.notify_waiters();
    }

    fn set(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap());
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("migration")
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}

/// Holds the vCPUs for `percent` of every 10 ms slice while a migration does not converge.
struct Throttle {
    percent: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    fn start(vm: Arc<Vm>) -> Throttle {
        let percent = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (percent.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                const SLICE: Duration = Duration::from_millis(10);
                // Parked, not slept: `stop` unparks the thread so that a switch-over never
                // waits out a slice.
                let wait = |d: Duration| {
                    let until = Instant::now() + d;
                    while !s.load(Ordering::Acquire) {
                        let now = Instant::now();
                        if now >= until {
                            break;
                        }
                        std::thread::park_timeout(until - now);
                    }
                };
                while !s.load(Ordering::Acquire) {
                    let pct = u32::from(p.load(Ordering::Acquire).min(99));
                    if pct == 0 || vm.pause().is_err() {
                        wait(SLICE);
                        continue;
                    }
                    wait(SLICE * pct / 100);
                    let _ = vm.resume();
                    wait(SLICE * (100 - pct) / 100);
                }
            })
            .expect("throttle thread starts");
        Throttle {
            percent,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, percent: u8) {
        self.percent.store(percent, Ordering::Release);
    }

    /// Stops throttling; on return the throttle no longer pauses or resumes the VM.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Keeps the wire at or under a byte rate.
struct Limiter {
    bytes_per_sec: u64,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl Limiter {
    async fn acquire(&self, bytes: usize) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let wake = {
            let mut next = self.next.lock().await;
            let now = tokio::time::Instant::now();
            if *next < now {
                *next = now;
            }
            *next += cost;
            *next - cost
        };
        tokio::time::sleep_until(wake).await;
    }
}

enum Job {
    Batch(u32, Vec<u64>),
    Flush(oneshot::Sender<Result<(), String>>),
    Finish(oneshot::Sender<Result<(), String>>),
}

#[derive(Default)]
struct WireStats {
    wire: AtomicU64,
    raw: AtomicU64,
}

/// One data stream: reads its batches from guest memory, compresses and sends them.
async fn sender(
    vm: Arc<Vm>,
    mut send: quinn::SendStream,
    mut jobs: mpsc::Receiver<Job>,
    stats: Arc<WireStats>,
    limiter: Arc<Limiter>,
) {
    let mut failed: Option<String> = None;
    let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE];
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Batch(round, pages) => {
                if failed.is_some() {
                    continue;
                }
                let mut refs = Vec::with_capacity(pages.len());
                for (i, page) in pages.iter().enumerate() {
                    let slot = &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                    if let Err(e) = vm
                        .mem
                        .read_slice(slot, GuestAddress(page * PAGE_SIZE as u64))
                    {
                        failed = Some(format!("reading guest page {page}: {e}"));
                        break;
                    }
                }
                if failed.is_some() {
                    continue;
                }
                for (i, page) in pages.iter().enumerate() {
                    refs.push((*page, &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]));
                }
                let batch = PageBatch::build(round, &refs);
                stats
                    .raw
                    .fetch_add(batch.raw_bytes() as u64, Ordering::Relaxed);
                let bytes = Frame::Pages(batch).encode();
                stats.wire.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                limiter.acquire(bytes.len()).await;
                if let Err(e) = transport::write_frame(&mut send, &bytes).await {
                    failed = Some(e.to_string());
                }
            }
            Job::Flush(ack) => {
                let _ = ack.send(failed.clone().map_or(Ok(()), Err));
            }
            Job::Finish(ack) => {
                let r = match &failed {
                    Some(e) => Err(e.clone()),
                    None => send.finish().map_err(|e| e.to_string()),
                };
                let _ = ack.send(r);
                return;
            }
        }
    }
}

struct Senders {
    queues: Vec<mpsc::Sender<Job>>,
    next: usize,
}

impl Senders {
    async fn send_pages(&mut self, round: u32, pages: &[u64]) -> Result<(), MigrateError> {
        for chunk in pages.chunks(BATCH_PAGES) {
            let q = &self.queues[self.next % self.queues.len()];
            self.next += 1;
            q.send(Job::Batch(round, chunk.to_vec()))
                .await
                .map_err(|_| MigrateError::Other("data stream task ended".into()))?;
        }
        Ok(())
    }

    async fn barrier(&self, finish: bool) -> Result<(), MigrateError> {
        let mut acks = Vec::new();
        for q in &self.queues {
            let (tx, rx) = oneshot::channel();
            let job = if finish {
                Job::Finish(tx)
            } else {
                Job::Flush(tx)
            };
            q.send(job)
                .await
                .map_err(|_| MigrateError::Other("data stream task ended".into()))?;
            acks.push(rx);
        }
        for rx in acks {
            rx.await
                .map_err(|_| MigrateError::Other("data stream task ended".into()))?
                .map_err(MigrateError::Other)?;
        }
        Ok(())
    }
}

async fn send_control(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), MigrateError> {
    transport::write_frame(send, &frame.encode()).await?;
    Ok(())
}

async fn recv_control(recv: &mut quinn::RecvStream) -> Result<Frame, MigrateError> {
    let bytes = transport::read_frame(recv, MAX_PAYLOAD)
        .await?
        .ok_or(MigrateError::Closed)?;
    Ok(frame::decode(&bytes)?.0)
}

/// Runs an outgoing migration to its end on the calling thread. On success the VM has been
/// released (the VMM is ending with [`ExitReason::Migrated`]); on failure it runs here again,
/// with its memory intact, or (after a commit whose answer was lost) stays paused in doubt.
pub fn migrate_out(vm: Arc<Vm>, params: OutgoingParams, handle: Arc<Handle>) {
    let rt = runtime();
    let started = Instant::now();
    handle.set(|p| p.phase = "connecting".into());
    let mut src = Source::new();
    let mut throttle = None;
    let result = rt.block_on(source(
        &vm,
        &params,
        &handle,
        &mut src,
        &mut throttle,
        started,
    ));
    if let Some(mut t) = throttle.take() {
        t.stop();
    }
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    match result {
        Ok(()) => {
            // total_ms was taken when the destination confirmed (step 8).
            handle.set(|p| p.phase = "completed".into());
            let p = handle.progress.lock().unwrap().clone();
            vm.finish(
                ExitReason::Migrated,
                format!(
                    "migrated to {} in {:.0} ms, downtime {:.1} ms, {} rounds",
                    params.dest_agent,
                    p.total_ms,
                    p.downtime_ms.unwrap_or(0.0),
                    p.pages_per_round.len()
                ),
            );
        }
        Err(e) => {
            let in_doubt = src.state() == novacron_migration::protocol::SourceState::InDoubt;
            if !in_doubt {
                // Roll back: nothing of the VM changed but the dirty log and the pause.
                let _ = vm.set_dirty_log(false);
                if src.paused() || vm.state() == crate::control::RunState::Paused {
                    let _ = vm.resume();
                }
            }
            tracing::warn!(error = %e, in_doubt, "migration did not complete");
            handle.set(|p| {
                p.phase = if in_doubt { "in-doubt" } else { "rolled-back" }.into();
                p.total_ms = total_ms;
                p.error = Some(e.to_string());
            });
        }
    }
    rt.shutdown_timeout(Duration::from_secs(1));
}

async fn source(
    vm: &Arc<Vm>,
    params: &OutgoingParams,
    handle: &Arc<Handle>,
    sm: &mut Source,
    throttle: &mut Option<Throttle>,
    started: Instant,
) -> Result<(), MigrateError> {
    let step = |what: &str| {
        tracing::debug!(
            us = started.elapsed().as_micros() as u64,
            "outgoing: {what}"
        )
    };
    let certs = ClusterDir::new(&params.cert_dir);
    let id = certs.load_identity(&params.agent)?;
    let ca = certs.load_ca()?;
    step("identity loaded");
    let bind: SocketAddr = if params.address.is_ipv6() {
        "[::]:0".parse().expect("valid")
    } else {
        "0.0.0.0:0".parse().expect("valid")
    };
    let endpoint = transport::client_endpoint(bind)?;
    let conn = transport::connect(&endpoint, params.address, &params.dest_agent, &id, &ca).await?;
    let (mut ctl_send, mut ctl_recv) = conn
        .open_bi()
        .await
        .map_err(transport::TransportError::from)?;
    // Control frames (the device state, Commit) go ahead of any page data still queued.
    let _ = ctl_send.set_priority(CONTROL_PRIORITY);
    step("connected");

    // Steps 1-2.
    let mut pending = sm.start(
        vm.config.id.clone(),
        vm.config.memory_mib << 20,
        vm.config.vcpus,
        params.token,
    );
    loop {
        let mut start = false;
        for a in pending.drain(..) {
            match a {
                SourceAction::Send(f) => send_control(&mut ctl_send, &f).await?,
                SourceAction::StartPreCopy => start = true,
                SourceAction::Rollback(e) | SourceAction::InDoubt(e) => return Err(e.into()),
                SourceAction::Release | SourceAction::RoundAcked { .. } => {}
            }
        }
        if start {
            break;
        }
        let f = recv_control(&mut ctl_recv).await.inspect_err(|_| {
            sm.connection_lost();
        })?;
        pending = sm.on_frame(f);
    }

    // Step 3: data streams, dirty logging, round 0.
    let stats = Arc::new(WireStats::default());
    let limiter = Arc::new(Limiter {
        bytes_per_sec: params.bandwidth_limit,
        next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
    });
    let mut queues = Vec::new();
    for _ in 0..params.streams.clamp(1, 16) {
        let send = conn
            .open_uni()
            .await
            .map_err(transport::TransportError::from)?;
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(sender(vm.clone(), send, rx, stats.clone(), limiter.clone()));
        queues.push(tx);
    }
    let mut senders = Senders { queues, next: 0 };
    step("accepted; data streams open");
    vm.set_dirty_log(true)?;
    vm.take_dirty_pages()?;
    // The per-VM dirty-rate cap: page-accurate in the vCPU threads with the dirty ring,
    // otherwise by throttling the vCPUs after each round (below).
    let ring_limited =
        params.dirty_rate_limit > 0 && vm.set_dirty_rate_limit(params.dirty_rate_limit);
    *throttle = Some(Throttle::start(vm.clone()));
    let mut conv = Convergence::new(Policy {
        downtime_limit: Duration::from_millis(params.downtime_limit_ms),
        time_limit: Duration::from_secs(params.time_limit_s),
        on_time_limit: if params.force_at_time_limit {
            TimeLimitAction::Force
        } else {
            TimeLimitAction::Cancel
        },
        auto_converge: params.auto_converge,
        ..Policy::default()
    });
    handle.set(|p| p.phase = "pre-copy".into());

    // Round 0: every page this process ever backed. Pages never touched are zero here and on
    // the destination; any write from now on is in the dirty log, enabled above.
    let mut to_send = vm.backed_pages();
    step("round 0 begins");
    let mut round = 0u32;
    let dirty = loop {
        if handle.cancel.load(Ordering::Acquire) {
            abort(sm, &mut ctl_send, &conn, "cancelled").await;
            return Err(MigrateError::Other("cancelled".into()));
        }
        let t = Instant::now();
        let wire_before = stats.wire.load(Ordering::Relaxed);
        senders.send_pages(round, &to_send).await?;
        senders.barrier(false).await?;
        for a in sm.round_sent(to_send.len() as u64) {
            if let SourceAction::Send(f) = a {
                send_control(&mut ctl_send, &f).await?;
            }
        }
        // Step 4: the round ends when the destination has applied it, so its time measures
        // what the link and the destination really carried, not what a buffer took.
        wait_round_ack(sm, &mut ctl_recv).await?;
        let duration = t.elapsed();
        let dirty = vm.take_dirty_pages()?;
        let dirty_rate = dirty.len() as f64 / duration.as_secs_f64().max(1e-6);
        let decision = conv.after_round(RoundStats {
            pages_sent: to_send.len() as u64,
            wire_bytes: stats.wire.load(Ordering::Relaxed) - wire_before,
            duration,
            dirty_pages: dirty.len() as u64,
            elapsed: started.elapsed(),
        });
        let mut throttle_pct = match decision {
            Decision::Continue { throttle } => throttle,
            _ => conv.throttle(),
        };
        if !ring_limited
            && params.dirty_rate_limit > 0
            && dirty_rate > params.dirty_rate_limit as f64
        {
            // The per-VM dirty-rate cap: hold the vCPUs long enough to bring the rate under it.
            let need = (100.0 * (1.0 - params.dirty_rate_limit as f64 / dirty_rate)).ceil() as u8;
            throttle_pct = throttle_pct.max(need.min(99));
        }
        if let Some(t) = throttle.as_ref() {
            t.set(throttle_pct);
        }
        handle.set(|p| {
            p.round = round;
            p.pages_per_round.push(to_send.len() as u64);
            p.pages_left = dirty.len() as u64;
            p.dirty_rate = dirty_rate;
            p.throughput = conv.throughput();
            p.predicted_downtime_ms = conv.predict(dirty.len() as u64).as_secs_f64() * 1e3;
            p.throttle = throttle_pct;
            p.wire_bytes = stats.wire.load(Ordering::Relaxed);
            p.raw_bytes = stats.raw.load(Ordering::Relaxed);
            p.total_ms = started.elapsed().as_secs_f64() * 1e3;
        });
        tracing::info!(
            round,
            sent = to_send.len(),
            dirty = dirty.len(),
            ?duration,
            ?decision,
            "round done"
        );
        round += 1;
        match decision {
            Decision::SwitchOver { .. } => break dirty,
            Decision::Cancel => {
                abort(sm, &mut ctl_send, &conn, "time limit reached").await;
                return Err(MigrateError::Other(format!(
                    "did not converge within the {} s time limit",
                    params.time_limit_s
                )));
            }
            Decision::Continue { .. } => to_send = dirty,
        }
    };

    // Step 5: stop the throttle, pause, send the rest and the state.
    if let Some(mut t) = throttle.take() {
        t.stop();
    }
    handle.set(|p| p.phase = "switch-over".into());
    vm.pause()?;
    let paused_at = Instant::now();
    let mark = |what: &str| {
        tracing::debug!(
            us = paused_at.elapsed().as_micros() as u64,
            "switch-over: {what}"
        )
    };
    sm.vm_paused();
    let mut last = dirty;
    last.extend(vm.take_dirty_pages()?);
    last.sort_unstable();
    last.dedup();
    mark("dirty set taken");
    senders.send_pages(round, &last).await?;
    // The state does not change while paused: capture it while the streams send.
    let device_state = state::capture(vm)?;
    mark("state captured");
    senders.barrier(true).await?;
    mark("last pages sent");
    for a in sm.switch_over(last.len() as u64, device_state) {
        if let SourceAction::Send(f) = a {
            send_control(&mut ctl_send, &f).await?;
        }
    }
    mark("state sent");
    handle.set(|p| {
        p.phase = "committing".into();
        p.pages_per_round.push(last.len() as u64);
        p.pages_left = 0;
        p.wire_bytes = stats.wire.load(Ordering::Relaxed);
        p.raw_bytes = stats.raw.load(Ordering::Relaxed);
    });

    // Steps 6-8.
    loop {
        let f = match recv_control(&mut ctl_recv).await {
            Ok(f) => f,
            Err(e) => {
                sm.connection_lost();
                return Err(e);
            }
        };
        mark("answer received");
        for a in sm.on_frame(f) {
            match a {
                SourceAction::Send(f) => {
                    if let Err(e) = send_control(&mut ctl_send, &f).await {
                        sm.connection_lost();
                        return Err(e);
                    }
                }
                SourceAction::Release => {
                    // The migration is complete here: the guest runs on the destination.
                    // Downtime ends when its vCPUs run there, which is when it sent
                    // `Resumed`: one one-way delay (half the connection's smoothed RTT)
                    // before the frame arrived here.
                    let observed = paused_at.elapsed();
                    let one_way = conn.rtt() / 2;
                    let downtime = observed.saturating_sub(one_way).as_secs_f64() * 1e3;
                    tracing::debug!(
                        observed_us = observed.as_micros() as u64,
                        one_way_us = one_way.as_micros() as u64,
                        "downtime"
                    );
                    let total = started.elapsed().as_secs_f64() * 1e3;
                    handle.set(|p| {
                        p.downtime_ms = Some(downtime);
                        p.total_ms = total;
                    });
                    let _ = ctl_send.finish();
                    conn.close(0u32.into(), b"done");
                    // Long enough for the close to leave, not for the whole draining
                    // period (three probe timeouts), which the destination does not need.
                    let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
                    return Ok(());
                }
                SourceAction::Rollback(e) | SourceAction::InDoubt(e) => return Err(e.into()),
                SourceAction::StartPreCopy | SourceAction::RoundAcked { .. } => {}
            }
        }
    }
}

/// Reads the control stream until the destination acknowledges the round just sent.
async fn wait_round_ack(
    sm: &mut Source,
    ctl_recv: &mut quinn::RecvStream,
) -> Result<(), MigrateError> {
    loop {
        let f = match recv_control(ctl_recv).await {
            Ok(f) => f,
            Err(e) => {
                sm.connection_lost();
                return Err(e);
            }
        };
        for a in sm.on_frame(f) {
            match a {
                SourceAction::RoundAcked { .. } => return Ok(()),
                SourceAction::Rollback(e) | SourceAction::InDoubt(e) => return Err(e.into()),
                _ => {}
            }
        }
    }
}

/// Step 9 from the source: tell the destination, and give the frame a moment to arrive.
async fn abort(
    sm: &mut Source,
    ctl_send: &mut quinn::SendStream,
    conn: &quinn::Connection,
    reason: &str,
) {
    for a in sm.abort(reason) {
        if let SourceAction::Send(f) = a {
            let _ = send_control(ctl_send, &f).await;
        }
    }
    let _ = ctl_send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
}

/// Striped locks and the last round applied per page, so that a page is never overwritten
/// by an older round's copy arriving late on another stream.
struct PageOrder {
    last_round: Vec<AtomicU32>,
    stripes: Vec<Mutex<()>>,
    first_page: Vec<(u64, u64, usize)>,
}

impl PageOrder {
    fn new(vm: &Vm) -> PageOrder {
        let mut first_page = Vec::new();
        let mut total = 0usize;
        for r in vm.mem.iter() {
            let first = r.start_addr().0 / PAGE_SIZE as u64;
            let n = r.len() / PAGE_SIZE as u64;
            first_page.push((first, n, total));
            total += n as usize;
        }
        PageOrder {
            last_round: (0..total).map(|_| AtomicU32::new(0)).collect(),
            stripes: (0..1024).map(|_| Mutex::new(())).collect(),
            first_page,
        }
    }

    fn slot(&self, page: u64) -> Option<usize> {
        self.first_page
            .iter()
            .find(|(first, n, _)| page >= *first && page < first + n)
            .map(|(first, _, base)| base + (page - first) as usize)
    }

    /// Writes `data` to `page` unless a later round already did. Round numbers are stored
    /// plus one, so round 0 beats "never written".
    fn apply(&self, vm: &Vm, page: u64, round: u32, data: PageData<'_>) -> Result<(), String> {
        let slot = self
            .slot(page)
            .ok_or_else(|| format!("page {page} is outside guest memory"))?;
        let _guard = self.stripes[slot % self.stripes.len()].lock().unwrap();
        if self.last_round[slot].load(Ordering::Relaxed) > round + 1 {
            return Ok(());
        }
        vm.mem
            .write_slice(data.as_bytes(), GuestAddress(page * PAGE_SIZE as u64))
            .map_err(|e| format!("writing page {page}: {e}"))?;
        self.last_round[slot].store(round + 1, Ordering::Relaxed);
        Ok(())
    }
}

/// Pages applied on the destination, with a wake-up for whoever waits for a count: the
/// round acknowledgement and the final drain wait on it instead of polling, so the switch-over
/// does not pay a timer tick.
#[derive(Default)]
struct Received {
    pages: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Received {
    fn get(&self) -> u64 {
        self.pages.load(Ordering::Acquire)
    }

    fn add(&self, n: u64) {
        self.pages.fetch_add(n, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Waits until at least `total` pages have been applied, a receiver fails, or 30 s pass.
    async fn wait_for(
        &self,
        total: u64,
        errors: &mut mpsc::Receiver<String>,
        what: &str,
    ) -> Result<u64, String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let got = self.get();
            if got >= total {
                return Ok(got);
            }
            tokio::select! {
                _ = changed => {}
                Some(e) = errors.recv() => return Err(e),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!("{what}: {} of {total} pages arrived within 30 s", self.get()));
                }
            }
        }
    }
}

async fn receiver(
    vm: Arc<Vm>,
    mut recv: quinn::RecvStream,
    order: Arc<PageOrder>,
    received: Arc<Received>,
    errors: mpsc::Sender<String>,
) {
    let mut scratch = Vec::new();
    loop {
        let bytes = match transport::read_frame(&mut recv, MAX_PAYLOAD).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                let _ = errors.send(format!("data stream: {e}")).await;
                return;
            }
        };
        let batch = match frame::decode(&bytes) {
            Ok((Frame::Pages(batch), _)) => batch,
            Ok((other, _)) => {
                let _ = errors.send(format!("data stream carried {other:?}")).await;
                return;
            }
            Err(e) => {
                let _ = errors.send(format!("data stream: {e}")).await;
                return;
            }
        };
        let round = batch.round();
        let pages = match batch.pages(&mut scratch) {
            Ok(p) => p,
            Err(e) => {
                let _ = errors.send(format!("page batch: {e}")).await;
                return;
            }
        };
        let mut n = 0u64;
        for (page, data) in pages {
            if let Err(e) = order.apply(&vm, page, round, data) {
                let _ = errors.send(e).await;
                return;
            }
            n += 1;
        }
        received.add(n);
    }
}

/// Binds the listener of an incoming migration; returns the bound address and a function that
/// runs the migration to its end on the calling thread.
pub fn migrate_in(
    vm: Arc<Vm>,
    params: IncomingParams,
    handle: Arc<Handle>,
) -> Result<(SocketAddr, impl FnOnce() + Send + 'static), MigrateError> {
    let rt = runtime();
    let certs = ClusterDir::new(&params.cert_dir);
    let id = certs.load_identity(&params.agent)?;
    let ca = certs.load_ca()?;
    let endpoint = rt.block_on(transport::listen(params.listen, &id, &ca))?;
    let addr = endpoint
        .local_addr()
        .map_err(|e| MigrateError::Other(format!("listener address: {e}")))?;
    handle.set(|p| {
        p.phase = "listening".into();
        p.listen_address = Some(addr.to_string());
    });
    let run = move || {
        let started = Instant::now();
        let mut dst = Destination::new();
        let result = rt.block_on(destination(
            &vm, &params, &handle, &endpoint, &mut dst, started,
        ));
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(()) => handle.set(|p| {
                p.phase = "completed".into();
                p.total_ms = total_ms;
            }),
            Err(e) => {
                tracing::warn!(error = %e, "incoming migration discarded");
                handle.set(|p| {
                    p.phase = "discarded".into();
                    p.error = Some(e.to_string());
                });
                vm.finish(
                    ExitReason::IncomingDiscarded,
                    format!("incoming migration discarded: {e}"),
                );
            }
        }
        rt.shutdown_timeout(Duration::from_secs(1));
    };
    Ok((addr, run))
}

async fn destination(
    vm: &Arc<Vm>,
    params: &IncomingParams,
    handle: &Arc<Handle>,
    endpoint: &quinn::Endpoint,
    sm: &mut Destination,
    started: Instant,
) -> Result<(), MigrateError> {
    let (conn, peer) = loop {
        tokio::select! {
            accepted = transport::accept(endpoint) => match accepted {
                Some(Ok(c)) => break c,
                // A refused handshake (wrong CA, no certificate) does not end the listener.
                Some(Err(e)) => tracing::warn!(error = %e, "refused a migration connection"),
                None => return Err(MigrateError::Closed),
            },
            _ = handle.cancelled.notified() => return Err(MigrateError::Other("cancelled".into())),
        }
    };
    tracing::info!(%peer, "incoming migration connected");
    let (mut ctl_send, mut ctl_recv) = conn
        .accept_bi()
        .await
        .map_err(transport::TransportError::from)?;
    let _ = ctl_send.set_priority(CONTROL_PRIORITY);
    let order = Arc::new(PageOrder::new(vm));
    let received = Arc::new(Received::default());
    let (err_tx, mut err_rx) = mpsc::channel(4);
    {
        let (vm, conn, order, received) =
            (vm.clone(), conn.clone(), order.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok(recv) = conn.accept_uni().await {
                tokio::spawn(receiver(
                    vm.clone(),
                    recv,
                    order.clone(),
                    received.clone(),
                    err_tx.clone(),
                ));
            }
        });
    }
    handle.set(|p| p.phase = "receiving".into());
    let mut resumed = false;
    loop {
        let frame = tokio::select! {
            f = recv_control(&mut ctl_recv) => f,
            Some(e) = err_rx.recv() => Err(MigrateError::Other(e)),
        };
        let actions = match frame {
            Ok(f) => sm.on_frame(f),
            Err(e) if resumed => {
                // After Commit the VM is ours whatever happens to the connection.
                tracing::info!(error = %e, "control stream ended after the commit");
                return Ok(());
            }
            Err(e) => {
                sm.connection_lost();
                return Err(e);
            }
        };
        let mut queue: std::collections::VecDeque<DestAction> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                DestAction::Send(f) => {
                    let sent = send_control(&mut ctl_send, &f).await;
                    if matches!(f, Frame::Resumed) {
                        let _ = ctl_send.finish();
                        handle.set(|p| p.total_ms = started.elapsed().as_secs_f64() * 1e3);
                        // Give the source a moment to read it; the VM runs here either way.
                        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                        return Ok(());
                    }
                    sent?;
                }
                DestAction::CheckAdmission {
                    vm_id,
                    memory_bytes,
                    vcpus,
                    token,
                } => {
                    let ours = vm.config.memory_mib << 20;
                    let verdict = if token != params.token {
                        Some("wrong migration token".to_string())
                    } else if memory_bytes != ours || vcpus != vm.config.vcpus {
                        Some(format!(
                            "VM {vm_id} has {memory_bytes} bytes and {vcpus} vCPUs; this destination was prepared for {ours} bytes and {} vCPUs",
                            vm.config.vcpus
                        ))
                    } else {
                        None
                    };
                    queue.extend(match verdict {
                        None => sm.admit(),
                        Some(reason) => sm.refuse(&reason),
                    });
                }
                DestAction::LoadState(bytes) => match state::apply(vm, &bytes) {
                    Ok(()) => queue.extend(sm.state_loaded()),
                    Err(e) => queue.extend(sm.abort(&format!("device state: {e}"))),
                },
                DestAction::AckRound { round, total } => {
                    match received
                        .wait_for(total, &mut err_rx, &format!("round {round}"))
                        .await
                    {
                        Err(e) => queue.extend(sm.abort(&e)),
                        Ok(pages) => {
                            send_control(&mut ctl_send, &Frame::RoundAck { round, pages }).await?
                        }
                    }
                }
                DestAction::DrainData => {
                    let expected = sm_expected_total(sm);
                    match received.wait_for(expected, &mut err_rx, "last round").await {
                        Err(e) => queue.extend(sm.abort(&e)),
                        Ok(got) => {
                            tracing::debug!(expected, received = got, "all data received");
                            queue.extend(sm.data_complete(got));
                        }
                    }
                }
                DestAction::Resume => {
                    vm.resume()?;
                    resumed = true;
                    queue.extend(sm.resumed());
                }
                DestAction::Discard(e) => {
                    // Let a Reject or Abort reach the source before the connection goes.
                    let _ = ctl_send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                    return Err(e.into());
                }
            }
        }
    }
}

fn sm_expected_total(sm: &Destination) -> u64 {
    sm.expected_total().unwrap_or(0)
}
