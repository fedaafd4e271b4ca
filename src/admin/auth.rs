//! The optional bearer token of the admin listener (`admin.token`). The probes stay open
//! (kubelet and load balancers call them without credentials), and so does the status page
//! itself, which is static: the data it fetches needs the token.

use http::{HeaderMap, header};

use crate::proxy::Shared;

pub fn public(path: &str) -> bool {
    matches!(path, "/livez" | "/readyz" | "/health" | "/")
}

pub fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let snapshot = shared.snapshot.load();
    let Some(token) = snapshot.config.admin.token.as_deref() else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| same(given.trim().as_bytes(), token.as_bytes()))
}

/// Compares without stopping at the first difference, so timing does not tell how much of
/// a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
