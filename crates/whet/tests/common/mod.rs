//! Running the `whet` binary and finding assets, for the CLI tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// An asset of the cache (`WHET_CACHE` or `cache/`); panics with the fetch command when absent.
pub fn asset(rel: &str) -> PathBuf {
    let p = cache().join(rel);
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch_assets.sh",
        p.display()
    );
    p
}

/// The asset cache the tests use: `WHET_CACHE`, else the repository's `cache/`.
pub fn cache() -> PathBuf {
    std::env::var_os("WHET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("cache"))
}

/// Runs `whet` with `args` (and the repository's asset cache, so that the tokenization cache
/// does not land in the crate folder).
pub fn whet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whet"))
        .env("WHET_CACHE", cache())
        .args(args)
        .output()
        .expect("whet runs")
}

/// Runs `whet`, asserts success and returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = whet(args);
    assert!(
        out.status.success(),
        "whet {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `whet`, asserts failure and returns stderr.
pub fn err(args: &[&str]) -> String {
    let out = whet(args);
    assert!(!out.status.success(), "whet {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
