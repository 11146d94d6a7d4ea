#![no_main]
//! Fuzzes the legacy mapping reader `commands::adopt::parse_mappings`; the properties
//! checked are in `fuzz/src/lib.rs`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| roster_fuzz::legacy_mappings(data));
