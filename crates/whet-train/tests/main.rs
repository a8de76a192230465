//! The integration tests of `whet-train`, one module per task, linked as one test binary
//! (`autotests = false` in Cargo.toml): `cargo test -p whet-train --test main <module>::`
//! runs one module.

mod common;
mod dpo;
mod fuzz;
mod lm;
mod methods;
mod ppo;
mod qa;
mod reward;
mod train;
mod trajectory;
