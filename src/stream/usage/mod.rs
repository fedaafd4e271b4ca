//! The token counts of an LLM answer, read from its body as it passes on its way to the
//! client: the meter is fed the chunks exactly as they are forwarded, split anywhere, and
//! keeps a fixed few hundred bytes whatever the size of the body or of its events (a key
//! buffer of [`KEY_CAP`] bytes, number accumulators, one bit per open JSON container).
//!
//! Shapes recognised (checked against the public sources named):
//!
//! - OpenAI chat completions, streamed (`text/event-stream`): each event's data is one JSON
//!   text; a root object's `usage` object carries `prompt_tokens` and `completion_tokens`,
//!   totals for the whole answer, in the last chunk (with `stream_options.include_usage`;
//!   earlier chunks may say `"usage": null`). The last usage found wins. `data: [DONE]` and
//!   any data that is not one JSON text are ignored.
//! - FastGPT (labring/FastGPT, `projects/app/src/pages/api/v1/chat/completions.ts`): with
//!   `detail: true` a stream ends with an event named `flowResponses` whose data is the JSON
//!   array of node responses (`DispatchNodeResponseType` in
//!   `packages/global/core/workflow/runtime/type.ts`). A node counts `inputTokens` and
//!   `toolCallInputTokens` as prompt, `outputTokens` and `toolCallOutputTokens` as
//!   completion; a node with none of these (older FastGPT: `tokens`, `toolCallTokens` in
//!   `runtime/type.d.ts`) counts those, totals that cannot be split, as prompt. The
//!   nodes a node ran (`toolDetail`, `pluginDetail`, `loopDetail`, `childrenResponses`,
//!   arrays of node responses whose tokens the parent does not include) are counted too, to
//!   [`NODE_CAP`] levels. FastGPT's chunks carry no `usage`; a stream that has one (an
//!   OpenAI-compatible upstream) is counted by it alone, so tokens are never counted twice.
//! - JSON answers (`application/json`, `+json`): the root object's `usage` as above, unless
//!   it has a `responseData` array of node responses (FastGPT's non-stream answer with
//!   `detail: true`), which is counted as the `flowResponses` array is: FastGPT's own
//!   `usage` there is a constant placeholder (`prompt_tokens: 1, completion_tokens: 1`).
//!
//! Only a key at its place counts: the JSON is tokenized (strings with their escapes,
//! numbers, literals, nesting), so a `"prompt_tokens"` in the answer's text or one level
//! off is nothing. A count is a non-negative integer that fits in a u64; any other value
//! (a float, a negative, a string) makes that key count as absent; sums saturate. A key
//! given twice counts by its last value, as in a JSON parser's map. An event's findings
//! count only once the event is dispatched and its data was one whole JSON text (a JSON
//! body's, once the body is whole); strings are not checked as UTF-8 nor their surrogate
//! escapes paired: the meter reads where counts sit, it is not a validator. Containers
//! nested deeper than [`MAX_DEPTH`] make the text invalid, as serde_json's recursion limit
//! does.

/// Token counts of one answer (defined with the metrics that take them).
pub(crate) use crate::observe::tokens::Usage;

use crate::stream::sse::{Scanner, Sink};

/// The longest key of interest: `toolCallOutputTokens`.
const KEY_CAP: usize = 20;

/// Levels of node responses followed (a node, the nodes it ran, theirs, ...).
const NODE_CAP: usize = 4;

/// Open containers at most (one bit each); deeper is invalid, as in serde_json.
const MAX_DEPTH: u8 = 127;

/// Containers whose role is followed, from the root: the root object, `responseData`, then
/// a node and its detail array per level.
const CHAIN_CAP: usize = 2 + 2 * NODE_CAP;

/// Node keys, in the order of [`Node::counts`].
const NODE_KEYS: [&[u8]; 6] = [
    b"inputTokens",
    b"toolCallInputTokens",
    b"outputTokens",
    b"toolCallOutputTokens",
    b"tokens",
    b"toolCallTokens",
];

