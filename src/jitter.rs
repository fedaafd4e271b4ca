//! A small, fast source of randomness for jitter and power-of-two choices (not for
//! anything secret): xorshift64* per thread, seeded from the process's random hasher keys.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish() | 1
}

/// Uniform in `0..u64::MAX`.
pub(crate) fn next_u64() -> u64 {
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// Uniform in `[0, 1)`.
pub(crate) fn unit() -> f64 {
    (next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Uniform in `0..n` (n > 0).
pub(crate) fn below(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    (next_u64() % n as u64) as usize
}

/// `d` scaled by a factor uniform in `[1 - spread, 1 + spread]`.
pub(crate) fn spread(d: std::time::Duration, spread: f64) -> std::time::Duration {
    d.mul_f64(1.0 - spread + 2.0 * spread * unit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_in_range() {
        for _ in 0..10_000 {
            let u = unit();
            assert!((0.0..1.0).contains(&u));
            assert!(below(3) < 3);
        }
        let d = std::time::Duration::from_secs(10);
        for _ in 0..1000 {
            let s = spread(d, 0.1);
            assert!(
                s >= std::time::Duration::from_secs(9) && s <= std::time::Duration::from_secs(11)
            );
        }
    }
}
