//! Any bytes as a policy file: `Policy::parse_bytes`, then what `policy apply` computes from a
//! valid policy before it touches a map (the kernel's limits, the diff against the default).
//! No panic, and every refusal has a location inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spawnguard::{daemon, loader, policy::Policy};

const FILE: &str = "fuzz.toml";

fuzz_target!(|data: &[u8]| {
    match Policy::parse_bytes(data, FILE) {
        Ok(policy) => {
            let _ = loader::host_limits(&policy);
            for i in 0..policy.types.len() {
                let _ = loader::type_limits(&policy, i);
                let _ = loader::breaker_limits(&policy, i);
            }
            let _ = daemon::diff(&Policy::default_policy(), &policy);
            // What `policy show` answers.
            serde_json::to_value(&policy).expect("a policy serializes");
        }
        Err(e) => {
            assert_eq!(e.file, FILE);
            let lines = data.iter().filter(|&&b| b == b'\n').count() + 1;
            assert!(
                e.line >= 1 && e.line <= lines,
                "line {} of {lines}: {e}",
                e.line
            );
            assert!(e.column >= 1, "{e}");
            assert!(!e.message.is_empty(), "{e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("{FILE}:{}:{}: ", e.line, e.column)),
                "{e}"
            );
        }
    }
});
