//! The migration wire format: one frame = a 16-byte header + a payload.
//!
//! ```text
//! 0   u32 magic 0x464d434e ("NCMF")   4 u8 version (1)   5 u8 type   6 u16 flags (0)
//! 8   u32 payload length (<= MAX_PAYLOAD)                12 u32 CRC32C of the payload
//! 16  payload
//! ```
//!
//! All integers are little endian. Payload encodings (no serde):
//!
//! | type | frame | payload |
//! |---|---|---|
//! | 1 | `Hello` | `u32 n, n × u8 versions, u32 n, n bytes vm_id (UTF-8), u64 memory_bytes, u8 vcpus, [u8; 16] token` |
//! | 2 | `Welcome` | `u8 version` |
//! | 3 | `Reject` | the whole payload is the reason (UTF-8) |
//! | 4 | `Pages` | see [`PageBatch`] |
//! | 5 | `RoundEnd` | `u32 round, u64 pages` |
//! | 6 | `DeviceState` | the whole payload is the opaque state |
//! | 7 | `Complete` | `u32 rounds, u64 pages_total` |
//! | 8, 9, 10 | `Ready`, `Commit`, `Resumed` | empty |
//! | 11 | `Abort` | the whole payload is the reason (UTF-8) |
//! | 12 | `RoundAck` | `u32 round, u64 pages` (pages applied so far, all rounds) |
//!
//! A page batch is `u32 round, u32 count`, then per page `u64 index, u8 kind` (0 = zero page,
//! 1 = its [`PAGE_SIZE`] bytes follow inline, 2 = its bytes are inside the batch's LZ4 block),
//! then, if any page has kind 2, `u32 compressed_len` and an LZ4 block (`lz4_flex::block`)
//! that decompresses to the concatenation of all kind-2 pages in order.
//!
//! [`decode`] checks magic, version, flags, length, type and checksum before it parses a
//! payload byte; a payload must be consumed exactly (trailing bytes are malformed). The
//! decoder never panics, and allocates at most a small constant factor of the declared
//! (bounded) payload length; decompressing a page batch ([`PageBatch::pages`]) needs at most
//! `MAX_BATCH_PAGES × PAGE_SIZE` (< [`MAX_PAYLOAD`]) bytes. Decoding followed by encoding
//! reproduces the input bytes exactly (the encoding is canonical).

use std::fmt;

/// Frame magic: the bytes `N C M F` read as a little-endian `u32`.
pub const MAGIC: u32 = 0x464d_434e;
/// The wire-format version this module speaks.
pub const VERSION: u8 = 1;
/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 16;
/// Largest payload a frame may carry (16 MiB).
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;
/// Size of a guest page in bytes.
pub const PAGE_SIZE: usize = 4096;
/// Largest number of pages in one [`PageBatch`]: even an all-raw batch fits in
/// [`MAX_PAYLOAD`] (4087 pages).
pub const MAX_BATCH_PAGES: usize = (MAX_PAYLOAD - BATCH_HEADER_LEN) / (ENTRY_LEN + PAGE_SIZE);

/// `round u32, count u32`.
const BATCH_HEADER_LEN: usize = 8;
/// `index u64, kind u8`.
const ENTRY_LEN: usize = 9;

/// A page of zeros, what [`PageData::Zero`] stands for.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The buffer holds less than a whole header or a whole frame; read until it holds at least
    /// `needed` bytes in total and try again.
    #[error("incomplete frame: {needed} bytes needed")]
    Incomplete {
        /// Total number of bytes (from the start of the frame) needed to make progress.
        needed: usize,
    },
    /// The first four bytes are not [`MAGIC`].
    #[error("bad frame magic {found:#010x}")]
    BadMagic {
        /// The magic that was found.
        found: u32,
    },
    /// The header names a version other than [`VERSION`].
    #[error("unsupported frame version {version}")]
    UnsupportedVersion {
        /// The version that was found.
        version: u8,
    },
    /// The header's flags are not zero (no flag is defined in version 1).
    #[error("unsupported frame flags {flags:#06x}")]
    UnsupportedFlags {
        /// The flags that were found.
        flags: u16,
    },
    /// The header declares a payload longer than [`MAX_PAYLOAD`].
    #[error("frame payload length {len} exceeds the maximum of {MAX_PAYLOAD}")]
    Oversized {
        /// The declared payload length.
        len: u32,
    },
    /// The header names an unknown frame type.
    #[error("unknown frame type {frame_type}")]
    UnknownType {
        /// The type byte that was found.
        frame_type: u8,
    },
    /// The payload's CRC32C differs from the header's.
    #[error("frame checksum mismatch: header says {expected:#010x}, payload has {actual:#010x}")]
    Checksum {
        /// The checksum in the header.
        expected: u32,
        /// The checksum of the payload received.
        actual: u32,
    },
    /// [`decode_payload`] was given a payload whose length differs from the header's.
    #[error("payload is {actual} bytes but the header declares {declared}")]
    LengthMismatch {
        /// The header's payload length.
        declared: u32,
        /// The length of the payload given.
        actual: usize,
    },
    /// The header and checksum are fine but the payload does not parse.
    #[error("malformed {frame_type:?} payload: {what}")]
    Malformed {
        /// The frame type whose payload is malformed.
        frame_type: FrameType,
        /// What was wrong.
        what: &'static str,
    },
}

/// The frame type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// [`Frame::Hello`].
    Hello = 1,
    /// [`Frame::Welcome`].
    Welcome = 2,
    /// [`Frame::Reject`].
    Reject = 3,
    /// [`Frame::Pages`].
    Pages = 4,
    /// [`Frame::RoundEnd`].
    RoundEnd = 5,
    /// [`Frame::DeviceState`].
    DeviceState = 6,
    /// [`Frame::Complete`].
    Complete = 7,
    /// [`Frame::Ready`].
    Ready = 8,
    /// [`Frame::Commit`].
    Commit = 9,
    /// [`Frame::Resumed`].
    Resumed = 10,
    /// [`Frame::Abort`].
    Abort = 11,
    /// [`Frame::RoundAck`].
    RoundAck = 12,
}

