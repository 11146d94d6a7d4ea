#![no_main]
//! Fuzzes `config_load`; the properties checked are in `fuzz/src/lib.rs`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| roster_fuzz::config_load(data));
