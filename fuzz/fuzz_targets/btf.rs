//! Any bytes as the kernel's BTF (`/sys/kernel/btf/vmlinux`): `Btf::parse`, then every lookup
//! the loader makes. An error, never a panic; run with `-malloc_limit_mb` under ASan, so an
//! allocation sized from a header field is a finding too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spawnguard::{btf::Btf, loader::KILL_KFUNC};

fuzz_target!(|data: &[u8]| {
    let Some(btf) = Btf::parse(data) else {
        return;
    };
    let _ = btf.kernel_offsets();
    let _ = btf.struct_size("task_struct");
    let _ = btf.member_offset("task_struct", "pid");
    let _ = btf.func_id(KILL_KFUNC);
});
