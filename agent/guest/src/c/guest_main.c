/*
 * Freestanding side of the test guest: runs at CPL3 with IOPL=3 and IF=0 (entered from
 * entry.S), reads its settings and RAM layout from the PVH start_info and hands over to
 * the shared workload.
 */
#include "workload.h"

struct hvm_start_info {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	uint64_t memmap_paddr;
	uint32_t memmap_entries;
	uint32_t reserved;
};

struct hvm_memmap_table_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
	uint32_t reserved;
};

#define E820_RAM 1
#define MIB (1024ULL * 1024)
#define ALIGN_2M (2 * MIB)
#define LIMIT_4G (4096 * MIB)
#define CMDLINE_MAX 2048

/* Linker-script symbols; the stacks live after __bss_end so zeroing .bss spares them. */
extern char __bss_start[], __bss_end[], __image_end[];

static union {
	struct ncga_status st;
	uint8_t bytes[NCGA_STATUS_PAGE_SIZE];
} status_page __attribute__((aligned(NCGA_STATUS_PAGE_SIZE)));

static char cmdline[CMDLINE_MAX];

/* gcc may emit calls to these even in freestanding code (struct initialisers). */
void *memset(void *d, int c, size_t n)
{
	uint8_t *p = d;
	while (n--)
		*p++ = (uint8_t)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	uint8_t *p = d;
	const uint8_t *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

void *memmove(void *d, const void *s, size_t n)
{
	uint8_t *p = d;
	const uint8_t *q = s;
	if (p < q)
		return memcpy(d, s, n);
	while (n--)
		p[n] = q[n];
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const uint8_t *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}

#define UART_FCR (NCGA_PORT_UART + 2)
#define UART_LSR (NCGA_PORT_UART + 5)
#define UART_LSR_THRE 0x20
#define UART_FIFO_LEN 16

/*
 * Every port access is an exit (~80 us under PVM), so the 16550 runs with its FIFO on
 * and LSR is polled once per 16 bytes instead of once per byte, as Linux's 8250 does.
 */
void plat_console(const char *s, size_t n)
{
	static int uart_ready;
	static unsigned fifo_room;

	if (!uart_ready) {
		nc_outb(UART_FCR, 0x07); /* enable and clear both FIFOs */
		uart_ready = 1;
	}
	for (size_t k = 0; k < n; k++) {
		nc_outb(NCGA_PORT_DEBUGCON, (uint8_t)s[k]);
		if (fifo_room == 0) {
			/* Bounded: a wedged UART must not hang the guest; a missing one reads 0xff. */
			for (int spin = 0; spin < 100000; spin++)
				if (nc_inb(UART_LSR) & UART_LSR_THRE)
					break;
			fifo_room = UART_FIFO_LEN;
		}
		nc_outb(NCGA_PORT_UART, (uint8_t)s[k]);
		fifo_room--;
	}
}

uint64_t plat_calibrate_tsc_khz(int has_ports)
{
	/* PIT channel 2 in mode 0 with the speaker gate: the classic 10 ms one-shot. */
	const uint32_t latch = 1193182 / 100;
	(void)has_ports;
	nc_outb(0x61, (uint8_t)((nc_inb(0x61) & ~0x02) | 0x01));
	nc_outb(0x43, 0xb0);
	nc_outb(0x42, latch & 0xff);
	nc_outb(0x42, (uint8_t)(latch >> 8));
	uint64_t t0 = nc_rdtsc();
	for (uint32_t n = 0; n < 10000000; n++) {
		if (nc_inb(0x61) & 0x20) {
			uint64_t t1 = nc_rdtsc();
			return (t1 - t0) / 10;
		}
	}
	return 0;
}

__attribute__((noreturn)) void plat_poweroff(int agent, int verify_ok)
{
	(void)verify_ok;
	/* With the device the VMM ends the VM on the doorbell; QEMU -no-reboot exits on reset. */
	if (!agent)
		nc_outb(NCGA_PORT_I8042_CMD, NCGA_I8042_RESET);
	for (;;)
		nc_pause();
}

void plat_dump(const char *path, const uint8_t *ws, uint64_t ws_pages)
{
	(void)path;
	(void)ws;
	(void)ws_pages;
}

__attribute__((noreturn)) void nc_guest_main(const struct hvm_start_info *si);

__attribute__((noreturn)) void nc_guest_main(const struct hvm_start_info *si)
{
	struct ncga_status *st = &status_page.st;
	struct nc_config cfg;
	struct nc_env env;

	/* The VMM or loader may not zero .bss (it is not in the file); the stacks are not in it. */
	memset(__bss_start, 0, (size_t)(__bss_end - __bss_start));

	if (si->magic != NCGA_PVH_START_MAGIC)
		nc_panic(st, 0, "bad hvm_start_info magic");

	nc_config_defaults(&cfg);
	if (si->cmdline_paddr) {
		/* Copy first: the working set may cover where the loader put the command line. */
		const char *src = (const char *)(uintptr_t)si->cmdline_paddr;
		size_t k = 0;
		while (k < CMDLINE_MAX - 1 && src[k]) {
			cmdline[k] = src[k];
			k++;
		}
		cmdline[k] = 0;
		nc_parse_settings(&cfg, cmdline);
	}

	/* Largest 2 MiB-aligned RAM range above the image and below 4 GiB (the identity map). */
	uint64_t floor = ((uint64_t)(uintptr_t)__image_end + ALIGN_2M - 1) & ~(ALIGN_2M - 1);
	uint64_t best_start = 0, best_len = 0;
	const struct hvm_memmap_table_entry *mm =
		(const struct hvm_memmap_table_entry *)(uintptr_t)si->memmap_paddr;
	for (uint32_t k = 0; si->memmap_paddr && k < si->memmap_entries; k++) {
		if (mm[k].type != E820_RAM)
			continue;
		uint64_t a = mm[k].addr, b = mm[k].addr + mm[k].size;
		if (a < floor)
			a = floor;
		if (b > LIMIT_4G)
			b = LIMIT_4G;
		a = (a + ALIGN_2M - 1) & ~(ALIGN_2M - 1);
		b &= ~(ALIGN_2M - 1);
		if (b > a && b - a > best_len) {
			best_start = a;
			best_len = b - a;
		}
	}
	if (best_len == 0)
		nc_panic(st, 0, "no RAM for the working set in the memmap");
	if (cfg.mem_mib && cfg.mem_mib * MIB < best_len)
		best_len = cfg.mem_mib * MIB;

	env.status = st;
	env.status_gpa = (uint64_t)(uintptr_t)st;
	env.ws = (uint8_t *)(uintptr_t)best_start;
	env.ws_start = best_start;
	env.ws_pages = best_len / NCGA_PAGE_SIZE;
	env.has_ports = 1;
	env.nop_without_agent = 1;
	env.ws_known_zero = 0;
	nc_run(&cfg, &env);
}
