//! The meter's tests: examples cut at every byte, and proptests against serde_json.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use reference::{reference_json, reference_stream};

mod reference;

fn usage(prompt: u64, completion: u64) -> Option<Usage> {
    Some(Usage { prompt, completion })
}

/// The meter's answer for `body` fed in `pieces` cut at `cuts`.
fn meter(new: fn() -> UsageMeter, body: &[u8], cuts: &[usize]) -> Option<Usage> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(body.len())).collect();
    cuts.push(body.len());
    cuts.sort_unstable();
    let mut m = new();
    let mut from = 0;
    for to in cuts {
        m.feed(&body[from..to]);
        from = to;
    }
    m.usage()
}

/// The answer for `body` fed whole, which every cut in two and the byte-by-byte feed
/// must give too.
fn every_split(new: fn() -> UsageMeter, body: &[u8]) -> Option<Usage> {
    let whole = meter(new, body, &[]);
    for i in 0..=body.len() {
        assert_eq!(meter(new, body, &[i]), whole, "cut at {i}: {body:?}");
    }
    let each: Vec<usize> = (1..body.len()).collect();
    assert_eq!(meter(new, body, &each), whole, "byte by byte: {body:?}");
    whole
}

fn sse(stream: &str) -> Option<Usage> {
    every_split(UsageMeter::event_stream, stream.as_bytes())
}

fn body(json: &str) -> Option<Usage> {
    every_split(UsageMeter::json, json.as_bytes())
}

/// An OpenAI stream with `stream_options.include_usage`, as the API sends it.
const OPENAI: &str = concat!(
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n",
    "data: [DONE]\n\n",
);

/// FastGPT's `/api/v1/chat/completions` with `stream: true, detail: true`: answer
/// events (no usage), then the node responses (current field names, a tool call with
/// the nodes it ran).
const FASTGPT: &str = concat!(
    "event: flowNodeStatus\ndata: {\"status\":\"running\",\"name\":\"AI 对话\"}\n\n",
    "event: answer\ndata: {\"id\":\"\",\"object\":\"\",\"created\":0,\"model\":\"\",\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"你好\"},\"index\":0,\"finish_reason\":null}]}\n\n",
    "event: answer\ndata: {\"id\":\"\",\"object\":\"\",\"created\":0,\"model\":\"\",\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":null},\"index\":0,\"finish_reason\":\"stop\"}]}\n\n",
    "event: answer\ndata: [DONE]\n\n",
    "event: flowResponses\ndata: [",
    "{\"nodeId\":\"w\",\"moduleName\":\"知识库搜索\",\"totalPoints\":0.1,\"embeddingTokens\":12},",
    "{\"nodeId\":\"a\",\"moduleName\":\"AI 对话\",\"model\":\"gpt-4o\",\"inputTokens\":120,\"outputTokens\":30,\"query\":\"what are \\\"prompt_tokens\\\"?\",\"historyPreview\":[{\"obj\":\"Human\",\"value\":\"\\\"inputTokens\\\": 999\"}]},",
    "{\"nodeId\":\"t\",\"moduleName\":\"工具调用\",\"toolCallInputTokens\":50,\"toolCallOutputTokens\":5,\"toolDetail\":[",
    "{\"nodeId\":\"c\",\"moduleName\":\"AI 对话\",\"inputTokens\":7,\"outputTokens\":3}]}",
    "]\n\n",
);

#[test]
fn an_openai_stream_counts_the_usage_of_its_last_chunk() {
    assert_eq!(sse(OPENAI), usage(19, 10));
    // Counts are totals: a later usage replaces an earlier one, `null` does not.
    let two = "data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n\
               data: {\"usage\":null}\n\n\
               data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}\n\n\
               data: {\"usage\":null}\n\n";
    assert_eq!(sse(two), usage(5, 9));
    assert_eq!(sse("data: {\"usage\":null}\n\ndata: [DONE]\n\n"), None);
    // Not dispatched (no blank line after it): not counted, as the client ignores it.
    assert_eq!(
        sse("data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n"),
        None
    );
}

