//! The guest-agent ABI shared with the test guest (`src/c/ncga.h` is the C side; a unit
//! test keeps the two in step).
//!
//! The guest talks to the VMM through a few 32-bit I/O ports and a 4 KiB status page in
//! its own memory. Page contents and the running checksum are defined here exactly, so
//! the host can check guest memory (e.g. after a migration) without the guest's help.

use std::fmt;

// ---- ports ----

/// In: reads [`DEVICE_ID`] when the guest-agent device is present.
pub const PORT_ID: u16 = 0x0f40;
/// Out: guest-physical address of the status page, written once at start.
pub const PORT_STATUS_GPA: u16 = 0x0f44;
/// Out: an event code (`EV_*`), written after the status page was updated.
pub const PORT_DOORBELL: u16 = 0x0f48;
/// Out: exit-heavy filler; the value is ignored.
pub const PORT_NOP: u16 = 0x0f4c;
/// In: guest TSC frequency in kHz, 0 if unknown.
pub const PORT_TSC_KHZ: u16 = 0x0f50;
/// Out (8-bit): Bochs/QEMU debug console.
pub const PORT_DEBUGCON: u16 = 0x00e9;
/// 16550 UART base (THR; LSR is at +5).
pub const PORT_UART: u16 = 0x03f8;
/// i8042 command port, used to reset (power off under `-no-reboot`) without the device.
pub const PORT_I8042_CMD: u16 = 0x0064;
/// i8042 "pulse reset line" command.
pub const I8042_RESET: u8 = 0xfe;

// ---- identification ----

/// Value of [`PORT_ID`]: "NCGA" little endian.
pub const DEVICE_ID: u32 = 0x4147_434e;
/// Status page magic: "NCST" little endian.
pub const STATUS_MAGIC: u32 = 0x5453_434e;
/// Status page layout version.
pub const STATUS_VERSION: u32 = 1;
/// Size and alignment of the status page.
pub const STATUS_PAGE_SIZE: usize = 4096;
/// Size of the NUL-terminated message at [`OFF_MESSAGE`].
pub const MESSAGE_LEN: usize = 256;

/// `hvm_start_info.magic` expected in RBX/EBX at entry.
pub const PVH_START_MAGIC: u32 = 0x336e_c578;
/// Xen ELF note type carrying the 32-bit PVH entry address.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Physical (= virtual) load address of the guest image.
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;

// ---- events (doorbell values) ----

/// Status page valid, before the first page write.
pub const EV_READY: u32 = 1;
/// After the very first page write, then every `report_ms`.
pub const EV_PROGRESS: u32 = 2;
/// A verification finished (`verify_*` fields updated).
pub const EV_VERIFY_DONE: u32 = 3;
/// A command was executed (`cmd_ack` updated).
pub const EV_CMD_ACK: u32 = 4;
/// Fatal guest error; `message` says why. A [`EV_POWEROFF`] follows.
pub const EV_PANIC: u32 = 5;
/// The guest asks to be powered off and spins on `pause` from now on.
pub const EV_POWEROFF: u32 = 6;

// ---- commands (VMM -> guest through the status page) ----

/// Set the target rate in pages/s (0 = unlimited).
pub const CMD_SET_RATE: u32 = 1;
/// Set the write pattern (`PATTERN_*`).
pub const CMD_SET_PATTERN: u32 = 2;
/// Verify the whole working set (VERIFY_DONE, then CMD_ACK).
pub const CMD_VERIFY: u32 = 3;
/// Set the NOP port writes per page written.
pub const CMD_SET_EXIT_HEAVY: u32 = 4;
/// Set the hot-set size in pages (clamped to 1..=ws_pages).
pub const CMD_SET_HOT_PAGES: u32 = 5;
/// Power off (after CMD_ACK).
pub const CMD_POWEROFF: u32 = 6;

// ---- patterns ----

/// Pages 0, 1, 2, ... wrapping.
pub const PATTERN_SEQ: u32 = 0;
/// xorshift64 over the working set.
pub const PATTERN_RANDOM: u32 = 1;
/// xorshift64 over the first `hot_pages` pages.
pub const PATTERN_HOT: u32 = 2;

// ---- page content and checksum ----

