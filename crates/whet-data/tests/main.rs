//! The integration tests of `whet-data`, one module per task, linked as one test binary
//! (`autotests = false` in Cargo.toml): `cargo test -p whet-data --test main <module>::`
//! runs one module.

mod causal_lm;
mod data;
mod fuzz;
mod question_answering;
mod token_classification;
