//! Whether a routed request may go on: the rate limits of its route.

pub(crate) mod ratelimit;