/// Working-set page size.
pub const PAGE_SIZE: usize = 4096;
/// 64-bit words per page.
pub const PAGE_WORDS: usize = 512;
/// Step between consecutive pattern words.
pub const WORD_STEP: u64 = 0x9e37_79b9_7f4a_7c15;
/// Page-index multiplier of the checksum term.
pub const TERM_K1: u64 = 0xd1b5_4a32_d192_ed03;
/// Generation multiplier of the checksum term.
pub const TERM_K2: u64 = 0xabc9_8388_fb8f_ac03;
/// splitmix64 increment.
pub const SPLITMIX_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
/// splitmix64 first multiplier.
pub const SPLITMIX_M1: u64 = 0xbf58_476d_1ce4_e5b9;
/// splitmix64 second multiplier.
pub const SPLITMIX_M2: u64 = 0x94d0_49bb_1331_11eb;
/// `nc.seed` when the command line does not set one.
pub const DEFAULT_SEED: u64 = 0;

// ---- status page offsets ----

/// u32 magic.
pub const OFF_MAGIC: usize = 0x00;
/// u32 version.
pub const OFF_VERSION: usize = 0x04;
/// u64, bumped by the guest on every update (before the doorbell).
pub const OFF_SEQ: usize = 0x08;
/// u64 total page writes since start.
pub const OFF_PAGES_WRITTEN: usize = 0x10;
/// u64 running checksum of the working set.
pub const OFF_CHECKSUM: usize = 0x18;
/// u64 guest-physical start of the working set.
pub const OFF_WS_START: usize = 0x20;
/// u64 working-set size in pages.
pub const OFF_WS_PAGES: usize = 0x28;
/// u64 current target pages/s.
pub const OFF_RATE: usize = 0x30;
/// u32 pattern code.
pub const OFF_PATTERN: usize = 0x38;
/// u32 NOP outs per page.
pub const OFF_EXIT_HEAVY: usize = 0x3c;
/// u64 hot-set size.
pub const OFF_HOT_PAGES: usize = 0x40;
/// u64 completed verifications.
pub const OFF_VERIFY_COUNT: usize = 0x48;
/// u64 bad pages found by the last verification.
pub const OFF_VERIFY_BAD_PAGES: usize = 0x50;
/// u64 checksum recomputed by the last verification.
pub const OFF_VERIFY_CHECKSUM: usize = 0x58;
/// u64 TSC frequency the guest uses.
pub const OFF_TSC_KHZ: usize = 0x60;
/// u64 guest ms since the workload started (as of the last event).
pub const OFF_ELAPSED_MS: usize = 0x68;
/// u64 written by the VMM: bump to post a command.
pub const OFF_CMD_SEQ: usize = 0x70;
/// u32 written by the VMM: command code.
pub const OFF_CMD: usize = 0x78;
/// u32 reserved.
pub const OFF_RESERVED: usize = 0x7c;
/// u64 written by the VMM: command argument.
pub const OFF_CMD_ARG: usize = 0x80;
/// u64 set by the guest to `cmd_seq` once the command was executed.
pub const OFF_CMD_ACK: usize = 0x88;
/// u64 total NOP outs issued.
pub const OFF_NOP_OUTS: usize = 0x90;
/// u64 the workload seed (`nc.seed`), needed to verify page contents from the host.
pub const OFF_SEED: usize = 0x98;
/// u64 the page being written, plus one (0: none). Set before the page's first word is
/// written and cleared after the checksum is updated.
pub const OFF_WRITING: usize = 0xa0;
/// u64 the generation the page in flight had before this write.
pub const OFF_WRITING_OLD_GEN: usize = 0xa8;
/// `char[256]` NUL-terminated text for PANIC events.
pub const OFF_MESSAGE: usize = 0x100;
/// Bytes of the status page that carry fields.
pub const STATUS_USED_LEN: usize = OFF_MESSAGE + MESSAGE_LEN;

/// splitmix64 finaliser as used by the guest.
pub const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(SPLITMIX_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(SPLITMIX_M1);
    z = (z ^ (z >> 27)).wrapping_mul(SPLITMIX_M2);
    z ^ (z >> 31)
}

/// Base of the pattern words of page `page_index` at generation `generation`.
pub const fn pattern_base(seed: u64, page_index: u64, generation: u64) -> u64 {
    splitmix64(seed ^ (page_index << 20) ^ generation)
}