/// Keys whose value is an array of the node responses a node ran.
const DETAIL_KEYS: [&[u8]; 4] = [
    b"toolDetail",
    b"pluginDetail",
    b"loopDetail",
    b"childrenResponses",
];

/// The event that carries FastGPT's node responses.
const FLOW_EVENT: &[u8] = b"flowResponses";

// ============================== the meter ==============================

/// Reads an answer's token counts from its body's chunks.
#[derive(Debug, Clone)]
pub(crate) struct UsageMeter(Body);

#[derive(Debug, Clone)]
enum Body {
    /// One JSON text, no framing.
    Json(Json),
    /// An event stream followed by its own scanner (boxed: the meter's size is the JSON
    /// tokenizer's). The event guard, `stream::events`, feeds a [`StreamUsage`] from the
    /// scanner it has anyway instead.
    Events(Box<Scanner>, StreamUsage),
}

impl UsageMeter {
    /// For a `text/event-stream` body.
    pub(crate) fn event_stream() -> UsageMeter {
        UsageMeter(Body::Events(
            Box::new(Scanner::new::<&str>(&[])),
            StreamUsage::new(),
        ))
    }

    /// For an `application/json` (or `+json`) body.
    pub(crate) fn json() -> UsageMeter {
        UsageMeter(Body::Json(Json::new()))
    }

    /// Reads the next bytes of the body.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        match &mut self.0 {
            Body::Json(json) => json.feed(chunk),
            Body::Events(scanner, usage) => {
                scanner.feed_with(chunk, usage);
            }
        }
    }

    /// The counts found so far: in an event stream, those of the events dispatched; in a
    /// JSON body, those of the whole body (`None` until it is one whole JSON text).
    pub(crate) fn usage(&self) -> Option<Usage> {
        match &self.0 {
            Body::Events(_, usage) => usage.usage(),
            // Nodes count here under `responseData` only, not as a root array.
            Body::Json(json) if json.complete() && json.top_object == Some(true) => {
                json.flow.or_else(|| json.usage())
            }
            Body::Json(_) => None,
        }
    }
}

/// The token counts of an event stream, taken from its events as `sse::Scanner` reads
/// them: each event's data is one JSON text.
///
/// Most events hold no count (a content delta, a heartbeat): an event whose data is not an
/// object or an array, or whose bytes are all in the chunk where its data begins and hold
/// nothing that a key of interest can be read from (see [`may_count`]), is not tokenized;
/// its findings would have been none.
#[derive(Debug, Clone)]
// `mode` first (`repr(C)`): every event reads it, on a line the event guard touches anyway.
#[repr(C)]
pub(crate) struct StreamUsage {
    /// For the current event.
    mode: Mode,
    /// Events tokenized and dispatched (the prefilter's tests).
    #[cfg(test)]
    tokenized: usize,
    json: Json,
    /// The last OpenAI `usage` of a dispatched event.
    usage: Option<Usage>,
    /// The sums of the `flowResponses` events dispatched.
    flow: Option<Usage>,
}

impl StreamUsage {
    pub(crate) fn new() -> StreamUsage {
        StreamUsage {
            mode: Mode::Undecided,
            #[cfg(test)]
            tokenized: 0,
            json: Json::new(),
            usage: None,
            flow: None,
        }
    }

    /// An OpenAI `usage` wins over FastGPT's node sums: never counted twice.
    pub(crate) fn usage(&self) -> Option<Usage> {
        self.usage.or(self.flow)
    }
}

/// Whether the current event's data is tokenized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No data piece yet (an empty data line, whitespace to the tokenizer, changes nothing).
    Undecided,
    Tokenize,
    /// The event can hold no count: its data is passed over.
    Skip,
}

