//! Reading a whole BPF hash map in a few syscalls (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6+), so a
//! scrape of 10,000 instances costs a few syscalls, not 20,000 (aya's iterator asks for every
//! key and every value separately). Kernels without batch lookup fall back to that iterator.

use std::{
    hash::Hash,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    maps::{HashMap, IterableMap, MapData},
    Pod,
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per syscall.
const CHUNK: usize = 4096;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of a hash map. Entries that change during the read may be missed or seen
/// twice (as with any iteration of a live map); callers add up counts, which is what they want.
pub fn entries<K: Pod + Eq + Hash, V: Pod>(
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>, aya::maps::MapError> {
    match batch(map.map()) {
        Ok(all) => Ok(all),
        // EINVAL/ENOTSUPP: a kernel before 5.6 (or a map type without batch ops).
        Err(_) => map.iter().collect(),
    }
}

fn batch<K: Pod, V: Pod>(map: &MapData) -> std::io::Result<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    let mut keys = vec![0u8; CHUNK * ks];
    let mut values = vec![0u8; CHUNK * vs];
    let mut all = Vec::new();
    // The kernel's cursor: hash maps use a 4-byte bucket index; 8 bytes leave room.
    let (mut cursor_in, mut cursor_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &raw const cursor_in as u64
            },
            out_batch: &raw mut cursor_out as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the bpf syscall reads `attr` and writes at most `count` keys and values into
        // the buffers sized for CHUNK entries, and the cursor into `cursor_out`, all ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let n = (attr.count as usize).min(CHUNK);
        for i in 0..n {
            // SAFETY: the kernel wrote `n` whole keys and values; Pod types are valid for any
            // bytes; read unaligned from the byte buffers.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * ks).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * vs).cast::<V>()),
                )
            };
            all.push((k, v));
        }
        match err {
            None => {}
            // The end of the map (the last chunk came with it).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(all),
            Some(e) => return Err(e),
        }
        cursor_in = cursor_out;
        first = false;
    }
}
