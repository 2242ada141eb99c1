/*
 * NovaCron guest-agent ABI, shared by the freestanding test guest, the static Linux
 * workload and (mirrored by hand) the Rust crate `novacron-testguest::abi`.
 * A unit test in that crate parses the #defines below and compares them with the Rust
 * constants, so keep every value a plain literal on a single #define line.
 */
#ifndef NCGA_H
#define NCGA_H

/* Device ports (32-bit inl/outl). */
#define NCGA_PORT_ID          0x0f40
#define NCGA_PORT_STATUS_GPA  0x0f44
#define NCGA_PORT_DOORBELL    0x0f48
#define NCGA_PORT_NOP         0x0f4c
#define NCGA_PORT_TSC_KHZ     0x0f50

/* Consoles and the i8042 reset used to power off without the device. */
#define NCGA_PORT_DEBUGCON    0x00e9
#define NCGA_PORT_UART        0x03f8
#define NCGA_PORT_I8042_CMD   0x0064
#define NCGA_I8042_RESET      0xfe

#define NCGA_DEVICE_ID        0x4147434e /* "NCGA" */
#define NCGA_STATUS_MAGIC     0x5453434e /* "NCST" */
#define NCGA_STATUS_VERSION   1
#define NCGA_STATUS_PAGE_SIZE 4096
#define NCGA_MESSAGE_LEN      256

/* PVH boot. */
#define NCGA_PVH_START_MAGIC  0x336ec578
#define NCGA_XEN_ELFNOTE_PHYS32_ENTRY 18
#define NCGA_GUEST_LOAD_ADDR  0x100000

/* Doorbell events. */
#define NCGA_EV_READY         1
#define NCGA_EV_PROGRESS      2
#define NCGA_EV_VERIFY_DONE   3
#define NCGA_EV_CMD_ACK       4
#define NCGA_EV_PANIC         5
#define NCGA_EV_POWEROFF      6

/* Commands posted by the VMM in the status page. */
#define NCGA_CMD_SET_RATE       1
#define NCGA_CMD_SET_PATTERN    2
#define NCGA_CMD_VERIFY         3
#define NCGA_CMD_SET_EXIT_HEAVY 4
#define NCGA_CMD_SET_HOT_PAGES  5
#define NCGA_CMD_POWEROFF       6

/* Write patterns. */
#define NCGA_PATTERN_SEQ      0
#define NCGA_PATTERN_RANDOM   1
#define NCGA_PATTERN_HOT      2

/* Page content and checksum (see docs/design/test-guest.md). */
#define NCGA_PAGE_SIZE        4096
#define NCGA_PAGE_WORDS       512
#define NCGA_WORD_STEP        0x9e3779b97f4a7c15ULL
#define NCGA_TERM_K1          0xd1b54a32d192ed03ULL
#define NCGA_TERM_K2          0xabc98388fb8fac03ULL
#define NCGA_SPLITMIX_GAMMA   0x9e3779b97f4a7c15ULL
#define NCGA_SPLITMIX_M1      0xbf58476d1ce4e5b9ULL
#define NCGA_SPLITMIX_M2      0x94d049bb133111ebULL

/* Status page field offsets. */
#define NCGA_OFF_MAGIC            0x00
#define NCGA_OFF_VERSION          0x04
#define NCGA_OFF_SEQ              0x08
#define NCGA_OFF_PAGES_WRITTEN    0x10
#define NCGA_OFF_CHECKSUM         0x18
#define NCGA_OFF_WS_START         0x20
#define NCGA_OFF_WS_PAGES         0x28
#define NCGA_OFF_RATE             0x30
#define NCGA_OFF_PATTERN          0x38
#define NCGA_OFF_EXIT_HEAVY       0x3c
#define NCGA_OFF_HOT_PAGES        0x40
#define NCGA_OFF_VERIFY_COUNT     0x48
#define NCGA_OFF_VERIFY_BAD_PAGES 0x50
#define NCGA_OFF_VERIFY_CHECKSUM  0x58
#define NCGA_OFF_TSC_KHZ          0x60
#define NCGA_OFF_ELAPSED_MS       0x68
#define NCGA_OFF_CMD_SEQ          0x70
#define NCGA_OFF_CMD              0x78
#define NCGA_OFF_CMD_ARG          0x80
#define NCGA_OFF_CMD_ACK          0x88
#define NCGA_OFF_NOP_OUTS         0x90
#define NCGA_OFF_SEED             0x98
#define NCGA_OFF_WRITING          0xa0
#define NCGA_OFF_WRITING_OLD_GEN  0xa8
#define NCGA_OFF_MESSAGE          0x100