#[test]
fn fastgpt_flow_responses_are_summed_over_nodes() {
    assert_eq!(sse(FASTGPT), usage(120 + 50 + 7, 30 + 5 + 3));
    // Older FastGPT: one `tokens` total per node (`toolCallTokens` for a tool call).
    let old = "event: flowResponses\n\
               data: [{\"moduleName\":\"AI\",\"tokens\":100},{\"moduleName\":\"tool\",\"toolCallTokens\":20,\"toolDetail\":[{\"tokens\":3}]}]\n\n";
    assert_eq!(sse(old), usage(123, 0));
    // A node with both counts the split ones only.
    let both = "event: flowResponses\ndata: [{\"tokens\":150,\"inputTokens\":120,\"outputTokens\":30}]\n\n";
    assert_eq!(sse(both), usage(120, 30));
    // The same array under another event name, or an object in flowResponses: nothing.
    let other = "event: answer\ndata: [{\"inputTokens\":1,\"outputTokens\":1}]\n\n";
    assert_eq!(sse(other), None);
    let object = "event: flowResponses\ndata: {\"responseData\":[{\"inputTokens\":1}]}\n\n";
    assert_eq!(sse(object), None);
}

#[test]
fn nested_node_responses_count_to_the_cap() {
    // Node at level `n` has `n + 1` input tokens and runs the next level.
    let mut node = json!({"inputTokens": 1});
    for level in (1..=NODE_CAP as u64).rev() {
        node = json!({"inputTokens": level + 1, "pluginDetail": [node]});
    }
    let stream = format!("event: flowResponses\ndata: [{node}]\n\n");
    // Levels 0..NODE_CAP count; the deepest (the `1`) is past the cap.
    let counted: u64 = (2..=NODE_CAP as u64 + 1).sum();
    assert_eq!(sse(&stream), usage(counted, 0));
    for key in ["toolDetail", "loopDetail", "childrenResponses"] {
        let s = format!(
            "event: flowResponses\ndata: [{{\"{key}\":[{{\"outputTokens\":4}}],\"outputTokens\":1}}]\n\n"
        );
        assert_eq!(sse(&s), usage(0, 5), "{key}");
    }
}

#[test]
fn openai_usage_wins_over_flow_responses() {
    let stream = format!(
        "{FASTGPT}data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":4}}}}\n\n"
    );
    assert_eq!(sse(&stream), usage(3, 4));
    let stream =
        format!("data: {{\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":4}}}}\n\n{FASTGPT}");
    assert_eq!(sse(&stream), usage(3, 4));
}

#[test]
fn a_json_answer_counts_its_usage() {
    let openai = r#"{
  "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o",
  "choices": [{"index": 0, "message": {"role": "assistant",
"content": "The \"usage\": {\"prompt_tokens\": 999} field", "refusal": null},
"finish_reason": "stop"}],
  "usage": {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
"completion_tokens_details": {"reasoning_tokens": 0}}
}
"#;
    assert_eq!(body(openai), usage(1117, 46));
    // FastGPT, `detail: true`: its usage is a placeholder; the nodes have the counts.
    let fastgpt = r#"{"responseData":[{"moduleName":"AI","inputTokens":40,"outputTokens":8}],"newVariables":{},"id":"","model":"","usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":1},"choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"stop","index":0}]}"#;
    assert_eq!(body(fastgpt), usage(40, 8));
    // Without `detail`, the placeholder is all there is.
    let plain = r#"{"id":"","model":"","usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":1},"choices":[]}"#;
    assert_eq!(body(plain), usage(1, 1));
    // Not whole, or not one JSON text: nothing.
    assert_eq!(body(&openai[..openai.len() - 3]), None);
    assert_eq!(body(&format!("{openai}{openai}")), None);
    assert_eq!(body("[{\"inputTokens\":1}]"), None);
    assert_eq!(body(""), None);
}