impl TryFrom<u8> for FrameType {
    type Error = FrameError;

    fn try_from(value: u8) -> Result<Self, FrameError> {
        Ok(match value {
            1 => FrameType::Hello,
            2 => FrameType::Welcome,
            3 => FrameType::Reject,
            4 => FrameType::Pages,
            5 => FrameType::RoundEnd,
            6 => FrameType::DeviceState,
            7 => FrameType::Complete,
            8 => FrameType::Ready,
            9 => FrameType::Commit,
            10 => FrameType::Resumed,
            11 => FrameType::Abort,
            12 => FrameType::RoundAck,
            frame_type => return Err(FrameError::UnknownType { frame_type }),
        })
    }
}

/// A validated frame header (magic, version, flags, length and type checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The frame type.
    pub frame_type: FrameType,
    /// The flags (always 0 in version 1).
    pub flags: u16,
    /// Length of the payload that follows the header (<= [`MAX_PAYLOAD`]).
    pub payload_len: u32,
    /// CRC32C of the payload.
    pub crc: u32,
}

impl Header {
    /// Length of the whole frame: [`HEADER_LEN`] + `payload_len`.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// One message of the migration protocol (see `docs/design/migration.md`).
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    /// S → D: open a migration.
    Hello {
        /// Wire/protocol versions the source speaks.
        versions: Vec<u8>,
        /// The VM being migrated.
        vm_id: String,
        /// Guest memory size in bytes.
        memory_bytes: u64,
        /// Number of vCPUs.
        vcpus: u8,
        /// The migration token the destination was told to expect (redacted in `Debug`).
        token: [u8; 16],
    },
    /// D → S: accepted, speaking `version`.
    Welcome {
        /// The chosen version.
        version: u8,
    },
    /// D → S: refused.
    Reject {
        /// Why.
        reason: String,
    },
    /// S → D: a batch of pages.
    Pages(PageBatch),
    /// S → D: a round is complete.
    RoundEnd {
        /// The round.
        round: u32,
        /// Pages sent in that round.
        pages: u64,
    },
    /// D → S: the destination has applied `pages` pages in all, through round `round`.
    RoundAck {
        /// The round acknowledged.
        round: u32,
        /// Pages applied so far, all rounds.
        pages: u64,
    },
    /// S → D: the device state (opaque here).
    DeviceState {
        /// The encoded state.
        bytes: Vec<u8>,
    },
    /// S → D: everything was sent.
    Complete {
        /// Number of rounds.
        rounds: u32,
        /// Pages sent over all rounds.
        pages_total: u64,
    },
    /// D → S: memory and state loaded, VM paused and ready.
    Ready,
    /// S → D: the destination now owns the VM.
    Commit,
    /// D → S: the destination VM runs.
    Resumed,
    /// Either side: cancel the migration.
    Abort {
        /// Why.
        reason: String,
    },
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Hello {
                versions,
                vm_id,
                memory_bytes,
                vcpus,
                token: _,
            } => f
                .debug_struct("Hello")
                .field("versions", versions)
                .field("vm_id", vm_id)
                .field("memory_bytes", memory_bytes)
                .field("vcpus", vcpus)
                .field("token", &"<redacted>")
                .finish(),
            Frame::Welcome { version } => {
                f.debug_struct("Welcome").field("version", version).finish()
            }
            Frame::Reject { reason } => f.debug_struct("Reject").field("reason", reason).finish(),
            Frame::Pages(batch) => f.debug_tuple("Pages").field(batch).finish(),
            Frame::RoundAck { round, pages } => f
                .debug_struct("RoundAck")
                .field("round", round)
                .field("pages", pages)
                .finish(),
            Frame::RoundEnd { round, pages } => f
                .debug_struct("RoundEnd")
                .field("round", round)
                .field("pages", pages)
                .finish(),
            Frame::DeviceState { bytes } => f
                .debug_struct("DeviceState")
                .field("len", &bytes.len())
                .finish(),
            Frame::Complete {
                rounds,
                pages_total,
            } => f
                .debug_struct("Complete")
                .field("rounds", rounds)
                .field("pages_total", pages_total)
                .finish(),
            Frame::Ready => f.write_str("Ready"),
            Frame::Commit => f.write_str("Commit"),
            Frame::Resumed => f.write_str("Resumed"),
            Frame::Abort { reason } => f.debug_struct("Abort").field("reason", reason).finish(),
        }
    }
}

