//! The migration protocol as pure state machines: no sockets, no clocks (times come in as
//! arguments). The engine in the VMM feeds them received frames and local events and carries
//! out what they return. Steps are numbered as in `docs/design/migration.md`.
//!
//! Memory pages travel on data streams that the state machines do not see: the engine tells
//! the source how many pages each round carried, and the destination how many arrived, and
//! the machines check that the two agree before anything is committed.

use std::time::Duration;

use crate::frame::Frame;

/// Protocol versions this build speaks, newest first.
pub const SUPPORTED_VERSIONS: &[u8] = &[1];

/// Why a migration did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The peer sent a frame that is not valid in the current state.
    #[error("unexpected {frame} in state {state}")]
    Unexpected {
        /// The frame's name.
        frame: &'static str,
        /// Our state.
        state: &'static str,
    },
    /// No protocol version in common.
    #[error("no common protocol version (ours {ours:?}, theirs {theirs:?})")]
    Version {
        /// What we speak.
        ours: Vec<u8>,
        /// What the peer offered.
        theirs: Vec<u8>,
    },
    /// The destination refused the migration.
    #[error("destination refused: {0}")]
    Rejected(String),
    /// The peer aborted.
    #[error("peer aborted: {0}")]
    PeerAborted(String),
    /// We aborted (cancel, time limit, local failure).
    #[error("aborted: {0}")]
    Aborted(String),
    /// The page counts of the two sides differ: something was lost.
    #[error("page count mismatch: source sent {sent}, destination received {received}")]
    PageCount {
        /// Pages the source announced.
        sent: u64,
        /// Pages the destination got.
        received: u64,
    },
    /// The connection broke.
    #[error("connection lost in state {0}")]
    ConnectionLost(&'static str),
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::Welcome { .. } => "Welcome",
        Frame::Reject { .. } => "Reject",
        Frame::Pages(_) => "Pages",
        Frame::RoundEnd { .. } => "RoundEnd",
        Frame::RoundAck { .. } => "RoundAck",
        Frame::DeviceState { .. } => "DeviceState",
        Frame::Complete { .. } => "Complete",
        Frame::Ready => "Ready",
        Frame::Commit => "Commit",
        Frame::Resumed => "Resumed",
        Frame::Abort { .. } => "Abort",
    }
}

/// What the source engine must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAction {
    /// Send this frame on the control stream.
    Send(Frame),
    /// Step 3: switch dirty logging on and start round 0.
    StartPreCopy,
    /// Step 4: the destination has applied everything through `round` (`pages` in all); the
    /// round's time, measured until now, is what the link really carried.
    RoundAcked {
        /// The round.
        round: u32,
        /// Pages applied in all rounds.
        pages: u64,
    },
    /// Step 9: roll back: dirty logging off, throttle off, resume the vCPUs if paused.
    Rollback(ProtocolError),
    /// Step 8: the destination runs the VM; release ours (the VMM exits as migrated).
    Release,
    /// Step 10: the connection broke after Commit; keep the VM paused and report in doubt.
    InDoubt(ProtocolError),
}

/// States of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Not started.
    Idle,
    /// Step 1 sent, waiting for Welcome.
    Hello,
    /// Steps 3-4: pre-copy rounds.
    PreCopy,
    /// Step 5 sent, waiting for Ready.
    AwaitReady,
    /// Step 7 sent, waiting for Resumed.
    Committed,
    /// The destination runs the VM.
    Done,
    /// Rolled back: the VM runs here.
    RolledBack,
    /// Connection lost after Commit.
    InDoubt,
}

impl SourceState {
    fn name(self) -> &'static str {
        match self {
            SourceState::Idle => "idle",
            SourceState::Hello => "hello",
            SourceState::PreCopy => "pre-copy",
            SourceState::AwaitReady => "await-ready",
            SourceState::Committed => "committed",
            SourceState::Done => "done",
            SourceState::RolledBack => "rolled-back",
            SourceState::InDoubt => "in-doubt",
        }
    }
}

/// The source side.
#[derive(Debug)]
pub struct Source {
    state: SourceState,
    version: Option<u8>,
    round: u32,
    pages_total: u64,
    paused: bool,
}

impl Default for Source {
    fn default() -> Self {
        Self::new()
    }
}

impl Source {
    /// A source that has not started.
    pub fn new() -> Self {
        Source {
            state: SourceState::Idle,
            version: None,
            round: 0,
            pages_total: 0,
            paused: false,
        }
    }

    /// Current state.
    pub fn state(&self) -> SourceState {
        self.state
    }

