//! Everything between an admitted request and the upstream's answer: the breaker, the retry
//! loop and its budget, the choice of endpoint, the forward itself, the connection pool and
//! our HTTP/1.1 client.

pub(crate) mod attempts;
pub(crate) mod balance;
pub(crate) mod breaker;
pub(crate) mod client;
pub(crate) mod forward;
pub(crate) mod forwarded;
pub(crate) mod groups;
pub(crate) mod pool;
pub(crate) mod release;
pub(crate) mod resilience;
pub(crate) mod retry;
