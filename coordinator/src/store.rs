//! Durable Raft storage: the log in a write-ahead file ([`crate::wal`]), the vote, the state
//! machine and its snapshot in one `redb` file.
//!
//! `<dir>/wal/wal-*.log`: every log entry (JSON), truncations, purges and the committed marker,
//! group-committed by the WAL's writer thread (one `fdatasync` per batch). The entries after
//! the purge point are also kept in memory for readers.
//!
//! Layout of `<dir>/raft.redb`:
//!
//! | table       | key                      | value                                   |
//! |-------------|--------------------------|-----------------------------------------|
//! | `meta`      | "vote"                   | JSON                                    |
//! | `sm`        | "host/ID", "vm/ID", "mig/ID" | record (JSON)                       |
//! | `sm_meta`   | "applied", "membership", "event_seq" | JSON                         |
//! | `snapshot`  | "meta", "data"           | SnapshotMeta (JSON), framed snapshot    |
//!
//! Durability: `append` returns as soon as the entries are readable and queued; openraft's
//! `LogFlushed` callback runs only after the `fdatasync` that covers them, so the leader counts
//! an entry (its own or a follower's) toward the majority only once it is on that node's disk.
//! Truncations, purges and votes are durable before they return. The committed marker is not
//! waited for (losing it only means re-learning it). State machine applies commit with
//! `Durability::None`: they become durable with the next durable redb commit (a vote or a
//! snapshot); after a crash the state machine reloads at its last durable applied index and is
//! brought forward by replaying the log, which is never purged beyond a snapshot that was
//! committed durably first.
//!
//! Snapshot data: `NCSNAP01` magic, u32 version, u32 CRC-32 of the body, then the JSON body
//! (the whole [`ClusterState`]). The loader checks all three before trusting the body.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::state::{ClusterState, Command, Event, Host, Key, Reply, StateError};
use crate::wal::{Job, Record, Wal, WalError, Writer};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("sm");
const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const SNAP_MAGIC: &[u8; 8] = b"NCSNAP01";
const SNAP_VERSION: u32 = 1;
/// Events kept in memory for `WatchEvents` from an older sequence number.
const EVENTS_KEPT: usize = 4096;

openraft::declare_raft_types!(
    /// openraft's type configuration for the coordinator.
    pub TypeConfig:
        D = Proposal,
        R = Applied,
        NodeId = u64,
        Node = BasicNode,
);

/// The payload of one normal log entry: a batch of client commands, applied in order, each on
/// its own (a refused command changes nothing and does not affect the others). The leader packs
/// the writes that queue up while its earlier entries are in flight into one entry, so that one
/// entry, one replication message and one fsync per node carry them all (group commit).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proposal(pub Vec<Command>);

/// The result of applying one log entry: one result per command of its [`Proposal`] (none for
/// blank and membership entries).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied(pub Vec<Result<Reply, StateError>>);

/// Node id.
pub type NodeId = u64;
type SErr = StorageError<NodeId>;

/// Errors opening the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The redb file could not be opened or created.
    #[error("open {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: redb::DatabaseError,
    },
    /// A table or record could not be read at startup.
    #[error("load {what}: {source}")]
    Load {
        /// What was loaded.
        what: &'static str,
        /// Cause.
        #[source]
        source: AnyError,
    },
    /// The snapshot's frame is damaged.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The Raft log's WAL could not be opened or replayed.
    #[error("raft log: {0}")]
    Wal(#[from] WalError),
}

/// `StorageError` constructors (openraft builds them from `StorageIOError`).
mod io {
    use openraft::storage::SnapshotSignature;
    use openraft::{AnyError, StorageError, StorageIOError};

