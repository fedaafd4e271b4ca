//! rampart: a reverse proxy that keeps an LLM chat product up.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod alert;
pub mod app;
pub mod body;
pub mod config;
pub mod demo;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod health;
pub mod jitter;
pub mod listener;
pub mod observe;
pub mod path;
pub mod pipeline;
pub mod redis;
pub mod reload;
pub mod route;
pub mod shutdown;
pub mod stream;
pub(crate) mod sync;
pub mod text;
pub mod upstream;
pub mod workers;