    /// Whether the engine paused the VM for the switch-over (a rollback must resume it).
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The negotiated version.
    pub fn version(&self) -> Option<u8> {
        self.version
    }

    /// Step 1.
    pub fn start(
        &mut self,
        vm_id: String,
        memory_bytes: u64,
        vcpus: u8,
        token: [u8; 16],
    ) -> Vec<SourceAction> {
        assert_eq!(self.state, SourceState::Idle, "a Source starts once");
        self.state = SourceState::Hello;
        vec![SourceAction::Send(Frame::Hello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            vm_id,
            memory_bytes,
            vcpus,
            token,
        })]
    }

    /// Step 3/4: the engine finished sending round `round` with `pages` pages.
    pub fn round_sent(&mut self, pages: u64) -> Vec<SourceAction> {
        if self.state != SourceState::PreCopy {
            return Vec::new();
        }
        let round = self.round;
        self.round += 1;
        self.pages_total += pages;
        vec![SourceAction::Send(Frame::RoundEnd { round, pages })]
    }

    /// Step 5: the engine paused the vCPUs and sent the last `pages` dirty pages; `state` is
    /// the serialized device state.
    pub fn switch_over(&mut self, pages: u64, state: Vec<u8>) -> Vec<SourceAction> {
        if self.state != SourceState::PreCopy {
            return Vec::new();
        }
        self.paused = true;
        let mut out = self.round_sent(pages);
        self.state = SourceState::AwaitReady;
        out.push(SourceAction::Send(Frame::DeviceState { bytes: state }));
        out.push(SourceAction::Send(Frame::Complete {
            rounds: self.round,
            pages_total: self.pages_total,
        }));
        out
    }

    /// Marks the VM paused (the engine paused it for the switch-over before calling
    /// [`Source::switch_over`], so a failure in between still resumes it).
    pub fn vm_paused(&mut self) {
        self.paused = true;
    }

    /// Step 9 from our side: cancel, time limit, local failure.
    pub fn abort(&mut self, reason: &str) -> Vec<SourceAction> {
        match self.state {
            SourceState::Hello | SourceState::PreCopy | SourceState::AwaitReady => {
                self.state = SourceState::RolledBack;
                vec![
                    SourceAction::Send(Frame::Abort {
                        reason: reason.into(),
                    }),
                    SourceAction::Rollback(ProtocolError::Aborted(reason.into())),
                ]
            }
            SourceState::Idle => {
                self.state = SourceState::RolledBack;
                vec![SourceAction::Rollback(ProtocolError::Aborted(
                    reason.into(),
                ))]
            }
            // After Commit the source may not take the VM back.
            _ => Vec::new(),
        }
    }

    /// The connection broke (or timed out).
    pub fn connection_lost(&mut self) -> Vec<SourceAction> {
        let err = ProtocolError::ConnectionLost(self.state.name());
        match self.state {
            SourceState::Idle
            | SourceState::Hello
            | SourceState::PreCopy
            | SourceState::AwaitReady => {
                self.state = SourceState::RolledBack;
                vec![SourceAction::Rollback(err)]
            }
            SourceState::Committed => {
                self.state = SourceState::InDoubt;
                vec![SourceAction::InDoubt(err)]
            }
            _ => Vec::new(),
        }
    }

    /// A frame from the destination's control stream.
    pub fn on_frame(&mut self, frame: Frame) -> Vec<SourceAction> {
        let unexpected = |s: &Self, f: &Frame| ProtocolError::Unexpected {
            frame: frame_name(f),
            state: s.state.name(),
        };
        match (self.state, frame) {
            (SourceState::Hello, Frame::Welcome { version }) => {
                if !SUPPORTED_VERSIONS.contains(&version) {
                    return self.fail(ProtocolError::Version {
                        ours: SUPPORTED_VERSIONS.to_vec(),
                        theirs: vec![version],
                    });
                }
                self.version = Some(version);
                self.state = SourceState::PreCopy;
                vec![SourceAction::StartPreCopy]
            }
            (SourceState::Hello, Frame::Reject { reason }) => {
                self.state = SourceState::RolledBack;
                vec![SourceAction::Rollback(ProtocolError::Rejected(reason))]
            }
            (SourceState::PreCopy, Frame::RoundAck { round, pages }) => {
                vec![SourceAction::RoundAcked { round, pages }]
            }
            // The final round is acknowledged too; by then only Ready matters.
            (SourceState::AwaitReady, Frame::RoundAck { .. }) => Vec::new(),
            (SourceState::AwaitReady, Frame::Ready) => {
                self.state = SourceState::Committed;
                vec![SourceAction::Send(Frame::Commit)]
            }
            (SourceState::Committed, Frame::Resumed) => {
                self.state = SourceState::Done;
                vec![SourceAction::Release]
            }
            (
                SourceState::Hello | SourceState::PreCopy | SourceState::AwaitReady,
                Frame::Abort { reason },
            ) => {
                self.state = SourceState::RolledBack;
                vec![SourceAction::Rollback(ProtocolError::PeerAborted(reason))]
            }
            (_, f) => {
                let err = unexpected(self, &f);
                self.fail(err)
            }
        }
    }

    fn fail(&mut self, err: ProtocolError) -> Vec<SourceAction> {
        match self.state {
            SourceState::Committed => {
                self.state = SourceState::InDoubt;
                vec![SourceAction::InDoubt(err)]
            }
            SourceState::Done | SourceState::RolledBack | SourceState::InDoubt => Vec::new(),
            _ => {
                self.state = SourceState::RolledBack;
                vec![
                    SourceAction::Send(Frame::Abort {
                        reason: err.to_string(),
                    }),
                    SourceAction::Rollback(err),
                ]
            }
        }
    }
}

