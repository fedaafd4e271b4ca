//! The reference the meter is held to: the same counts read from a whole answer parsed by
//! serde_json (`reference_json`), and from a whole event stream split into events the simple
//! way (`reference_stream`).

use serde_json::Value;

use super::*;

fn count(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_u64)
}

fn openai(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?.as_object()?;
    let (p, c) = (
        count(u.get("prompt_tokens")),
        count(u.get("completion_tokens")),
    );
    (p.is_some() || c.is_some()).then(|| Usage {
        prompt: p.unwrap_or(0),
        completion: c.unwrap_or(0),
    })
}

fn nodes(v: &Value, level: usize, sum: &mut Option<Usage>) {
    for node in v.as_array().into_iter().flatten().filter(|n| n.is_object()) {
        let c: Vec<Option<u64>> = NODE_KEYS
            .iter()
            .map(|k| count(node.get(std::str::from_utf8(k).unwrap())))
            .collect();
        let z = |i: usize| c[i].unwrap_or(0);
        let own = if c[..4].iter().any(Option::is_some) {
            Some(Usage {
                prompt: z(0).saturating_add(z(1)),
                completion: z(2).saturating_add(z(3)),
            })
        } else if c[4..].iter().any(Option::is_some) {
            Some(Usage {
                prompt: z(4).saturating_add(z(5)),
                completion: 0,
            })
        } else {
            None
        };
        if let Some(own) = own {
            *sum = Some(sum.unwrap_or_default().add(own));
        }
        if level + 1 < NODE_CAP {
            for key in DETAIL_KEYS {
                if let Some(d) = node.get(std::str::from_utf8(key).unwrap()) {
                    nodes(d, level + 1, sum);
                }
            }
        }
    }
}

fn flow(v: &Value) -> Option<Usage> {
    let mut sum = None;
    nodes(v, 0, &mut sum);
    sum
}

pub(super) fn reference_json(body: &[u8]) -> Option<Usage> {
    let v: Value = serde_json::from_slice(body).ok()?;
    if !v.is_object() {
        return None;
    }
    v.get("responseData").and_then(flow).or_else(|| openai(&v))
}

/// Events as the WHATWG algorithm dispatches them: (name, data).
fn events(stream: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let stream = stream.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(stream);
    let mut lines = Vec::new();
    let (mut i, mut from) = (0, 0);
    while i < stream.len() {
        match stream[i] {
            b'\n' | b'\r' => {
                lines.push(&stream[from..i]);
                if stream[i] == b'\r' && stream.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                from = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    let mut out = Vec::new();
    let (mut name, mut data, mut has) = (Vec::new(), Vec::new(), false);
    for line in lines {
        if line.is_empty() {
            if has {
                data.pop();
                out.push((std::mem::take(&mut name), std::mem::take(&mut data)));
            }
            (name, data, has) = (Vec::new(), Vec::new(), false);
            continue;
        }
        if line[0] == b':' {
            continue;
        }
        let (field, value) = crate::stream::sse::field_and_value(line);
        match field {
            b"data" => {
                has = true;
                data.extend_from_slice(value);
                data.push(b'\n');
            }
            b"event" => name = value.to_vec(),
            _ => {}
        }
    }
    out
}

pub(super) fn reference_stream(stream: &[u8]) -> Option<Usage> {
    let (mut last, mut sum): (Option<Usage>, Option<Usage>) = (None, None);
    for (name, data) in events(stream) {
        let Ok(v) = serde_json::from_slice::<Value>(&data) else {
            continue;
        };
        if name == FLOW_EVENT {
            if v.is_array()
                && let Some(f) = flow(&v)
            {
                sum = Some(sum.unwrap_or_default().add(f));
            }
        } else if let Some(u) = openai(&v) {
            last = Some(u);
        }
    }
    last.or(sum)
}

#[test]
fn the_reference_agrees_on_the_examples() {
    assert_eq!(reference_stream(OPENAI.as_bytes()), usage(19, 10));
    assert_eq!(
        reference_stream(FASTGPT.as_bytes()),
        usage(120 + 50 + 7, 30 + 5 + 3)
    );
}
