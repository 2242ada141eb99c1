// SPDX-License-Identifier: GPL-2.0
// NovaCron per-VM telemetry probes (CO-RE). Loaded by novacron-telemetry with aya.
//
// Every program looks the current (or switched) task up in `watched` first and returns at
// once for threads that are not one of the agent's VMs, so that the cost does not grow with
// the host's other work. The agent gives each VM a slot (0..NC_MAX_VMS) and writes
// tid -> {slot, kind} for its vCPU threads and pid -> {slot, kind} for its VMM process.
// Counters and histograms are per-CPU arrays indexed by slot; user space sums the CPUs.
//
// The layout constants below are mirrored in agent/telemetry/src/layout.rs.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define NC_MAX_VMS 64
#define NC_EXIT_REASONS 64 /* KVM_EXIT_* codes; larger ones count in the last slot */
#define NC_HIST_BUCKETS 40 /* log2(ns) buckets: [2^i, 2^(i+1)) ns, last is open */
#define NC_PREEMPTORS 4096

/* per-VM counter indices (NC_COUNTERS per slot) */
#define C_PIO 0
#define C_MMIO 1
#define C_EMULATE 2
#define C_FPU 3
#define C_KVM_EXIT 4
#define C_HALT_WAKEUP 5
#define C_HALT_WAIT_NS 6
#define C_PAGE_FAULT 7
#define C_ONCPU_NS 8
#define C_PREEMPT_INVOL 9
#define C_SWITCH_OUT 10
#define C_WAKEUPS 11
#define C_BLK_RQ 12
#define C_BLK_BYTES 13
/* involuntary preemptions by who preempted: the VMM's own threads, another watched VM,
 * a kernel thread, any other host process */
#define C_PRE_SAME_VM 16
#define C_PRE_OTHER_VM 17
#define C_PRE_KERNEL 18
#define C_PRE_HOST 19
#define NC_COUNTERS 20

#define NC_PF_KTHREAD 0x00200000 /* PF_KTHREAD */

/* health counters (global) */
#define H_MAP_UPDATE_FAILED 0
#define H_EVENTS_DROPPED 1
#define H_UNKNOWN_SLOT 2
#define NC_HEALTH 4

#define KIND_VCPU 1
#define KIND_VMM 2

struct watch {
    __u32 slot;
    __u32 kind;
};

struct preempt_key {
    __u32 slot;
    __u32 tgid; /* the preempting task's process */
};

struct preempt_val {
    __u64 count;
    __u64 cgroup_id; /* the preempting task's cgroup v2 id */
};

struct blk_start {
    __u64 ts;
    __u32 slot;
    __u32 pad;
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, __u32);
    __type(value, struct watch);
} watched SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, NC_MAX_VMS *NC_COUNTERS);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, NC_MAX_VMS *NC_EXIT_REASONS);
    __type(key, __u32);
    __type(value, __u64);
} exit_reasons SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, NC_MAX_VMS *NC_HIST_BUCKETS);
    __type(key, __u32);
    __type(value, __u64);
} runq_hist SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, NC_MAX_VMS);
    __type(key, __u32);
    __type(value, __u64);
} runq_sum_ns SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, NC_MAX_VMS *NC_HIST_BUCKETS);
    __type(key, __u32);
    __type(value, __u64);
} blk_hist SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, NC_MAX_VMS);
    __type(key, __u32);
    __type(value, __u64);
} blk_sum_ns SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, NC_HEALTH);
    __type(key, __u32);
    __type(value, __u64);
} health SEC(".maps");

/* tid -> when it became runnable (wakeup or involuntary switch-out) */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, __u32);
    __type(value, __u64);
} enqueued_at SEC(".maps");

/* tid -> when it went on CPU */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, __u32);
    __type(value, __u64);
} oncpu_at SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, NC_PREEMPTORS);
    __type(key, struct preempt_key);
    __type(value, struct preempt_val);
} preemptors SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 8192);
    __type(key, __u64);
    __type(value, struct blk_start);
} blk_start SEC(".maps");

static __always_inline void health_inc(__u32 idx)
{
    __u64 *v = bpf_map_lookup_elem(&health, &idx);
    if (v)
        *v += 1;
}

