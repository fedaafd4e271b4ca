//! The worker's write buffer, lent to whatever is about to encode bytes into an empty
//! write buffer and taken back once they are written: the HTTP/1.1 server's answer heads
//! and frames (`h1::conn`), the upstream client's request heads (`upstream::client`). Each
//! connection's own buffer has left the cache by its next request or event when 1,000
//! connections share a core; this one is used by every connection in turn and stays in it
//! (callgrind counted the copy of each event into a connection's buffer as ~2.5 missed
//! lines, and ~5 per request for heads and small bodies). Buffers only change hands while
//! empty, so a write left pending keeps its bytes in whichever buffer the connection has.

use std::cell::RefCell;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Swaps `buf`, empty, with the worker's buffer (lend or give back: the same move).
pub(crate) fn swap(buf: &mut Vec<u8>) {
    if !buf.is_empty() {
        return;
    }
    let _ = SCRATCH.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            std::mem::swap(&mut *s, buf);
        }
    });
}

/// Empties `buf`, written, and gives it to the worker (or takes the worker's back).
pub(crate) fn give_back(buf: &mut Vec<u8>) {
    buf.clear();
    swap(buf);
}

#[cfg(test)]
mod tests {
    use super::swap;

    #[test]
    fn a_buffer_with_bytes_is_never_swapped() {
        let mut a = b"pending".to_vec();
        swap(&mut a);
        assert_eq!(a, b"pending");
    }

    #[test]
    fn lent_and_given_back_the_worker_keeps_its_buffer() {
        let mut own = Vec::with_capacity(8);
        let own_ptr = own.as_ptr();
        swap(&mut own); // lent: the connection now writes into the worker's buffer
        own.extend_from_slice(b"event");
        own.clear();
        let lent_ptr = own.as_ptr();
        swap(&mut own); // given back
        assert_eq!(own.as_ptr(), own_ptr);
        let mut next = Vec::new();
        swap(&mut next);
        assert_eq!(
            next.as_ptr(),
            lent_ptr,
            "the next connection gets the same buffer"
        );
        swap(&mut next);
    }
}
