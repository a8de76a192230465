//! The integration tests of `whet-infer`, one module per task, linked as one test binary
//! (`autotests = false` in Cargo.toml): `cargo test -p whet-infer --test main <module>::`
//! runs one module.

mod batch;
mod device;
mod generation;