static __always_inline void counter_add(__u32 slot, __u32 idx, __u64 n)
{
    __u32 key = slot * NC_COUNTERS + idx;
    __u64 *v;
    if (slot >= NC_MAX_VMS) {
        health_inc(H_UNKNOWN_SLOT);
        return;
    }
    v = bpf_map_lookup_elem(&counters, &key);
    if (v)
        *v += n;
}

static __always_inline __u32 log2_bucket(__u64 v)
{
    __u32 r = 0;
    /* unrolled binary search for the highest set bit */
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { r += 1; }
    if (r >= NC_HIST_BUCKETS)
        r = NC_HIST_BUCKETS - 1;
    return r;
}

static __always_inline void hist_add(void *map, void *sum_map, __u32 slot, __u64 ns)
{
    __u32 key;
    __u64 *v;
    if (slot >= NC_MAX_VMS)
        return;
    key = slot * NC_HIST_BUCKETS + log2_bucket(ns);
    v = bpf_map_lookup_elem(map, &key);
    if (v)
        *v += 1;
    v = bpf_map_lookup_elem(sum_map, &slot);
    if (v)
        *v += ns;
}

/* The current thread's watch entry if it is a vCPU thread of a watched VM. */
static __always_inline struct watch *current_vcpu(void)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct watch *w = bpf_map_lookup_elem(&watched, &tid);
    if (w && w->kind == KIND_VCPU)
        return w;
    return 0;
}

/* ---- exits ---------------------------------------------------------------------------- */

/*
 * The KVM probes are BTF-enabled raw tracepoints: they get the tracepoint's arguments
 * directly, without the perf record a classic tracepoint assembles before each call.
 */
SEC("tp_btf/kvm_userspace_exit")
int BPF_PROG(nc_userspace_exit, __u32 reason, int err)
{
    struct watch *w = current_vcpu();
    __u32 key;
    __u64 *v;
    if (!w)
        return 0;
    if (reason >= NC_EXIT_REASONS)
        reason = NC_EXIT_REASONS - 1;
    if (w->slot >= NC_MAX_VMS)
        return 0;
    key = w->slot * NC_EXIT_REASONS + reason;
    v = bpf_map_lookup_elem(&exit_reasons, &key);
    if (v)
        *v += 1;
    return 0;
}

#define SIMPLE_COUNTER(name, tp, idx)                                                        \
    SEC("tp_btf/" tp)                                                                        \
    int name(void *ctx)                                                                      \
    {                                                                                        \
        struct watch *w = current_vcpu();                                                    \
        if (w)                                                                               \
            counter_add(w->slot, idx, 1);                                                    \
        return 0;                                                                            \
    }

SIMPLE_COUNTER(nc_pio, "kvm_pio", C_PIO)
SIMPLE_COUNTER(nc_mmio, "kvm_mmio", C_MMIO)
SIMPLE_COUNTER(nc_emulate_insn, "kvm_emulate_insn", C_EMULATE)
SIMPLE_COUNTER(nc_fpu, "kvm_fpu", C_FPU) /* not attached by default: 2 events per exit */
SIMPLE_COUNTER(nc_kvm_exit, "kvm_exit", C_KVM_EXIT)
SIMPLE_COUNTER(nc_page_fault, "kvm_page_fault", C_PAGE_FAULT)

/* A halted vCPU woke up; `ns` is how long it polled or blocked. */
SEC("tp_btf/kvm_vcpu_wakeup")
int BPF_PROG(nc_vcpu_wakeup, __u64 ns, bool waited, bool valid)
{
    struct watch *w = current_vcpu();
    if (!w)
        return 0;
    counter_add(w->slot, C_HALT_WAKEUP, 1);
    counter_add(w->slot, C_HALT_WAIT_NS, ns);
    return 0;
}

/* ---- scheduling ----------------------------------------------------------------------- */

static __always_inline struct watch *watched_vcpu(__u32 tid)
{
    struct watch *w = bpf_map_lookup_elem(&watched, &tid);
    if (w && w->kind == KIND_VCPU)
        return w;
    return 0;
}

