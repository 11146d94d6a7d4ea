#![no_main]
//! Fuzzes `appservice_transaction`; the properties checked are in `fuzz/src/lib.rs`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| roster_fuzz::appservice_transaction(data));