#[test]
fn keys_count_only_at_their_place() {
    for json in [
        // In the text of the answer, escaped quotes and all.
        r#"{"choices":[{"delta":{"content":"\"usage\":{\"prompt_tokens\":999,\"completion_tokens\":9}"}}]}"#,
        r#"{"content":"{\"usage\":{\"prompt_tokens\":999}}","x":"\\"}"#,
        // One level off.
        r#"{"choices":[{"usage":{"prompt_tokens":999,"completion_tokens":9}}]}"#,
        r#"{"prompt_tokens":999,"completion_tokens":9}"#,
        r#"{"usage":{"details":{"prompt_tokens":999}}}"#,
        r#"{"x":{"usage":{"prompt_tokens":999}}}"#,
        // As a key's value, or a key that only begins so.
        r#"{"usage":{"k":"prompt_tokens","prompt_tokens_details":{"cached_tokens":9}}}"#,
        r#"{"usage":{"prompt_tokensx":999,"xprompt_tokens":9}}"#,
    ] {
        assert_eq!(body(json), None, "{json}");
        assert_eq!(sse(&format!("data: {json}\n\n")), None, "{json}");
    }
}

#[test]
fn escapes_are_decoded_in_keys_and_skipped_in_strings() {
    let json = r#"{"a":"\\\"\/\b\f\n\r\t\u00e9\ud83d\ude00","us\u0061ge":{"prompt\u005Ftokens":7,"completion_tokens":2}}"#;
    assert_eq!(body(json), usage(7, 2));
    // A non-ASCII escape makes another key.
    assert_eq!(body(r#"{"usag\u00e9":{"prompt_tokens":7}}"#), None);
    // Bad escapes and raw control characters: not JSON.
    assert_eq!(body(r#"{"a":"\x","usage":{"prompt_tokens":7}}"#), None);
    assert_eq!(body(r#"{"a":"\u12G4","usage":{"prompt_tokens":7}}"#), None);
    assert_eq!(body("{\"a\":\"\t\",\"usage\":{\"prompt_tokens\":7}}"), None);
    // Raw UTF-8 in strings passes as it is.
    assert_eq!(
        body("{\"内容\":\"é😀\",\"usage\":{\"prompt_tokens\":7}}"),
        usage(7, 0)
    );
}

#[test]
fn counts_are_non_negative_integers() {
    let one = |v: &str| {
        body(&format!(
            "{{\"usage\":{{\"prompt_tokens\":{v},\"completion_tokens\":3}}}}"
        ))
    };
    assert_eq!(one("0"), usage(0, 3));
    assert_eq!(one("18446744073709551615"), usage(u64::MAX, 3));
    for ignored in [
        "18446744073709551616",
        "18446744073709551619",
        "99999999999999999999999",
        "-1",
        "-0",
        "1.0",
        "1e2",
        "1E+2",
        "\"5\"",
        "null",
        "true",
        "[5]",
        "{}",
    ] {
        assert_eq!(one(ignored), usage(0, 3), "{ignored}");
    }
    for invalid in [
        "01", "1.", ".5", "-", "1e", "+1", "0x1", "tru", "nul", "1 2",
    ] {
        assert_eq!(one(invalid), None, "{invalid}");
    }
    // A key given twice counts by its last value, as in a parsed map.
    assert_eq!(
        body(r#"{"usage":{"prompt_tokens":5,"prompt_tokens":6.5,"completion_tokens":1}}"#),
        usage(0, 1)
    );
    assert_eq!(
        body(r#"{"usage":{"prompt_tokens":5},"usage":{"completion_tokens":2}}"#),
        usage(0, 2)
    );
    assert_eq!(body(r#"{"usage":{"prompt_tokens":5},"usage":null}"#), None);
    // Sums saturate.
    let big = format!(
        "event: flowResponses\ndata: [{{\"inputTokens\":{m}}},{{\"inputTokens\":{m}}}]\n\n",
        m = u64::MAX
    );
    assert_eq!(sse(&big), usage(u64::MAX, 0));
}

#[test]
fn event_stream_framing_follows_whatwg() {
    let u = "{\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}";
    for stream in [
        format!("data: {u}\r\n\r\n"),
        format!("data: {u}\r\r"),
        format!("data:{u}\n\n"),
        format!("\u{FEFF}data: {u}\n\n"),
        format!(": keep-alive\n\nid: 1\nretry: 5\ndata: {u}\n: c\n\n"),
        // Data on several lines is one text, joined by line feeds.
        "data: {\"usage\":\ndata: {\"prompt_tokens\":2,\r\ndata:\"completion_tokens\"\rdata: :3}}\n\n".to_owned(),
        // An event's name comes from its last `event` field, wherever it is.
        format!("data: {u}\nevent: flowResponses\nevent: answer\n\n"),
    ] {
        assert_eq!(sse(&stream), usage(2, 3), "{stream:?}");
    }
    for stream in [
        // A second mark, a CR between two halves of a CRLF, a `data` that is not.
        format!("\u{FEFF}\u{FEFF}data: {u}\n\n"),
        format!("datas: {u}\n\n"),
        format!("data : {u}\n\n"),
        format!(":data: {u}\n\n"),
        // The value is all that follows the one space: here not a JSON text.
        format!("data: {u}x\n\n"),
    ] {
        assert_eq!(sse(&stream), None, "{stream:?}");
    }
    let flow = "[{\"inputTokens\":4}]";
    for name in [
        "flowResponses ",
        "  flowResponses",
        "flowresponses",
        "flowResponsesflowResponses",
    ] {
        assert_eq!(
            sse(&format!("event:{name}\ndata: {flow}\n\n")),
            None,
            "{name}"
        );
    }
    assert_eq!(
        sse(&format!("event:flowResponses\ndata: {flow}\n\n")),
        usage(4, 0)
    );
    // The name is the event's only: the next event is a `message`.
    assert_eq!(
        sse(&format!("event: flowResponses\n\ndata: {flow}\n\n")),
        None
    );
    // A CRLF split anywhere is one line end (every_split cuts between CR and LF).
    assert_eq!(
        sse(&format!("data: {u}\r\n\r\ndata: x\r\n\r\n")),
        usage(2, 3)
    );
}

#[test]
fn non_json_data_is_ignored_quietly() {
    let u = "data: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n\n";
    for noise in [
        "data: [DONE]\n\n",
        "data: hello\n\n",
        "data: {\"usage\":{\"prompt_tokens\":9}\n\n",
        "data: }}]]\n\n",
        "data: \"\\\n\n",
        "data\n\n",
        "event: flowResponses\ndata: [{\"inputTokens\":9}\n\n",
    ] {
        assert_eq!(sse(&format!("{u}{noise}")), usage(2, 3), "{noise:?}");
        assert_eq!(sse(&format!("{noise}{u}")), usage(2, 3), "{noise:?}");
    }
}

#[test]
fn nesting_is_bounded_as_in_serde_json() {
    for depth in [
        MAX_DEPTH as usize - 1,
        MAX_DEPTH as usize,
        MAX_DEPTH as usize + 1,
    ] {
        let deep = format!(
            "{{\"usage\":{{\"prompt_tokens\":1}},\"x\":{}{}}}",
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        );
        let serde_ok = serde_json::from_str::<Value>(&deep).is_ok();
        assert_eq!(body(&deep).is_some(), serde_ok, "depth {depth}");
    }
    assert!(
        size_of::<UsageMeter>() <= 512,
        "{}",
        size_of::<UsageMeter>()
    );
}

// ============================== generated answers ==============================

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u64..100_000).prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        1 => (-1000i64..0).prop_map(Value::from),
        1 => (0.0f64..1e6).prop_map(Value::from),
        1 => Just(Value::Null),
        1 => "[0-9]{1,3}".prop_map(Value::from),
    ]
}

/// Text that looks like what the meter looks for.
fn noise_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"prompt_tokens\": 999".to_owned()),
        Just("{\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":9}}".to_owned()),
        Just("inputTokens\\\"".to_owned()),
        Just("[DONE]".to_owned()),
        "[ -~]{0,16}",
        "\\PC{0,8}",
        Just("\u{0}\u{1f}\n\r\t\"\\".to_owned()),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z_]{1,8}",
        1 => proptest::sample::select(&[
            "usage", "prompt_tokens", "completion_tokens", "responseData", "inputTokens",
            "outputTokens", "toolCallInputTokens", "toolCallOutputTokens", "tokens",
            "toolCallTokens", "toolDetail", "pluginDetail", "loopDetail",
            "childrenResponses", "content", "choices",
        ][..]).prop_map(str::to_owned),
    ]
}

/// Any JSON, with the keys of interest among others, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        number(),
        noise_text().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            proptest::collection::vec((key(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn usage_object() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        4 => (number(), number(), proptest::option::of(any_json())).prop_map(|(p, c, extra)| {
            let mut u = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": 1});
            if let Some(e) = extra {
                u["prompt_tokens_details"] = e;
            }
            u
        }),
        1 => any_json(),
    ]
}

/// A node response, with nested ones.
fn node() -> impl Strategy<Value = Value> {
    let flat = (
        proptest::collection::vec((proptest::sample::select(&NODE_KEYS[..]), number()), 0..4),
        proptest::collection::vec((key(), any_json()), 0..3),
    )
        .prop_map(|(counts, other)| {
            let mut o = serde_json::Map::new();
            for (k, v) in other {
                o.insert(k, v);
            }
            for (k, v) in counts {
                o.insert(String::from_utf8_lossy(k).into_owned(), v);
            }
            Value::Object(o)
        });
    flat.prop_recursive(5, 24, 3, |inner| {
        (
            inner.clone(),
            proptest::sample::select(&DETAIL_KEYS[..]),
            proptest::collection::vec(inner, 0..3),
        )
            .prop_map(|(mut n, k, children)| {
                n[String::from_utf8_lossy(k).as_ref()] = Value::from(children);
                n
            })
    })
}

fn node_array() -> impl Strategy<Value = Value> {
    proptest::collection::vec(prop_oneof![4 => node(), 1 => any_json()], 0..5).prop_map(Value::from)
}

/// A root object like an answer or a chunk: usage and responseData in random places.
fn answer() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec((key(), any_json()), 0..4),
        proptest::option::of(usage_object()),
        proptest::option::of(prop_oneof![3 => node_array(), 1 => any_json()]),
        proptest::option::of(any_json()),
    )
        .prop_map(|(other, usage, response_data, choices)| {
            let mut o: serde_json::Map<String, Value> = other.into_iter().collect();
            if let Some(c) = choices {
                o.insert("choices".into(), json!([{"delta": {"content": c}}]));
            }
            if let Some(u) = usage {
                o.insert("usage".into(), u);
            }
            if let Some(r) = response_data {
                o.insert("responseData".into(), r);
            }
            Value::Object(o)
        })
}

/// Serialized compact or pretty, maybe with a key escaped, maybe cut short.
fn text(v: Value, pretty: bool, escape: bool, cut: Option<usize>) -> String {
    let mut s = if pretty {
        serde_json::to_string_pretty(&v).unwrap()
    } else {
        serde_json::to_string(&v).unwrap()
    };
    if escape {
        s = s
            .replace("\"usage\"", "\"us\\u0061ge\"")
            .replace("\"prompt_tokens\"", "\"prompt\\u005ftokens\"")
            .replace("\"inputTokens\"", "\"\\u0069nputTokens\"");
    }
    if let Some(c) = cut {
        let mut c = c % (s.len() + 1);
        while !s.is_char_boundary(c) {
            c -= 1;
        }
        s.truncate(c);
    }
    s
}

fn json_text() -> impl Strategy<Value = String> {
    (
        prop_oneof![3 => answer(), 1 => node_array(), 1 => any_json()],
        any::<bool>(),
        any::<bool>(),
        proptest::option::weighted(0.1, any::<usize>()),
    )
        .prop_map(|(v, pretty, escape, cut)| text(v, pretty, escape, cut))
}

fn line_end() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("\n"), Just("\r"), Just("\r\n")]
}

