/*
 * The NovaCron test workload: writes self-describing pages at a controlled rate and can
 * prove, from memory alone, that no write was lost or corrupted (e.g. across a live
 * migration). The page content and checksum are part of the ABI: the Rust crate mirrors
 * them so the host can verify guest memory independently.
 */
#include "workload.h"

#define BURST_PAGES 32
#define LINE_MAX_LEN 160

/* ---- tiny string helpers (no libc in the guest) ---- */

struct line {
	char buf[LINE_MAX_LEN];
	size_t n;
};

static void line_str(struct line *l, const char *s)
{
	while (*s && l->n < LINE_MAX_LEN - 1)
		l->buf[l->n++] = *s++;
}

static void line_dec(struct line *l, uint64_t v)
{
	char tmp[20];
	int k = 0;
	do {
		tmp[k++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (k && l->n < LINE_MAX_LEN - 1)
		l->buf[l->n++] = tmp[--k];
}

static void line_hex16(struct line *l, uint64_t v)
{
	for (int sh = 60; sh >= 0 && l->n < LINE_MAX_LEN - 1; sh -= 4)
		l->buf[l->n++] = "0123456789abcdef"[(v >> sh) & 0xf];
}

static void line_emit(struct line *l)
{
	l->buf[l->n++] = '\n';
	plat_console(l->buf, l->n);
	l->n = 0;
}

static int parse_u64(const char *s, const char *end, uint64_t *out)
{
	uint64_t v = 0;
	int base = 10;
	if (end - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (s == end)
		return 0;
	for (; s < end; s++) {
		unsigned d;
		if (*s >= '0' && *s <= '9')
			d = (unsigned)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = (unsigned)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = (unsigned)(*s - 'A' + 10);
		else
			return 0;
		v = v * (uint64_t)base + d;
	}
	*out = v;
	return 1;
}

static int token_eq(const char *s, const char *end, const char *word)
{
	while (s < end && *word)
		if (*s++ != *word++)
			return 0;
	return s == end && !*word;
}

static const char *pattern_name(uint32_t p)
{
	switch (p) {
	case NCGA_PATTERN_SEQ:
		return "seq";
	case NCGA_PATTERN_RANDOM:
		return "random";
	case NCGA_PATTERN_HOT:
		return "hot";
	}
	return "?";
}

/* ---- settings ---- */

void nc_config_defaults(struct nc_config *cfg)
{
	char *p = (char *)cfg;
	for (size_t k = 0; k < sizeof(*cfg); k++)
		p[k] = 0;
	cfg->pattern = NCGA_PATTERN_SEQ;
	cfg->hot = 256;
	cfg->report_ms = 100;
	cfg->log_ms = 1000;
	cfg->zero = NC_ZERO_AUTO;
}

static void apply_setting(struct nc_config *cfg, const char *tok, const char *end)
{
	const char *v;
	uint64_t n;
	const char *eq = tok;
	while (eq < end && *eq != '=')
		eq++;
	if (eq == end)
		return;
	v = eq + 1;
	if (token_eq(tok, eq, "nc.pattern")) {
		if (token_eq(v, end, "seq"))
			cfg->pattern = NCGA_PATTERN_SEQ;
		else if (token_eq(v, end, "random"))
			cfg->pattern = NCGA_PATTERN_RANDOM;
		else if (token_eq(v, end, "hot"))
			cfg->pattern = NCGA_PATTERN_HOT;
		return;
	}
	if (token_eq(tok, eq, "nc.dump")) {
		size_t k = 0;
		while (v < end && k < sizeof(cfg->dump_path) - 1)
			cfg->dump_path[k++] = *v++;
		cfg->dump_path[k] = 0;
		return;
	}
	if (!parse_u64(v, end, &n))
		return;
	if (token_eq(tok, eq, "nc.rate"))
		cfg->rate = n;
	else if (token_eq(tok, eq, "nc.hot"))
		cfg->hot = n;
	else if (token_eq(tok, eq, "nc.mem"))
		cfg->mem_mib = n;
	else if (token_eq(tok, eq, "nc.report_ms"))
		cfg->report_ms = n;
	else if (token_eq(tok, eq, "nc.log_ms"))
		cfg->log_ms = n;
	else if (token_eq(tok, eq, "nc.exit_heavy"))
		cfg->exit_heavy = n;
	else if (token_eq(tok, eq, "nc.verify_ms"))
		cfg->verify_ms = n;
	else if (token_eq(tok, eq, "nc.seed"))
		cfg->seed = n;
	else if (token_eq(tok, eq, "nc.tsc_khz"))
		cfg->tsc_khz = n;
	else if (token_eq(tok, eq, "nc.stop_after_pages"))
		cfg->stop_after_pages = n;
	else if (token_eq(tok, eq, "nc.fault_after_pages"))
		cfg->fault_after_pages = n;
	else if (token_eq(tok, eq, "nc.panic_after_pages"))
		cfg->panic_after_pages = n;
	else if (token_eq(tok, eq, "nc.zero") && n <= 1)
		cfg->zero = (uint32_t)n;
}

void nc_parse_settings(struct nc_config *cfg, const char *s)
{
	while (*s) {
		while (*s == ' ' || *s == '\t' || *s == '\n')
			s++;
		const char *tok = s;
		while (*s && *s != ' ' && *s != '\t' && *s != '\n')
			s++;
		if (s > tok)
			apply_setting(cfg, tok, s);
	}
}

/* ---- workload state ---- */

struct nc {
	struct ncga_status *st;
	int agent;
	int nop_ok;
	uint8_t *ws;
	uint64_t ws_pages;
	uint64_t seed;
	uint64_t rate;
	uint32_t pattern;
	uint64_t hot_pages;
	uint64_t exit_heavy;
	uint64_t rng;
	uint64_t seq_cursor;
	uint64_t pages_written;
	uint64_t checksum;
	uint64_t nop_outs;
	uint64_t tsc_khz;
	uint64_t tsc_start;
	uint64_t rate_epoch_tsc;
	uint64_t rate_epoch_pages;
	int last_verify_ok;
};

static uint64_t ms_to_ticks(const struct nc *s, uint64_t ms)
{
	return ms * s->tsc_khz;
}

static void set_hot(struct nc *s, uint64_t hot)
{
	if (hot == 0)
		hot = 1;
	if (hot > s->ws_pages)
		hot = s->ws_pages;
	s->hot_pages = hot;
}

static void rate_rebase(struct nc *s, uint64_t now)
{
	s->rate_epoch_tsc = now;
	s->rate_epoch_pages = s->pages_written;
}

/* Stores the VMM may sample while the vCPU runs: force them out of registers. */
#define PUBLISH(field, val) (*(volatile __typeof__(field) *)&(field) = (val))

static void notify(struct nc *s, uint32_t ev)
{
	struct ncga_status *st = s->st;
	st->pages_written = s->pages_written;
	st->checksum = s->checksum;
	st->rate = s->rate;
	st->pattern = s->pattern;
	st->exit_heavy = (uint32_t)s->exit_heavy;
	st->hot_pages = s->hot_pages;
	st->nop_outs = s->nop_outs;
	st->elapsed_ms = (nc_rdtsc() - s->tsc_start) / s->tsc_khz;
	st->seq++;
	if (s->agent)
		nc_outl(NCGA_PORT_DOORBELL, ev);
	else
		__asm__ volatile("" ::: "memory");
}

static uint64_t next_page(struct nc *s)
{
	uint64_t x;
	switch (s->pattern) {
	case NCGA_PATTERN_RANDOM:
	case NCGA_PATTERN_HOT:
		x = s->rng;
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		s->rng = x;
		return x % (s->pattern == NCGA_PATTERN_HOT ? s->hot_pages : s->ws_pages);
	default:
		x = s->seq_cursor;
		s->seq_cursor = x + 1 == s->ws_pages ? 0 : x + 1;
		return x;
	}
}

static void write_page(struct nc *s, uint64_t i)
{
	uint64_t *p = (uint64_t *)(s->ws + i * NCGA_PAGE_SIZE);
	/* The page carries its own generation, so no per-page table is needed. */
	uint64_t old = p[1];
	uint64_t g = old + 1;
	/*
	 * Announce the page in flight, so that a host reading memory while the vCPU is paused
	 * mid-page (a snapshot, a migration round) can tell it from a corrupted page.
	 */
	PUBLISH(s->st->writing_old_gen, old);
	PUBLISH(s->st->writing, i + 1);
	uint64_t w = ncga_pattern_base(s->seed, i, g) + 2 * NCGA_WORD_STEP;
	p[0] = i;
	p[1] = g;
	for (unsigned j = 2; j < NCGA_PAGE_WORDS; j++) {
		p[j] = w;
		w += NCGA_WORD_STEP;
	}
	/*
	 * Subtracting the term of the generation found in memory (not the one we believe
	 * is there) keeps a lost or corrupted page visible to verification even after the
	 * page is rewritten.
	 */
	s->checksum += ncga_checksum_term(s->seed, i, g) - ncga_checksum_term(s->seed, i, old);
	s->pages_written++;
	if (s->nop_ok) {
		for (uint64_t k = 0; k < s->exit_heavy; k++)
			nc_outl(NCGA_PORT_NOP, 0);
		s->nop_outs += s->exit_heavy;
	}
	PUBLISH(s->st->pages_written, s->pages_written);
	PUBLISH(s->st->checksum, s->checksum);
	PUBLISH(s->st->writing, 0);
}

static int page_ok(const struct nc *s, uint64_t i, const uint64_t *p)
{
	uint64_t g = p[1];
	if (g == 0) {
		uint64_t acc = 0;
		for (unsigned j = 0; j < NCGA_PAGE_WORDS; j++)
			acc |= p[j];
		return acc == 0;
	}
	if (p[0] != i)
		return 0;
	uint64_t w = ncga_pattern_base(s->seed, i, g) + 2 * NCGA_WORD_STEP;
	uint64_t diff = 0;
	for (unsigned j = 2; j < NCGA_PAGE_WORDS; j++) {
		diff |= p[j] ^ w;
		w += NCGA_WORD_STEP;
	}
	return diff == 0;
}

static void verify(struct nc *s)
{
	uint64_t bad = 0, sum = 0;
	for (uint64_t i = 0; i < s->ws_pages; i++) {
		const uint64_t *p = (const uint64_t *)(s->ws + i * NCGA_PAGE_SIZE);
		if (!page_ok(s, i, p))
			bad++;
		sum += ncga_checksum_term(s->seed, i, p[1]);
	}
	s->last_verify_ok = bad == 0 && sum == s->checksum;
	s->st->verify_count++;
	s->st->verify_bad_pages = bad;
	s->st->verify_checksum = sum;

	struct line l = {.n = 0};
	line_str(&l, "novacron-guest: verify ");
	line_str(&l, s->last_verify_ok ? "ok" : "FAIL");
	line_str(&l, " pages=");
	line_dec(&l, s->ws_pages);
	line_str(&l, " bad=");
	line_dec(&l, bad);
	line_str(&l, " checksum=");
	line_hex16(&l, sum);
	line_str(&l, " expected=");
	line_hex16(&l, s->checksum);
	line_emit(&l);
	notify(s, NCGA_EV_VERIFY_DONE);
}

static void progress_line(const struct nc *s)
{
	struct line l = {.n = 0};
	line_str(&l, "novacron-guest: progress pages=");
	line_dec(&l, s->pages_written);
	line_str(&l, " checksum=");
	line_hex16(&l, s->checksum);
	line_emit(&l);
}

static void ready_line(const struct nc *s)
{
	struct line l = {.n = 0};
	line_str(&l, "novacron-guest: ready ws_pages=");
	line_dec(&l, s->ws_pages);
	line_str(&l, " rate=");
	line_dec(&l, s->rate);
	line_str(&l, " pattern=");
	line_str(&l, pattern_name(s->pattern));
	line_str(&l, " tsc_khz=");
	line_dec(&l, s->tsc_khz);
	line_str(&l, " agent=");
	line_dec(&l, (uint64_t)s->agent);
	line_emit(&l);
}

__attribute__((noreturn)) static void poweroff(struct nc *s)
{
	struct line l = {.n = 0};
	line_str(&l, "novacron-guest: poweroff");
	line_emit(&l);
	notify(s, NCGA_EV_POWEROFF);
	plat_poweroff(s->agent, s->last_verify_ok);
}

__attribute__((noreturn)) void nc_panic(struct ncga_status *st, int agent, const char *msg)
{
	struct line l = {.n = 0};
	size_t k = 0;
	if (st) {
		for (; msg[k] && k < NCGA_MESSAGE_LEN - 1; k++)
			st->message[k] = msg[k];
		st->message[k] = 0;
		st->seq++;
	}
	line_str(&l, "novacron-guest: panic ");
	line_str(&l, msg);
	line_emit(&l);
	if (agent) {
		nc_outl(NCGA_PORT_DOORBELL, NCGA_EV_PANIC);
		nc_outl(NCGA_PORT_DOORBELL, NCGA_EV_POWEROFF);
	}
	plat_poweroff(agent, 0);
}

static void handle_command(struct nc *s, uint64_t cmd_seq)
{
	uint32_t cmd = s->st->cmd;
	uint64_t arg = s->st->cmd_arg;
	switch (cmd) {
	case NCGA_CMD_SET_RATE:
		s->rate = arg;
		rate_rebase(s, nc_rdtsc());
		break;
	case NCGA_CMD_SET_PATTERN:
		if (arg <= NCGA_PATTERN_HOT)
			s->pattern = (uint32_t)arg;
		break;
	case NCGA_CMD_VERIFY:
		verify(s);
		rate_rebase(s, nc_rdtsc());
		break;
	case NCGA_CMD_SET_EXIT_HEAVY:
		s->exit_heavy = arg;
		break;
	case NCGA_CMD_SET_HOT_PAGES:
		set_hot(s, arg);
		break;
	default:
		break;
	}
	s->st->cmd_ack = cmd_seq;
	notify(s, NCGA_EV_CMD_ACK);
	if (cmd == NCGA_CMD_POWEROFF)
		poweroff(s);
}

static uint64_t tsc_khz(const struct nc_config *cfg, const struct nc_env *env, int agent)
{
	if (cfg->tsc_khz)
		return cfg->tsc_khz;
	if (agent) {
		uint32_t khz = nc_inl(NCGA_PORT_TSC_KHZ);
		if (khz)
			return khz;
	}
	return plat_calibrate_tsc_khz(env->has_ports);
}

__attribute__((noreturn)) void nc_run(const struct nc_config *cfg, struct nc_env *env)
{
	struct nc s = {0};
	struct ncga_status *st = env->status;

	s.st = st;
	s.agent = env->has_ports && env->status_gpa && nc_inl(NCGA_PORT_ID) == NCGA_DEVICE_ID;
	s.nop_ok = s.agent || (env->has_ports && env->nop_without_agent);
	s.ws = env->ws;
	s.ws_pages = env->ws_pages;
	s.seed = cfg->seed;
	s.rate = cfg->rate;
	s.pattern = cfg->pattern <= NCGA_PATTERN_HOT ? cfg->pattern : NCGA_PATTERN_SEQ;
	s.exit_heavy = cfg->exit_heavy;
	s.rng = ncga_splitmix64(cfg->seed) | 1;
	s.last_verify_ok = 1;
	if (s.ws_pages == 0)
		nc_panic(st, 0, "empty working set");
	set_hot(&s, cfg->hot);

	st->magic = NCGA_STATUS_MAGIC;
	st->version = NCGA_STATUS_VERSION;
	st->ws_start = env->ws_start;
	st->ws_pages = s.ws_pages;
	st->seed = s.seed;
	if (s.agent)
		nc_outl(NCGA_PORT_STATUS_GPA, (uint32_t)env->status_gpa);

	s.tsc_khz = tsc_khz(cfg, env, s.agent);
	if (s.tsc_khz == 0)
		nc_panic(st, s.agent, "cannot determine the TSC frequency");
	st->tsc_khz = s.tsc_khz;

	/*
	 * Verification treats any page whose word[1] is 0 as never written and requires it
	 * to be all zero, so leftovers from firmware (SeaBIOS relocates itself to the top of
	 * RAM, which QEMU's PVH memmap still reports as RAM) must go. A fresh NovaCron VM
	 * (the agent device is present) starts zeroed, and skipping this keeps boot fast.
	 */
	if (cfg->zero == NC_ZERO_YES ||
	    (cfg->zero == NC_ZERO_AUTO && !s.agent && !env->ws_known_zero)) {
		uint64_t words = s.ws_pages * NCGA_PAGE_WORDS;
		void *dst = s.ws;
		__asm__ volatile("rep stosq" : "+D"(dst), "+c"(words) : "a"(0ULL) : "memory");
	}

	uint64_t now = nc_rdtsc();
	s.tsc_start = now;
	rate_rebase(&s, now);

	notify(&s, NCGA_EV_READY);

	const uint64_t report_ticks = ms_to_ticks(&s, cfg->report_ms);
	const uint64_t log_ticks = ms_to_ticks(&s, cfg->log_ms);
	const uint64_t verify_ticks = ms_to_ticks(&s, cfg->verify_ms);
	uint64_t next_report = 0, next_log = 0, next_verify = now + verify_ticks;

	for (;;) {
		uint64_t cmd_seq = st->cmd_seq;
		if (cmd_seq != st->cmd_ack)
			handle_command(&s, cmd_seq);

		now = nc_rdtsc();
		uint64_t burst = BURST_PAGES;
		if (s.rate) {
			uint64_t us = (now - s.rate_epoch_tsc) * 1000 / s.tsc_khz;
			/* +1: the first page of an epoch goes at once, so boot timing and
			 * rate changes do not wait a whole period. */
			uint64_t allowed = s.rate * us / 1000000 + 1;
			uint64_t done = s.pages_written - s.rate_epoch_pages;
			uint64_t deficit = allowed > done ? allowed - done : 0;
			/*
			 * After a long stall (VM paused, verification, migration downtime)
			 * resume at the target rate instead of catching up in one flood.
			 */
			if (deficit > s.rate / 4 + BURST_PAGES) {
				rate_rebase(&s, now);
				deficit = 1;
			}
			if (deficit < burst)
				burst = deficit;
		}
		if (s.pages_written == 0 && burst)
			burst = 1; /* report the very first page on its own */
		if (cfg->stop_after_pages && s.pages_written + burst > cfg->stop_after_pages)
			burst = cfg->stop_after_pages - s.pages_written;

		for (uint64_t k = 0; k < burst; k++)
			write_page(&s, next_page(&s));

		if (burst) {
			now = nc_rdtsc();
			if (next_report == 0) {
				/*
				 * The first report marks "guest is up and writing" for boot timing.
				 * Console bytes are one exit each (~80 us under PVM), so the lines
				 * wait until after this doorbell, and the short progress line (what
				 * a run without the device is timed by) goes before the ready line.
				 */
				notify(&s, NCGA_EV_PROGRESS);
				progress_line(&s);
				ready_line(&s);
				next_report = now + report_ticks;
				next_log = now + log_ticks;
			}
		} else {
			nc_pause();
		}

		/* Fault injection, so that tests can see how the VMM reports a dying guest. */
		if (cfg->fault_after_pages && s.pages_written >= cfg->fault_after_pages)
			__builtin_trap();
		if (cfg->panic_after_pages && s.pages_written >= cfg->panic_after_pages)
			nc_panic(s.st, s.agent, "requested by nc.panic_after_pages");
		if (cfg->stop_after_pages && s.pages_written >= cfg->stop_after_pages) {
			progress_line(&s);
			verify(&s);
			if (cfg->dump_path[0])
				plat_dump(cfg->dump_path, s.ws, s.ws_pages);
			poweroff(&s);
		}
		if (next_report && report_ticks && now >= next_report) {
			notify(&s, NCGA_EV_PROGRESS);
			next_report = now + report_ticks;
		}
		if (next_report && log_ticks && now >= next_log) {
			progress_line(&s);
			next_log = now + log_ticks;
		}
		if (verify_ticks && now >= next_verify) {
			verify(&s);
			rate_rebase(&s, nc_rdtsc());
			next_verify = nc_rdtsc() + verify_ticks;
		}
	}
}
