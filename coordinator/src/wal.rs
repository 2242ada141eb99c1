//! The Raft log's write-ahead file: an append-only, segmented, checksummed record log with one
//! `fdatasync` per batch of writes (group commit), and torn-tail recovery on open.
//!
//! Knows nothing of openraft: it stores opaque entry bytes by log index, the purge point and the
//! committed marker; `store` encodes openraft's types into them.
//!
//! ## Format
//!
//! `<dir>/wal-<seq, 16 digits>.log` segments, replayed in `seq` order. Each segment starts with
//! a 16-byte header: `NCWAL001` magic, u32 version (1), u32 CRC-32 of the first 12 bytes. Then
//! records, each framed as u32 body length, u32 CRC-32 of the body, body; the body is a type byte
//! and its payload (all integers little-endian):
//!
//! | type | record | payload |
//! |---|---|---|
//! | 1 | `Entry` | u64 index, entry bytes — also drops every entry at or after `index` |
//! | 2 | `Truncate` | u64 from: drops every entry at or after `from` |
//! | 3 | `Purge` | u64 up to, purged log id bytes: drops every entry up to `up to` |
//! | 4 | `Committed` | committed log id bytes |
//!
//! ## Protocol
//!
//! 1. Callers hand the writer thread a batch job (records, whether it must be durable, a
//!    completion). The thread takes every job queued meanwhile, writes all their records with
//!    one `write`, calls `fdatasync` once if any job needs durability, then completes them all.
//!    So a slow disk makes batches larger, not writes slower one by one.
//! 2. A segment over [`SEGMENT_BYTES`] is synced and closed after a batch; the next one starts
//!    with a `Purge` record repeating the purge point, so deleting old segments loses nothing.
//! 3. A purge is written and synced first; then whole segments from the oldest on are deleted
//!    while all their entries are purged (a prefix only: a later segment's `Truncate` may refer
//!    to an earlier one's entries).
//! 4. Open replays every segment. In the last one, a short or checksum-failing record is a torn
//!    write from a crash: replay stops at the last good record and the file is cut there. The
//!    same in an older segment (synced before the next one was created) is corruption: open
//!    fails and names the file and offset.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

const MAGIC: &[u8; 8] = b"NCWAL001";
const VERSION: u32 = 1;
const HEADER: usize = 16;
const FRAME: usize = 8;
/// A segment is closed once it grows past this size.
pub const SEGMENT_BYTES: u64 = 32 << 20;
/// Largest record body accepted on replay (a larger length is a torn or corrupt frame).
const MAX_BODY: u32 = 64 << 20;

const T_ENTRY: u8 = 1;
const T_TRUNCATE: u8 = 2;
const T_PURGE: u8 = 3;
const T_COMMITTED: u8 = 4;

/// Errors of the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file or directory operation failed.
    #[error("wal {path}: {op}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A segment other than the last is damaged (it was synced before the next one began).
    #[error("wal {path}: corrupt at byte {offset}: {what}")]
    Corrupt {
        /// The segment.
        path: String,
        /// Where the bad frame starts.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The writer thread is gone.
    #[error("wal writer stopped")]
    Stopped,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> WalError + 'a {
    move |source| WalError::Io {
        path: path.display().to_string(),
        op,
        source,
    }
}