/// One event: maybe a name, its data on one or more lines, maybe other fields.
fn event() -> impl Strategy<Value = String> {
    (
        proptest::option::of(prop_oneof![
            3 => Just("flowResponses"),
            1 => Just("answer"),
            1 => Just("flowResponsesX"),
            1 => Just(""),
        ]),
        prop_oneof![
            4 => json_text(),
            1 => noise_text(),
            1 => Just("[DONE]".to_owned()),
        ],
        any::<bool>(),
        proptest::option::of(":[ -~]{0,8}"),
        line_end(),
    )
        .prop_map(|(name, data, space, comment, eol)| {
            let mut e = String::new();
            if let Some(n) = name {
                e.push_str(&format!("event: {n}{eol}"));
            }
            if let Some(c) = comment {
                e.push_str(&format!("{c}{eol}"));
            }
            // Each line of the data its own field (a noise string may hold line ends).
            for line in data.split(['\n', '\r']) {
                e.push_str(if space { "data: " } else { "data:" });
                e.push_str(line);
                e.push_str(eol);
            }
            e.push_str(eol);
            e
        })
}

fn stream() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        proptest::collection::vec(event(), 0..8),
        proptest::option::of("(data|event): [ -~]{0,8}"),
    )
        .prop_map(|(bom, events, tail)| {
            let mut s = if bom {
                "\u{FEFF}".to_owned()
            } else {
                String::new()
            };
            s.extend(events);
            s.extend(tail);
            s
        })
}

