//! kfunc calls for aya 0.14, which cannot relocate them: bpf-linker emits `call -1` with a
//! relocation against the undefined kfunc symbol; this rewrites each such call in the ELF bytes
//! into a kfunc call (`src_reg = BPF_PSEUDO_KFUNC_CALL`, imm = the kfunc's BTF id in vmlinux) or,
//! when the kernel lacks the kfunc, into `r0 = 0` so the object still loads (the backend that
//! needs it is then not selected, and its code path is dead).

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

use crate::btf::Btf;

const BPF_CALL: u8 = 0x85;
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
const BPF_MOV64_IMM: u8 = 0xb7;

#[derive(Debug, thiserror::Error)]
pub enum KfuncError {
    #[error("the eBPF object is not a valid ELF file: {0}")]
    Elf(#[from] object::Error),
    #[error("relocation for {name} at byte {at} is not a call instruction")]
    NotACall { name: String, at: usize },
}

/// What happened to each kfunc the object calls.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KfuncPatch {
    pub resolved: Vec<(String, u32)>,
    pub missing: Vec<String>,
}

impl KfuncPatch {
    pub fn has(&self, name: &str) -> bool {
        self.resolved.iter().any(|(n, _)| n == name)
    }
}

/// Rewrites every call to an undefined symbol in `elf`; returns what was resolved.
pub fn patch_kfunc_calls(elf: &mut [u8], btf: &Btf) -> Result<KfuncPatch, KfuncError> {
    let mut sites = Vec::new();
    {
        let file = object::File::parse(&*elf)?;
        for section in file.sections() {
            let Some((file_off, _)) = section.file_range() else {
                continue;
            };
            for (offset, reloc) in section.relocations() {
                let RelocationTarget::Symbol(idx) = reloc.target() else {
                    continue;
                };
                let symbol = file.symbol_by_index(idx)?;
                if !symbol.is_undefined() {
                    continue;
                }
                sites.push(((file_off + offset) as usize, symbol.name()?.to_owned()));
            }
        }
    }
    let mut patch = KfuncPatch::default();
    for (at, name) in sites {
        if elf.get(at) != Some(&BPF_CALL) {
            return Err(KfuncError::NotACall { name, at });
        }
        let insn = &mut elf[at..at + 8];
        match btf.func_id(&name) {
            Some(id) => {
                insn[1] = BPF_PSEUDO_KFUNC_CALL << 4;
                insn[2..4].copy_from_slice(&0u16.to_le_bytes());
                insn[4..8].copy_from_slice(&id.to_le_bytes());
                if !patch.has(&name) {
                    patch.resolved.push((name, id));
                }
            }
            None => {
                insn.copy_from_slice(&[BPF_MOV64_IMM, 0, 0, 0, 0, 0, 0, 0]);
                if !patch.missing.contains(&name) {
                    patch.missing.push(name);
                }
            }
        }
    }
    Ok(patch)
}