impl Frame {
    /// The frame's type byte.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello { .. } => FrameType::Hello,
            Frame::Welcome { .. } => FrameType::Welcome,
            Frame::Reject { .. } => FrameType::Reject,
            Frame::Pages(_) => FrameType::Pages,
            Frame::RoundEnd { .. } => FrameType::RoundEnd,
            Frame::RoundAck { .. } => FrameType::RoundAck,
            Frame::DeviceState { .. } => FrameType::DeviceState,
            Frame::Complete { .. } => FrameType::Complete,
            Frame::Ready => FrameType::Ready,
            Frame::Commit => FrameType::Commit,
            Frame::Resumed => FrameType::Resumed,
            Frame::Abort { .. } => FrameType::Abort,
        }
    }

    /// Length of the encoded payload (without the header). A frame can be encoded only if
    /// this is at most [`MAX_PAYLOAD`]; a [`Frame::Pages`] always can.
    pub fn payload_len(&self) -> usize {
        match self {
            Frame::Hello {
                versions, vm_id, ..
            } => 4 + versions.len() + 4 + vm_id.len() + 8 + 1 + 16,
            Frame::Welcome { .. } => 1,
            Frame::Reject { reason } | Frame::Abort { reason } => reason.len(),
            Frame::Pages(batch) => batch.wire_bytes(),
            Frame::RoundEnd { .. } | Frame::RoundAck { .. } | Frame::Complete { .. } => 4 + 8,
            Frame::DeviceState { bytes } => bytes.len(),
            Frame::Ready | Frame::Commit | Frame::Resumed => 0,
        }
    }

    /// The whole frame (header + payload).
    ///
    /// # Panics
    /// If [`Frame::payload_len`] exceeds [`MAX_PAYLOAD`] (a string or state that large is a
    /// caller bug; check `payload_len` first when it depends on outside input).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload_len());
        self.encode_into(&mut out);
        out
    }

    /// Appends the whole frame (header + payload) to `out`.
    ///
    /// # Panics
    /// As [`Frame::encode`].
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let payload_len = self.payload_len();
        assert!(
            payload_len <= MAX_PAYLOAD,
            "{:?} payload of {payload_len} bytes exceeds MAX_PAYLOAD",
            self.frame_type()
        );
        out.reserve(HEADER_LEN + payload_len);
        let start = out.len();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(VERSION);
        out.push(self.frame_type() as u8);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(payload_len as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]); // CRC, patched below
        self.encode_payload(out);
        let payload = &out[start + HEADER_LEN..];
        debug_assert_eq!(payload.len(), payload_len);
        let crc = crc32c::crc32c(payload);
        out[start + 12..start + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello {
                versions,
                vm_id,
                memory_bytes,
                vcpus,
                token,
            } => {
                put_bytes(out, versions);
                put_bytes(out, vm_id.as_bytes());
                out.extend_from_slice(&memory_bytes.to_le_bytes());
                out.push(*vcpus);
                out.extend_from_slice(token);
            }
            Frame::Welcome { version } => out.push(*version),
            Frame::Reject { reason } | Frame::Abort { reason } => {
                out.extend_from_slice(reason.as_bytes())
            }
            Frame::Pages(batch) => batch.encode_into(out),
            Frame::RoundEnd { round: a, pages: b }
            | Frame::RoundAck { round: a, pages: b }
            | Frame::Complete {
                rounds: a,
                pages_total: b,
            } => {
                out.extend_from_slice(&a.to_le_bytes());
                out.extend_from_slice(&b.to_le_bytes());
            }
            Frame::DeviceState { bytes } => out.extend_from_slice(bytes),
            Frame::Ready | Frame::Commit | Frame::Resumed => {}
        }
    }
}

/// `u32` length prefix + bytes. Callers have checked the total against `MAX_PAYLOAD`.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Validates a frame header: magic, version, flags, payload length (<= [`MAX_PAYLOAD`]) and
/// type. A stream reader then reads exactly `payload_len` more bytes and calls
/// [`decode_payload`].
pub fn parse_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let [m0, m1, m2, m3, version, frame_type, f0, f1, l0, l1, l2, l3, c0, c1, c2, c3] = *bytes;
    let magic = u32::from_le_bytes([m0, m1, m2, m3]);
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion { version });
    }
    let flags = u16::from_le_bytes([f0, f1]);
    if flags != 0 {
        return Err(FrameError::UnsupportedFlags { flags });
    }
    let payload_len = u32::from_le_bytes([l0, l1, l2, l3]);
    if payload_len as usize > MAX_PAYLOAD {
        return Err(FrameError::Oversized { len: payload_len });
    }
    let frame_type = FrameType::try_from(frame_type)?;
    Ok(Header {
        frame_type,
        flags,
        payload_len,
        crc: u32::from_le_bytes([c0, c1, c2, c3]),
    })
}

/// Decodes the frame at the start of `bytes`; returns it and the number of bytes it took.
/// Bytes after the frame are left alone (the next frame, for a stream reader).
///
/// [`FrameError::Incomplete`] means `bytes` is a prefix of a possibly valid frame: it is
/// shorter than the header, or than header + the (already validated) payload length.
pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), FrameError> {
    let Some(header_bytes) = bytes.first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::Incomplete { needed: HEADER_LEN });
    };
    let header = parse_header(header_bytes)?;
    let frame_len = header.frame_len();
    let Some(payload) = bytes.get(HEADER_LEN..frame_len) else {
        return Err(FrameError::Incomplete { needed: frame_len });
    };
    Ok((decode_payload(&header, payload)?, frame_len))
}

/// Decodes a payload read after `header` (from [`parse_header`]): checks its length and
/// checksum, then parses it.
pub fn decode_payload(header: &Header, payload: &[u8]) -> Result<Frame, FrameError> {
    if payload.len() != header.payload_len as usize {
        return Err(FrameError::LengthMismatch {
            declared: header.payload_len,
            actual: payload.len(),
        });
    }
    let actual = crc32c::crc32c(payload);
    if actual != header.crc {
        return Err(FrameError::Checksum {
            expected: header.crc,
            actual,
        });
    }
    let frame_type = header.frame_type;
    let mut r = Reader {
        buf: payload,
        frame_type,
    };
    let frame = match frame_type {
        FrameType::Hello => {
            let versions = r.prefixed("truncated versions")?.to_vec();
            let vm_id = utf8(frame_type, r.prefixed("truncated vm_id")?)?;
            let memory_bytes = r.u64("truncated memory_bytes")?;
            let vcpus = r.u8("truncated vcpus")?;
            let token = r.array::<16>("truncated token")?;
            Frame::Hello {
                versions,
                vm_id,
                memory_bytes,
                vcpus,
                token,
            }
        }
        FrameType::Welcome => Frame::Welcome {
            version: r.u8("missing version")?,
        },
        FrameType::Reject => Frame::Reject {
            reason: utf8(frame_type, r.rest())?,
        },
        FrameType::Pages => Frame::Pages(PageBatch::decode(&mut r)?),
        FrameType::RoundEnd => Frame::RoundEnd {
            round: r.u32("truncated round")?,
            pages: r.u64("truncated pages")?,
        },
        FrameType::RoundAck => Frame::RoundAck {
            round: r.u32("truncated round")?,
            pages: r.u64("truncated pages")?,
        },
        FrameType::DeviceState => Frame::DeviceState {
            bytes: r.rest().to_vec(),
        },
        FrameType::Complete => Frame::Complete {
            rounds: r.u32("truncated rounds")?,
            pages_total: r.u64("truncated pages_total")?,
        },
        FrameType::Ready => Frame::Ready,
        FrameType::Commit => Frame::Commit,
        FrameType::Resumed => Frame::Resumed,
        FrameType::Abort => Frame::Abort {
            reason: utf8(frame_type, r.rest())?,
        },
    };
    if !r.buf.is_empty() {
        return Err(r.malformed("trailing bytes after the payload"));
    }
    Ok(frame)
}

