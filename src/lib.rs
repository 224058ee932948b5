//! MPREG in Rust: a cluster of nodes that run named functions wherever the functions and
//! the resources they need are, resolving dependencies between the commands of one request.
//!
//! A guided tour:
//! - [`NodeBuilder`] (in [`node`]) turns [`Settings`] and [`FunctionSpec`]s into a running
//!   node: a supervision tree of actix actors (see `mpreg_actors::supervisor`) behind a
//!   websocket listener.
//! - [`Client`] (in [`client`]) talks to any node: `call` one function, `request` a DAG
//!   of commands, subscribe and publish.
//! - [`functions`] holds the built-ins and the demo pack used by examples and tests.
//! - [`cli`] is the `mpreg` command: `server`, `client`, `bench`, `demo`.
//! - [`worker`] serves functions from a separate process (a worker), over the websocket.
//! - [`demo`] is the quick demo (`mpreg demo`, `--example quick_demo`) and its helpers.
//!
//! The node's insides live in the `mpreg-actors` crate, one actor per file.

pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod functions;
pub mod node;
pub mod worker;

pub use client::{CacheHit, CacheOptions, CasOutcome, Client, ClientError};
pub use config::Settings;
pub use mpreg_actors::function::{CallArgs, FunctionError, FunctionSpec, Json};
pub use mpreg_actors::protocol::{RpcCommand, RpcError};
pub use mpreg_actors::version::Version;
pub use node::{Node, NodeBuilder};
