//! Everything between an admitted request and the upstream's answer: the breaker, the retry
//! loop and its budget, the choice of endpoint, the forward itself, the connection pool and
//! our HTTP/1.1 client.

pub mod attempts;
pub mod balance;
pub mod breaker;
pub mod client;
pub mod forward;
pub mod forwarded;
pub mod pool;
pub mod resilience;
pub mod retry;
