//! rampart: a reverse proxy that keeps an LLM chat product up.
#![forbid(unsafe_code)]

pub mod config;
