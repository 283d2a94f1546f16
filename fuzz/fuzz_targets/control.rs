//! Any bytes as a control socket request line: decoded and dispatched (`control::decode`,
//! `control::dispatch`) against a backend with no kernel behind it. No panic; every reply
//! serializes as the socket would send it.
#![no_main]

use anyhow::{bail, Result};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use spawnguard::{
    breaker::view,
    control::{self, Backend, BreakerAnswer, PolicyDiff, PolicyShown, Reply, Request},
    daemon,
    policy::{Policy, DEFAULT_POLICY},
};
use spawnguard_common::BreakerState;

/// The daemon's side, as plain values: the policy in force, breakers per type.
struct Fake {
    policy: Policy,
    text: String,
    breakers: Vec<(String, BreakerState)>,
}

impl Backend for Fake {
    fn status(&mut self) -> Result<Value> {
        Ok(serde_json::json!({ "types": self.policy.types.len() }))
    }

    fn policy_shown(&self) -> Result<PolicyShown> {
        Ok(PolicyShown {
            text: self.text.clone(),
            policy: serde_json::to_value(&self.policy)?,
        })
    }

    fn breaker(&mut self, request: &Request) -> Result<BreakerAnswer> {
        let Some(type_name) = request.breaker_type() else {
            bail!("not a breaker request");
        };
        let Some((name, state)) = self.breakers.iter_mut().find(|(n, _)| n == type_name) else {
            bail!("no type {type_name:?} with a breaker in the policy in force");
        };
        state.trips = state.trips.saturating_add(1);
        Ok(BreakerAnswer {
            breaker: view(name, state, 1_000),
            message: format!("{request:?}"),
        })
    }

    fn apply(&mut self, policy: Policy, text: &str) -> Result<PolicyDiff> {
        let d = daemon::diff(&self.policy, &policy);
        self.policy = policy;
        self.text = text.to_owned();
        Ok(d)
    }

    fn applied(&mut self, _file: &str, _text: &str, _result: &Result<PolicyDiff>) {}
}

fuzz_target!(|data: &[u8]| {
    // The socket reads a line of text: bytes that are not UTF-8 never reach the decoder.
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let policy = Policy::default_policy();
    let breakers = policy
        .types
        .iter()
        .map(|t| (t.name.clone(), BreakerState::default()))
        .collect();
    let mut fake = Fake {
        policy,
        text: DEFAULT_POLICY.to_owned(),
        breakers,
    };
    // One connection may only carry one request, but a daemon answers many: the same backend
    // answers every line.
    for line in line.split('\n') {
        let reply = match control::decode(line) {
            Ok(Request::Events { .. }) => continue,
            Ok(request) => Reply::from(control::dispatch(&mut fake, request)),
            Err(e) => Reply::from(Err(e)),
        };
        assert_eq!(reply.ok, reply.error.is_none());
        serde_json::to_vec(&reply).expect("a reply serializes");
    }
});