    type E = StorageError<u64>;
    pub fn write_logs(e: AnyError) -> E {
        StorageIOError::write_logs(e).into()
    }
    pub fn write_vote(e: AnyError) -> E {
        StorageIOError::write_vote(e).into()
    }
    pub fn read_vote(e: AnyError) -> E {
        StorageIOError::read_vote(e).into()
    }
    pub fn write_state_machine(e: AnyError) -> E {
        StorageIOError::write_state_machine(e).into()
    }
    pub fn write_snapshot(sig: Option<SnapshotSignature<u64>>, e: AnyError) -> E {
        StorageIOError::write_snapshot(sig, e).into()
    }
    pub fn read_snapshot(sig: Option<SnapshotSignature<u64>>, e: AnyError) -> E {
        StorageIOError::read_snapshot(sig, e).into()
    }
}

fn any<E: std::error::Error + 'static>(e: E) -> AnyError {
    AnyError::new(&e)
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("raft types serialize to JSON")
}

/// Opens (or creates) the store in `dir`: the Raft log in `dir/wal/`, the rest in `dir/raft.redb`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let path = dir.join("raft.redb");
    let db = Database::create(&path).map_err(|source| StoreError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let db = Arc::new(db);
    let load = |what, e: AnyError| StoreError::Load { what, source: e };
    // Create the tables so that readers never see them missing.
    {
        let tx = db.begin_write().map_err(|e| load("tables", any(e)))?;
        for t in [META, SM, SM_META, SNAPSHOT] {
            tx.open_table(t).map_err(|e| load("tables", any(e)))?;
        }
        tx.commit().map_err(|e| load("tables", any(e)))?;
    }
    let mut sm = StateMachineStore::load(db.clone()).map_err(|e| load("state machine", e))?;
    let (wal, rec) = Wal::open(&dir.join("wal"))?;
    if rec.torn_bytes > 0 {
        tracing::warn!(
            torn_bytes = rec.torn_bytes,
            "raft log: a torn tail from a crash was cut"
        );
    }
    let mut mem = LogMem::default();
    for (index, data) in rec.entries {
        let e: Entry<TypeConfig> =
            serde_json::from_slice(&data).map_err(|e| load("log entry", any(e)))?;
        if e.log_id.index != index {
            return Err(StoreError::Load {
                what: "log entry",
                source: AnyError::error(format!(
                    "record for index {index} holds entry {}",
                    e.log_id
                )),
            });
        }
        mem.entries.insert(index, e);
    }
    if let Some((_, id)) = rec.purged {
        mem.purged = serde_json::from_slice(&id).map_err(|e| load("purged log id", any(e)))?;
    }
    if let Some(c) = rec.committed {
        mem.committed = serde_json::from_slice(&c).map_err(|e| load("committed log id", any(e)))?;
    }
    let last = mem.last_log_id().map(|l| l.index).unwrap_or(0);
    let log = LogStore {
        db,
        mem: Arc::new(Mutex::new(mem)),
        wal: Writer::spawn(wal),
        last_index: Arc::new(AtomicU64::new(last)),
    };
    sm.log_last_index = log.last_index.clone();
    Ok((log, sm))
}

// ---------------------------------------------------------------------------------------------
// Log store

/// The log as readers see it: every entry after the purge point, in memory (the WAL is only
/// read at open). The snapshot policy bounds it (`--snapshot-every` + `--keep-after-snapshot`).
#[derive(Default)]
struct LogMem {
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

impl LogMem {
    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.entries
            .last_key_value()
            .map(|(_, e)| e.log_id)
            .or(self.purged)
    }
}

/// The Raft log (in the WAL) and the vote (in redb).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    mem: Arc<Mutex<LogMem>>,
    wal: Writer,
    /// Index of the last entry in the log (0 when empty), shared with the state machine store
    /// so that the leader can use it as its read barrier (see `Node::read_index_local`).
    last_index: Arc<AtomicU64>,
}

fn wal_err(e: Arc<WalError>) -> AnyError {
    AnyError::error(e.to_string())
}