impl Sink for StreamUsage {
    fn data(&mut self, value: &[u8], rest: &[u8]) {
        if self.mode == Mode::Undecided {
            // Whitespace first changes nothing in the tokenizer: the first byte of the root
            // value decides. Only an object or an array can hold a count.
            let Some(&first) = value
                .iter()
                .find(|&&b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
            else {
                return;
            };
            self.mode = if !matches!(first, b'{' | b'[') {
                Mode::Skip
            } else {
                match event_end(rest, value.len()) {
                    Some(end) if !may_count(rest.get(..end).unwrap_or(rest)) => Mode::Skip,
                    _ => Mode::Tokenize,
                }
            };
        }
        if self.mode == Mode::Tokenize {
            self.json.feed(value);
        }
    }

    fn data_line_end(&mut self) {
        if self.mode == Mode::Tokenize {
            self.json.feed(b"\n");
        }
    }

    fn dispatch(&mut self, name: &[u8]) {
        if self.mode != Mode::Tokenize {
            // Nothing was fed: the tokenizer is as new, and would have found nothing.
            self.mode = Mode::Undecided;
            return;
        }
        self.mode = Mode::Undecided;
        #[cfg(test)]
        {
            self.tokenized += 1;
        }
        let json = &self.json;
        if json.complete() {
            if name == FLOW_EVENT {
                // The data of `flowResponses` is the array of node responses.
                if json.top_object == Some(false)
                    && let Some(f) = json.flow
                {
                    self.flow = Some(self.flow.unwrap_or_default().add(f));
                }
            } else if let Some(u) = json.usage() {
                self.usage = Some(u);
            }
        }
        self.json.reset();
    }
}

/// Where the event whose data begins `rest` ends in it: the offset of its blank line (a line
/// end just after another), if the chunk holds it. `line_end` is where the data's first line
/// ends (a CR or an LF, or past the chunk). The bytes before the blank line hold all the
/// event's data, and more (its other lines).
fn event_end(rest: &[u8], line_end: usize) -> Option<usize> {
    let mut at = line_end;
    loop {
        // A CRLF is one line end; a CR last in the chunk may be one too: then the next line
        // begins past the chunk, unknown.
        let next = if rest.get(at..at + 2) == Some(b"\r\n") {
            at + 2
        } else {
            at + 1
        };
        match rest.get(next)? {
            b'\r' | b'\n' => return Some(next),
            _ => at = next + memchr::memchr2(b'\r', b'\n', rest.get(next..)?)?,
        }
    }
}

/// Whether an event whose raw bytes (data lines and any others) are `event` may hold a count:
/// whether its data, decoded as JSON, may have a key of interest. Every key counted holds
/// `usage` (an OpenAI `usage`), or `tokens` or `Tokens` (a FastGPT node's counts: the
/// `flowResponses` event's data); a key is read with its escapes decoded, and only `\uXXXX`
/// can make a letter. Data lines are joined with a line feed, which no key of interest
/// holds, so a key in the data is in the raw bytes as it is, or has a `\u` there.
///
/// `"usage":null` (or `"usage": null`) does not count, wherever it stands: a string's text,
/// a key of no interest, or the root's `usage` whose value holds no count (OpenAI's chunks
/// before the last say so).
fn may_count(event: &[u8]) -> bool {
    let at = |from: usize, len: usize| event.get(from..from + len).unwrap_or_default();
    let mut from = 0;
    while let Some(i) = event
        .get(from..)
        .and_then(|r| memchr::memchr3(b'g', b'k', b'\\', r))
    {
        let i = from + i;
        let hit = match event.get(i) {
            Some(b'\\') => event.get(i + 1) == Some(&b'u'),
            Some(b'k') => i >= 1 && at(i - 1, 5) == b"okens",
            Some(b'g') => {
                i >= 3
                    && at(i - 3, 5) == b"usage"
                    && !(i >= 4
                        && at(i - 4, 1) == b"\""
                        && (at(i + 2, 6) == b"\":null" || at(i + 2, 7) == b"\": null"))
            }
            _ => false,
        };
        if hit {
            return true;
        }
        from = i + 1;
    }
    false
}

mod json;
#[cfg(test)]
mod tests;

use json::Json;