/// Expected `word` (0..512) of page `page_index` after its `generation`-th write, for
/// the default seed ([`DEFAULT_SEED`]); see [`expected_page_word_seeded`].
pub const fn expected_page_word(page_index: u64, generation: u64, word: usize) -> u64 {
    expected_page_word_seeded(DEFAULT_SEED, page_index, generation, word)
}

/// Expected `word` (0..512) of page `page_index` after its `generation`-th write.
///
/// Generation 0 is a never-written page: all zero. Otherwise word 0 is the page index,
/// word 1 the generation and word j >= 2 is `pattern_base + j * WORD_STEP` (wrapping).
pub const fn expected_page_word_seeded(
    seed: u64,
    page_index: u64,
    generation: u64,
    word: usize,
) -> u64 {
    if generation == 0 {
        return 0;
    }
    match word {
        0 => page_index,
        1 => generation,
        j => pattern_base(seed, page_index, generation)
            .wrapping_add((j as u64).wrapping_mul(WORD_STEP)),
    }
}

/// Contribution of page `page_index` at `generation` to the running checksum, for the
/// default seed; see [`checksum_term_seeded`].
pub const fn checksum_term(page_index: u64, generation: u64) -> u64 {
    checksum_term_seeded(DEFAULT_SEED, page_index, generation)
}

/// Contribution of page `page_index` at `generation` to the running checksum: 0 for
/// generation 0, else `splitmix64(i * TERM_K1 + g * TERM_K2 + seed)` (wrapping). The
/// checksum is the wrapping sum of the terms of all working-set pages.
pub const fn checksum_term_seeded(seed: u64, page_index: u64, generation: u64) -> u64 {
    if generation == 0 {
        return 0;
    }
    splitmix64(
        page_index
            .wrapping_mul(TERM_K1)
            .wrapping_add(generation.wrapping_mul(TERM_K2))
            .wrapping_add(seed),
    )
}

/// Checks one working-set page the way the guest's verification does.
///
/// Returns the page's generation if it is valid (all zero counts as generation 0), or
/// `None` if it is corrupt. `page` must be [`PAGE_SIZE`] bytes.
pub fn check_page(seed: u64, page_index: u64, page: &[u8]) -> Option<u64> {
    if page.len() != PAGE_SIZE {
        return None;
    }
    let word = |j: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&page[j * 8..j * 8 + 8]);
        u64::from_le_bytes(b)
    };
    let generation = word(1);
    (0..PAGE_WORDS)
        .all(|j| word(j) == expected_page_word_seeded(seed, page_index, generation, j))
        .then_some(generation)
}

/// Pattern name as used by `nc.pattern=` and the report lines.
pub fn pattern_name(pattern: u32) -> Option<&'static str> {
    match pattern {
        PATTERN_SEQ => Some("seq"),
        PATTERN_RANDOM => Some("random"),
        PATTERN_HOT => Some("hot"),
        _ => None,
    }
}

/// Why a status page could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiError {
    /// The buffer is shorter than the status fields.
    TooShort {
        /// Length given.
        len: usize,
    },
    /// Wrong magic (the guest has not initialised the page, or it is not a status page).
    BadMagic(u32),
    /// Unsupported layout version.
    BadVersion(u32),
}

impl fmt::Display for AbiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbiError::TooShort { len } => write!(
                f,
                "status page too short: {len} bytes, need at least {STATUS_USED_LEN}"
            ),
            AbiError::BadMagic(m) => {
                write!(
                    f,
                    "bad status page magic {m:#010x} (want {STATUS_MAGIC:#010x})"
                )
            }
            AbiError::BadVersion(v) => {
                write!(
                    f,
                    "unsupported status page version {v} (want {STATUS_VERSION})"
                )
            }
        }
    }
}

impl std::error::Error for AbiError {}

/// The status page's PANIC message buffer (NUL-terminated).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StatusMessage(pub [u8; MESSAGE_LEN]);

impl StatusMessage {
    /// Builds a message from text, truncated to fit with its NUL.
    pub fn new(text: &str) -> Self {
        let mut m = [0u8; MESSAGE_LEN];
        let n = text.len().min(MESSAGE_LEN - 1);
        m[..n].copy_from_slice(&text.as_bytes()[..n]);
        StatusMessage(m)
    }

    /// The text up to the first NUL (lossy if not UTF-8).
    pub fn text(&self) -> String {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(MESSAGE_LEN);
        String::from_utf8_lossy(&self.0[..end]).into_owned()
    }
}