fn utf8(frame_type: FrameType, bytes: &[u8]) -> Result<String, FrameError> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(FrameError::Malformed {
            frame_type,
            what: "string is not UTF-8",
        }),
    }
}

/// A bounds-checked cursor over a payload.
struct Reader<'a> {
    buf: &'a [u8],
    frame_type: FrameType,
}

impl<'a> Reader<'a> {
    fn malformed(&self, what: &'static str) -> FrameError {
        FrameError::Malformed {
            frame_type: self.frame_type,
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        if n > self.buf.len() {
            return Err(self.malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FrameError> {
        match self.buf.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.buf = tail;
                Ok(*head)
            }
            None => Err(self.malformed(what)),
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// `u32` length + that many bytes.
    fn prefixed(&mut self, what: &'static str) -> Result<&'a [u8], FrameError> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// How one page of a batch is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageKind {
    Zero = 0,
    Raw = 1,
    Lz4 = 2,
}

/// Number of pages of each kind in a [`PageBatch`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// All-zero pages (no data on the wire).
    pub zero: usize,
    /// Pages sent raw.
    pub raw: usize,
    /// Pages inside the LZ4 block.
    pub lz4: usize,
}

/// A page as it comes out of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageData<'a> {
    /// The page is all zeros.
    Zero,
    /// The page's bytes.
    Bytes(&'a [u8; PAGE_SIZE]),
}

impl<'a> PageData<'a> {
    /// The page's bytes (a static zero page for [`PageData::Zero`]).
    pub fn as_bytes(&self) -> &'a [u8; PAGE_SIZE] {
        match *self {
            PageData::Zero => &ZERO_PAGE,
            PageData::Bytes(bytes) => bytes,
        }
    }
}

/// The payload of [`Frame::Pages`]: up to [`MAX_BATCH_PAGES`] guest pages of one round.
///
/// Built by the sender with [`PageBatch::build`]; read by the receiver with
/// [`PageBatch::pages`]. Duplicate or out-of-range page indices are not this module's
/// business (the protocol layer checks them).
#[derive(Clone, PartialEq, Eq)]
pub struct PageBatch {
    round: u32,
    entries: Vec<(u64, PageKind)>,
    /// The kind-1 pages, concatenated in order.
    raw: Vec<u8>,
    /// The LZ4 block holding the kind-2 pages (meaningful only if `counts.lz4 > 0`).
    lz4: Vec<u8>,
    counts: PageCounts,
}

impl fmt::Debug for PageBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBatch")
            .field("round", &self.round)
            .field("counts", &self.counts)
            .field("wire_bytes", &self.wire_bytes())
            .finish_non_exhaustive()
    }
}

impl PageBatch {
    /// Builds a batch of `pages` (`(index, bytes)`) for `round`. All-zero pages are sent as
    /// markers; the others are LZ4-compressed together, or sent raw if the LZ4 block is not
    /// smaller than 7/8 of their size (the bypass: incompressible memory costs no CPU on the
    /// receiver and no bytes on the wire).
    ///
    /// # Panics
    /// If a page is not exactly [`PAGE_SIZE`] bytes or there are more than
    /// [`MAX_BATCH_PAGES`] pages.
    pub fn build(round: u32, pages: &[(u64, &[u8])]) -> PageBatch {
        assert!(
            pages.len() <= MAX_BATCH_PAGES,
            "{} pages exceed MAX_BATCH_PAGES",
            pages.len()
        );
        let mut counts = PageCounts::default();
        let mut entries = Vec::with_capacity(pages.len());
        for &(index, page) in pages {
            assert_eq!(page.len(), PAGE_SIZE, "page {index} is not PAGE_SIZE bytes");
            if is_zero_page(page) {
                counts.zero += 1;
                entries.push((index, PageKind::Zero));
            } else {
                counts.raw += 1;
                entries.push((index, PageKind::Raw));
            }
        }
        let mut raw = Vec::with_capacity(counts.raw * PAGE_SIZE);
        for (&(_, page), &(_, kind)) in pages.iter().zip(&entries) {
            if kind == PageKind::Raw {
                raw.extend_from_slice(page);
            }
        }
        let mut lz4 = Vec::new();
        if !raw.is_empty() {
            let block = lz4_flex::block::compress(&raw);
            if block.len() * 8 < raw.len() * 7 {
                for entry in &mut entries {
                    if entry.1 == PageKind::Raw {
                        entry.1 = PageKind::Lz4;
                    }
                }
                counts.lz4 = counts.raw;
                counts.raw = 0;
                raw = Vec::new();
                lz4 = block;
            }
        }
        PageBatch {
            round,
            entries,
            raw,
            lz4,
            counts,
        }
    }

    /// The migration round the pages belong to.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Number of pages in the batch.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the batch has no page.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of pages of each kind.
    pub fn counts(&self) -> PageCounts {
        self.counts
    }

    /// Guest memory the batch stands for: `len() × PAGE_SIZE` (zero pages included).
    pub fn raw_bytes(&self) -> usize {
        self.entries.len() * PAGE_SIZE
    }

