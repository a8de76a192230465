//! The integration tests of `whet`, one module per task, linked as one test binary
//! (`autotests = false` in Cargo.toml): `cargo test -p whet --test main <module>::`
//! runs one module.

mod cli;
mod common;
mod device_cli;
mod families;
mod hub_cli;
#[path = "../../whet-hub/tests/common/hub_server.rs"]
mod hub_server;
#[path = "../../whet-models/tests/common/mod.rs"]
mod model_fixture;
mod train_cli;