/// The counts of `stream` fed in pieces cut at `cuts`, and how many events were tokenized.
fn stream_usage(stream: &[u8], cuts: &[usize]) -> (Option<Usage>, usize) {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).collect();
    cuts.push(stream.len());
    cuts.sort_unstable();
    let (mut scanner, mut u) = (Scanner::new::<&str>(&[]), StreamUsage::new());
    let mut from = 0;
    for to in cuts {
        scanner.feed_with(&stream[from..to], &mut u);
        from = to;
    }
    (u.usage(), u.tokenized)
}

#[test]
fn events_that_cannot_hold_a_count_are_not_tokenized_and_the_counts_stay_the_same_at_every_cut() {
    // (stream, counts, events tokenized when fed whole, events with data)
    let cases: [(&str, Option<Usage>, usize, usize); 2] = [
        // The chunks with `"usage":null` and `[DONE]` are passed over; the last usage not.
        (OPENAI, usage(19, 10), 1, 5),
        // The answers pass, `flowResponses` (with its `Tokens`) is tokenized.
        (FASTGPT, usage(120 + 50 + 7, 30 + 5 + 3), 1, 5),
    ];
    for (stream, counts, whole, all) in cases {
        let bytes = stream.as_bytes();
        assert_eq!(reference_stream(bytes), counts, "{stream}");
        assert_eq!(stream_usage(bytes, &[]), (counts, whole), "{stream}");
        for i in 0..=bytes.len() {
            for j in [i, i + 1, i + 7, i + 64] {
                let (found, tokenized) = stream_usage(bytes, &[i, j]);
                assert_eq!(found, counts, "cut at {i} and {j}: {stream}");
                assert!((whole..=all).contains(&tokenized), "cut at {i} and {j}");
            }
        }
        // Byte by byte no event is whole in its chunk: every one is tokenized.
        let each: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(stream_usage(bytes, &each), (counts, all), "{stream}");
    }
    // A usage on a later data line, or behind an escape, in the same chunk: tokenized.
    let later = "data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n";
    assert_eq!(stream_usage(later.as_bytes(), &[]), (usage(3, 4), 1));
    let escaped = "data: {\"us\\u0061ge\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n";
    assert_eq!(stream_usage(escaped.as_bytes(), &[]), (usage(3, 4), 1));
    let split = "data: {\"usage\":{\"prompt\\u005ftokens\":3,\"completion_tokens\":4}}\r\n\r\n";
    assert_eq!(sse(split), usage(3, 4));
    // Non-JSON data (the benchmark's padding) is passed over.
    let pad = "data: xxxxxxxxxxxxxxxx\n\ndata: xxxx\n\n";
    assert_eq!(stream_usage(pad.as_bytes(), &[]), (None, 0));
    // Nor data whose root value is no object or array, even cut mid-event.
    let scalars = "data: \"usage\"\n\ndata: 12\ndata: 3\n\ndata:\ndata:  \t\ndata: null\n\n";
    for i in 0..=scalars.len() {
        assert_eq!(
            stream_usage(scalars.as_bytes(), &[i]),
            (None, 0),
            "cut at {i}"
        );
    }
    // Whitespace first, then the object: tokenized.
    let spaced = "data:  \ndata: \t{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
    assert_eq!(stream_usage(spaced.as_bytes(), &[]), (usage(1, 2), 1));
    assert_eq!(sse(spaced), usage(1, 2));
}