impl Default for StatusMessage {
    fn default() -> Self {
        StatusMessage([0; MESSAGE_LEN])
    }
}

impl fmt::Debug for StatusMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text(), f)
    }
}

/// Decoded status page (magic and version are checked by [`GuestStatus::parse`] and
/// written by [`GuestStatus::write_to`], so they are not fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestStatus {
    /// Bumped by the guest on every update.
    pub seq: u64,
    /// Total page writes since start.
    pub pages_written: u64,
    /// Running checksum of the working set.
    pub checksum: u64,
    /// Guest-physical start of the working set (a virtual address for the Linux build).
    pub ws_start: u64,
    /// Working-set size in pages.
    pub ws_pages: u64,
    /// Current target pages/s (0 = unlimited).
    pub rate: u64,
    /// Pattern code (`PATTERN_*`).
    pub pattern: u32,
    /// NOP outs per page written.
    pub exit_heavy: u32,
    /// Hot-set size in pages.
    pub hot_pages: u64,
    /// Completed verifications.
    pub verify_count: u64,
    /// Bad pages found by the last verification.
    pub verify_bad_pages: u64,
    /// Checksum recomputed from memory by the last verification.
    pub verify_checksum: u64,
    /// TSC frequency the guest uses.
    pub tsc_khz: u64,
    /// Guest ms since the workload started, as of the last event.
    pub elapsed_ms: u64,
    /// Written by the VMM: bumped to post a command.
    pub cmd_seq: u64,
    /// Written by the VMM: command code (`CMD_*`).
    pub cmd: u32,
    /// Written by the VMM: command argument.
    pub cmd_arg: u64,
    /// The last `cmd_seq` the guest executed.
    pub cmd_ack: u64,
    /// Total NOP outs issued.
    pub nop_outs: u64,
    /// Workload seed (needed for [`check_page`]).
    pub seed: u64,
    /// The page in flight plus one (0: none): a paused guest may be in the middle of it.
    pub writing: u64,
    /// Generation of the page in flight before the write (its term is still in `checksum`).
    pub writing_old_gen: u64,
    /// PANIC text.
    pub message: StatusMessage,
}

fn rd32(p: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&p[off..off + 4]);
    u32::from_le_bytes(b)
}

fn rd64(p: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[off..off + 8]);
    u64::from_le_bytes(b)
}

