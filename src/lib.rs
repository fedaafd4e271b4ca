//! rampart: a reverse proxy that keeps an LLM chat product up.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod shutdown;