/// One record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The entry at `index` (dropping any at or after it).
    Entry {
        /// Log index.
        index: u64,
        /// Encoded entry.
        data: Vec<u8>,
    },
    /// Drop entries at or after `from`.
    Truncate {
        /// First dropped index.
        from: u64,
    },
    /// Drop entries up to `upto`; `id` is the purged log id, encoded.
    Purge {
        /// Last purged index.
        upto: u64,
        /// Encoded log id.
        id: Vec<u8>,
    },
    /// The committed log id, encoded.
    Committed(Vec<u8>),
}

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME]);
        match self {
            Record::Entry { index, data } => {
                out.push(T_ENTRY);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(data);
            }
            Record::Truncate { from } => {
                out.push(T_TRUNCATE);
                out.extend_from_slice(&from.to_le_bytes());
            }
            Record::Purge { upto, id } => {
                out.push(T_PURGE);
                out.extend_from_slice(&upto.to_le_bytes());
                out.extend_from_slice(id);
            }
            Record::Committed(id) => {
                out.push(T_COMMITTED);
                out.extend_from_slice(id);
            }
        }
        let body = &out[start + FRAME..];
        let len = u32::try_from(body.len()).expect("record under 4 GiB");
        let crc = crc32fast::hash(body);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(body: &[u8]) -> Result<Record, String> {
        let (&t, rest) = body.split_first().ok_or("empty record")?;
        let u64_at = |b: &[u8]| -> Result<u64, String> {
            b.get(..8)
                .map(|x| u64::from_le_bytes(x.try_into().expect("8 bytes")))
                .ok_or_else(|| format!("record type {t}: expected a u64, got {} bytes", b.len()))
        };
        Ok(match t {
            T_ENTRY => Record::Entry {
                index: u64_at(rest)?,
                data: rest[8..].to_vec(),
            },
            T_TRUNCATE => Record::Truncate {
                from: u64_at(rest)?,
            },
            T_PURGE => Record::Purge {
                upto: u64_at(rest)?,
                id: rest[8..].to_vec(),
            },
            T_COMMITTED => Record::Committed(rest.to_vec()),
            t => return Err(format!("unknown record type {t}, expected 1..=4")),
        })
    }
}

/// What the log holds after replay.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Entries after the purge point, by index.
    pub entries: BTreeMap<u64, Vec<u8>>,
    /// The last purge: index and encoded log id.
    pub purged: Option<(u64, Vec<u8>)>,
    /// The last committed marker.
    pub committed: Option<Vec<u8>>,
    /// Bytes cut from the last segment's torn tail (0 after a clean shutdown).
    pub torn_bytes: u64,
}

impl Recovered {
    fn apply(&mut self, r: Record) {
        match r {
            Record::Entry { index, data } => {
                self.entries.split_off(&index);
                self.entries.insert(index, data);
            }
            Record::Truncate { from } => {
                self.entries.split_off(&from);
            }
            Record::Purge { upto, id } => {
                self.entries = self.entries.split_off(&(upto + 1));
                self.purged = Some((upto, id));
            }
            Record::Committed(c) => self.committed = Some(c),
        }
    }
}

struct Segment {
    seq: u64,
    path: PathBuf,
    /// Highest entry index written in it (0 if none).
    max_index: u64,
}

/// The open log: the segments and the active file. Used by one thread at a time.
pub struct Wal {
    dir: PathBuf,
    segments: Vec<Segment>,
    file: File,
    size: u64,
    purged: Option<(u64, Vec<u8>)>,
    buf: Vec<u8>,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("wal-{seq:016}.log"))
}

fn header() -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "sync directory"))
}

