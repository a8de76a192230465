//! whet-hub's tests: one binary, modules inside.

mod common {
    pub mod hub_server;
}
mod hub;
