//! rampart: a reverse proxy that keeps an LLM chat product up.
#![forbid(unsafe_code)]

pub(crate) mod admin;
pub(crate) mod admission;
pub(crate) mod alert;
pub mod app;
#[doc(hidden)]
pub mod bench;
pub(crate) mod body;
pub(crate) mod cache;
pub(crate) mod clock;
pub mod config;
pub mod demo;
pub(crate) mod error;
#[doc(hidden)]
pub mod fuzz;
pub(crate) mod h1;
pub(crate) mod health;
pub(crate) mod jitter;
pub(crate) mod listener;
pub(crate) mod observe;
pub(crate) mod path;
pub(crate) mod pipeline;
pub(crate) mod redis;
pub mod reload;
pub(crate) mod route;
pub(crate) mod scratch;
pub(crate) mod shutdown;
pub(crate) mod stream;
pub(crate) mod sync;
pub(crate) mod text;
pub(crate) mod tls;
pub(crate) mod upstream;
pub mod workers;

/// The cause chain of an error, one line (the tests print it).
pub use health::error_chain;