/// What the destination engine must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestAction {
    /// Send this frame on the control stream.
    Send(Frame),
    /// Step 2: check that a VM of this shape can be hosted; answer with
    /// [`Destination::admit`] or [`Destination::refuse`].
    CheckAdmission {
        /// The VM's id.
        vm_id: String,
        /// Its memory.
        memory_bytes: u64,
        /// Its vCPUs.
        vcpus: u8,
        /// The token the source presented.
        token: [u8; 16],
    },
    /// Step 4: once `total` pages have been applied, send
    /// `RoundAck { round, pages: applied }`.
    AckRound {
        /// The round.
        round: u32,
        /// Pages announced through this round.
        total: u64,
    },
    /// Step 6: wait until every data stream has ended, then call
    /// [`Destination::data_complete`] with the pages received.
    DrainData,
    /// Step 6: load this device state into the paused VM, then call
    /// [`Destination::state_loaded`].
    LoadState(Vec<u8>),
    /// Step 8: resume the vCPUs (then the engine reports [`Destination::resumed`]).
    Resume,
    /// Step 9: discard everything received; the VMM exits and leaves nothing behind.
    Discard(ProtocolError),
}

/// States of the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestState {
    /// Waiting for Hello.
    AwaitHello,
    /// Checking admission.
    Admitting,
    /// Receiving rounds.
    Receiving,
    /// Complete received; draining data and loading state.
    Finishing,
    /// Ready sent, waiting for Commit.
    AwaitCommit,
    /// Commit received; resuming.
    Resuming,
    /// The VM runs here.
    Done,
    /// Discarded.
    Discarded,
}

impl DestState {
    fn name(self) -> &'static str {
        match self {
            DestState::AwaitHello => "await-hello",
            DestState::Admitting => "admitting",
            DestState::Receiving => "receiving",
            DestState::Finishing => "finishing",
            DestState::AwaitCommit => "await-commit",
            DestState::Resuming => "resuming",
            DestState::Done => "done",
            DestState::Discarded => "discarded",
        }
    }
}

/// The destination side.
#[derive(Debug)]
pub struct Destination {
    state: DestState,
    version: Option<u8>,
    announced: u64,
    rounds: u32,
    expected_total: Option<u64>,
    received: Option<u64>,
    state_loaded: bool,
}

impl Default for Destination {
    fn default() -> Self {
        Self::new()
    }
}

impl Destination {
    /// A destination waiting for Hello.
    pub fn new() -> Self {
        Destination {
            state: DestState::AwaitHello,
            version: None,
            announced: 0,
            rounds: 0,
            expected_total: None,
            received: None,
            state_loaded: false,
        }
    }

    /// Current state.
    pub fn state(&self) -> DestState {
        self.state
    }

    /// Pages the source said it sent in all, once `Complete` arrived.
    pub fn expected_total(&self) -> Option<u64> {
        self.expected_total
    }

    /// Step 2: the VM fits here.
    pub fn admit(&mut self) -> Vec<DestAction> {
        if self.state != DestState::Admitting {
            return Vec::new();
        }
        self.state = DestState::Receiving;
        vec![DestAction::Send(Frame::Welcome {
            version: self.version.expect("set with Hello"),
        })]
    }

    /// Step 2: the VM does not fit (or the token is wrong).
    pub fn refuse(&mut self, reason: &str) -> Vec<DestAction> {
        self.state = DestState::Discarded;
        vec![
            DestAction::Send(Frame::Reject {
                reason: reason.into(),
            }),
            DestAction::Discard(ProtocolError::Aborted(format!("refused: {reason}"))),
        ]
    }

