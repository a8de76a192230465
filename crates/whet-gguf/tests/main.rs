//! The integration tests of `whet-gguf`, one module per task, linked as one test binary
//! (`autotests = false` in Cargo.toml): `cargo test -p whet-gguf --test main <module>::`
//! runs one module.

mod fuzz;
mod quants;
