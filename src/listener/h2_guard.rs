//! HTTP/2 control-frame flood guard at the byte level.
//!
//! The h2 crate answers or absorbs frames that cost the peer nothing and move no request
//! forward (PING, SETTINGS, WINDOW_UPDATE, PRIORITY, RST_STREAM, empty DATA, frames of
//! unknown types) without ever closing the connection: a client can keep a core busy with
//! millions of them a second (CVE-2019-9512, -9515, -9518 class). [`H2Watch`] follows the
//! frame headers the connection's reads carry (9 bytes each, payloads skipped, nothing
//! copied or changed) and gives each connection a budget of such frames, as Envoy's
//! `max_consecutive_inbound_frames_with_empty_payload` and
//! `max_inbound_window_update_frames_per_data_frame_sent` do in spirit: a burst of
//! [`BURST`], refilled with time, with every request (HEADERS) and with every KiB rampart
//! writes (a downloading client sends WINDOW_UPDATEs in proportion). Over budget, the read
//! fails and the connection is closed.

use tokio::time::Instant;

/// Idle frames a connection may send at once.
pub(crate) const BURST: u32 = 1_000;
/// Idle frames a second a connection may keep sending.
const REFILL_PER_SEC: u32 = 100;
/// Idle frames granted per request: browsers send PRIORITY and WINDOW_UPDATE per stream.
const PER_REQUEST: u32 = 10;
/// Bytes rampart writes per idle frame granted (WINDOW_UPDATEs of a download).
const BYTES_PER_FRAME: usize = 1024;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;

/// One HTTP/2 connection's frame budget, fed the bytes after the client preface.
pub(crate) struct H2Watch {
    head: [u8; 9],
    /// Bytes of `head` read so far.
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
    tokens: u32,
    refilled: Instant,
    /// Written bytes not yet turned into tokens.
    written: usize,
}

impl Default for H2Watch {
    fn default() -> Self {
        H2Watch::new()
    }
}

impl H2Watch {
    pub(crate) fn new() -> Self {
        H2Watch {
            head: [0; 9],
            have: 0,
            skip: 0,
            tokens: BURST,
            refilled: Instant::now(),
            written: 0,
        }
    }

    /// Follows the frames in `buf`, the connection's next bytes. False: over budget.
    pub(crate) fn feed(&mut self, mut buf: &[u8]) -> bool {
        self.refill();
        while !buf.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(buf.len());
                self.skip -= n;
                buf = &buf[n..];
                continue;
            }
            let n = (9 - self.have).min(buf.len());
            self.head[self.have..self.have + n].copy_from_slice(&buf[..n]);
            self.have += n;
            buf = &buf[n..];
            if self.have < 9 {
                break;
            }
            self.have = 0;
            let h = self.head;
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            self.skip = len;
            if !self.frame(h[3], h[4], len) {
                return false;
            }
        }
        true
    }

    /// Whether a frame of `kind` is within the budget.
    fn frame(&mut self, kind: u8, flags: u8, len: usize) -> bool {
        let progress = match kind {
            HEADERS => {
                self.tokens = self.tokens.saturating_add(PER_REQUEST).min(BURST);
                true
            }
            // Data, or the end of a body.
            DATA => len > 0 || flags & END_STREAM != 0,
            // h2 bounds header blocks itself; GOAWAY ends the connection.
            CONTINUATION | PUSH_PROMISE | GOAWAY => true,
            _ => false,
        };
        if progress {
            return true;
        }
        match self.tokens.checked_sub(1) {
            Some(t) => {
                self.tokens = t;
                true
            }
            None => false,
        }
    }

    /// rampart wrote `n` bytes on the connection.
    pub(crate) fn wrote(&mut self, n: usize) {
        self.written += n;
        if self.written >= BYTES_PER_FRAME {
            let grant = u32::try_from(self.written / BYTES_PER_FRAME).unwrap_or(u32::MAX);
            self.written %= BYTES_PER_FRAME;
            self.tokens = self.tokens.saturating_add(grant).min(BURST);
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.refilled);
        let grant = elapsed.as_millis() * u128::from(REFILL_PER_SEC) / 1000;
        if grant > 0 {
            let grant = u32::try_from(grant).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(grant).min(BURST);
            self.refilled = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    const PING: u8 = 0x6;
    const SETTINGS: u8 = 0x4;
    const WINDOW_UPDATE: u8 = 0x8;
    const PRIORITY: u8 = 0x2;

    #[tokio::test(start_paused = true)]
    async fn floods_of_idle_frames_run_out_of_budget() {
        for (kind, flags, payload) in [
            (PING, 0, &[0u8; 8][..]),
            (PING, 1, &[0u8; 8][..]),
            (SETTINGS, 0, &[][..]),
            (WINDOW_UPDATE, 0, &[0, 0, 0, 1][..]),
            (PRIORITY, 0, &[0, 0, 0, 0, 16][..]),
            (DATA, 0, &[][..]),
            (0xee, 0, &b"unknown"[..]),
        ] {
            let mut w = H2Watch::new();
            let one = frame(kind, flags, payload);
            let burst: Vec<u8> = one.repeat(BURST as usize);
            assert!(w.feed(&burst), "a burst is allowed ({kind:#x})");
            assert!(!w.feed(&one), "one more is not ({kind:#x})");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_with_time_requests_and_writes() {
        let ping = frame(PING, 0, &[0; 8]);
        let mut w = H2Watch::new();
        assert!(w.feed(&ping.repeat(BURST as usize)));
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert!(w.feed(&ping.repeat(REFILL_PER_SEC as usize)));
        assert!(!w.feed(&ping));

        let mut w = H2Watch::new();
        assert!(w.feed(&ping.repeat(BURST as usize)));
        assert!(w.feed(&frame(HEADERS, 0x4, &[0x82, 0x86, 0x84])));
        assert!(w.feed(&ping.repeat(PER_REQUEST as usize)));
        assert!(!w.feed(&ping));

        let mut w = H2Watch::new();
        let update = frame(WINDOW_UPDATE, 0, &[0, 0, 64, 0]);
        assert!(w.feed(&update.repeat(BURST as usize)));
        w.wrote(16 * 1024 + 100);
        assert!(w.feed(&update.repeat(16)));
        assert!(!w.feed(&update));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_and_data_cost_nothing_and_frames_may_split_anywhere() {
        let mut conn = Vec::new();
        conn.extend(frame(SETTINGS, 0, &[0, 4, 0, 1, 0, 0]));
        for _ in 0..5_000 {
            conn.extend(frame(HEADERS, 0x4, &[0x83, 0x86, 0x84]));
            conn.extend(frame(DATA, 0, &[b'x'; 100]));
            conn.extend(frame(PRIORITY, 0, &[0, 0, 0, 0, 16]));
            conn.extend(frame(DATA, END_STREAM, &[]));
        }
        for step in [1, 7, 9, 4096, conn.len()] {
            let mut w = H2Watch::new();
            for part in conn.chunks(step) {
                assert!(w.feed(part), "split every {step}");
            }
            assert_eq!((w.have, w.skip), (0, 0));
        }
        // A large frame's payload is skipped, not read as frame headers.
        let mut w = H2Watch::new();
        let big = frame(DATA, 0, &frame(PING, 0, &[0; 8]).repeat(2 * BURST as usize));
        assert!(w.feed(&big));
        assert_eq!(w.tokens, BURST);
    }
}
