#![no_main]
//! Fuzzes the legacy mapping reader `commands::adopt::parse_mappings`: any text is read or
//! refused with an error, never a panic. Not in Cargo.toml's `[[bin]]` list until
//! `parse_mappings` is on this branch; fuzz/README.md has the edit that enables it.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = roster::commands::adopt::parse_mappings(text);
    }
});
