//! The integration tests of `whet-peft`, one module per task, linked as one test binary
//! (`autotests = false` in Cargo.toml): `cargo test -p whet-peft --test main <module>::`
//! runs one module.

mod lora;
mod prompt;
