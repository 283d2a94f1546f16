//! Any bytes as a record of the kernel's event ring: `events::parse`, then the daemon's log
//! line (`describe`) and the JSON record (`EventRecord::from_event`) of it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spawnguard::{
    events::{self, EventRecord, Names},
    loader::PlacedType,
    policy::{Mode, OnMaxAge},
};

fuzz_target!(|data: &[u8]| {
    let Some(ev) = events::parse(data) else {
        return;
    };
    let types = (0..3)
        .map(|index| PlacedType {
            name: format!("t{index}"),
            index,
            cgroup_id: 100 + u64::from(index),
            level: 2,
            dir: std::path::PathBuf::from("/nonexistent/spawnguard-fuzz"),
            mode: Mode::Enforce,
            max_tasks: 10,
            max_threads: 10,
            max_age: None,
            on_max_age: OnMaxAge::Event,
            backstop: None,
        })
        .collect();
    let mut names = Names::new(types);
    let line = events::describe(&ev, &mut names);
    assert!(!line.is_empty());
    let record = EventRecord::from_event(&ev, &mut names);
    serde_json::to_vec(&record).expect("a record serializes");
});
