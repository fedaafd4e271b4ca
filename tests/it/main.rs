//! The one integration-test binary: every module below is compiled into it (one link step).

mod config;
