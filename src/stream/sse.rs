//! Where the events of a `text/event-stream` body begin and end, read from its bytes as they
//! pass on their way to the client (WHATWG HTML, "Server-sent events", parsing and
//! interpreting an event stream).
//!
//! The scanner only watches: the caller forwards every byte unchanged, and the scanner keeps
//! no event data, only a few fixed-size buffers (the start of the current field name, the
//! current `event:` name up to [`NAME_CAP`]), so a stream costs the same however large its
//! events or lines are. What it tells the caller is enough to time events, count in-band
//! errors, and find the places where a byte string can be inserted without splitting an
//! event (a heartbeat comment, a final error event).
//!
//! Bytes are followed rather than decoded text: CR, LF and `:` are ASCII, so they never occur
//! inside a UTF-8 sequence, and an invalid sequence can only affect a name compared here,
//! which then matches nothing, as the replacement character it would decode to would not.

/// Field names are told apart only as far as `event` and `data` need: a longer name is a
/// field the scanner has no interest in.
const FIELD_CAP: usize = 5;

/// Event names longer than this match no configured error name.
const NAME_CAP: usize = 64;

const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// What the chunk just fed contained.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scan {
    /// Events dispatched: a blank line after at least one `data` field.
    pub(crate) events: usize,
    /// Those of them whose event name is in the scanner's error list.
    pub(crate) errors: usize,
    /// Comment lines (`:` first) completed.
    pub(crate) comments: usize,
    /// Offset in the chunk just past its last line end at which no event is partly
    /// received: bytes inserted there split no event. Between the CR and the LF of a CRLF
    /// split across chunks, the chunk ending in the CR reports its end; what is inserted
    /// there is then followed by a lone LF, a blank line, which between events dispatches
    /// nothing.
    pub(crate) boundary: Option<usize>,
}

/// Takes an event's data as the scanner reads it (the token meter, `stream::usage`): the
/// values of its `data` fields in pieces, a line feed's worth after each `data` line (the
/// WHATWG algorithm joins them with LF), and the dispatch with the event's name (empty for
/// none, and for a name longer than 64 bytes, which matches nothing).
pub(crate) trait Sink {
    /// A piece of a `data` value; `rest` is the chunk from the piece on (the piece is its
    /// start), for a sink that looks ahead.
    fn data(&mut self, value: &[u8], rest: &[u8]);
    fn data_line_end(&mut self);
    fn dispatch(&mut self, name: &[u8]);
}

/// The scanner alone.
struct Ignore;

impl Sink for Ignore {
    #[inline(always)]
    fn data(&mut self, _: &[u8], _: &[u8]) {}
    #[inline(always)]
    fn data_line_end(&mut self) {}
    #[inline(always)]
    fn dispatch(&mut self, _: &[u8]) {}
}

/// Where the scanner is in the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the very start of the stream, `n` bytes of a byte order mark seen.
    Bom(u8),
    /// Nothing of the line yet.
    Start,
    /// In a field's name.
    Name,
    /// Just past the colon: one space there is not part of the value.
    ValueStart,
    /// In a field's value.
    Value,
    /// In a comment.
    Comment,
}

/// The fields the scanner follows; the others (`id`, `retry`, anything) only mark an event
/// as begun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Data,
    Event,
    Other,
}

/// Follows an event stream's framing across the chunks of a response body. What every
/// event reads comes first (`repr(C)`, near the event guard's hot fields), the name last.
#[derive(Debug, Clone)]
#[repr(C)]
pub(crate) struct Scanner {
    line: Line,
    /// The last byte was a CR: an LF now belongs to the same line end.
    after_cr: bool,
    /// The current line's field, once its name has ended.
    kind: Field,
    /// A field line was received since the last blank line: an event is under way.
    in_event: bool,
    /// The event has a `data` field: a blank line dispatches it.
    has_data: bool,
    /// Unnamed events (`message`) are errors: decided once, not read from `error_names`.
    message_is_error: bool,
    field: [u8; FIELD_CAP],
    /// Bytes of the field name so far; past FIELD_CAP, a name the scanner ignores.
    field_len: usize,
    /// Bytes of the event name so far; past NAME_CAP, a name no error name matches.
    name_len: usize,
    /// Event names counted as in-band errors.
    error_names: Box<[Box<[u8]>]>,
    name: [u8; NAME_CAP],
}