impl Wal {
    /// Opens (or creates) the log in `dir` and replays it.
    pub fn open(dir: &Path) -> Result<(Wal, Recovered), WalError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
        let mut seqs: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io_err(dir, "list"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("wal-")?
                    .strip_suffix(".log")?
                    .parse::<u64>()
                    .ok()
            })
            .collect();
        seqs.sort_unstable();
        let mut rec = Recovered::default();
        let mut segments = Vec::new();
        let n = seqs.len();
        let mut active = None;
        for (i, seq) in seqs.into_iter().enumerate() {
            let path = segment_path(dir, seq);
            let last = i + 1 == n;
            let (max_index, good_len) = replay_segment(&path, last, &mut rec)?;
            segments.push(Segment {
                seq,
                path: path.clone(),
                max_index,
            });
            if last {
                active = Some((path, good_len));
            }
        }
        let (file, size) = match active {
            Some((path, good_len)) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path, "open"))?;
                let len = file.metadata().map_err(io_err(&path, "stat"))?.len();
                if len != good_len {
                    rec.torn_bytes = len - good_len;
                    tracing::warn!(
                        path = %path.display(),
                        torn_bytes = len - good_len,
                        "wal: cutting a torn tail after the last good record"
                    );
                    file.set_len(good_len).map_err(io_err(&path, "truncate"))?;
                    if good_len < HEADER as u64 {
                        (&file)
                            .write_all(&header())
                            .map_err(io_err(&path, "write header"))?;
                    }
                    file.sync_all().map_err(io_err(&path, "sync"))?;
                }
                let size = good_len.max(HEADER as u64);
                (file, size)
            }
            None => {
                let path = segment_path(dir, 1);
                let file = create_segment(&path, dir)?;
                segments.push(Segment {
                    seq: 1,
                    path,
                    max_index: 0,
                });
                (file, HEADER as u64)
            }
        };
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segments,
            file,
            size,
            purged: rec.purged.clone(),
            buf: Vec::new(),
        };
        // Appends go after the good end.
        use std::io::Seek;
        wal.file
            .seek(std::io::SeekFrom::Start(wal.size))
            .map_err(io_err(&wal.active().path.clone(), "seek"))?;
        Ok((wal, rec))
    }

    fn active(&self) -> &Segment {
        self.segments.last().expect("an active segment")
    }

    /// Writes records (no sync).
    pub fn write(&mut self, records: &[Record]) -> Result<(), WalError> {
        self.buf.clear();
        for r in records {
            r.encode(&mut self.buf);
            match r {
                Record::Entry { index, .. } => {
                    let s = self.segments.last_mut().expect("active");
                    s.max_index = s.max_index.max(*index);
                }
                Record::Purge { upto, id } => self.purged = Some((*upto, id.clone())),
                _ => {}
            }
        }
        let path = self.active().path.clone();
        self.file
            .write_all(&self.buf)
            .map_err(io_err(&path, "write"))?;
        self.size += self.buf.len() as u64;
        Ok(())
    }

    /// Makes everything written so far durable (`fdatasync`).
    pub fn sync(&mut self) -> Result<(), WalError> {
        let path = self.active().path.clone();
        self.file.sync_data().map_err(io_err(&path, "fdatasync"))
    }

    /// Closes a full segment and starts the next (call after a sync).
    fn maybe_rotate(&mut self) -> Result<(), WalError> {
        if self.size < SEGMENT_BYTES {
            return Ok(());
        }
        self.sync()?;
        let seq = self.active().seq + 1;
        let path = segment_path(&self.dir, seq);
        self.file = create_segment(&path, &self.dir)?;
        self.size = HEADER as u64;
        self.segments.push(Segment {
            seq,
            path,
            max_index: 0,
        });
        if let Some((upto, id)) = self.purged.clone() {
            self.write(&[Record::Purge { upto, id }])?;
        }
        self.sync()
    }

    /// Deletes the oldest closed segments whose entries are all purged (after the purge record
    /// is durable).
    fn delete_purged_segments(&mut self) -> Result<(), WalError> {
        let Some((upto, _)) = self.purged else {
            return Ok(());
        };
        let mut n = 0;
        while n + 1 < self.segments.len() && self.segments[n].max_index <= upto {
            let p = &self.segments[n].path;
            std::fs::remove_file(p).map_err(io_err(p, "delete purged segment"))?;
            n += 1;
        }
        if n > 0 {
            self.segments.drain(..n);
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Number of segment files (for tests and metrics).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

fn create_segment(path: &Path, dir: &Path) -> Result<File, WalError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path, "create segment"))?;
    f.write_all(&header())
        .map_err(io_err(path, "write header"))?;
    f.sync_all().map_err(io_err(path, "sync"))?;
    sync_dir(dir)?;
    Ok(f)
}