fn wr32(p: &mut [u8], off: usize, v: u32) {
    p[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn wr64(p: &mut [u8], off: usize, v: u64) {
    p[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

impl GuestStatus {
    /// Decodes a status page (at least [`STATUS_USED_LEN`] bytes, normally a whole page).
    pub fn parse(page: &[u8]) -> Result<GuestStatus, AbiError> {
        if page.len() < STATUS_USED_LEN {
            return Err(AbiError::TooShort { len: page.len() });
        }
        let magic = rd32(page, OFF_MAGIC);
        if magic != STATUS_MAGIC {
            return Err(AbiError::BadMagic(magic));
        }
        let version = rd32(page, OFF_VERSION);
        if version != STATUS_VERSION {
            return Err(AbiError::BadVersion(version));
        }
        let mut message = [0u8; MESSAGE_LEN];
        message.copy_from_slice(&page[OFF_MESSAGE..OFF_MESSAGE + MESSAGE_LEN]);
        Ok(GuestStatus {
            seq: rd64(page, OFF_SEQ),
            pages_written: rd64(page, OFF_PAGES_WRITTEN),
            checksum: rd64(page, OFF_CHECKSUM),
            ws_start: rd64(page, OFF_WS_START),
            ws_pages: rd64(page, OFF_WS_PAGES),
            rate: rd64(page, OFF_RATE),
            pattern: rd32(page, OFF_PATTERN),
            exit_heavy: rd32(page, OFF_EXIT_HEAVY),
            hot_pages: rd64(page, OFF_HOT_PAGES),
            verify_count: rd64(page, OFF_VERIFY_COUNT),
            verify_bad_pages: rd64(page, OFF_VERIFY_BAD_PAGES),
            verify_checksum: rd64(page, OFF_VERIFY_CHECKSUM),
            tsc_khz: rd64(page, OFF_TSC_KHZ),
            elapsed_ms: rd64(page, OFF_ELAPSED_MS),
            cmd_seq: rd64(page, OFF_CMD_SEQ),
            cmd: rd32(page, OFF_CMD),
            cmd_arg: rd64(page, OFF_CMD_ARG),
            cmd_ack: rd64(page, OFF_CMD_ACK),
            nop_outs: rd64(page, OFF_NOP_OUTS),
            seed: rd64(page, OFF_SEED),
            writing: rd64(page, OFF_WRITING),
            writing_old_gen: rd64(page, OFF_WRITING_OLD_GEN),
            message: StatusMessage(message),
        })
    }

    /// Encodes into `page` (at least [`STATUS_USED_LEN`] bytes) with magic and version;
    /// bytes outside the fields are left alone. Useful for tests and fake guests.
    ///
    /// # Panics
    /// If `page` is shorter than [`STATUS_USED_LEN`].
    pub fn write_to(&self, page: &mut [u8]) {
        assert!(
            page.len() >= STATUS_USED_LEN,
            "status page buffer too short: {}",
            page.len()
        );
        wr32(page, OFF_MAGIC, STATUS_MAGIC);
        wr32(page, OFF_VERSION, STATUS_VERSION);
        wr64(page, OFF_SEQ, self.seq);
        wr64(page, OFF_PAGES_WRITTEN, self.pages_written);
        wr64(page, OFF_CHECKSUM, self.checksum);
        wr64(page, OFF_WS_START, self.ws_start);
        wr64(page, OFF_WS_PAGES, self.ws_pages);
        wr64(page, OFF_RATE, self.rate);
        wr32(page, OFF_PATTERN, self.pattern);
        wr32(page, OFF_EXIT_HEAVY, self.exit_heavy);
        wr64(page, OFF_HOT_PAGES, self.hot_pages);
        wr64(page, OFF_VERIFY_COUNT, self.verify_count);
        wr64(page, OFF_VERIFY_BAD_PAGES, self.verify_bad_pages);
        wr64(page, OFF_VERIFY_CHECKSUM, self.verify_checksum);
        wr64(page, OFF_TSC_KHZ, self.tsc_khz);
        wr64(page, OFF_ELAPSED_MS, self.elapsed_ms);
        wr64(page, OFF_CMD_SEQ, self.cmd_seq);
        wr32(page, OFF_CMD, self.cmd);
        wr32(page, OFF_RESERVED, 0);
        wr64(page, OFF_CMD_ARG, self.cmd_arg);
        wr64(page, OFF_CMD_ACK, self.cmd_ack);
        wr64(page, OFF_NOP_OUTS, self.nop_outs);
        wr64(page, OFF_SEED, self.seed);
        wr64(page, OFF_WRITING, self.writing);
        wr64(page, OFF_WRITING_OLD_GEN, self.writing_old_gen);
        page[OFF_MESSAGE..OFF_MESSAGE + MESSAGE_LEN].copy_from_slice(&self.message.0);
    }

    /// Encodes into a fresh zeroed page.
    pub fn to_page(&self) -> [u8; STATUS_PAGE_SIZE] {
        let mut p = [0u8; STATUS_PAGE_SIZE];
        self.write_to(&mut p);
        p
    }

    /// Whether the guest has executed the last posted command.
    pub fn command_done(&self) -> bool {
        self.cmd_ack == self.cmd_seq
    }

    /// Expected word of a working-set page under this guest's seed.
    pub fn expected_page_word(&self, page_index: u64, generation: u64, word: usize) -> u64 {
        expected_page_word_seeded(self.seed, page_index, generation, word)
    }

    /// Checksum term of a working-set page under this guest's seed.
    pub fn checksum_term(&self, page_index: u64, generation: u64) -> u64 {
        checksum_term_seeded(self.seed, page_index, generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestStatus {
        GuestStatus {
            seq: 7,
            pages_written: 123_456,
            checksum: 0xdead_beef_0123_4567,
            ws_start: 0x20_0000,
            ws_pages: 64_512,
            rate: 5000,
            pattern: PATTERN_HOT,
            exit_heavy: 3,
            hot_pages: 256,
            verify_count: 2,
            verify_bad_pages: 1,
            verify_checksum: 42,
            tsc_khz: 2_600_000,
            elapsed_ms: 999,
            cmd_seq: 5,
            cmd: CMD_VERIFY,
            cmd_arg: 77,
            cmd_ack: 4,
            nop_outs: 370_368,
            seed: 9,
            writing: 7,
            writing_old_gen: 3,
            message: StatusMessage::new("boom"),
        }
    }

    #[test]
    fn parse_round_trip() {
        let s = sample();
        let page = s.to_page();
        assert_eq!(GuestStatus::parse(&page), Ok(s));
        assert_eq!(rd32(&page, OFF_MAGIC), STATUS_MAGIC);
        assert_eq!(s.message.text(), "boom");
        assert!(!s.command_done());
        let d = GuestStatus::default();
        assert_eq!(GuestStatus::parse(&d.to_page()), Ok(d));
    }

    #[test]
    fn parse_rejects_bad_pages() {
        let mut page = sample().to_page();
        assert_eq!(
            GuestStatus::parse(&page[..100]),
            Err(AbiError::TooShort { len: 100 })
        );
        wr32(&mut page, OFF_VERSION, 2);
        assert_eq!(GuestStatus::parse(&page), Err(AbiError::BadVersion(2)));
        wr32(&mut page, OFF_MAGIC, 0);
        assert_eq!(GuestStatus::parse(&page), Err(AbiError::BadMagic(0)));
        assert!(AbiError::BadMagic(0).to_string().contains("magic"));
    }

    #[test]
    fn page_words_and_check_page() {
        assert_eq!(expected_page_word(5, 0, 0), 0);
        assert_eq!(expected_page_word(5, 0, 300), 0);
        assert_eq!(expected_page_word(5, 3, 0), 5);
        assert_eq!(expected_page_word(5, 3, 1), 3);
        assert_eq!(
            expected_page_word(5, 3, 3).wrapping_sub(expected_page_word(5, 3, 2)),
            WORD_STEP
        );
        assert_eq!(checksum_term(5, 0), 0);
        assert_ne!(checksum_term(5, 1), checksum_term(5, 2));
        assert_ne!(checksum_term_seeded(1, 5, 1), checksum_term(5, 1));

        let mut page = vec![0u8; PAGE_SIZE];
        assert_eq!(check_page(9, 17, &page), Some(0));
        for j in 0..PAGE_WORDS {
            let w = expected_page_word_seeded(9, 17, 4, j);
            page[j * 8..j * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(check_page(9, 17, &page), Some(4));
        assert_eq!(check_page(8, 17, &page), None);
        assert_eq!(check_page(9, 16, &page), None);
        page[4000] ^= 1;
        assert_eq!(check_page(9, 17, &page), None);
    }

    /// Known values computed by the C implementation (from guest runs).
    #[test]
    fn matches_c_reference_values() {
        // `progress pages=1` of a seq run with the default seed: page 0 at generation 1.
        assert_eq!(checksum_term(0, 1), 0xb550_6de8_fdc2_1900);
    }

    /// Every numeric #define in ncga.h must equal the Rust constant of the same name.
    #[test]
    fn header_matches_rust_constants() {
        let rust: &[(&str, u64)] = &[
            ("PORT_ID", PORT_ID.into()),
            ("PORT_STATUS_GPA", PORT_STATUS_GPA.into()),
            ("PORT_DOORBELL", PORT_DOORBELL.into()),
            ("PORT_NOP", PORT_NOP.into()),
            ("PORT_TSC_KHZ", PORT_TSC_KHZ.into()),
            ("PORT_DEBUGCON", PORT_DEBUGCON.into()),
            ("PORT_UART", PORT_UART.into()),
            ("PORT_I8042_CMD", PORT_I8042_CMD.into()),
            ("I8042_RESET", I8042_RESET.into()),
            ("DEVICE_ID", DEVICE_ID.into()),
            ("STATUS_MAGIC", STATUS_MAGIC.into()),
            ("STATUS_VERSION", STATUS_VERSION.into()),
            ("STATUS_PAGE_SIZE", STATUS_PAGE_SIZE as u64),
            ("MESSAGE_LEN", MESSAGE_LEN as u64),
            ("PVH_START_MAGIC", PVH_START_MAGIC.into()),
            ("XEN_ELFNOTE_PHYS32_ENTRY", XEN_ELFNOTE_PHYS32_ENTRY.into()),
            ("GUEST_LOAD_ADDR", GUEST_LOAD_ADDR),
            ("EV_READY", EV_READY.into()),
            ("EV_PROGRESS", EV_PROGRESS.into()),
            ("EV_VERIFY_DONE", EV_VERIFY_DONE.into()),
            ("EV_CMD_ACK", EV_CMD_ACK.into()),
            ("EV_PANIC", EV_PANIC.into()),
            ("EV_POWEROFF", EV_POWEROFF.into()),
            ("CMD_SET_RATE", CMD_SET_RATE.into()),
            ("CMD_SET_PATTERN", CMD_SET_PATTERN.into()),
            ("CMD_VERIFY", CMD_VERIFY.into()),
            ("CMD_SET_EXIT_HEAVY", CMD_SET_EXIT_HEAVY.into()),
            ("CMD_SET_HOT_PAGES", CMD_SET_HOT_PAGES.into()),
            ("CMD_POWEROFF", CMD_POWEROFF.into()),
            ("PATTERN_SEQ", PATTERN_SEQ.into()),
            ("PATTERN_RANDOM", PATTERN_RANDOM.into()),
            ("PATTERN_HOT", PATTERN_HOT.into()),
            ("PAGE_SIZE", PAGE_SIZE as u64),
            ("PAGE_WORDS", PAGE_WORDS as u64),
            ("WORD_STEP", WORD_STEP),
            ("TERM_K1", TERM_K1),
            ("TERM_K2", TERM_K2),
            ("SPLITMIX_GAMMA", SPLITMIX_GAMMA),
            ("SPLITMIX_M1", SPLITMIX_M1),
            ("SPLITMIX_M2", SPLITMIX_M2),
            ("OFF_MAGIC", OFF_MAGIC as u64),
            ("OFF_VERSION", OFF_VERSION as u64),
            ("OFF_SEQ", OFF_SEQ as u64),
            ("OFF_PAGES_WRITTEN", OFF_PAGES_WRITTEN as u64),
            ("OFF_CHECKSUM", OFF_CHECKSUM as u64),
            ("OFF_WS_START", OFF_WS_START as u64),
            ("OFF_WS_PAGES", OFF_WS_PAGES as u64),
            ("OFF_RATE", OFF_RATE as u64),
            ("OFF_PATTERN", OFF_PATTERN as u64),
            ("OFF_EXIT_HEAVY", OFF_EXIT_HEAVY as u64),
            ("OFF_HOT_PAGES", OFF_HOT_PAGES as u64),
            ("OFF_VERIFY_COUNT", OFF_VERIFY_COUNT as u64),
            ("OFF_VERIFY_BAD_PAGES", OFF_VERIFY_BAD_PAGES as u64),
            ("OFF_VERIFY_CHECKSUM", OFF_VERIFY_CHECKSUM as u64),
            ("OFF_TSC_KHZ", OFF_TSC_KHZ as u64),
            ("OFF_ELAPSED_MS", OFF_ELAPSED_MS as u64),
            ("OFF_CMD_SEQ", OFF_CMD_SEQ as u64),
            ("OFF_CMD", OFF_CMD as u64),
            ("OFF_CMD_ARG", OFF_CMD_ARG as u64),
            ("OFF_CMD_ACK", OFF_CMD_ACK as u64),
            ("OFF_NOP_OUTS", OFF_NOP_OUTS as u64),
            ("OFF_SEED", OFF_SEED as u64),
            ("OFF_WRITING", OFF_WRITING as u64),
            ("OFF_WRITING_OLD_GEN", OFF_WRITING_OLD_GEN as u64),
            ("OFF_MESSAGE", OFF_MESSAGE as u64),
        ];
        let header = include_str!("c/ncga.h");
        let mut seen = 0;
        for line in header.lines() {
            let mut it = line.split_whitespace();
            if it.next() != Some("#define") {
                continue;
            }
            let (Some(name), Some(value)) = (it.next(), it.next()) else {
                continue;
            };
            let Some(name) = name.strip_prefix("NCGA_") else {
                continue;
            };
            let value = value.trim_end_matches("ULL");
            let parsed = match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => value.parse(),
            };
            let Ok(parsed) = parsed else {
                continue; // macros such as NCGA_H or NCGA_CHECK_OFF(...)
            };
            let Some(&(_, want)) = rust.iter().find(|(n, _)| *n == name) else {
                panic!("ncga.h defines NCGA_{name} but abi.rs has no such constant");
            };
            assert_eq!(
                parsed, want,
                "NCGA_{name}: header {parsed:#x} vs Rust {want:#x}"
            );
            seen += 1;
        }
        assert_eq!(
            seen,
            rust.len(),
            "some Rust constants are missing from ncga.h"
        );
    }
}
