#![no_main]
//! Fuzzes `lifecycle_decode`; the properties checked are in `fuzz/src/lib.rs`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| roster_fuzz::lifecycle_decode(data));