/// Replays one segment into `rec`; returns its highest entry index and the length of its good
/// prefix. A bad frame in the last segment ends the replay there; elsewhere it is an error.
fn replay_segment(path: &Path, last: bool, rec: &mut Recovered) -> Result<(u64, u64), WalError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io_err(path, "read"))?;
    let corrupt = |offset: usize, what: String| WalError::Corrupt {
        path: path.display().to_string(),
        offset: offset as u64,
        what,
    };
    if data.len() < HEADER {
        return if last {
            Ok((0, 0))
        } else {
            Err(corrupt(
                0,
                format!("{} bytes, expected a 16-byte header", data.len()),
            ))
        };
    }
    if &data[..8] != MAGIC {
        return Err(corrupt(
            0,
            format!("magic {:?}, expected {MAGIC:?}", &data[..8]),
        ));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(data[12..16].try_into().expect("4 bytes"));
    if crc != crc32fast::hash(&data[..12]) {
        return Err(corrupt(0, "header checksum mismatch".into()));
    }
    if version != VERSION {
        return Err(corrupt(0, format!("version {version}, expected {VERSION}")));
    }
    let mut off = HEADER;
    let mut max_index = 0;
    while off < data.len() {
        let bad = match frame_at(&data, off) {
            Ok((body, next)) => match Record::decode(body) {
                Ok(r) => {
                    if let Record::Entry { index, .. } = &r {
                        max_index = max_index.max(*index);
                    }
                    rec.apply(r);
                    off = next;
                    continue;
                }
                Err(e) => e,
            },
            Err(e) => e,
        };
        if last {
            return Ok((max_index, off as u64));
        }
        return Err(corrupt(off, bad));
    }
    Ok((max_index, off as u64))
}

fn frame_at(data: &[u8], off: usize) -> Result<(&[u8], usize), String> {
    let head = data
        .get(off..off + FRAME)
        .ok_or_else(|| format!("{} bytes left, expected an 8-byte frame", data.len() - off))?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_BODY {
        return Err(format!("record length {len}, expected 1..={MAX_BODY}"));
    }
    let start = off + FRAME;
    let body = data
        .get(start..start + len as usize)
        .ok_or_else(|| format!("record of {len} bytes, only {} left", data.len() - start))?;
    if crc32fast::hash(body) != crc {
        return Err("record checksum mismatch".into());
    }
    Ok((body, start + len as usize))
}

/// Called once a job is written (and synced, if it asked to be).
pub type Done = Box<dyn FnOnce(Result<(), std::sync::Arc<WalError>>) + Send>;

/// A batch of records for the writer thread.
pub struct Job {
    /// Records, written in order.
    pub records: Vec<Record>,
    /// The job completes only after an `fdatasync` covering its records.
    pub durable: bool,
    /// After writing (and syncing), delete segments that hold only purged entries.
    pub delete_purged: bool,
    /// Completion.
    pub done: Done,
}

/// Handle to the writer thread: jobs are written in the order they are sent.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread over `wal`.
    pub fn spawn(wal: Wal) -> Writer {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer_loop(wal, rx))
            .expect("spawn wal writer thread");
        Writer { tx }
    }

    /// Queues a job.
    pub fn send(&self, job: Job) -> Result<(), WalError> {
        self.tx.send(job).map_err(|_| WalError::Stopped)
    }

    /// Queues records and waits until they are written (and synced, when `durable`).
    pub async fn write(
        &self,
        records: Vec<Record>,
        durable: bool,
        delete_purged: bool,
    ) -> Result<(), std::sync::Arc<WalError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job {
            records,
            durable,
            delete_purged,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        })
        .map_err(std::sync::Arc::new)?;
        rx.await
            .map_err(|_| std::sync::Arc::new(WalError::Stopped))?
    }
}

