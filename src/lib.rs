//! rampart: a reverse proxy that keeps an LLM chat product up.
#![forbid(unsafe_code)]

pub mod admin;
pub mod alert;
pub mod app;
pub mod balance;
pub mod breaker;
pub mod config;
pub mod demo;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod health;
pub mod jitter;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod ratelimit;
pub mod redis;
pub mod reload;
pub mod retry;
pub mod server;
pub mod shutdown;
pub(crate) mod sync;
pub mod workers;