impl Default for Scanner {
    /// Counts events named `error` as in-band errors.
    fn default() -> Scanner {
        Scanner::new(&["error"])
    }
}

impl Scanner {
    /// A scanner for a stream from its first byte, counting events with one of
    /// `error_names` as errors (an event without an `event` field is named `message`; a
    /// name longer than 64 bytes is never matched).
    pub(crate) fn new<S: AsRef<str>>(error_names: &[S]) -> Scanner {
        let names = error_names.iter().map(|n| n.as_ref().as_bytes().into());
        let error_names: Box<[Box<[u8]>]> = names.collect();
        Scanner {
            message_is_error: error_names.iter().any(|n| **n == *b"message"),
            error_names,
            line: Line::Bom(0),
            after_cr: false,
            field: [0; FIELD_CAP],
            field_len: 0,
            kind: Field::Other,
            in_event: false,
            has_data: false,
            name: [0; NAME_CAP],
            name_len: 0,
        }
    }

    /// True when no event (nor any line) is partly received: at the start of the stream,
    /// or after a line end with only comments and blank lines since the last blank line.
    pub(crate) fn at_boundary(&self) -> bool {
        matches!(self.line, Line::Start | Line::Bom(0)) && !self.in_event
    }

    /// Follows the next bytes of the stream.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Scan {
        self.feed_with(chunk, &mut Ignore)
    }

    /// Follows the next bytes of the stream, handing the events' data to `sink` as it is
    /// read (see [`Sink`]).
    pub(crate) fn feed_with<S: Sink>(&mut self, chunk: &[u8], sink: &mut S) -> Scan {
        let mut scan = Scan::default();
        let mut i = 0;
        while let Some(&b) = chunk.get(i) {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    i += 1;
                    if !self.in_event {
                        scan.boundary = Some(i);
                    }
                    continue;
                }
            }
            match self.line {
                Line::Bom(n) => {
                    if BOM.get(usize::from(n)) == Some(&b) {
                        self.line = if n == 2 {
                            Line::Start
                        } else {
                            Line::Bom(n + 1)
                        };
                        i += 1;
                    } else if n == 0 {
                        self.line = Line::Start;
                    } else {
                        // Not a mark after all: its bytes began a field name that is none
                        // of ours. The byte that told is taken again as part of that line.
                        self.begin_field();
                        self.field_len = FIELD_CAP + 1;
                    }
                }
                Line::Start => {
                    match b {
                        b'\r' | b'\n' => self.end_line(b, i, &mut scan, sink),
                        b':' => self.line = Line::Comment,
                        b'd' if chunk.get(i..i + 5) == Some(b"data:") => {
                            // The most common name, whole in the chunk: read in one step,
                            // to the same state as byte by byte.
                            self.begin_field();
                            self.kind = Field::Data;
                            self.has_data = true;
                            self.line = Line::ValueStart;
                            i += 4;
                        }
                        _ => {
                            self.begin_field();
                            self.push_field(b);
                        }
                    }
                    i += 1;
                }
                Line::Name => {
                    match b {
                        b'\r' | b'\n' => {
                            self.name_ended();
                            self.end_line(b, i, &mut scan, sink);
                        }
                        b':' => {
                            self.name_ended();
                            self.line = Line::ValueStart;
                        }
                        _ => self.push_field(b),
                    }
                    i += 1;
                }
                Line::ValueStart => {
                    self.line = Line::Value;
                    if b == b' ' {
                        i += 1;
                    }
                }
                Line::Value | Line::Comment => {
                    let rest = chunk.get(i..).unwrap_or_default();
                    // SIMD search: a value is most of an event's bytes.
                    let end = memchr::memchr2(b'\r', b'\n', rest);
                    let value = &rest[..end.unwrap_or(rest.len())];
                    if self.line == Line::Value {
                        match self.kind {
                            Field::Event => self.push_name(value),
                            Field::Data if !value.is_empty() => sink.data(value, rest),
                            _ => {}
                        }
                    }
                    i += value.len();
                    if let Some(&eol) = chunk.get(i) {
                        self.end_line(eol, i, &mut scan, sink);
                        i += 1;
                    }
                }
            }
        }
        scan
    }

    fn begin_field(&mut self) {
        self.line = Line::Name;
        self.in_event = true;
        self.field_len = 0;
    }

    fn push_field(&mut self, b: u8) {
        if let Some(slot) = self.field.get_mut(self.field_len) {
            *slot = b;
        }
        self.field_len = (self.field_len + 1).min(FIELD_CAP + 1);
    }

    /// The field name is complete: what the field does takes effect now, as its value
    /// only matters once the line (and then the event) ends.
    fn name_ended(&mut self) {
        let name = self.field.get(..self.field_len).unwrap_or_default();
        self.kind = match name {
            b"data" => Field::Data,
            b"event" => Field::Event,
            _ => Field::Other,
        };
        match self.kind {
            Field::Data => self.has_data = true,
            Field::Event => self.name_len = 0,
            Field::Other => {}
        }
    }

    fn push_name(&mut self, bytes: &[u8]) {
        let end = self.name_len + bytes.len();
        if let Some(slots) = self.name.get_mut(self.name_len..end) {
            slots.copy_from_slice(bytes);
        }
        self.name_len = end.min(NAME_CAP + 1);
    }

    /// The line ended with `eol` (CR or LF), at `i` in the chunk.
    fn end_line<S: Sink>(&mut self, eol: u8, i: usize, scan: &mut Scan, sink: &mut S) {
        match self.line {
            Line::Start => {
                if self.has_data {
                    scan.events += 1;
                    if self.is_error() {
                        scan.errors += 1;
                    }
                    sink.dispatch(self.name.get(..self.name_len).unwrap_or_default());
                }
                self.has_data = false;
                self.name_len = 0;
                self.in_event = false;
            }
            Line::Comment => scan.comments += 1,
            // A data line's value is followed by a line feed in the event's data.
            Line::Name | Line::ValueStart | Line::Value if self.kind == Field::Data => {
                sink.data_line_end();
            }
            _ => {}
        }
        self.line = Line::Start;
        self.after_cr = eol == b'\r';
        if !self.in_event {
            scan.boundary = Some(i + 1);
        }
    }

    fn is_error(&self) -> bool {
        let name = match self.name.get(..self.name_len) {
            Some([]) => return self.message_is_error,
            Some(name) => name,
            None => return false,
        };
        self.error_names.iter().any(|n| **n == *name)
    }
}