fn writer_loop(mut wal: Wal, rx: mpsc::Receiver<Job>) {
    let mut jobs: Vec<Job> = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    while let Ok(first) = rx.recv() {
        jobs.push(first);
        while let Ok(j) = rx.try_recv() {
            jobs.push(j);
        }
        let durable = jobs.iter().any(|j| j.durable);
        let delete = jobs.iter().any(|j| j.delete_purged);
        records.clear();
        for j in &mut jobs {
            records.append(&mut j.records);
        }
        let mut res = wal.write(&records);
        if res.is_ok() && (durable || delete) {
            res = wal.sync();
        }
        if res.is_ok() && delete {
            res = wal.delete_purged_segments();
        }
        if res.is_ok() {
            res = wal.maybe_rotate();
        }
        let res = res.map_err(std::sync::Arc::new);
        if let Err(e) = &res {
            tracing::error!(error = %e, "wal write failed");
        }
        for j in jobs.drain(..) {
            (j.done)(res.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> Record {
        Record::Entry {
            index: i,
            data: format!("entry {i}").into_bytes(),
        }
    }

    fn write_synced(wal: &mut Wal, recs: &[Record]) {
        wal.write(recs).unwrap();
        wal.sync().unwrap();
    }

    fn only_segment(dir: &Path) -> PathBuf {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v.pop().unwrap()
    }

    #[test]
    fn replays_entries_truncate_purge_and_committed() {
        let d = tempfile::tempdir().unwrap();
        let (mut wal, rec) = Wal::open(d.path()).unwrap();
        assert_eq!(rec, Recovered::default());
        let recs: Vec<Record> = (1..=10).map(entry).collect();
        write_synced(&mut wal, &recs);
        write_synced(
            &mut wal,
            &[
                Record::Truncate { from: 8 },
                entry(8),
                Record::Purge {
                    upto: 3,
                    id: b"p3".to_vec(),
                },
                Record::Committed(b"c7".to_vec()),
                // An entry rewrites everything from its index on.
                entry(6),
            ],
        );
        drop(wal);
        let (_, rec) = Wal::open(d.path()).unwrap();
        assert_eq!(
            rec.entries.keys().copied().collect::<Vec<_>>(),
            vec![4, 5, 6]
        );
        assert_eq!(rec.entries[&6], b"entry 6".to_vec());
        assert_eq!(rec.purged, Some((3, b"p3".to_vec())));
        assert_eq!(rec.committed, Some(b"c7".to_vec()));
        assert_eq!(rec.torn_bytes, 0);
    }

    #[test]
    fn torn_tail_is_cut_at_the_last_good_record_and_appends_continue() {
        let d = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(d.path()).unwrap();
        write_synced(&mut wal, &(1..=5).map(entry).collect::<Vec<_>>());
        drop(wal);
        let path = only_segment(d.path());
        let good = std::fs::metadata(&path).unwrap().len();
        // A crash in the middle of writing record 6: only part of it reached the file.
        let mut buf = Vec::new();
        entry(6).encode(&mut buf);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&buf[..buf.len() - 3]).unwrap();
        drop(f);
        let (mut wal, rec) = Wal::open(d.path()).unwrap();
        assert_eq!(rec.entries.len(), 5);
        assert_eq!(rec.torn_bytes, buf.len() as u64 - 3);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        write_synced(&mut wal, &[entry(6)]);
        drop(wal);
        let (_, rec) = Wal::open(d.path()).unwrap();
        assert_eq!(
            rec.entries.keys().copied().collect::<Vec<_>>(),
            (1..=6).collect::<Vec<_>>()
        );
    }

    #[test]
    fn checksum_mismatch_stops_replay_at_the_last_good_record() {
        let d = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(d.path()).unwrap();
        write_synced(&mut wal, &(1..=5).map(entry).collect::<Vec<_>>());
        drop(wal);
        let path = only_segment(d.path());
        let mut data = std::fs::read(&path).unwrap();
        // Flip a byte in the body of the 4th record.
        let mut off = HEADER;
        for _ in 0..3 {
            let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
            off += FRAME + len;
        }
        data[off + FRAME + 2] ^= 0x40;
        std::fs::write(&path, &data).unwrap();
        let (_, rec) = Wal::open(d.path()).unwrap();
        assert_eq!(
            rec.entries.keys().copied().collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), off as u64);
    }

    #[test]
    fn damage_in_an_older_segment_or_header_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(d.path()).unwrap();
        write_synced(&mut wal, &(1..=3).map(entry).collect::<Vec<_>>());
        // Force a second segment.
        wal.size = SEGMENT_BYTES;
        wal.maybe_rotate().unwrap();
        write_synced(&mut wal, &[entry(4)]);
        drop(wal);
        let first = segment_path(d.path(), 1);
        let mut data = std::fs::read(&first).unwrap();
        let n = data.len();
        data[n - 1] ^= 1;
        std::fs::write(&first, &data).unwrap();
        let err = Wal::open(d.path()).err().expect("corrupt older segment");
        assert!(
            err.to_string().contains("record checksum mismatch"),
            "{err}"
        );
        assert!(
            err.to_string().contains("wal-0000000000000001.log"),
            "{err}"
        );
        data[n - 1] ^= 1;
        data[0] = b'X';
        std::fs::write(&first, &data).unwrap();
        let err = Wal::open(d.path()).err().expect("bad magic");
        assert!(err.to_string().contains("magic"), "{err}");
    }

    #[test]
    fn purge_deletes_old_segments_and_keeps_the_purge_point() {
        let d = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(d.path()).unwrap();
        for k in 0..3u64 {
            write_synced(
                &mut wal,
                &((k * 10 + 1)..=(k * 10 + 10))
                    .map(entry)
                    .collect::<Vec<_>>(),
            );
            wal.size = SEGMENT_BYTES;
            wal.maybe_rotate().unwrap();
        }
        assert_eq!(wal.segment_count(), 4);
        write_synced(
            &mut wal,
            &[Record::Purge {
                upto: 20,
                id: b"p20".to_vec(),
            }],
        );
        wal.delete_purged_segments().unwrap();
        // Segments 1 and 2 (entries 1..=20) go; 3 (21..=30) and the active one stay.
        assert_eq!(wal.segment_count(), 2);
        wal.size = SEGMENT_BYTES;
        wal.maybe_rotate().unwrap();
        write_synced(
            &mut wal,
            &[Record::Purge {
                upto: 30,
                id: b"p30".to_vec(),
            }],
        );
        wal.delete_purged_segments().unwrap();
        drop(wal);
        let (_, rec) = Wal::open(d.path()).unwrap();
        assert!(rec.entries.is_empty());
        assert_eq!(rec.purged, Some((30, b"p30".to_vec())));
    }

    #[test]
    fn writer_thread_groups_jobs_and_completes_each() {
        let d = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(d.path()).unwrap();
        let w = Writer::spawn(wal);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            // Queued back to back, in index order, as the log store does; each waits for its own
            // completion.
            let mut waits = Vec::new();
            for i in 1..=50u64 {
                let (tx, rx) = tokio::sync::oneshot::channel();
                w.send(Job {
                    records: vec![entry(i)],
                    durable: true,
                    delete_purged: false,
                    done: Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                })
                .unwrap();
                waits.push(rx);
            }
            for rx in waits {
                rx.await.unwrap().unwrap();
            }
            w.write(vec![Record::Committed(b"c".to_vec())], true, false)
                .await
                .unwrap();
        });
        drop(w);
        // The thread has not necessarily exited; everything acknowledged is on disk.
        let (_, rec) = Wal::open(d.path()).unwrap();
        assert_eq!(rec.entries.len(), 50);
    }
}
