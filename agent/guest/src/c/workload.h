/*
 * The workload is shared verbatim between the freestanding guest (guest_main.c) and the
 * static Linux program (linux_main.c); everything that differs lives behind plat_*.
 */
#ifndef NC_WORKLOAD_H
#define NC_WORKLOAD_H

#include <stddef.h>
#include <stdint.h>

#include "ncga.h"

#define NC_ZERO_NO   0
#define NC_ZERO_YES  1
#define NC_ZERO_AUTO 2 /* only when memory is not known to start zeroed */

struct nc_config {
	uint64_t rate;
	uint32_t pattern;
	uint64_t hot;
	uint64_t mem_mib; /* 0 = platform default */
	uint64_t report_ms;
	uint64_t log_ms;
	uint64_t exit_heavy;
	uint64_t verify_ms;
	uint64_t seed;
	uint64_t tsc_khz; /* 0 = ask the device, else calibrate */
	uint64_t stop_after_pages;
	uint64_t fault_after_pages; /* fault injection: ud2 (a triple fault without an IDT) */
	uint64_t panic_after_pages; /* fault injection: a guest panic through the device */
	uint32_t zero; /* NC_ZERO_* */
	char dump_path[256]; /* Linux only: dump the working set after the final verify */
};

struct nc_env {
	struct ncga_status *status;
	uint64_t status_gpa;  /* 0 = cannot be shared with the VMM */
	uint8_t *ws;          /* where the workload reaches the working set */
	uint64_t ws_start;    /* what the status page reports as ws_start */
	uint64_t ws_pages;
	int has_ports;        /* port I/O is allowed (always in the guest; iopl on Linux) */
	int nop_without_agent; /* issue NOP outs even with no device (QEMU exit benchmarks) */
	int ws_known_zero;     /* the platform guarantees the working set starts zeroed */
};

void nc_config_defaults(struct nc_config *cfg);
/* Space-separated key=value tokens; unknown keys and malformed values are ignored. */
void nc_parse_settings(struct nc_config *cfg, const char *s);
/* Called once the platform has a working set; never returns. */
__attribute__((noreturn)) void nc_run(const struct nc_config *cfg, struct nc_env *env);
/* Reports through the status page (if shared) and the consoles, then powers off. */
__attribute__((noreturn)) void nc_panic(struct ncga_status *st, int agent, const char *msg);

/* Port I/O helpers, only valid when has_ports. */
static inline void nc_outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}
static inline uint8_t nc_inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}
static inline void nc_outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}
static inline uint32_t nc_inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}
static inline uint64_t nc_rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}
static inline void nc_pause(void)
{
	__asm__ volatile("pause" ::: "memory");
}

/* Platform hooks. */
void plat_console(const char *s, size_t n);
/* TSC kHz measured by the platform, 0 on failure. */
uint64_t plat_calibrate_tsc_khz(int has_ports);
/* After the POWEROFF doorbell (agent) or without a device; verify_ok is the last result. */
__attribute__((noreturn)) void plat_poweroff(int agent, int verify_ok);
/* Linux only (a no-op in the guest). */
void plat_dump(const char *path, const uint8_t *ws, uint64_t ws_pages);

#endif