    /// Step 6: every data stream ended, with `pages` pages received in all.
    pub fn data_complete(&mut self, pages: u64) -> Vec<DestAction> {
        if self.state != DestState::Finishing {
            return Vec::new();
        }
        self.received = Some(pages);
        self.maybe_ready()
    }

    /// Step 6: the device state loaded into the VM.
    pub fn state_loaded(&mut self) -> Vec<DestAction> {
        // The state arrives before Complete, so it may load while rounds are still open.
        if !matches!(self.state, DestState::Receiving | DestState::Finishing) {
            return Vec::new();
        }
        self.state_loaded = true;
        self.maybe_ready()
    }

    /// Step 8: the vCPUs run.
    pub fn resumed(&mut self) -> Vec<DestAction> {
        if self.state != DestState::Resuming {
            return Vec::new();
        }
        self.state = DestState::Done;
        vec![DestAction::Send(Frame::Resumed)]
    }

    /// A local failure (memory, state that does not load): abort before Commit.
    pub fn abort(&mut self, reason: &str) -> Vec<DestAction> {
        match self.state {
            DestState::Done | DestState::Resuming | DestState::Discarded => Vec::new(),
            _ => {
                self.state = DestState::Discarded;
                vec![
                    DestAction::Send(Frame::Abort {
                        reason: reason.into(),
                    }),
                    DestAction::Discard(ProtocolError::Aborted(reason.into())),
                ]
            }
        }
    }

    /// The connection broke: before Commit everything is discarded; after it the VM is ours.
    pub fn connection_lost(&mut self) -> Vec<DestAction> {
        match self.state {
            DestState::Done | DestState::Discarded => Vec::new(),
            DestState::Resuming => Vec::new(),
            s => {
                self.state = DestState::Discarded;
                vec![DestAction::Discard(ProtocolError::ConnectionLost(s.name()))]
            }
        }
    }

    fn maybe_ready(&mut self) -> Vec<DestAction> {
        let (Some(received), Some(expected)) = (self.received, self.expected_total) else {
            return Vec::new();
        };
        if received != expected || self.announced != expected {
            return self.abort(
                &ProtocolError::PageCount {
                    sent: expected,
                    received,
                }
                .to_string(),
            );
        }
        if !self.state_loaded {
            return Vec::new();
        }
        self.state = DestState::AwaitCommit;
        vec![DestAction::Send(Frame::Ready)]
    }

    /// A frame from the source's control stream.
    pub fn on_frame(&mut self, frame: Frame) -> Vec<DestAction> {
        match (self.state, frame) {
            (
                DestState::AwaitHello,
                Frame::Hello {
                    versions,
                    vm_id,
                    memory_bytes,
                    vcpus,
                    token,
                },
            ) => {
                let Some(v) = SUPPORTED_VERSIONS.iter().find(|v| versions.contains(v)) else {
                    let err = ProtocolError::Version {
                        ours: SUPPORTED_VERSIONS.to_vec(),
                        theirs: versions,
                    };
                    self.state = DestState::Discarded;
                    return vec![
                        DestAction::Send(Frame::Reject {
                            reason: err.to_string(),
                        }),
                        DestAction::Discard(err),
                    ];
                };
                self.version = Some(*v);
                self.state = DestState::Admitting;
                vec![DestAction::CheckAdmission {
                    vm_id,
                    memory_bytes,
                    vcpus,
                    token,
                }]
            }
            (DestState::Receiving, Frame::RoundEnd { round, pages }) => {
                if round != self.rounds {
                    return self.abort(&format!(
                        "round {round} ended, expected round {}",
                        self.rounds
                    ));
                }
                self.rounds += 1;
                self.announced += pages;
                vec![DestAction::AckRound {
                    round,
                    total: self.announced,
                }]
            }
            (DestState::Receiving, Frame::DeviceState { bytes }) => {
                vec![DestAction::LoadState(bytes)]
            }
            (
                DestState::Receiving,
                Frame::Complete {
                    rounds,
                    pages_total,
                },
            ) => {
                if rounds != self.rounds {
                    return self.abort(&format!(
                        "source ended after {rounds} rounds, {} announced",
                        self.rounds
                    ));
                }
                self.expected_total = Some(pages_total);
                self.state = DestState::Finishing;
                let mut out = vec![DestAction::DrainData];
                out.extend(self.maybe_ready());
                out
            }
            (DestState::AwaitCommit, Frame::Commit) => {
                self.state = DestState::Resuming;
                vec![DestAction::Resume]
            }
            (DestState::Done | DestState::Resuming, Frame::Abort { .. }) => Vec::new(),
            (_, Frame::Abort { reason }) => {
                self.state = DestState::Discarded;
                vec![DestAction::Discard(ProtocolError::PeerAborted(reason))]
            }
            (state, f) => {
                let reason = ProtocolError::Unexpected {
                    frame: frame_name(&f),
                    state: state.name(),
                }
                .to_string();
                self.abort(&reason)
            }
        }
    }
}

