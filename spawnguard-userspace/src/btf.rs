//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): struct member offsets and
//! function ids. aya 0.14 keeps its member lookup private, and spawnguard needs nothing else.

use std::path::Path;

use spawnguard_common::KernelOffsets;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not valid BTF")]
    Malformed(String),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("the kernel's BTF has no member {1} in struct {0}")]
    NoMember(String, String),
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// Where one type's record starts in the type section, and its header.
struct Type {
    name: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    at: u32,
}

/// The parsed type section, indexed by type id (id 0 is `void`). Only headers are indexed:
/// members are read from the raw bytes when asked for. Parsing is on the start-up path (an
/// emulated guest spends seconds per parse of a 5 MB vmlinux BTF), so nothing per type is
/// allocated and no name index is built: spawnguard looks up a dozen names, each a scan.
pub struct Btf {
    raw: Vec<u8>,
    strings: std::ops::Range<usize>,
    type_base: usize,
    types: Vec<Type>,
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data).ok_or_else(|| BtfError::Malformed(path.display().to_string()))
    }

    pub fn parse(data: impl Into<Vec<u8>>) -> Option<Self> {
        let raw = data.into();
        if raw.get(0..2)? != [0x9f, 0xeb] {
            return None;
        }
        let hdr_len = u32_at(&raw, 4)? as usize;
        let type_off = u32_at(&raw, 8)? as usize;
        let type_len = u32_at(&raw, 12)? as usize;
        let str_off = u32_at(&raw, 16)? as usize;
        let str_len = u32_at(&raw, 20)? as usize;
        let type_base = hdr_len + type_off;
        let types_raw = raw.get(type_base..type_base + type_len)?;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        raw.get(strings.clone())?;
        let mut types = Vec::with_capacity(type_len / 16);
        types.push(Type {
            name: 0,
            kind: 0,
            vlen: 0,
            kind_flag: false,
            at: 0,
        });
        let mut at = 0;
        while at < types_raw.len() {
            let name = u32_at(types_raw, at)?;
            let info = u32_at(types_raw, at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            types.push(Type {
                name,
                kind,
                vlen,
                kind_flag: info >> 31 == 1,
                at: at as u32 + 12,
            });
            at += 12;
            let vlen = vlen as usize;
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => at += 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => at += 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => at += 8 * vlen,
                _ => {}
            }
        }
        Some(Self {
            raw,
            strings,
            type_base,
            types,
        })
    }

    fn string(&self, off: u32) -> &[u8] {
        let strings = &self.raw[self.strings.clone()];
        let rest = strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// The first type of `kind` called `name` (the kernel's own types come first).
    fn find(&self, name: &str, kind: u32) -> Option<u32> {
        let name = name.as_bytes();
        self.types
            .iter()
            .position(|t| t.kind == kind && t.name != 0 && self.string(t.name) == name)
            .map(|id| id as u32)
    }

    /// BTF id of a kernel function (for kfunc calls).
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.find(name, KIND_FUNC)
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous structs and unions.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = self
            .find(name, KIND_STRUCT)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        // task_struct, the widest, has a few hundred members in a handful of anonymous ones.
        let mut budget = 1 << 16;
        self.find_member(id, member.as_bytes(), 0, 0, &mut budget)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(name.to_owned(), member.to_owned()))
    }

    /// Size in bytes of `struct name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let id = self
            .find(name, KIND_STRUCT)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        let t = &self.types[id as usize];
        // The size is the third word of the type's 12-byte header, which `at` points past.
        u32_at(&self.raw, self.type_base + t.at as usize - 4)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))
    }

    /// Members of a struct or union: (name, type id, bit offset).
    fn members(&self, t: &Type) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
        let base = self.type_base + t.at as usize;
        let n = if matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            t.vlen as usize
        } else {
            0
        };
        let kind_flag = t.kind_flag;
        (0..n).filter_map(move |i| {
            let at = base + 12 * i;
            let offset = u32_at(&self.raw, at + 8)?;
            Some((
                u32_at(&self.raw, at)?,
                u32_at(&self.raw, at + 4)?,
                if kind_flag {
                    offset & 0xff_ffff
                } else {
                    offset
                },
            ))
        })
    }

    /// Looks through anonymous members depth-first. `budget` bounds the members looked at in
    /// all: a malformed blob can make every member of a wide struct an anonymous one of the
    /// struct itself, which the depth bound alone leaves exponential (found by fuzzing).
    fn find_member(
        &self,
        id: u32,
        member: &[u8],
        base_bits: u32,
        depth: u32,
        budget: &mut u32,
    ) -> Option<u32> {
        // Anonymous members nest a few levels at most; the bound keeps a malformed blob from
        // recursing forever.
        if depth > 16 {
            return None;
        }
        let t = self.types.get(id as usize)?;
        *budget = budget.checked_sub(t.vlen.max(1))?;
        if let Some((_, _, bits)) = self
            .members(t)
            .find(|&(name, _, _)| name != 0 && self.string(name) == member)
        {
            // A corrupted blob may hold any offsets: past u32 is no offset at all.
            return base_bits.checked_add(bits);
        }
        self.members(t)
            .filter(|&(name, _, _)| name == 0)
            .find_map(|(_, type_id, bits)| {
                let base = base_bits.checked_add(bits)?;
                self.find_member(type_id, member, base, depth + 1, budget)
            })
    }

    /// Offset of `inner.field` within `outer.member` (a struct member of type `inner`).
    fn nested_offset(
        &self,
        outer: &str,
        member: &str,
        inner: &str,
        field: &str,
    ) -> Result<u32, BtfError> {
        self.member_offset(outer, member)?
            .checked_add(self.member_offset(inner, field)?)
            .ok_or_else(|| BtfError::NoMember(outer.to_owned(), format!("{member}.{field}")))
    }

    /// The offsets the programs need, from this kernel.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let (cgroup_ancestors, ancestors_are_ids) = match self.member_offset("cgroup", "ancestors")
        {
            Ok(off) => (off, 0),
            Err(_) => (self.member_offset("cgroup", "ancestor_ids")?, 1),
        };
        Ok(KernelOffsets {
            task_pid: self.member_offset("task_struct", "pid")?,
            task_tgid: self.member_offset("task_struct", "tgid")?,
            task_cgroups: self.member_offset("task_struct", "cgroups")?,
            task_signal: self.member_offset("task_struct", "signal")?,
            css_set_dfl_cgrp: self.member_offset("css_set", "dfl_cgrp")?,
            cgroup_level: self.member_offset("cgroup", "level")?,
            cgroup_kn: self.member_offset("cgroup", "kn")?,
            cgroup_ancestors,
            ancestors_are_ids,
            kernfs_node_id: self.member_offset("kernfs_node", "id")?,
            signal_live: self.member_offset("signal_struct", "live")?,
            task_flags: self.member_offset("task_struct", "flags")?,
            cgroup_root: self.member_offset("cgroup", "root")?,
            task_real_parent: self.member_offset("task_struct", "real_parent")?,
            task_comm: self.member_offset("task_struct", "comm")?,
            kernfs_name: self.member_offset("kernfs_node", "name")?,
            task_sighand: self.member_offset("task_struct", "sighand")?,
            sighand_action: self.member_offset("sighand_struct", "action")?,
            k_sigaction_size: self.struct_size("k_sigaction")?,
            k_sigaction_handler: self.nested_offset(
                "k_sigaction",
                "sa",
                "sigaction",
                "sa_handler",
            )?,
            k_sigaction_flags: self.nested_offset("k_sigaction", "sa", "sigaction", "sa_flags")?,
            task_start_boottime: self.member_offset("task_struct", "start_boottime")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: struct outer { int a; union { int b; int c; }; } and func f.
    fn blob() -> Vec<u8> {
        let strings = b"\0outer\0a\0b\0c\0int\0f\0".to_vec();
        let s = |name: &str| {
            let pos = strings
                .windows(name.len() + 2)
                .position(|w| {
                    w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0
                })
                .unwrap();
            (pos + 1) as u32
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: anonymous union { int b; int c; }
        push(&[0, KIND_UNION << 24 | 2, 4, s("b"), 1, 0, s("c"), 1, 0]);
        // 3: struct outer { int a; union; } with the union at byte 8
        push(&[
            s("outer"),
            KIND_STRUCT << 24 | 2,
            12,
            s("a"),
            1,
            0,
            0,
            2,
            64,
        ]);
        // 4: func f
        push(&[s("f"), KIND_FUNC << 24, 0]);
        let mut out = Vec::new();
        out.extend_from_slice(&[0x9f, 0xeb, 1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions() {
        let btf = Btf::parse(blob()).unwrap();
        assert_eq!(btf.member_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "c").unwrap(), 8);
        assert!(btf.member_offset("outer", "zz").is_err());
        assert!(btf.member_offset("nope", "a").is_err());
        assert_eq!(btf.func_id("f"), Some(4));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all".to_vec()).is_none());
    }

    #[test]
    fn reads_the_running_kernel_when_present() {
        if !Path::new(VMLINUX).exists() {
            assert!(std::env::var("CI").is_err(), "CI hosts have kernel BTF");
            return;
        }
        let btf = Btf::from_sys_fs().unwrap();
        let o = btf.kernel_offsets().unwrap();
        assert!(o.task_tgid > o.task_pid || o.task_tgid == o.task_pid + 4);
        assert_ne!(o.cgroup_kn, 0);
    }

    /// The fuzz target's seed is a small BTF holding every struct the loader reads, so the
    /// fuzzer starts from inputs that reach every lookup.
    #[test]
    fn the_fuzz_seed_holds_every_offset_the_loader_reads() {
        let seed = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/btf/valid-small.btf"),
        )
        .unwrap();
        let btf = Btf::parse(seed).expect("the seed parses");
        let o = btf.kernel_offsets().unwrap();
        assert_eq!((o.task_pid, o.task_tgid, o.task_comm), (64, 68, 152));
        assert_eq!(o.k_sigaction_flags, 8);
        assert!(btf.func_id(crate::loader::KILL_KFUNC).is_some());
    }

    /// Fuzz finding (btf target): member bit offsets that add past u32 (an anonymous member
    /// at a huge offset) overflowed; now the member is not found.
    #[test]
    fn offsets_past_u32_are_no_offsets() {
        let crash = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/seeds/btf/regression-member-offset-overflow.btf"),
        )
        .unwrap();
        let btf = Btf::parse(crash).expect("it parses");
        assert!(btf.kernel_offsets().is_err());
    }

    /// Fuzz finding (btf target, a timeout): anonymous members that are the struct itself,
    /// many of them, made the member search exponential within its depth bound; the search
    /// now has a budget of members in all.
    #[test]
    fn self_nested_anonymous_members_end_quickly() {
        let blob = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/seeds/btf/regression-nested-anonymous-members.btf"),
        )
        .unwrap();
        let started = std::time::Instant::now();
        if let Some(btf) = Btf::parse(blob) {
            let _ = btf.kernel_offsets();
        }
        // Exponential took longer than libFuzzer's 10 s; the budget makes it milliseconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