/// A line's field and value as the WHATWG spec splits them (the first colon; one space
/// after it dropped; no colon: the whole line is the field): for the whole-stream
/// reference parsers the tests check the incremental ones against.
#[cfg(test)]
pub(crate) fn field_and_value(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b':') {
        Some(c) => {
            let v = &line[c + 1..];
            (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
        }
        None => (line, &b""[..]),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// Events, errors, comments.
    type Totals = (usize, usize, usize);

    /// What the WHATWG algorithm makes of a whole stream, written line by line.
    #[derive(Debug)]
    struct Reference {
        events: usize,
        errors: usize,
        comments: usize,
        /// Offsets just past a line end (past the CR of a CRLF too) with no event under way.
        boundaries: BTreeSet<usize>,
        /// Offsets at which nothing is partly received.
        idle: BTreeSet<usize>,
    }

    fn reference(stream: &[u8], names: &[&str]) -> Reference {
        let start = if stream.starts_with(BOM) { 3 } else { 0 };
        // Each line with the offsets past its end (two for a CRLF); an unended last line
        // is never processed.
        let mut lines: Vec<(&[u8], Vec<usize>)> = Vec::new();
        let (mut i, mut from) = (start, start);
        while i < stream.len() {
            match stream[i] {
                b'\n' => lines.push((&stream[from..i], vec![i + 1])),
                b'\r' if stream.get(i + 1) == Some(&b'\n') => {
                    lines.push((&stream[from..i], vec![i + 1, i + 2]));
                    i += 1;
                }
                b'\r' => lines.push((&stream[from..i], vec![i + 1])),
                _ => {
                    i += 1;
                    continue;
                }
            }
            i += 1;
            from = i;
        }
        let mut r = Reference {
            events: 0,
            errors: 0,
            comments: 0,
            boundaries: BTreeSet::new(),
            idle: BTreeSet::from([0, start]),
        };
        let (mut data, mut name, mut in_event) = (false, Vec::new(), false);
        for (line, ends) in lines {
            if line.is_empty() {
                if data {
                    r.events += 1;
                    let effective = if name.is_empty() {
                        b"message".to_vec()
                    } else {
                        name
                    };
                    if names.iter().any(|n| n.as_bytes() == effective) {
                        r.errors += 1;
                    }
                }
                (data, name, in_event) = (false, Vec::new(), false);
            } else if line[0] == b':' {
                r.comments += 1;
            } else {
                in_event = true;
                let (field, value) = field_and_value(line);
                match field {
                    b"data" => data = true,
                    b"event" => name = value.to_vec(),
                    _ => {}
                }
            }
            if !in_event {
                r.boundaries.extend(&ends);
                r.idle.extend(&ends);
            }
        }
        r
    }

    /// Feeds `stream` cut at `cuts` and checks every chunk's report, and the state after
    /// it, against the reference.
    fn check(stream: &[u8], cuts: &[usize], names: &[&str]) {
        let r = reference(stream, names);
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut s = Scanner::new(names);
        let (mut events, mut errors, mut comments, mut from) = (0, 0, 0, 0);
        for to in cuts {
            let scan = s.feed(&stream[from..to]);
            events += scan.events;
            errors += scan.errors;
            comments += scan.comments;
            let last = r.boundaries.range(from + 1..to + 1).next_back();
            assert_eq!(
                scan.boundary,
                last.map(|p| p - from),
                "chunk {from}..{to} of {stream:?}"
            );
            assert_eq!(
                s.at_boundary(),
                r.idle.contains(&to),
                "at {to} of {stream:?}"
            );
            from = to;
        }
        let totals = (events, errors, comments);
        assert_eq!(
            totals,
            (r.events, r.errors, r.comments),
            "{stream:?} cut at {from}"
        );
    }

    /// Every cut into two and three pieces, and byte by byte.
    fn check_every_split(stream: &[u8], names: &[&str]) {
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                check(stream, &[i, j], names);
            }
        }
        check(stream, &(1..stream.len()).collect::<Vec<_>>(), names);
    }

    /// The totals of `pieces` fed in turn, and whether the scanner ends at a boundary.
    fn feed(names: &[&str], pieces: &[&[u8]]) -> (Totals, bool) {
        let mut s = Scanner::new(names);
        let mut t = (0, 0, 0);
        for p in pieces {
            let scan = s.feed(p);
            t = (t.0 + scan.events, t.1 + scan.errors, t.2 + scan.comments);
        }
        (t, s.at_boundary())
    }

    fn totals(stream: &[u8]) -> Totals {
        feed(&["error"], &[stream]).0
    }

    // The streams of the WHATWG page.
    const SPEC: &[(&[u8], Totals)] = &[
        (
            b"data: This is the first message.\n\ndata: This is the second message, it\ndata: has two lines.\n\ndata: This is the third message.\n\n",
            (3, 0, 0),
        ),
        (
            b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
            (3, 0, 0),
        ),
        (b"data: YHOO\ndata: +2\ndata: 10\n\n", (1, 0, 0)),
        (
            b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
            (3, 0, 1),
        ),
        // The last `data:` has no blank line after it: not dispatched.
        (b"data\n\ndata\ndata\n\ndata:", (2, 0, 0)),
        (b"data:test\n\ndata: test\n\n", (2, 0, 0)),
    ];

    #[test]
    fn the_spec_examples() {
        for (stream, expected) in SPEC {
            assert_eq!(
                totals(stream),
                *expected,
                "{:?}",
                String::from_utf8_lossy(stream)
            );
            check_every_split(stream, &["error", "add"]);
        }
        assert_eq!(feed(&["add"], &[SPEC[1].0]).0, (3, 2, 0));
    }

    #[test]
    fn lines_end_in_cr_lf_or_crlf() {
        assert_eq!(totals(b"data: a\r\rdata: b\n\ndata: c\r\n\r\n"), (3, 0, 0));
        assert_eq!(
            totals(b"data: a\r\n\ndata: b\n\r\ndata: c\r\r\n"),
            (3, 0, 0)
        );
        // A CR, then a CRLF: two line ends, not three.
        assert_eq!(totals(b"data: a\r\r\ndata: b\r\n\r\n"), (2, 0, 0));
        assert_eq!(totals(b"data: a\n\r"), (1, 0, 0));
        check_every_split(b"data: a\r\rdata: b\n\ndata: c\r\n\r\n: x\r\n", &["error"]);
    }

    #[test]
    fn a_crlf_split_across_chunks_is_one_line_end() {
        // Two line ends here would dispatch `a` and `b` apart.
        assert_eq!(
            feed(&[], &[b"data: a\r", b"\ndata: b\r\n\r\n"]).0,
            (1, 0, 0)
        );
        let mut s = Scanner::default();
        assert_eq!(s.feed(b"data: a\r\r").boundary, Some(9));
        assert!(s.at_boundary());
        let scan = s.feed(b"\n");
        assert_eq!((scan.events, scan.boundary), (0, Some(1)));
        assert_eq!(s.feed(b"\r").boundary, Some(1));
        // The LF ends the CR's line: not a blank line, so `b` is one event with `c`.
        assert_eq!(s.feed(b"data: b\r").boundary, None);
        assert_eq!(s.feed(b"\n").boundary, None);
        assert_eq!(s.feed(b"data: c\n\n").events, 1);
    }

    #[test]
    fn a_leading_bom_is_skipped_once() {
        assert_eq!(totals(b"\xEF\xBB\xBFdata: x\n\n"), (1, 0, 0));
        assert_eq!(totals(b"\xEF\xBB\xBF: hi\n"), (0, 0, 1));
        let split: &[&[u8]] = &[b"\xEF", b"\xBB", b"\xBFevent: error\ndata: x\n\n"];
        assert_eq!(feed(&["error"], split), ((1, 1, 0), true));
        // A second mark is part of the line: the field is not `data`.
        assert_eq!(totals(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n"), (0, 0, 0));
        assert_eq!(totals(b"\xEF\xBBdata: x\n\n"), (0, 0, 0));
        assert_eq!(totals(b"\xEF\xBB:x\n\n"), (0, 0, 0));
        let mut s = Scanner::default();
        assert!(s.at_boundary());
        s.feed(b"\xEF\xBB");
        assert!(!s.at_boundary());
        s.feed(b"\xBF");
        assert!(s.at_boundary());
        check_every_split(b"\xEF\xBB\xBFevent: error\r\ndata: x\r\n\r\n", &["error"]);
        check_every_split(b"\xEF\xBB\n\xEF\xBB\xBF\n\ndata\n\n", &["error"]);
    }

    #[test]
    fn comments_are_counted_and_leave_a_boundary() {
        let mut s = Scanner::default();
        let scan = s.feed(b": keep-alive\n\n:\r:x\r\n: ke");
        assert_eq!(
            (scan.events, scan.comments, scan.boundary),
            (0, 3, Some(20))
        );
        assert!(!s.at_boundary());
        let scan = s.feed(b"ep-alive\ndata: a\n");
        assert_eq!((scan.comments, scan.boundary), (1, Some(9)));
        assert!(!s.at_boundary());
        // A comment inside an event leaves it under way.
        let scan = s.feed(b": c\n");
        assert_eq!((scan.comments, scan.boundary), (1, None));
        let scan = s.feed(b"\n");
        assert_eq!((scan.events, scan.boundary), (1, Some(1)));
        assert!(s.at_boundary());
    }

    #[test]
    fn any_field_line_begins_an_event() {
        for line in [
            &b"id: 1\n"[..],
            b"retry: 10\n",
            b"x\n",
            b"event: error\n",
            b"data\n",
        ] {
            let mut s = Scanner::default();
            assert_eq!(s.feed(line).boundary, None);
            assert!(!s.at_boundary());
            assert_eq!(s.feed(b"\n").boundary, Some(1));
            assert!(s.at_boundary());
        }
    }

    #[test]
    fn error_events_by_name() {
        assert_eq!(totals(b"event: error\ndata: {}\n\n"), (1, 1, 0));
        assert_eq!(totals(b"event:error\ndata: {}\n\n"), (1, 1, 0));
        assert_eq!(totals(b"event:error\r\ndata\r\n\r\n"), (1, 1, 0));
        // One space only is dropped; the name is the whole rest of the line.
        assert_eq!(totals(b"event:  error\ndata: {}\n\n"), (1, 0, 0));
        assert_eq!(totals(b"event: error \ndata: {}\n\n"), (1, 0, 0));
        assert_eq!(totals(b"event: Error\ndata: {}\n\n"), (1, 0, 0));
        assert_eq!(totals(b"event: error:x\ndata: {}\n\n"), (1, 0, 0));
        // The last `event` field names the event.
        assert_eq!(totals(b"event: error\nevent: x\ndata\n\n"), (1, 0, 0));
        assert_eq!(totals(b"event: x\nevent: error\ndata\n\n"), (1, 1, 0));
        assert_eq!(totals(b"event: error\nevent\ndata\n\n"), (1, 0, 0));
        // Without data nothing is dispatched, and the name goes with the blank line.
        assert_eq!(totals(b"event: error\n\ndata: x\n\n"), (1, 0, 0));
        // Unnamed events are `message`s.
        assert_eq!(
            feed(&["message"], &[b"data\n\nevent: m\ndata\n\n"]).0,
            (2, 1, 0)
        );
        assert_eq!(
            feed(&["fail", "error"], &[b"event: fail\ndata\n\n"]).0,
            (1, 1, 0)
        );
        assert_eq!(feed(&[], &[b"event: error\ndata\n\n"]).0, (1, 0, 0));
        check_every_split(
            b"event: error\ndata: {\"code\": 1}\n\nevent:error\rdata\r\r",
            &["error"],
        );
    }

    #[test]
    fn a_field_name_longer_than_the_cap_is_another_field() {
        assert_eq!(totals(b"datadata: x\n\n"), (0, 0, 0));
        assert_eq!(totals(b"data : x\n\n"), (0, 0, 0));
        assert_eq!(totals(b"eventually: error\ndata: x\n\n"), (1, 0, 0));
        assert_eq!(totals(b"eventevent: error\ndata: x\n\n"), (1, 0, 0));
        let long = [&[b'd'; 10_000][..], b": x\n\n"].concat();
        assert_eq!(totals(&long), (0, 0, 0));
        check_every_split(b"dat: x\ndatas\nevents: error\n\ndata\n\n", &["error"]);
    }

    #[test]
    fn event_names_past_64_bytes_match_nothing() {
        let at_cap = "e".repeat(NAME_CAP);
        let names = [at_cap.as_str()];
        let stream = |name: &str| format!("event: {name}\ndata: x\n\n").into_bytes();
        assert_eq!(feed(&names, &[&stream(&at_cap)]).0, (1, 1, 0));
        let over = "e".repeat(NAME_CAP + 1);
        assert_eq!(feed(&names, &[&stream(&over)]).0, (1, 0, 0));
        let huge = "e".repeat(100_000);
        assert_eq!(feed(&names, &[&stream(&huge)]).0, (1, 0, 0));
        // Past the cap, then a shorter name again.
        let both = [stream(&over), stream(&at_cap)].concat();
        assert_eq!(feed(&names, &[&both]).0, (2, 1, 0));
        check_every_split(&both, &names);
        // The memory is fixed, whatever the stream.
        assert!(size_of::<Scanner>() <= 128, "{}", size_of::<Scanner>());
    }

    /// What a sink is handed: the data joined (a line end as `\n`), a `|name` per dispatch.
    #[derive(Default)]
    struct Record(Vec<u8>);

    impl Sink for Record {
        fn data(&mut self, value: &[u8], rest: &[u8]) {
            assert!(rest.starts_with(value));
            self.0.extend_from_slice(value);
        }
        fn data_line_end(&mut self) {
            self.0.push(b'\n');
        }
        fn dispatch(&mut self, name: &[u8]) {
            self.0.push(b'|');
            self.0.extend_from_slice(name);
        }
    }

    #[test]
    fn a_sink_is_handed_the_same_data_whether_a_data_line_comes_whole_or_cut() {
        let stream: &[u8] =
            b"data: a\ndata:b\ndata\ndat: x\ndatas: y\n\nevent: e\ndata:  c\r\n\r\nd\n\ndata:\n\n";
        let record = |cuts: &[usize]| {
            let (mut s, mut r) = (Scanner::default(), Record::default());
            let mut from = 0;
            for &to in cuts.iter().chain([&stream.len()]) {
                s.feed_with(&stream[from..to], &mut r);
                from = to;
            }
            r.0
        };
        let whole = record(&[]);
        assert_eq!(whole, b"a\nb\n\n| c\n|e\n|".to_vec());
        for i in 0..=stream.len() {
            assert_eq!(record(&[i]), whole, "cut at {i}");
        }
        assert_eq!(record(&(1..stream.len()).collect::<Vec<_>>()), whole);
    }

    fn line_end() -> impl Strategy<Value = &'static [u8]> {
        prop_oneof![Just(&b"\n"[..]), Just(&b"\r"[..]), Just(&b"\r\n"[..])]
    }

    fn event_name() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => Just("error".to_owned()),
            1 => Just(String::new()),
            1 => Just(" error".to_owned()),
            1 => Just("error ".to_owned()),
            1 => Just("fail".to_owned()),
            1 => Just("e".repeat(NAME_CAP)),
            1 => Just("e".repeat(NAME_CAP + 1)),
            1 => "[a-z:]{0,8}",
        ]
    }

    /// One line, without its end.
    fn line() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => (event_name(), any::<bool>())
                .prop_map(|(n, sp)| format!("event:{}{n}", if sp { " " } else { "" })),
            6 => "[ -~]{0,12}".prop_map(|v| format!("data: {v}")),
            1 => Just("data".to_owned()),
            1 => Just("data:".to_owned()),
            1 => "id: [0-9]{1,3}",
            1 => Just("retry: 100".to_owned()),
            2 => ":[ -~]{0,12}",
            1 => "[a-z ]{1,7}(:[ -~]{0,4})?",
            1 => Just("\u{FEFF}data: x".to_owned()),
        ]
        .prop_map(String::into_bytes)
    }

    /// A stream of lines and blank lines, each with its own end, maybe a mark first and
    /// maybe an unended line last.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let item = prop_oneof![3 => line(), 1 => Just(Vec::new())];
        (
            any::<bool>(),
            proptest::collection::vec((item, line_end()), 0..40),
            proptest::option::of(line()),
        )
            .prop_map(|(bom, items, tail)| {
                let mut out = if bom { BOM.to_vec() } else { Vec::new() };
                for (l, end) in items {
                    out.extend_from_slice(&l);
                    out.extend_from_slice(end);
                }
                out.extend(tail.unwrap_or_default());
                out
            })
    }

    /// Bytes from the ones that matter to the framing, in any order.
    fn soup() -> impl Strategy<Value = Vec<u8>> {
        let bytes = b"\r\n\r\n: :\xEF\xBB\xBFdataeventror";
        proptest::collection::vec(proptest::sample::select(&bytes[..]), 0..120)
    }

    fn names() -> impl Strategy<Value = Vec<&'static str>> {
        let at_cap: &'static str =
            "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
        prop_oneof![
            3 => Just(vec!["error"]),
            1 => Just(vec!["error", "fail"]),
            1 => Just(vec!["message"]),
            1 => Just(vec![at_cap]),
            1 => Just(vec![]),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// However a stream is cut into chunks, the chunks' reports add up to the
        /// reference's counts, each boundary is the reference's last one in its chunk, and
        /// the scanner is between events exactly when the reference is.
        #[test]
        fn any_cut_of_a_stream_agrees_with_the_reference(
            stream in prop_oneof![3 => stream(), 1 => soup()],
            cuts in proptest::collection::vec(0usize..600, 0..12),
            names in names(),
        ) {
            check(&stream, &cuts, &names);
        }
    }
}