    /// Encoded size of the batch (the `Pages` payload, without the frame header).
    pub fn wire_bytes(&self) -> usize {
        let lz4 = if self.counts.lz4 > 0 {
            4 + self.lz4.len()
        } else {
            0
        };
        BATCH_HEADER_LEN + self.entries.len() * ENTRY_LEN + self.raw.len() + lz4
    }

    /// The pages in batch order, as `(index, data)`. The LZ4 block (if any) is decompressed
    /// once, into `scratch` (cleared first; reuse it across batches to avoid allocating), and
    /// must decompress to exactly `counts().lz4 × PAGE_SIZE` bytes.
    pub fn pages<'a>(&'a self, scratch: &'a mut Vec<u8>) -> Result<Pages<'a>, FrameError> {
        let malformed = |what| FrameError::Malformed {
            frame_type: FrameType::Pages,
            what,
        };
        scratch.clear();
        if self.counts.lz4 > 0 {
            let expected = self.counts.lz4 * PAGE_SIZE;
            scratch.resize(expected, 0);
            match lz4_flex::block::decompress_into(&self.lz4, scratch) {
                Ok(n) if n == expected => {}
                Ok(_) => return Err(malformed("LZ4 block decompresses to too few bytes")),
                Err(_) => return Err(malformed("LZ4 block is corrupt or too long")),
            }
        }
        let lz4: &'a [u8] = scratch;
        Ok(Pages {
            entries: self.entries.iter(),
            raw: self.raw.chunks_exact(PAGE_SIZE),
            lz4: lz4.chunks_exact(PAGE_SIZE),
        })
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        let mut raw = self.raw.chunks_exact(PAGE_SIZE);
        for &(index, kind) in &self.entries {
            out.extend_from_slice(&index.to_le_bytes());
            out.push(kind as u8);
            if kind == PageKind::Raw {
                out.extend_from_slice(raw.next().unwrap_or(&ZERO_PAGE));
            }
        }
        if self.counts.lz4 > 0 {
            put_bytes(out, &self.lz4);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<PageBatch, FrameError> {
        let round = r.u32("truncated batch header")?;
        let count = r.u32("truncated batch header")? as usize;
        if count > MAX_BATCH_PAGES {
            return Err(r.malformed("more than MAX_BATCH_PAGES pages"));
        }
        if count * ENTRY_LEN > r.buf.len() {
            return Err(r.malformed("truncated page entries"));
        }
        let mut counts = PageCounts::default();
        let mut entries = Vec::with_capacity(count);
        let mut raw = Vec::new();
        for _ in 0..count {
            let index = r.u64("truncated page entry")?;
            let kind = match r.u8("truncated page entry")? {
                0 => {
                    counts.zero += 1;
                    PageKind::Zero
                }
                1 => {
                    counts.raw += 1;
                    raw.extend_from_slice(r.take(PAGE_SIZE, "truncated raw page")?);
                    PageKind::Raw
                }
                2 => {
                    counts.lz4 += 1;
                    PageKind::Lz4
                }
                _ => return Err(r.malformed("unknown page kind")),
            };
            entries.push((index, kind));
        }
        let lz4 = if counts.lz4 > 0 {
            r.prefixed("truncated LZ4 block")?.to_vec()
        } else {
            Vec::new()
        };
        Ok(PageBatch {
            round,
            entries,
            raw,
            lz4,
            counts,
        })
    }
}

/// Iterator over the pages of a [`PageBatch`], from [`PageBatch::pages`].
#[derive(Debug, Clone)]
pub struct Pages<'a> {
    entries: std::slice::Iter<'a, (u64, PageKind)>,
    raw: std::slice::ChunksExact<'a, u8>,
    lz4: std::slice::ChunksExact<'a, u8>,
}

impl<'a> Iterator for Pages<'a> {
    type Item = (u64, PageData<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let &(index, kind) = self.entries.next()?;
        let data = match kind {
            PageKind::Zero => PageData::Zero,
            PageKind::Raw => PageData::Bytes(self.raw.next()?.try_into().ok()?),
            PageKind::Lz4 => PageData::Bytes(self.lz4.next()?.try_into().ok()?),
        };
        Some((index, data))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.entries.size_hint()
    }
}

impl ExactSizeIterator for Pages<'_> {}

/// Whether `page` is all zeros: ORs 64-byte blocks word-wise (vectorizes), stopping at the
/// first non-zero block.
fn is_zero_page(page: &[u8]) -> bool {
    let blocks = page.chunks_exact(64);
    let tail = blocks.remainder();
    blocks
        .map(|block| {
            block.chunks_exact(8).fold(0u64, |acc, word| {
                acc | u64::from_ne_bytes(word.try_into().unwrap_or([0xff; 8]))
            })
        })
        .all(|acc| acc == 0)
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_frames() -> Vec<Frame> {
        let page_a = [0x5au8; PAGE_SIZE];
        vec![
            Frame::Hello {
                versions: vec![1, 2],
                vm_id: "vm-ü-42".into(),
                memory_bytes: 1 << 33,
                vcpus: 4,
                token: [7; 16],
            },
            Frame::Welcome { version: 1 },
            Frame::Reject {
                reason: "no common version".into(),
            },
            Frame::Pages(PageBatch::build(3, &[(1, &ZERO_PAGE), (9, &page_a)])),
            Frame::Pages(PageBatch::build(0, &[])),
            Frame::RoundEnd {
                round: 3,
                pages: u64::MAX,
            },
            Frame::DeviceState {
                bytes: vec![1, 2, 3, 0, 255],
            },
            Frame::DeviceState { bytes: vec![] },
            Frame::Complete {
                rounds: 7,
                pages_total: 123_456,
            },
            Frame::Ready,
            Frame::Commit,
            Frame::Resumed,
            Frame::Abort {
                reason: String::new(),
            },
        ]
    }

    /// Pages of a batch as `(index, bytes)`.
    fn collect(batch: &PageBatch) -> Vec<(u64, Vec<u8>)> {
        let mut scratch = Vec::new();
        batch
            .pages(&mut scratch)
            .unwrap()
            .map(|(i, d)| (i, d.as_bytes().to_vec()))
            .collect()
    }

    /// Deterministic incompressible bytes (xorshift).
    fn random_page(seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..PAGE_SIZE / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect()
    }

    fn pattern_page(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE).map(|i| (i % 16) as u8 ^ seed | 1).collect()
    }