impl LogStore {
    fn mem(&self) -> std::sync::MutexGuard<'_, LogMem> {
        self.mem.lock().expect("log lock")
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, AnyError> {
        let tx = self.db.begin_read().map_err(any)?;
        let t = tx.open_table(META).map_err(any)?;
        let Some(v) = t.get(key).map_err(any)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value()).map(Some).map_err(any)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        Ok(self
            .mem()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let m = self.mem();
        Ok(LogState {
            last_purged_log_id: m.purged,
            last_log_id: m.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        // Rare (elections): a durable redb commit, which also persists earlier state-machine
        // commits.
        let v = to_json(vote);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), AnyError> {
            let mut tx = db.begin_write().map_err(any)?;
            tx.set_durability(Durability::Immediate).map_err(any)?;
            {
                let mut t = tx.open_table(META).map_err(any)?;
                t.insert("vote", v.as_slice()).map_err(any)?;
            }
            tx.commit().map_err(any)
        })
        .await
        .map_err(|e| io::write_vote(any(e)))?
        .map_err(io::write_vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.get_meta("vote").map_err(io::read_vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // Written behind the entries it covers, synced with the next batch; not waited for:
        // losing it only means re-learning it from the leader (reads use the read barrier).
        self.mem().committed = committed;
        let done: crate::wal::Done = Box::new(|_| {});
        self.wal
            .send(Job {
                records: vec![Record::Committed(to_json(&committed))],
                durable: false,
                delete_purged: false,
                done,
            })
            .map_err(|e| io::write_logs(any(e)))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self.mem().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id.index) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let records: Vec<Record> = entries
            .iter()
            .map(|e| Record::Entry {
                index: e.log_id.index,
                data: to_json(e),
            })
            .collect();
        {
            // Readable at once (openraft replicates from here); durable when the callback runs.
            let mut m = self.mem();
            m.entries.split_off(&entries[0].log_id.index);
            for e in entries {
                m.entries.insert(e.log_id.index, e);
            }
        }
        self.last_index.store(last, Ordering::SeqCst);
        // Only after the fsync does openraft learn that the entries are durable: the leader
        // counts an entry (its own or a follower's) toward the majority only then.
        let done: crate::wal::Done = Box::new(move |r| {
            callback.log_io_completed(r.map_err(|e| std::io::Error::other(e.to_string())))
        });
        self.wal
            .send(Job {
                records,
                durable: true,
                delete_purged: false,
                done,
            })
            .map_err(|e| io::write_logs(any(e)))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.mem().entries.split_off(&log_id.index);
        self.last_index
            .store(log_id.index.saturating_sub(1), Ordering::SeqCst);
        self.wal
            .write(vec![Record::Truncate { from: log_id.index }], true, false)
            .await
            .map_err(|e| io::write_logs(wal_err(e)))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        {
            let mut m = self.mem();
            m.entries = m.entries.split_off(&(log_id.index + 1));
            m.purged = Some(log_id);
        }
        // Purging past the last entry (after a snapshot install) makes the purge point the last.
        self.last_index.fetch_max(log_id.index, Ordering::SeqCst);
        self.wal
            .write(
                vec![Record::Purge {
                    upto: log_id.index,
                    id: to_json(&log_id),
                }],
                true,
                true,
            )
            .await
            .map_err(|e| io::write_logs(wal_err(e)))
    }
}

// ---------------------------------------------------------------------------------------------
// State machine

/// The applied state as the API reads it.
#[derive(Debug, Default)]
pub struct Applying {
    /// The replicated state.
    pub state: ClusterState,
    /// Last applied log id.
    pub applied: Option<LogId<NodeId>>,
    /// Last applied membership.
    pub membership: StoredMembership<NodeId, BasicNode>,
    /// Recent events, oldest first.
    pub recent: VecDeque<Event>,
}

/// The state machine: in memory for reads, persisted row by row in redb.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    /// Shared with the API layer.
    pub shared: Arc<RwLock<Applying>>,
    /// Every applied event.
    pub events: broadcast::Sender<Event>,
    /// The last applied index (for waiting on freshness).
    pub applied_tx: Arc<watch::Sender<u64>>,
    /// Index of the last entry in this node's Raft log (durable on this node).
    pub log_last_index: Arc<AtomicU64>,
}

