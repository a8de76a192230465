//! The integration tests of `whet-models`, one module per task, linked as one test binary
//! (`autotests = false` in Cargo.toml): `cargo test -p whet-models --test main <module>::`
//! runs one module.

mod common;
mod errors;
mod fuzz;
mod parity_real;
mod parity_tiny;
mod quant;