    fn reseal(bytes: &mut [u8]) {
        let crc = crc32c::crc32c(&bytes[HEADER_LEN..]);
        bytes[12..16].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn round_trip_every_frame_type() {
        let frames = sample_frames();
        let mut stream = Vec::new();
        for frame in &frames {
            let bytes = frame.encode();
            assert_eq!(bytes.len(), HEADER_LEN + frame.payload_len());
            assert_eq!(&bytes[..4], b"NCMF");
            let (decoded, used) = decode(&bytes).unwrap();
            assert_eq!(&decoded, frame);
            assert_eq!(used, bytes.len());
            frame.encode_into(&mut stream);
        }
        // Back to back in one buffer, as a stream reader sees them.
        let mut rest = &stream[..];
        for frame in &frames {
            let (decoded, used) = decode(rest).unwrap();
            assert_eq!(&decoded, frame);
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
    }

    #[test]
    fn header_then_payload() {
        let bytes = Frame::RoundEnd { round: 1, pages: 2 }.encode();
        let header = parse_header(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(header.frame_type, FrameType::RoundEnd);
        assert_eq!(header.flags, 0);
        assert_eq!(header.payload_len, 12);
        assert_eq!(header.frame_len(), bytes.len());
        assert_eq!(
            decode_payload(&header, &bytes[HEADER_LEN..]).unwrap(),
            Frame::RoundEnd { round: 1, pages: 2 }
        );
        assert_eq!(
            decode_payload(&header, &bytes[HEADER_LEN + 1..]),
            Err(FrameError::LengthMismatch {
                declared: 12,
                actual: 11
            })
        );
    }

    #[test]
    fn debug_redacts_token() {
        let hello = &sample_frames()[0];
        let text = format!("{hello:?}");
        assert!(
            text.contains("<redacted>") && !text.contains("7, 7"),
            "{text}"
        );
    }

    #[test]
    fn each_corruption_has_its_own_error() {
        let good = Frame::Abort {
            reason: "operator cancelled".into(),
        }
        .encode();

        let mut b = good.clone();
        b[HEADER_LEN + 3] ^= 0x01;
        assert!(matches!(decode(&b), Err(FrameError::Checksum { .. })));

        let mut b = good.clone();
        b[12] ^= 0x80;
        assert!(matches!(decode(&b), Err(FrameError::Checksum { .. })));

        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(decode(&b), Err(FrameError::BadMagic { .. })));

        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(
            decode(&b),
            Err(FrameError::UnsupportedVersion { version: 2 })
        );

        let mut b = good.clone();
        b[6] = 1;
        assert_eq!(decode(&b), Err(FrameError::UnsupportedFlags { flags: 1 }));

        let mut b = good.clone();
        let len = MAX_PAYLOAD as u32 + 1;
        b[8..12].copy_from_slice(&len.to_le_bytes());
        assert_eq!(decode(&b), Err(FrameError::Oversized { len }));
        let len = u32::MAX;
        b[8..12].copy_from_slice(&len.to_le_bytes());
        assert_eq!(decode(&b), Err(FrameError::Oversized { len }));

        for ty in [0u8, 13, 255] {
            let mut b = good.clone();
            b[5] = ty;
            assert_eq!(decode(&b), Err(FrameError::UnknownType { frame_type: ty }));
        }

        // Valid checksum over a payload that does not parse.
        let mut b = good.clone();
        b[HEADER_LEN] = 0xff;
        reseal(&mut b);
        assert_eq!(
            decode(&b),
            Err(FrameError::Malformed {
                frame_type: FrameType::Abort,
                what: "string is not UTF-8"
            })
        );

        let mut b = Frame::Ready.encode();
        b.push(0);
        b[8] = 1;
        reseal(&mut b);
        assert!(matches!(
            decode(&b),
            Err(FrameError::Malformed {
                frame_type: FrameType::Ready,
                ..
            })
        ));
    }

    #[test]
    fn header_is_checked_before_the_payload_arrives() {
        // A header alone is enough to reject garbage, so a reader never waits for it.
        let mut b = Frame::Commit.encode();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&b), Err(FrameError::Oversized { .. })));
        let mut b = Frame::DeviceState { bytes: vec![1; 64] }.encode();
        b.truncate(HEADER_LEN + 10);
        assert_eq!(decode(&b), Err(FrameError::Incomplete { needed: 80 }));
        b[5] = 99;
        assert_eq!(decode(&b), Err(FrameError::UnknownType { frame_type: 99 }));
    }