fn frame_snapshot(state: &ClusterState) -> Vec<u8> {
    let body = serde_json::to_vec(state).expect("state serializes");
    let mut out = Vec::with_capacity(body.len() + 16);
    out.extend_from_slice(SNAP_MAGIC);
    out.extend_from_slice(&SNAP_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks magic, version and checksum, then decodes the snapshot body.
pub fn unframe_snapshot(data: &[u8]) -> Result<ClusterState, StoreError> {
    if data.len() < 16 || &data[..8] != SNAP_MAGIC {
        return Err(StoreError::Snapshot(format!(
            "bad magic: expected {SNAP_MAGIC:?} in a frame of at least 16 bytes, got {} bytes",
            data.len()
        )));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    if version != SNAP_VERSION {
        return Err(StoreError::Snapshot(format!(
            "version {version}, expected {SNAP_VERSION}"
        )));
    }
    let crc = u32::from_le_bytes(data[12..16].try_into().expect("4 bytes"));
    let body = &data[16..];
    if crc32fast::hash(body) != crc {
        return Err(StoreError::Snapshot("checksum mismatch".into()));
    }
    let mut state: ClusterState =
        serde_json::from_slice(body).map_err(|e| StoreError::Snapshot(format!("body: {e}")))?;
    state.rebuild_index();
    Ok(state)
}

/// A host's row: the record without `vm_ids`, which [`ClusterState::rebuild_index`] derives
/// from the VM rows at load. Placing a VM then rewrites two small rows, not a list of every VM
/// on the host (which made each write cost grow with the host's VM count).
fn host_row(h: &Host) -> Vec<u8> {
    #[derive(Serialize)]
    struct Row<'a> {
        id: &'a str,
        address: &'a str,
        capacity: crate::state::Resources,
        allocated: crate::state::Resources,
        labels: &'a std::collections::BTreeMap<String, String>,
        state: crate::state::HostState,
        vm_ids: [&'a str; 0],
        draining: bool,
    }
    to_json(&Row {
        id: &h.id,
        address: &h.address,
        capacity: h.capacity,
        allocated: h.allocated,
        labels: &h.labels,
        state: h.state,
        vm_ids: [],
        draining: h.draining,
    })
}

fn row_key(k: &Key) -> String {
    match k {
        Key::Host(id) => format!("host/{id}"),
        Key::Vm(id) => format!("vm/{id}"),
        Key::Migration(id) => format!("mig/{id}"),
    }
}

impl StateMachineStore {
    fn load(db: Arc<Database>) -> Result<StateMachineStore, AnyError> {
        let tx = db.begin_read().map_err(any)?;
        let mut state = ClusterState::default();
        let sm = tx.open_table(SM).map_err(any)?;
        for item in sm.iter().map_err(any)? {
            let (k, v) = item.map_err(any)?;
            let (k, v) = (k.value().to_string(), v.value());
            if let Some(id) = k.strip_prefix("host/") {
                state
                    .hosts
                    .insert(id.into(), serde_json::from_slice(v).map_err(any)?);
            } else if let Some(id) = k.strip_prefix("vm/") {
                state
                    .vms
                    .insert(id.into(), serde_json::from_slice(v).map_err(any)?);
            } else if let Some(id) = k.strip_prefix("mig/") {
                state
                    .migrations
                    .insert(id.into(), serde_json::from_slice(v).map_err(any)?);
            }
        }
        let meta = tx.open_table(SM_META).map_err(any)?;
        let get = |k: &str| -> Result<Option<Vec<u8>>, AnyError> {
            Ok(meta.get(k).map_err(any)?.map(|v| v.value().to_vec()))
        };
        let applied: Option<LogId<NodeId>> = match get("applied")? {
            Some(v) => serde_json::from_slice(&v).map_err(any)?,
            None => None,
        };
        let membership = match get("membership")? {
            Some(v) => serde_json::from_slice(&v).map_err(any)?,
            None => StoredMembership::default(),
        };
        if let Some(v) = get("event_seq")? {
            state.event_seq = serde_json::from_slice(&v).map_err(any)?;
        }
        state.rebuild_index();
        let index = applied.map(|l| l.index).unwrap_or(0);
        Ok(StateMachineStore {
            db,
            shared: Arc::new(RwLock::new(Applying {
                state,
                applied,
                membership,
                recent: VecDeque::new(),
            })),
            events: broadcast::channel(EVENTS_KEPT).0,
            applied_tx: Arc::new(watch::channel(index).0),
            log_last_index: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Replaces all state-machine rows with `state` (after installing a snapshot).
    fn persist_all(
        &self,
        state: &ClusterState,
        applied: Option<LogId<NodeId>>,
        membership: &StoredMembership<NodeId, BasicNode>,
    ) -> Result<(), AnyError> {
        let mut tx = self.db.begin_write().map_err(any)?;
        tx.set_durability(Durability::Immediate).map_err(any)?;
        {
            let mut t = tx.open_table(SM).map_err(any)?;
            t.retain(|_, _| false).map_err(any)?;
            for (id, h) in &state.hosts {
                t.insert(format!("host/{id}").as_str(), host_row(h).as_slice())
                    .map_err(any)?;
            }
            for (id, v) in &state.vms {
                t.insert(format!("vm/{id}").as_str(), to_json(v).as_slice())
                    .map_err(any)?;
            }
            for (id, m) in &state.migrations {
                t.insert(format!("mig/{id}").as_str(), to_json(m).as_slice())
                    .map_err(any)?;
            }
            let mut m = tx.open_table(SM_META).map_err(any)?;
            m.insert("applied", to_json(&applied).as_slice())
                .map_err(any)?;
            m.insert("membership", to_json(membership).as_slice())
                .map_err(any)?;
            m.insert("event_seq", to_json(&state.event_seq).as_slice())
                .map_err(any)?;
        }
        tx.commit().map_err(any)
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, AnyError> {
        let tx = self.db.begin_read().map_err(any)?;
        let t = tx.open_table(SNAPSHOT).map_err(any)?;
        let (Some(meta), Some(data)) = (t.get("meta").map_err(any)?, t.get("data").map_err(any)?)
        else {
            return Ok(None);
        };
        let meta: SnapshotMeta<NodeId, BasicNode> =
            serde_json::from_slice(meta.value()).map_err(any)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.value().to_vec())),
        }))
    }

    fn apply_batch(&self, entries: Vec<Entry<TypeConfig>>) -> Result<Vec<Applied>, AnyError> {
        let mut out = Vec::with_capacity(entries.len());
        let mut events = Vec::new();
        let mut touched = Vec::new();
        let (applied, membership, seq, rows) = {
            let mut g = self.shared.write().expect("state lock");
            for e in entries {
                g.applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Blank => out.push(Applied(Vec::new())),
                    EntryPayload::Membership(m) => {
                        g.membership = StoredMembership::new(Some(e.log_id), m);
                        out.push(Applied(Vec::new()));
                    }
                    EntryPayload::Normal(Proposal(cmds)) => {
                        let mut results = Vec::with_capacity(cmds.len());
                        for (sub, cmd) in cmds.iter().enumerate() {
                            match g.state.apply_at(e.log_id.index, sub, cmd) {
                                Ok((reply, keys, evs)) => {
                                    touched.extend(keys);
                                    events.extend(evs);
                                    results.push(Ok(reply));
                                }
                                Err(err) => results.push(Err(err)),
                            }
                        }
                        out.push(Applied(results));
                    }
                }
            }
            touched.sort();
            touched.dedup();
            let rows: Vec<(String, Option<Vec<u8>>)> = touched
                .iter()
                .map(|k| {
                    let v = match k {
                        Key::Host(id) => g.state.hosts.get(id).map(host_row),
                        Key::Vm(id) => g.state.vms.get(id).map(to_json),
                        Key::Migration(id) => g.state.migrations.get(id).map(to_json),
                    };
                    (row_key(k), v)
                })
                .collect();
            for ev in &events {
                if g.recent.len() == EVENTS_KEPT {
                    g.recent.pop_front();
                }
                g.recent.push_back(ev.clone());
            }
            (g.applied, g.membership.clone(), g.state.event_seq, rows)
        };
        let mut tx = self.db.begin_write().map_err(any)?;
        tx.set_durability(Durability::None).map_err(any)?;
        {
            let mut t = tx.open_table(SM).map_err(any)?;
            for (k, v) in &rows {
                match v {
                    Some(v) => {
                        t.insert(k.as_str(), v.as_slice()).map_err(any)?;
                    }
                    None => {
                        t.remove(k.as_str()).map_err(any)?;
                    }
                }
            }
            let mut m = tx.open_table(SM_META).map_err(any)?;
            m.insert("applied", to_json(&applied).as_slice())
                .map_err(any)?;
            m.insert("membership", to_json(&membership).as_slice())
                .map_err(any)?;
            m.insert("event_seq", to_json(&seq).as_slice())
                .map_err(any)?;
        }
        tx.commit().map_err(any)?;
        for ev in events {
            let _ = self.events.send(ev);
        }
        self.applied_tx
            .send_replace(applied.map(|l| l.index).unwrap_or(0));
        Ok(out)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let (data, applied, membership) = {
            let g = self.shared.read().expect("state lock");
            (frame_snapshot(&g.state), g.applied, g.membership.clone())
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}",
                applied.map(|l| l.leader_id.term).unwrap_or(0),
                applied.map(|l| l.index).unwrap_or(0)
            ),
        };
        let db = self.db.clone();
        let (m, d) = (to_json(&meta), data.clone());
        // Durable: it also makes every earlier (non-durable) state-machine commit durable, so the
        // log may be purged up to this snapshot afterwards.
        tokio::task::spawn_blocking(move || -> Result<(), AnyError> {
            let mut tx = db.begin_write().map_err(any)?;
            tx.set_durability(Durability::Immediate).map_err(any)?;
            {
                let mut t = tx.open_table(SNAPSHOT).map_err(any)?;
                t.insert("meta", m.as_slice()).map_err(any)?;
                t.insert("data", d.as_slice()).map_err(any)?;
            }
            tx.commit().map_err(any)
        })
        .await
        .map_err(|e| io::write_snapshot(None, any(e)))?
        .map_err(|e| io::write_snapshot(None, e))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), SErr> {
        let g = self.shared.read().expect("state lock");
        Ok((g.applied, g.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.apply_batch(entries))
            .await
            .map_err(|e| io::write_state_machine(any(e)))?
            .map_err(io::write_state_machine)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let state = unframe_snapshot(&data)
            .map_err(|e| io::read_snapshot(Some(meta.signature()), any(e)))?;
        let this = self.clone();
        let (meta2, state2) = (meta.clone(), state.clone());
        tokio::task::spawn_blocking(move || -> Result<(), AnyError> {
            this.persist_all(&state2, meta2.last_log_id, &meta2.last_membership)?;
            let mut tx = this.db.begin_write().map_err(any)?;
            tx.set_durability(Durability::Immediate).map_err(any)?;
            {
                let mut t = tx.open_table(SNAPSHOT).map_err(any)?;
                t.insert("meta", to_json(&meta2).as_slice()).map_err(any)?;
                t.insert("data", data.as_slice()).map_err(any)?;
            }
            tx.commit().map_err(any)
        })
        .await
        .map_err(|e| io::write_snapshot(Some(meta.signature()), any(e)))?
        .map_err(|e| io::write_snapshot(Some(meta.signature()), e))?;
        {
            let mut g = self.shared.write().expect("state lock");
            g.state = state;
            g.applied = meta.last_log_id;
            g.membership = meta.last_membership.clone();
        }
        self.applied_tx
            .send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        self.current_snapshot()
            .map_err(|e| io::read_snapshot(None, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Policy;
    use crate::state::{HostState, Phase, Resources};
    use openraft::CommittedLeaderId;

    fn normal(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal(vec![cmd])),
        }
    }

    /// The state machine reloaded from its rows equals the one in memory, host VM lists
    /// included (host rows are stored without them).
    #[test]
    fn state_machine_rows_reload_to_the_same_state() {
        let d = tempfile::tempdir().unwrap();
        let reg = |id: &str| Command::RegisterHost {
            id: id.into(),
            address: format!("{id}:1"),
            capacity: Resources {
                vcpus: 16,
                memory_mib: 16384,
            },
            labels: Default::default(),
        };
        let create = |name: &str| Command::CreateVm {
            name: name.into(),
            resources: Resources {
                vcpus: 1,
                memory_mib: 64,
            },
            labels: Default::default(),
            host_selector: Default::default(),
            anti_affinity_group: String::new(),
            start: true,
            policy: Policy::BinPack,
            boot: Default::default(),
            loads: Default::default(),
        };
        let mut cmds = vec![reg("h1"), reg("h2")];
        cmds.extend((0..5).map(|i| create(&format!("v{i}"))));
        cmds.push(Command::StartMigration {
            vm_id: "vm-3".into(),
            target_host: "h2".into(),
            requested_by: "user".into(),
            policy: Policy::BinPack,
            loads: Default::default(),
        });
        cmds.push(Command::ReportMigration {
            id: "mig-8".into(),
            phase: Phase::Succeeded,
            bytes_done: 1,
            bytes_total: 1,
            error: String::new(),
        });
        cmds.push(Command::DrainHost { id: "h1".into() });
        cmds.push(Command::SetHostState {
            id: "h1".into(),
            state: HostState::Down,
        });
        let entries: Vec<_> = cmds
            .into_iter()
            .enumerate()
            .map(|(i, c)| normal(i as u64 + 1, c))
            .collect();
        let before = {
            let (_log, sm) = open(d.path()).unwrap();
            for r in sm.apply_batch(entries).unwrap() {
                for r in r.0 {
                    r.unwrap();
                }
            }
            let g = sm.shared.read().unwrap();
            assert_eq!(g.state.hosts["h2"].vm_ids, vec!["vm-3".to_string()]);
            assert!(g.state.hosts["h1"].draining);
            g.state.clone()
        };
        let (_log, sm) = open(d.path()).unwrap();
        let g = sm.shared.read().unwrap();
        assert_eq!(g.state, before);
        assert_eq!(g.applied.map(|l| l.index), Some(11));
    }

    #[test]
    fn snapshot_frame_checks_magic_version_and_checksum() {
        let s = ClusterState {
            event_seq: 7,
            ..Default::default()
        };
        let f = frame_snapshot(&s);
        assert_eq!(unframe_snapshot(&f).unwrap(), s);
        let mut bad = f.clone();
        bad[0] = b'X';
        assert!(unframe_snapshot(&bad)
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
        let mut bad = f.clone();
        bad[8] = 9;
        assert!(unframe_snapshot(&bad)
            .unwrap_err()
            .to_string()
            .contains("version 9"));
        let mut bad = f.clone();
        let n = bad.len() - 2;
        bad[n] ^= 1;
        assert!(unframe_snapshot(&bad)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        assert!(unframe_snapshot(&f[..3]).is_err());
    }
}