/// Measurements of one pre-copy round, for the convergence decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundStats {
    /// Pages sent in the round.
    pub pages_sent: u64,
    /// Bytes put on the wire in the round.
    pub wire_bytes: u64,
    /// How long sending took.
    pub duration: Duration,
    /// Pages found dirty at the end of the round (what the next round must send).
    pub dirty_pages: u64,
    /// Time since the migration started.
    pub elapsed: Duration,
}

/// Convergence policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Longest acceptable downtime.
    pub downtime_limit: Duration,
    /// Give up (or force) after this long.
    pub time_limit: Duration,
    /// What to do at the time limit.
    pub on_time_limit: TimeLimitAction,
    /// Enable auto-converge (vCPU throttling).
    pub auto_converge: bool,
    /// First throttle step, in percent of each time slice the vCPUs are held.
    pub throttle_initial: u8,
    /// Throttle increment per non-converging round.
    pub throttle_step: u8,
    /// Largest throttle.
    pub throttle_max: u8,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            downtime_limit: Duration::from_millis(50),
            time_limit: Duration::from_secs(300),
            on_time_limit: TimeLimitAction::Cancel,
            auto_converge: true,
            throttle_initial: 20,
            throttle_step: 10,
            throttle_max: 99,
        }
    }
}

/// What happens when the time limit passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeLimitAction {
    /// Cancel: the VM stays on the source.
    Cancel,
    /// Switch over anyway, accepting a longer downtime.
    Force,
}

/// The decision after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Run another round with the vCPUs throttled by this percentage (0 = none).
    Continue {
        /// Throttle percentage.
        throttle: u8,
    },
    /// Pause and send the rest: predicted downtime is acceptable.
    SwitchOver {
        /// The prediction.
        predicted: Duration,
    },
    /// The time limit passed with the cancel policy.
    Cancel,
}

/// Rounds a migration may add, once the prediction is within the limit, to shrink the
/// downtime further.
pub const MAX_EXTRA_ROUNDS: u32 = 4;

/// Pure convergence control: predicts the downtime from the last round's throughput and the
/// dirty pages left, and raises the throttle when a round did not shrink the dirty set.
#[derive(Debug, Clone)]
pub struct Convergence {
    policy: Policy,
    throttle: u8,
    /// Rounds run although the prediction was already within the limit.
    extra_rounds: u32,
    last_dirty: Option<u64>,
    /// Bytes per second the link carried in the last round.
    throughput: f64,
}

impl Convergence {
    /// A controller with `policy`.
    pub fn new(policy: Policy) -> Self {
        Convergence {
            policy,
            throttle: 0,
            extra_rounds: 0,
            last_dirty: None,
            throughput: 0.0,
        }
    }

    /// Current throttle percentage.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// Link throughput measured in the last round (bytes on the wire per second).
    pub fn throughput(&self) -> f64 {
        self.throughput
    }

    /// Predicted downtime to send `dirty_pages` at the measured throughput.
    pub fn predict(&self, dirty_pages: u64) -> Duration {
        if self.throughput <= 0.0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64(dirty_pages as f64 * 4096.0 / self.throughput)
    }