    #[test]
    fn truncation_is_incomplete_at_every_length() {
        for frame in sample_frames() {
            let bytes = frame.encode();
            for cut in 0..bytes.len() {
                let needed = if cut < HEADER_LEN {
                    HEADER_LEN
                } else {
                    bytes.len()
                };
                assert_eq!(
                    decode(&bytes[..cut]),
                    Err(FrameError::Incomplete { needed }),
                    "{frame:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn zero_pages_are_markers() {
        let batch = PageBatch::build(0, &[(5, &ZERO_PAGE), (6, &ZERO_PAGE)]);
        assert_eq!(
            batch.counts(),
            PageCounts {
                zero: 2,
                raw: 0,
                lz4: 0
            }
        );
        assert_eq!(batch.wire_bytes(), 8 + 2 * 9);
        assert_eq!(batch.raw_bytes(), 2 * PAGE_SIZE);
        let mut scratch = Vec::new();
        let pages: Vec<_> = batch.pages(&mut scratch).unwrap().collect();
        assert_eq!(pages, vec![(5, PageData::Zero), (6, PageData::Zero)]);
        // A single non-zero byte anywhere makes a page non-zero.
        for at in [0, 7, 8, 63, 64, 2049, PAGE_SIZE - 1] {
            let mut page = vec![0u8; PAGE_SIZE];
            page[at] = 1;
            assert!(!is_zero_page(&page), "byte {at}");
        }
        assert!(is_zero_page(&ZERO_PAGE));
    }

    #[test]
    fn compressible_pages_go_lz4() {
        let a = pattern_page(1);
        let b = pattern_page(2);
        let batch = PageBatch::build(2, &[(10, &a), (11, &b)]);
        assert_eq!(batch.counts().lz4, 2);
        assert!(batch.wire_bytes() * 8 < batch.raw_bytes());
        let frame = Frame::Pages(batch.clone());
        let (decoded, _) = decode(&frame.encode()).unwrap();
        let Frame::Pages(decoded) = decoded else {
            panic!("not pages")
        };
        assert_eq!(decoded.round(), 2);
        assert_eq!(collect(&decoded), vec![(10, a), (11, b)]);
    }

    #[test]
    fn random_pages_bypass_lz4() {
        let pages: Vec<Vec<u8>> = (1..=3).map(random_page).collect();
        let input: Vec<(u64, &[u8])> = pages
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u64 * 100, &p[..]))
            .collect();
        let batch = PageBatch::build(1, &input);
        assert_eq!(
            batch.counts(),
            PageCounts {
                zero: 0,
                raw: 3,
                lz4: 0
            }
        );
        assert_eq!(batch.wire_bytes(), 8 + 3 * (9 + PAGE_SIZE));
        let (Frame::Pages(decoded), _) = decode(&Frame::Pages(batch).encode()).unwrap() else {
            panic!("not pages")
        };
        let expected: Vec<_> = input.iter().map(|&(i, p)| (i, p.to_vec())).collect();
        assert_eq!(collect(&decoded), expected);
    }

    #[test]
    fn mixed_batch_keeps_order() {
        let pat = pattern_page(3);
        let rnd = random_page(9);
        let input: Vec<(u64, &[u8])> = vec![
            (0, &ZERO_PAGE),
            (1, &pat),
            (2, &rnd),
            (3, &ZERO_PAGE),
            (4, &pat),
        ];
        let batch = PageBatch::build(4, &input);
        // Two pattern pages and one random page still shrink enough together.
        assert_eq!(
            batch.counts(),
            PageCounts {
                zero: 2,
                raw: 0,
                lz4: 3
            }
        );
        let (Frame::Pages(decoded), _) = decode(&Frame::Pages(batch).encode()).unwrap() else {
            panic!("not pages")
        };
        let expected: Vec<_> = input.iter().map(|&(i, p)| (i, p.to_vec())).collect();
        assert_eq!(collect(&decoded), expected);

        // Mostly random (8 of 9 non-zero pages, so LZ4 cannot save 1/8): the whole non-zero
        // set goes raw, zero pages stay markers.
        let rnds: Vec<Vec<u8>> = (10..18).map(random_page).collect();
        let mut input: Vec<(u64, &[u8])> = vec![(0, &ZERO_PAGE), (1, &pat)];
        input.extend(rnds.iter().zip(2..).map(|(p, i)| (i, &p[..])));
        let batch = PageBatch::build(5, &input);
        assert_eq!(
            batch.counts(),
            PageCounts {
                zero: 1,
                raw: 9,
                lz4: 0
            }
        );
        let expected: Vec<_> = input.iter().map(|&(i, p)| (i, p.to_vec())).collect();
        assert_eq!(collect(&batch), expected);
    }

    #[test]
    fn largest_batch_fits_in_a_frame() {
        let pages: Vec<Vec<u8>> = (0..MAX_BATCH_PAGES as u64).map(random_page).collect();
        let input: Vec<(u64, &[u8])> = pages
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u64, &p[..]))
            .collect();
        let frame = Frame::Pages(PageBatch::build(0, &input));
        assert!(frame.payload_len() <= MAX_PAYLOAD);
        let bytes = frame.encode();
        assert_eq!(decode(&bytes).unwrap().0, frame);
    }

    /// A batch payload by hand: `round 0`, entries, optional LZ4 section.
    fn batch_frame(entries: &[(u64, u8)], raw: &[u8], lz4: Option<&[u8]>) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for &(i, k) in entries {
            p.extend_from_slice(&i.to_le_bytes());
            p.push(k);
        }
        p.extend_from_slice(raw);
        if let Some(block) = lz4 {
            p.extend_from_slice(&(block.len() as u32).to_le_bytes());
            p.extend_from_slice(block);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[VERSION, FrameType::Pages as u8, 0, 0]);
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(&crc32c::crc32c(&p).to_le_bytes());
        b.extend_from_slice(&p);
        b
    }

    fn batch_of(bytes: &[u8]) -> Result<PageBatch, FrameError> {
        match decode(bytes)?.0 {
            Frame::Pages(batch) => Ok(batch),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_batches() {
        let what = |r: Result<PageBatch, FrameError>| match r {
            Err(FrameError::Malformed { what, .. }) => what,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            what(batch_of(&batch_frame(&[(0, 3)], &[], None))),
            "unknown page kind"
        );
        assert_eq!(
            what(batch_of(&batch_frame(&[(0, 1)], &[0; 100], None))),
            "truncated raw page"
        );
        assert_eq!(
            what(batch_of(&batch_frame(&[(0, 2)], &[], None))),
            "truncated LZ4 block"
        );
        assert_eq!(
            what(batch_of(&batch_frame(&[(0, 0)], &[], Some(&[1])))),
            "trailing bytes after the payload"
        );
        // Count larger than the entries present, and above the maximum.
        let mut b = batch_frame(&[(0, 0)], &[], None);
        b[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&2u32.to_le_bytes());
        reseal(&mut b);
        assert_eq!(what(batch_of(&b)), "truncated page entries");
        b[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(&mut b);
        assert_eq!(what(batch_of(&b)), "more than MAX_BATCH_PAGES pages");

        // The LZ4 block must decompress to exactly count_kind2 × PAGE_SIZE bytes.
        let one = lz4_flex::block::compress(&[7u8; PAGE_SIZE]);
        let two = lz4_flex::block::compress(&[7u8; 2 * PAGE_SIZE]);
        let mut scratch = Vec::new();
        let ok = batch_of(&batch_frame(&[(0, 2)], &[], Some(&one))).unwrap();
        assert_eq!(collect(&ok), vec![(0, vec![7u8; PAGE_SIZE])]);
        let long = batch_of(&batch_frame(&[(0, 2)], &[], Some(&two))).unwrap();
        assert!(matches!(
            long.pages(&mut scratch),
            Err(FrameError::Malformed { .. })
        ));
        let short = batch_of(&batch_frame(&[(0, 2), (1, 2)], &[], Some(&one))).unwrap();
        assert!(matches!(
            short.pages(&mut scratch),
            Err(FrameError::Malformed { .. })
        ));
        let junk = batch_of(&batch_frame(&[(0, 2)], &[], Some(&[0xff; 12]))).unwrap();
        assert!(matches!(
            junk.pages(&mut scratch),
            Err(FrameError::Malformed { .. })
        ));
        let empty = batch_of(&batch_frame(&[(0, 2)], &[], Some(&[]))).unwrap();
        assert!(empty.pages(&mut scratch).is_err());
    }

    #[test]
    #[should_panic(expected = "not PAGE_SIZE")]
    fn build_rejects_short_pages() {
        PageBatch::build(0, &[(0, &[1u8; 100])]);
    }

    fn arb_page() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(vec![0u8; PAGE_SIZE]),
            any::<u8>().prop_map(pattern_page),
            any::<u64>().prop_map(random_page),
            // Mostly zero with a few set bytes.
            prop::collection::vec((0..PAGE_SIZE, 1..=255u8), 1..4).prop_map(|set| {
                let mut p = vec![0u8; PAGE_SIZE];
                for (at, v) in set {
                    p[at] = v;
                }
                p
            }),
        ]
    }

    fn arb_string() -> impl Strategy<Value = String> {
        prop::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter)
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                prop::collection::vec(any::<u8>(), 0..8),
                arb_string(),
                any::<u64>(),
                any::<u8>(),
                any::<[u8; 16]>()
            )
                .prop_map(|(versions, vm_id, memory_bytes, vcpus, token)| {
                    Frame::Hello {
                        versions,
                        vm_id,
                        memory_bytes,
                        vcpus,
                        token,
                    }
                }),
            any::<u8>().prop_map(|version| Frame::Welcome { version }),
            arb_string().prop_map(|reason| Frame::Reject { reason }),
            (
                any::<u32>(),
                prop::collection::vec((any::<u64>(), arb_page()), 0..6)
            )
                .prop_map(|(round, pages)| {
                    let input: Vec<(u64, &[u8])> =
                        pages.iter().map(|(i, p)| (*i, &p[..])).collect();
                    Frame::Pages(PageBatch::build(round, &input))
                }),
            (any::<u32>(), any::<u64>())
                .prop_map(|(round, pages)| Frame::RoundEnd { round, pages }),
            (any::<u32>(), any::<u64>())
                .prop_map(|(round, pages)| Frame::RoundAck { round, pages }),
            prop::collection::vec(any::<u8>(), 0..64)
                .prop_map(|bytes| Frame::DeviceState { bytes }),
            (any::<u32>(), any::<u64>()).prop_map(|(rounds, pages_total)| Frame::Complete {
                rounds,
                pages_total
            }),
            Just(Frame::Ready),
            Just(Frame::Commit),
            Just(Frame::Resumed),
            arb_string().prop_map(|reason| Frame::Abort { reason }),
        ]
    }

    /// Decodes and, if that works, walks the pages and checks re-encoding is the identity.
    fn exercise(bytes: &[u8]) {
        if let Ok((frame, used)) = decode(bytes) {
            assert_eq!(frame.encode(), &bytes[..used]);
            if let Frame::Pages(batch) = &frame {
                let mut scratch = Vec::new();
                if let Ok(pages) = batch.pages(&mut scratch) {
                    assert_eq!(pages.count(), batch.len());
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_round_trip(frame in arb_frame(), tail in prop::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = frame.encode();
            let len = bytes.len();
            bytes.extend_from_slice(&tail);
            let (decoded, used) = decode(&bytes).unwrap();
            prop_assert_eq!(used, len);
            if let (Frame::Pages(a), Frame::Pages(b)) = (&frame, &decoded) {
                prop_assert_eq!(collect(a), collect(b));
            }
            prop_assert_eq!(decoded, frame);
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            exercise(&bytes);
        }

        #[test]
        fn prop_arbitrary_payload_never_panics(
            ty in 0u8..13,
            payload in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut bytes = Frame::Ready.encode();
            bytes[5] = ty;
            bytes[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&payload);
            reseal(&mut bytes);
            exercise(&bytes);
        }

        #[test]
        fn prop_mutated_frames_never_panic(
            frame in arb_frame(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            fix_crc in any::<bool>(),
        ) {
            let mut bytes = frame.encode();
            for (at, value) in edits {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            if fix_crc {
                // Get past the checksum so the payload parser sees the damage.
                reseal(&mut bytes);
            }
            exercise(&bytes);
            let cut = cut.index(bytes.len());
            exercise(&bytes[..cut]);
        }
    }
}