static __always_inline void mark_enqueued(struct task_struct *p)
{
    __u32 tid = p->pid; /* tp_btf: typed pointers are read directly */
    struct watch *w = watched_vcpu(tid);
    __u64 now;
    if (!w)
        return;
    now = bpf_ktime_get_ns();
    counter_add(w->slot, C_WAKEUPS, 1);
    if (bpf_map_update_elem(&enqueued_at, &tid, &now, BPF_ANY))
        health_inc(H_MAP_UPDATE_FAILED);
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(nc_sched_wakeup, struct task_struct *p)
{
    mark_enqueued(p);
    return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(nc_sched_wakeup_new, struct task_struct *p)
{
    mark_enqueued(p);
    return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(nc_sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next,
             unsigned int prev_state)
{
    __u32 prev_tid = prev->pid;
    __u32 next_tid = next->pid;
    struct watch *wp = watched_vcpu(prev_tid);
    struct watch *wn = watched_vcpu(next_tid);
    __u64 now, *ts;

    if (!wp && !wn)
        return 0;
    now = bpf_ktime_get_ns();

    if (wp) {
        ts = bpf_map_lookup_elem(&oncpu_at, &prev_tid);
        if (ts && now > *ts)
            counter_add(wp->slot, C_ONCPU_NS, now - *ts);
        bpf_map_delete_elem(&oncpu_at, &prev_tid);
        counter_add(wp->slot, C_SWITCH_OUT, 1);
        if (prev_state == 0 /* TASK_RUNNING: still runnable, so it was preempted */) {
            struct preempt_key key = {
                .slot = wp->slot,
                .tgid = next->tgid,
            };
            struct preempt_val *pv;
            struct watch *wo = bpf_map_lookup_elem(&watched, &key.tgid);
            __u32 class;
            if (wo && wo->kind == KIND_VMM)
                class = wo->slot == wp->slot ? C_PRE_SAME_VM : C_PRE_OTHER_VM;
            else if (next->flags & NC_PF_KTHREAD)
                class = C_PRE_KERNEL;
            else
                class = C_PRE_HOST;
            counter_add(wp->slot, class, 1);
            counter_add(wp->slot, C_PREEMPT_INVOL, 1);
            if (bpf_map_update_elem(&enqueued_at, &prev_tid, &now, BPF_ANY))
                health_inc(H_MAP_UPDATE_FAILED);
            pv = bpf_map_lookup_elem(&preemptors, &key);
            if (pv) {
                __sync_fetch_and_add(&pv->count, 1);
            } else {
                struct preempt_val init = {
                    .count = 1,
                    .cgroup_id = BPF_CORE_READ(next, cgroups, dfl_cgrp, kn, id),
                };
                if (bpf_map_update_elem(&preemptors, &key, &init, BPF_NOEXIST))
                    health_inc(H_EVENTS_DROPPED);
            }
        }
    }

    if (wn) {
        ts = bpf_map_lookup_elem(&enqueued_at, &next_tid);
        if (ts) {
            if (now > *ts)
                hist_add(&runq_hist, &runq_sum_ns, wn->slot, now - *ts);
            bpf_map_delete_elem(&enqueued_at, &next_tid);
        }
        if (bpf_map_update_elem(&oncpu_at, &next_tid, &now, BPF_ANY))
            health_inc(H_MAP_UPDATE_FAILED);
    }
    return 0;
}

/* ---- block I/O ------------------------------------------------------------------------ */

/* I/O issued by any thread of a watched VMM (or by its vCPU threads) is the VM's. */
static __always_inline struct watch *current_vm(void)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)id, tgid = id >> 32;
    struct watch *w = bpf_map_lookup_elem(&watched, &tid);
    if (w)
        return w;
    return bpf_map_lookup_elem(&watched, &tgid);
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(nc_block_rq_issue, struct request *rq)
{
    struct watch *w = current_vm();
    struct blk_start s = {};
    __u64 key = (__u64)rq;
    if (!w)
        return 0;
    s.ts = bpf_ktime_get_ns();
    s.slot = w->slot;
    if (bpf_map_update_elem(&blk_start, &key, &s, BPF_ANY))
        health_inc(H_MAP_UPDATE_FAILED);
    return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(nc_block_rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
    __u64 key = (__u64)rq, now;
    struct blk_start *s = bpf_map_lookup_elem(&blk_start, &key);
    if (!s)
        return 0;
    now = bpf_ktime_get_ns();
    if (now > s->ts)
        hist_add(&blk_hist, &blk_sum_ns, s->slot, now - s->ts);
    counter_add(s->slot, C_BLK_RQ, 1);
    counter_add(s->slot, C_BLK_BYTES, nr_bytes);
    bpf_map_delete_elem(&blk_start, &key);
    return 0;
}
