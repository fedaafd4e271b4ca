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
#[derive(Debug, Clone)]
pub(crate) struct StreamUsage {
    json: Json,
    /// The last OpenAI `usage` of a dispatched event.
    usage: Option<Usage>,
    /// The sums of the `flowResponses` events dispatched.
    flow: Option<Usage>,
}

impl StreamUsage {
    pub(crate) fn new() -> StreamUsage {
        StreamUsage {
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

impl Sink for StreamUsage {
    fn data(&mut self, value: &[u8]) {
        self.json.feed(value);
    }

    fn data_line_end(&mut self) {
        self.json.feed(b"\n");
    }

    fn dispatch(&mut self, name: &[u8]) {
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

mod json;
#[cfg(test)]
mod tests;

use json::Json;