#ifndef __ASSEMBLER__

#include <stdint.h>

struct ncga_status {
	uint32_t magic;
	uint32_t version;
	uint64_t seq;
	uint64_t pages_written;
	uint64_t checksum;
	uint64_t ws_start;
	uint64_t ws_pages;
	uint64_t rate;
	uint32_t pattern;
	uint32_t exit_heavy;
	uint64_t hot_pages;
	uint64_t verify_count;
	uint64_t verify_bad_pages;
	uint64_t verify_checksum;
	uint64_t tsc_khz;
	uint64_t elapsed_ms;
	/* The VMM writes these three while the guest runs. */
	volatile uint64_t cmd_seq;
	volatile uint32_t cmd;
	uint32_t reserved;
	volatile uint64_t cmd_arg;
	uint64_t cmd_ack;
	uint64_t nop_outs;
	uint64_t seed;
	uint64_t writing;
	uint64_t writing_old_gen;
	uint8_t pad[0x100 - 0xb0];
	char message[NCGA_MESSAGE_LEN];
};

#define NCGA_CHECK_OFF(f, o) _Static_assert(__builtin_offsetof(struct ncga_status, f) == (o), #f)
NCGA_CHECK_OFF(magic, NCGA_OFF_MAGIC);
NCGA_CHECK_OFF(version, NCGA_OFF_VERSION);
NCGA_CHECK_OFF(seq, NCGA_OFF_SEQ);
NCGA_CHECK_OFF(pages_written, NCGA_OFF_PAGES_WRITTEN);
NCGA_CHECK_OFF(checksum, NCGA_OFF_CHECKSUM);
NCGA_CHECK_OFF(ws_start, NCGA_OFF_WS_START);
NCGA_CHECK_OFF(ws_pages, NCGA_OFF_WS_PAGES);
NCGA_CHECK_OFF(rate, NCGA_OFF_RATE);
NCGA_CHECK_OFF(pattern, NCGA_OFF_PATTERN);
NCGA_CHECK_OFF(exit_heavy, NCGA_OFF_EXIT_HEAVY);
NCGA_CHECK_OFF(hot_pages, NCGA_OFF_HOT_PAGES);
NCGA_CHECK_OFF(verify_count, NCGA_OFF_VERIFY_COUNT);
NCGA_CHECK_OFF(verify_bad_pages, NCGA_OFF_VERIFY_BAD_PAGES);
NCGA_CHECK_OFF(verify_checksum, NCGA_OFF_VERIFY_CHECKSUM);
NCGA_CHECK_OFF(tsc_khz, NCGA_OFF_TSC_KHZ);
NCGA_CHECK_OFF(elapsed_ms, NCGA_OFF_ELAPSED_MS);
NCGA_CHECK_OFF(cmd_seq, NCGA_OFF_CMD_SEQ);
NCGA_CHECK_OFF(cmd, NCGA_OFF_CMD);
NCGA_CHECK_OFF(cmd_arg, NCGA_OFF_CMD_ARG);
NCGA_CHECK_OFF(cmd_ack, NCGA_OFF_CMD_ACK);
NCGA_CHECK_OFF(nop_outs, NCGA_OFF_NOP_OUTS);
NCGA_CHECK_OFF(seed, NCGA_OFF_SEED);
NCGA_CHECK_OFF(writing, NCGA_OFF_WRITING);
NCGA_CHECK_OFF(writing_old_gen, NCGA_OFF_WRITING_OLD_GEN);
NCGA_CHECK_OFF(message, NCGA_OFF_MESSAGE);
_Static_assert(sizeof(struct ncga_status) == 0x200, "status layout");

static inline uint64_t ncga_splitmix64(uint64_t x)
{
	uint64_t z = x + NCGA_SPLITMIX_GAMMA;
	z = (z ^ (z >> 30)) * NCGA_SPLITMIX_M1;
	z = (z ^ (z >> 27)) * NCGA_SPLITMIX_M2;
	return z ^ (z >> 31);
}

/* word[j] (j >= 2) of page i at generation g >= 1 is base + j * NCGA_WORD_STEP. */
static inline uint64_t ncga_pattern_base(uint64_t seed, uint64_t i, uint64_t g)
{
	return ncga_splitmix64(seed ^ (i << 20) ^ g);
}

static inline uint64_t ncga_checksum_term(uint64_t seed, uint64_t i, uint64_t g)
{
	if (g == 0)
		return 0;
	return ncga_splitmix64(i * NCGA_TERM_K1 + g * NCGA_TERM_K2 + seed);
}

#endif /* __ASSEMBLER__ */
#endif /* NCGA_H */
