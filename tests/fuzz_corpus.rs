//! Replays every committed fuzz input (`fuzz/corpus/<target>/`, and the crash reproducers in
//! `fuzz/artifacts/<target>/`) through the checks the fuzz targets run, so a regression on
//! anything the fuzzer once found fails an ordinary `cargo test`, no nightly flags needed.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::path::{Path, PathBuf};

/// A fuzz target's check: panics when the input breaks a property.
type Check = fn(&[u8]);

/// Every target with committed inputs, and its check (`fuzz/src/lib.rs`).
const TARGETS: &[(&str, Check)] = &[
    ("appservice_transaction", checks::appservice_transaction),
    ("lifecycle_decode", checks::lifecycle_decode),
    ("config_load", checks::config_load),
    ("legacy_mappings", checks::legacy_mappings),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every input of `target`; panics naming each input that fails.
fn replay(target: &str) {
    let (_, check) = TARGETS.iter().find(|(name, _)| *name == target).unwrap();
    let corpus = files(&fuzz_dir().join("corpus").join(target));
    assert!(
        corpus.len() >= 10,
        "fuzz/corpus/{target} holds {} inputs; an empty corpus replays nothing",
        corpus.len()
    );
    let reproducers = files(&fuzz_dir().join("artifacts").join(target));
    let mut failed = Vec::new();
    for input in corpus.iter().chain(&reproducers) {
        let data = std::fs::read(input).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(input.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: these inputs fail: {failed:#?}"
    );
    eprintln!(
        "{target}: {} corpus inputs and {} reproducers pass",
        corpus.len(),
        reproducers.len()
    );
}

#[test]
fn appservice_transaction_inputs_replay_clean() {
    replay("appservice_transaction");
}

#[test]
fn lifecycle_decode_inputs_replay_clean() {
    replay("lifecycle_decode");
}

#[test]
fn legacy_mappings_inputs_replay_clean() {
    replay("legacy_mappings");
}

#[test]
fn config_load_inputs_replay_clean() {
    replay("config_load");
}

/// A corpus or reproducer directory without a replay here would be committed for nothing.
#[test]
fn every_fuzz_input_directory_has_a_replay() {
    for kind in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for entry in entries {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                TARGETS.iter().any(|(target, _)| *target == name),
                "fuzz/{kind}/{name} has no replay in tests/fuzz_corpus.rs"
            );
        }
    }
}
