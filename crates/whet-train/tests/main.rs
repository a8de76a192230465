//! The integration tests of `whet-train`, one module per task, linked as one test binary
//! (`autotests = false` in Cargo.toml): `cargo test -p whet-train --test main <module>::`
//! runs one module.

mod causal_lm;
mod common;
mod dpo;
mod fuzz;
mod methods;
mod paged;
mod ppo;
mod precision;
mod question_answering;
mod reward;
mod train;
mod trajectory;
