//! End-to-end tests across sluice crates live in `tests/tests/`; this library holds helpers
//! they share. Tests that check the repository itself (docs present, generated files fresh)
//! run here too, with the normal test suite.

use std::path::PathBuf;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
