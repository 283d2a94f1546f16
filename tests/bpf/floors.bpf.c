// The floors `sg-bench --only decisions` measures spawnguard's programs against, in the same run
// and on the same hook (`run_time_ns` includes the kernel's own clock reads, slow on VMs): an
// empty program, and one doing a single hash lookup and an atomic add. Built by tests/build.rs
// with clang-22; no libbpf headers needed.

typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

#define BPF_MAP_TYPE_HASH 1

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u64);
    __type(value, __u64);
} FLOOR_COUNTS SEC(".maps");

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;

SEC("tp_btf/sched_process_fork")
int floor_empty(void *ctx) { return 0; }

SEC("tp_btf/sched_process_fork")
int floor_lookup(void *ctx) {
    __u64 key = 0;
    __u64 *n = bpf_map_lookup_elem(&FLOOR_COUNTS, &key);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