    /// Decides after a round.
    pub fn after_round(&mut self, s: RoundStats) -> Decision {
        if s.wire_bytes > 0 && !s.duration.is_zero() {
            // Bytes on the wire per second. A dirty page is assumed to cost a whole page on
            // the wire (zero and compressible pages cost less), so the prediction errs on the
            // long side and never switches over too early.
            self.throughput = s.wire_bytes as f64 / s.duration.as_secs_f64();
        }
        let predicted = self.predict(s.dirty_pages);
        // Within the limit, a cheap extra round that keeps shrinking the dirty set buys a
        // shorter downtime; stop when the set is tiny, stops shrinking, or after a few.
        let shrinking = self
            .last_dirty
            .is_some_and(|prev| s.dirty_pages * 4 <= prev * 3);
        if s.dirty_pages == 0
            || predicted <= self.policy.downtime_limit / 8
            || (predicted <= self.policy.downtime_limit
                && (!shrinking || self.extra_rounds >= MAX_EXTRA_ROUNDS))
        {
            return Decision::SwitchOver { predicted };
        }
        if predicted <= self.policy.downtime_limit {
            self.extra_rounds += 1;
            self.last_dirty = Some(s.dirty_pages);
            return Decision::Continue {
                throttle: self.throttle,
            };
        }
        if s.elapsed >= self.policy.time_limit {
            return match self.policy.on_time_limit {
                TimeLimitAction::Cancel => Decision::Cancel,
                TimeLimitAction::Force => Decision::SwitchOver { predicted },
            };
        }
        // Not converging: the dirty set did not shrink by at least a quarter.
        let stuck = self.last_dirty.is_some() && !shrinking;
        if self.policy.auto_converge && stuck {
            self.throttle = if self.throttle == 0 {
                self.policy.throttle_initial
            } else {
                self.throttle
                    .saturating_add(self.policy.throttle_step)
                    .min(self.policy.throttle_max)
            };
        }
        self.last_dirty = Some(s.dirty_pages);
        Decision::Continue {
            throttle: self.throttle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A simulated link: frames queue in each direction and can be dropped from a point on.
    #[derive(Default)]
    struct Link {
        to_dest: VecDeque<Frame>,
        to_source: VecDeque<Frame>,
        cut: bool,
    }

    struct Sim {
        src: Source,
        dst: Destination,
        link: Link,
        src_log: Vec<SourceAction>,
        dst_log: Vec<DestAction>,
        /// Pages the data streams deliver (may differ from what was sent, to simulate loss).
        delivered: u64,
        admit: bool,
    }

    impl Sim {
        fn new() -> Self {
            Sim {
                src: Source::new(),
                dst: Destination::new(),
                link: Link::default(),
                src_log: Vec::new(),
                dst_log: Vec::new(),
                delivered: 0,
                admit: true,
            }
        }

        fn src_do(&mut self, actions: Vec<SourceAction>) {
            for a in actions {
                if let SourceAction::Send(f) = &a {
                    if !self.link.cut {
                        self.link.to_dest.push_back(f.clone());
                    }
                }
                self.src_log.push(a);
            }
        }

        fn dst_do(&mut self, actions: Vec<DestAction>) {
            for a in actions {
                match &a {
                    DestAction::Send(f) if !self.link.cut => {
                        self.link.to_source.push_back(f.clone())
                    }
                    DestAction::CheckAdmission { .. } => {
                        let next = if self.admit {
                            self.dst.admit()
                        } else {
                            self.dst.refuse("not enough memory")
                        };
                        self.dst_log.push(a);
                        self.dst_do(next);
                        continue;
                    }
                    DestAction::AckRound { round, .. } if !self.link.cut => {
                        self.link.to_source.push_back(Frame::RoundAck {
                            round: *round,
                            pages: self.delivered,
                        });
                    }
                    DestAction::DrainData => {
                        let n = self.delivered;
                        self.dst_log.push(a);
                        let next = self.dst.data_complete(n);
                        self.dst_do(next);
                        continue;
                    }
                    DestAction::LoadState(_) => {
                        self.dst_log.push(a);
                        let next = self.dst.state_loaded();
                        self.dst_do(next);
                        continue;
                    }
                    DestAction::Resume => {
                        self.dst_log.push(a);
                        let next = self.dst.resumed();
                        self.dst_do(next);
                        continue;
                    }
                    _ => {}
                }
                self.dst_log.push(a);
            }
        }

        /// Delivers queued frames until both queues are empty.
        fn run(&mut self) {
            loop {
                if let Some(f) = self.link.to_dest.pop_front() {
                    let a = self.dst.on_frame(f);
                    self.dst_do(a);
                } else if let Some(f) = self.link.to_source.pop_front() {
                    let a = self.src.on_frame(f);
                    self.src_do(a);
                } else {
                    break;
                }
            }
        }

        fn start(&mut self) {
            let a = self.src.start("vm".into(), 1 << 30, 2, [7; 16]);
            self.src_do(a);
            self.run();
        }

        fn round(&mut self, pages: u64) {
            self.delivered += pages;
            let a = self.src.round_sent(pages);
            self.src_do(a);
            self.run();
        }

        fn switch_over(&mut self, pages: u64) {
            self.delivered += pages;
            self.src.vm_paused();
            let a = self.src.switch_over(pages, vec![1, 2, 3]);
            self.src_do(a);
            self.run();
        }
    }

    #[test]
    fn a_migration_commits_and_exactly_one_side_runs() {
        let mut s = Sim::new();
        s.start();
        assert_eq!(s.src.state(), SourceState::PreCopy);
        assert!(s.src_log.contains(&SourceAction::StartPreCopy));
        s.round(1000);
        s.round(100);
        s.switch_over(10);
        assert_eq!(s.src.state(), SourceState::Done);
        assert_eq!(s.dst.state(), DestState::Done);
        // Every pre-copy round was acknowledged with what the destination had applied.
        assert!(s.src_log.contains(&SourceAction::RoundAcked {
            round: 0,
            pages: 1000
        }));
        assert!(s.src_log.contains(&SourceAction::RoundAcked {
            round: 1,
            pages: 1100
        }));
        assert_eq!(s.src_log.last(), Some(&SourceAction::Release));
        // The destination resumed only after Commit, and the source released only after Resumed.
        assert!(s.dst_log.contains(&DestAction::Resume));
        assert!(!s
            .src_log
            .iter()
            .any(|a| matches!(a, SourceAction::Rollback(_))));
    }

    #[test]
    fn a_refused_migration_rolls_back() {
        let mut s = Sim::new();
        s.admit = false;
        s.start();
        assert_eq!(s.src.state(), SourceState::RolledBack);
        assert!(
            matches!(s.src_log.last(), Some(SourceAction::Rollback(ProtocolError::Rejected(r))) if r.contains("memory"))
        );
        assert_eq!(s.dst.state(), DestState::Discarded);
    }

    #[test]
    fn a_version_mismatch_is_refused_by_the_destination() {
        let mut dst = Destination::new();
        let out = dst.on_frame(Frame::Hello {
            versions: vec![9],
            vm_id: "vm".into(),
            memory_bytes: 1,
            vcpus: 1,
            token: [0; 16],
        });
        assert!(
            matches!(&out[0], DestAction::Send(Frame::Reject { reason }) if reason.contains("no common protocol version"))
        );
        assert_eq!(dst.state(), DestState::Discarded);
        let mut src = Source::new();
        src.start("vm".into(), 1, 1, [0; 16]);
        let out = src.on_frame(Frame::Welcome { version: 9 });
        assert!(matches!(
            out.last(),
            Some(SourceAction::Rollback(ProtocolError::Version { .. }))
        ));
    }

    #[test]
    fn lost_pages_are_caught_before_commit() {
        let mut s = Sim::new();
        s.start();
        s.round(1000);
        s.delivered -= 1; // one page never arrived
        s.switch_over(5);
        assert_eq!(s.dst.state(), DestState::Discarded);
        assert_eq!(s.src.state(), SourceState::RolledBack);
        assert!(s.src_log.iter().any(|a| matches!(a, SourceAction::Rollback(ProtocolError::PeerAborted(r)) if r.contains("page count mismatch"))));
        assert!(!s.dst_log.contains(&DestAction::Resume));
    }

    #[test]
    fn a_cut_before_commit_rolls_back_and_after_commit_is_in_doubt() {
        // Cut during pre-copy.
        let mut s = Sim::new();
        s.start();
        s.round(10);
        s.link.cut = true;
        let a = s.src.connection_lost();
        assert!(matches!(
            &a[..],
            [SourceAction::Rollback(ProtocolError::ConnectionLost(
                "pre-copy"
            ))]
        ));
        let d = s.dst.connection_lost();
        assert!(matches!(&d[..], [DestAction::Discard(_)]));

        // Cut after Commit was sent but before Resumed arrived: the source never resumes.
        let mut s = Sim::new();
        s.start();
        s.round(10);
        s.delivered += 0;
        s.src.vm_paused();
        let a = s.src.switch_over(1, vec![]);
        s.delivered += 1;
        s.src_do(a);
        // Deliver up to Ready and Commit, then cut before Resumed comes back.
        while let Some(f) = s.link.to_dest.pop_front() {
            let a = s.dst.on_frame(f);
            s.dst_do(a);
        }
        // The final round's acknowledgement comes first; the source takes no action on it.
        let ack = s.link.to_source.pop_front().unwrap();
        assert!(
            matches!(
                ack,
                Frame::RoundAck {
                    round: 1,
                    pages: 11
                }
            ),
            "{ack:?}"
        );
        assert!(s.src.on_frame(ack).is_empty());
        let ready = s.link.to_source.pop_front().unwrap();
        assert_eq!(ready, Frame::Ready);
        let a = s.src.on_frame(ready);
        assert_eq!(a, vec![SourceAction::Send(Frame::Commit)]);
        let a = s.src.connection_lost();
        assert!(matches!(&a[..], [SourceAction::InDoubt(_)]));
        assert_eq!(s.src.state(), SourceState::InDoubt);
        // Cancel after Commit changes nothing.
        assert!(s.src.abort("operator cancel").is_empty());
    }

    #[test]
    fn cancel_during_precopy_tells_the_destination() {
        let mut s = Sim::new();
        s.start();
        s.round(10);
        let a = s.src.abort("cancelled by operator");
        s.src_do(a);
        s.run();
        assert_eq!(s.src.state(), SourceState::RolledBack);
        assert_eq!(s.dst.state(), DestState::Discarded);
        assert!(s.dst_log.iter().any(|a| matches!(a, DestAction::Discard(ProtocolError::PeerAborted(r)) if r.contains("operator"))));
    }

    #[test]
    fn frames_out_of_order_abort() {
        let mut dst = Destination::new();
        let out = dst.on_frame(Frame::Commit);
        assert!(
            matches!(&out[0], DestAction::Send(Frame::Abort { reason }) if reason.contains("unexpected Commit"))
        );
        let mut src = Source::new();
        src.start("vm".into(), 1, 1, [0; 16]);
        let out = src.on_frame(Frame::Resumed);
        assert!(matches!(
            out.last(),
            Some(SourceAction::Rollback(ProtocolError::Unexpected { .. }))
        ));
    }

    #[test]
    fn convergence_switches_over_throttles_and_honours_the_time_limit() {
        let secs = Duration::from_secs;
        let stats = |sent: u64, dur_ms: u64, dirty: u64, elapsed: u64| RoundStats {
            pages_sent: sent,
            wire_bytes: sent * 4096,
            duration: Duration::from_millis(dur_ms),
            dirty_pages: dirty,
            elapsed: secs(elapsed),
        };
        // 1 GB/s: 250k pages per second. 10k pages left -> ~41 ms: switch over.
        let mut c = Convergence::new(Policy::default());
        assert!(matches!(
            c.after_round(stats(250_000, 1000, 10_000, 1)),
            Decision::SwitchOver { .. }
        ));
        // 100k dirty pages (~400 ms): continue, unthrottled at first, then throttled when stuck.
        let mut c = Convergence::new(Policy::default());
        assert_eq!(
            c.after_round(stats(250_000, 1000, 100_000, 1)),
            Decision::Continue { throttle: 0 }
        );
        assert_eq!(
            c.after_round(stats(100_000, 400, 100_000, 2)),
            Decision::Continue { throttle: 20 }
        );
        assert_eq!(
            c.after_round(stats(100_000, 400, 99_000, 3)),
            Decision::Continue { throttle: 30 }
        );
        // Shrinking by more than a quarter keeps the throttle where it is.
        assert_eq!(
            c.after_round(stats(100_000, 400, 50_000, 4)),
            Decision::Continue { throttle: 30 }
        );
        // Within the limit but still shrinking: a few extra rounds to cut the downtime.
        let mut e = Convergence::new(Policy::default());
        e.after_round(stats(250_000, 1000, 100_000, 1));
        assert_eq!(
            e.after_round(stats(100_000, 400, 10_000, 2)),
            Decision::Continue { throttle: 0 }
        );
        assert_eq!(
            e.after_round(stats(10_000, 40, 2_000, 2)),
            Decision::Continue { throttle: 0 }
        );
        // Tiny (under an eighth of the limit): switch at once.
        assert!(matches!(
            e.after_round(stats(2_000, 8, 1_500, 2)),
            Decision::SwitchOver { .. }
        ));
        // Within the limit and no longer shrinking: switch.
        let mut f = Convergence::new(Policy::default());
        f.after_round(stats(250_000, 1000, 100_000, 1));
        f.after_round(stats(100_000, 400, 10_000, 2));
        assert!(matches!(
            f.after_round(stats(10_000, 40, 9_000, 2)),
            Decision::SwitchOver { .. }
        ));
        // Time limit: cancel by default, force if asked.
        assert_eq!(
            c.after_round(stats(100_000, 400, 50_000, 400)),
            Decision::Cancel
        );
        let mut c = Convergence::new(Policy {
            on_time_limit: TimeLimitAction::Force,
            ..Policy::default()
        });
        assert!(matches!(
            c.after_round(stats(100_000, 400, 50_000, 400)),
            Decision::SwitchOver { .. }
        ));
        // Nothing dirty: switch over at once.
        let mut c = Convergence::new(Policy::default());
        assert!(matches!(
            c.after_round(stats(10, 1, 0, 0)),
            Decision::SwitchOver { .. }
        ));
    }
}