#[test]
fn may_count_finds_every_way_a_key_of_interest_can_be_written() {
    for (event, expected) in [
        (&b"data: {\"usage\":{}}\n"[..], true),
        (b"\"usage\":null", false),
        (b"\"usage\": null", false),
        (b"{\"usage\":null,\"usage\":{\"prompt_tokens\":1}}", true),
        (b"\"usage\":nul", true),
        (b"\"usage\":  null", true),
        (b"x\"usage\"", true),
        (b"xusage\":null", true),
        (b"usage", true),
        (b"usag", false),
        (b"sage", false),
        (b"inputTokens", true),
        (b"tokens", true),
        (b"okens", true),
        (b"Token", false),
        (b"kens", false),
        (b"\\u0075", true),
        (b"\\u", true),
        (b"\\n\\t\\\"\\/\\\\", false),
        (b"\\", false),
        (
            b"{\"choices\":[{\"delta\":{\"content\":\"chunk gpt-4o\"}}]}",
            false,
        ),
        (b"", false),
    ] {
        assert_eq!(
            may_count(event),
            expected,
            "{}",
            String::from_utf8_lossy(event)
        );
    }
}

#[test]
fn event_end_is_the_first_blank_line_known_to_be_one() {
    for (rest, expected) in [
        (&b"x\n\n"[..], Some(2)),
        (b"x\r\r", Some(2)),
        (b"x\r\n\r\n", Some(3)),
        (b"x\n\r", Some(2)),
        (b"x\r\n\n", Some(3)),
        (b"x\ndata: y\n\ndata: z\n\n", Some(10)),
        (b"x\n: c\nid: 1\r\n\r\n", Some(13)),
        (b"x\n", None),
        (b"x\r", None),
        (b"x\r\n", None),
        (b"x\ndata: y\n", None),
        (b"x", None),
    ] {
        let line_end = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
        assert_eq!(event_end(rest, line_end), expected, "{rest:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// However an event stream is cut, the meter finds what parsing each event's data
    /// with serde_json finds.
    #[test]
    fn any_cut_of_a_stream_agrees_with_serde_json(
        stream in stream(),
        cuts in proptest::collection::vec(0usize..4000, 0..12),
    ) {
        let expected = reference_stream(stream.as_bytes());
        prop_assert_eq!(meter(UsageMeter::event_stream, stream.as_bytes(), &cuts), expected);
        prop_assert_eq!(meter(UsageMeter::event_stream, stream.as_bytes(), &[]), expected);
    }

    /// However a JSON answer is cut, the meter finds what serde_json finds in it whole.
    #[test]
    fn any_cut_of_a_json_answer_agrees_with_serde_json(
        body in json_text(),
        cuts in proptest::collection::vec(0usize..4000, 0..12),
    ) {
        let expected = reference_json(body.as_bytes());
        prop_assert_eq!(meter(UsageMeter::json, body.as_bytes(), &cuts), expected);
    }
}
