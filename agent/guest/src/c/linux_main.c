/*
 * The same workload as a static Linux program, for Linux guests (e.g. as an initramfs
 * /init) and for running natively on a host. Settings come from argv with the same nc.*
 * keys; as PID 1 also from /proc/cmdline, because the kernel does not pass dotted
 * parameters to init.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

#include "workload.h"

#define DEFAULT_MEM_MIB 64

static union {
	struct ncga_status st;
	uint8_t bytes[NCGA_STATUS_PAGE_SIZE];
} status_page __attribute__((aligned(NCGA_STATUS_PAGE_SIZE)));

void plat_console(const char *s, size_t n)
{
	while (n) {
		ssize_t w = write(1, s, n);
		if (w <= 0)
			return;
		s += w;
		n -= (size_t)w;
	}
}

static uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

uint64_t plat_calibrate_tsc_khz(int has_ports)
{
	(void)has_ports;
	/* The kernel's clock is already calibrated; measure the TSC against it for ~10 ms. */
	uint64_t n0 = mono_ns(), t0 = nc_rdtsc();
	uint64_t n1, t1;
	do {
		n1 = mono_ns();
		t1 = nc_rdtsc();
	} while (n1 - n0 < 10000000ULL);
	return (t1 - t0) * 1000000ULL / (n1 - n0);
}

__attribute__((noreturn)) void plat_poweroff(int agent, int verify_ok)
{
	(void)agent;
	if (getpid() == 1) {
		/* init must never exit: the kernel would panic instead of powering off. */
		sync();
		reboot(RB_POWER_OFF);
		for (;;)
			pause();
	}
	exit(verify_ok ? 0 : 1);
}

void plat_dump(const char *path, const uint8_t *ws, uint64_t ws_pages)
{
	FILE *f = fopen(path, "wb");
	if (!f || fwrite(ws, NCGA_PAGE_SIZE, ws_pages, f) != ws_pages || fclose(f) != 0) {
		fprintf(stderr, "novacron-workload: cannot write dump %s\n", path);
		exit(2);
	}
}

/* The VMM needs the physical address; only root can read PFNs from pagemap. */
static uint64_t status_phys(void *page)
{
	uint64_t entry = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		return 0;
	off_t off = (off_t)((uintptr_t)page / NCGA_PAGE_SIZE * sizeof(entry));
	ssize_t n = pread(fd, &entry, sizeof(entry), off);
	close(fd);
	if (n != (ssize_t)sizeof(entry) || !(entry & (1ULL << 63)))
		return 0;
	uint64_t pfn = entry & ((1ULL << 55) - 1);
	/* The doorbell register is 32 bits wide. */
	if (pfn == 0 || pfn >= (1ULL << 20))
		return 0;
	return pfn * NCGA_PAGE_SIZE;
}

int main(int argc, char **argv)
{
	struct nc_config cfg;
	struct nc_env env;
	static char cmdline[4096];

	nc_config_defaults(&cfg);
	if (getpid() == 1) {
		mount("proc", "/proc", "proc", 0, NULL);
		int fd = open("/proc/cmdline", O_RDONLY);
		if (fd >= 0) {
			ssize_t n = read(fd, cmdline, sizeof(cmdline) - 1);
			if (n > 0)
				cmdline[n] = 0;
			close(fd);
			nc_parse_settings(&cfg, cmdline);
		}
	}
	for (int k = 1; k < argc; k++)
		nc_parse_settings(&cfg, argv[k]);

	uint64_t mib = cfg.mem_mib ? cfg.mem_mib : DEFAULT_MEM_MIB;
	size_t len = (size_t)(mib * 1024 * 1024);
	void *ws = mmap(NULL, len, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (ws == MAP_FAILED)
		nc_panic(NULL, 0, "cannot mmap the working set");

	env.status = &status_page.st;
	env.has_ports = iopl(3) == 0;
	env.status_gpa = 0;
	/* Natively (root has iopl) stray port writes would hit real hardware. */
	env.nop_without_agent = 0;
	env.ws_known_zero = 1; /* fresh anonymous mapping */
	if (env.has_ports && mlock(&status_page, sizeof(status_page)) == 0)
		env.status_gpa = status_phys(&status_page);
	if (!env.has_ports)
		printf("novacron-workload: iopl(3) failed; running without the guest-agent device\n");
	fflush(stdout);
	env.ws = ws;
	/* A virtual address here: the working set is not physically contiguous under Linux. */
	env.ws_start = (uint64_t)(uintptr_t)ws;
	env.ws_pages = len / NCGA_PAGE_SIZE;
	nc_run(&cfg, &env);
}
