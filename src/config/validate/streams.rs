//! A route's `stream:`: the timers, heartbeat and in-band error names for answers that are
//! event streams (issue 16). A child of `validate` for its reader API.

use std::time::Duration;

use super::reader::{Ctx, Field, ListSpec, MapReader};
use crate::config::StreamConfig;

/// Names compared against every event's name: a short list.
const MAX_ERROR_EVENTS: usize = 16;
/// The scanner compares names up to 64 bytes (stream::sse); a longer one could never match.
const MAX_EVENT_NAME: usize = 64;
/// A heartbeat more often than this is traffic, not a keep-alive.
const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
/// Holding back more than this per stream costs more memory than any event is worth.
const MAX_PARTIAL_EVENT_BUFFER: u64 = 16 * 1024 * 1024;

pub(super) fn stream(ctx: &mut Ctx, f: Option<Field>) -> StreamConfig {
    let d = StreamConfig::default();
    let mut m = MapReader::open(ctx, f);
    let config = StreamConfig {
        first_event: m
            .read(ctx, "first_event", Ctx::duration_or_off)
            .unwrap_or(d.first_event),
        between_events: m
            .read(ctx, "between_events", Ctx::duration_or_off)
            .unwrap_or(d.between_events),
        max_duration: m
            .read(ctx, "max_duration", Ctx::duration_or_off)
            .unwrap_or(d.max_duration),
        heartbeat: m
            .read(ctx, "heartbeat", |ctx, f| {
                let h = ctx.duration_or_off(f)?;
                if h.is_some_and(|h| h < MIN_HEARTBEAT) {
                    ctx.report(
                        f.pos(),
                        &f.path,
                        "must be at least 1s (or off): a heartbeat is a keep-alive, not traffic",
                    );
                    return None;
                }
                Some(h)
            })
            .unwrap_or(d.heartbeat),
        comments_are_activity: m
            .read(ctx, "comments_are_activity", Ctx::boolean)
            .unwrap_or(d.comments_are_activity),
        error_events: m
            .read(ctx, "error_events", error_events)
            .unwrap_or(d.error_events),
        partial_event_buffer: m
            .read(ctx, "partial_event_buffer", |ctx, f| {
                ctx.bytes(f, 0, MAX_PARTIAL_EVENT_BUFFER)
            })
            .unwrap_or(d.partial_event_buffer),
    };
    m.finish(ctx);
    config
}

/// The list; None when any entry was refused (each one reported).
fn error_events(ctx: &mut Ctx, f: &Field) -> Option<Vec<String>> {
    ctx.distinct_list(
        f,
        &ListSpec {
            expected: "a list of event names (e.g. [error], or [] for none)",
            max: MAX_ERROR_EVENTS,
            plural: "event names",
            one: "an event name",
            duplicate: "event name",
        },
        parse_event_name,
    )
}

/// What an `event:` field can carry: no line break, not empty, at most 64 bytes.
fn parse_event_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > MAX_EVENT_NAME || s.contains(['\r', '\n']) {
        return Err(format!(
            "expected an event name of 1 to {MAX_EVENT_NAME} bytes without line breaks, got \"{s}\""
        ));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::test_support::*;

    fn with_stream(stream: &str) -> String {
        MINIMAL.replace(
            "- upstream: backend",
            &format!("- upstream: backend\n                stream: {stream}"),
        )
    }

    #[test]
    fn defaults_apply_when_left_out() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listeners[0].routes[0].stream, StreamConfig::default());
        let s = StreamConfig::default();
        assert_eq!(s.first_event, Some(Duration::from_secs(60)));
        assert_eq!(s.between_events, Some(Duration::from_secs(45)));
        assert_eq!(s.max_duration, Some(Duration::from_secs(600)));
        assert_eq!(s.heartbeat, Some(Duration::from_secs(15)));
        assert_eq!(s.error_events, ["error"]);
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(&with_stream(
            "{ first_event: 5s, between_events: off, max_duration: 1h, heartbeat: off, \
             comments_are_activity: true, error_events: [error, failed], \
             partial_event_buffer: 8KiB }",
        ))
        .unwrap();
        let s = &c.listeners[0].routes[0].stream;
        assert_eq!(s.first_event, Some(Duration::from_secs(5)));
        assert_eq!(s.between_events, None);
        assert_eq!(s.max_duration, Some(Duration::from_secs(3600)));
        assert_eq!(s.heartbeat, None);
        assert!(s.comments_are_activity);
        assert_eq!(s.error_events, ["error", "failed"]);
        assert_eq!(s.partial_event_buffer, 8 * 1024);
    }

    #[test]
    fn token_counting_cannot_be_off_under_a_token_budget() {
        let with = |tokens: &str| {
            MINIMAL
                .replace(
                    "- upstream: backend",
                    &format!(
                        "- upstream: backend\n                rate_limits: [t]\n                tokens: {tokens}"
                    ),
                )
                .trim_end()
                .to_owned()
                + "\n        rate_limits: { t: { points: 100, cost: tokens, store: memory } }\n"
        };
        let c = parse(&with("all")).unwrap();
        assert_eq!(
            c.listeners[0].routes[0].tokens,
            crate::config::TokenCounting::All
        );
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c.listeners[0].routes[0].tokens,
            crate::config::TokenCounting::Streams
        );
        let p = problems(&with("off"));
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!(p[0].path, "listeners[0].routes[0].tokens");
        assert!(
            p[0].message.contains("policy \"t\" charges tokens"),
            "{p:#?}"
        );
        let p = problems(&with("some"));
        assert!(p[0].message.contains("one of streams, all, off"), "{p:#?}");
    }

    #[test]
    fn bad_values_are_refused_where_they_are() {
        only(
            &with_stream("{ heartbeat: 100ms }"),
            6,
            30,
            "listeners[0].routes[0].stream.heartbeat",
            "must be at least 1s",
        );
        only(
            &with_stream("{ first_event: 0s }"),
            6,
            32,
            "listeners[0].routes[0].stream.first_event",
            "must be greater than 0",
        );
        only(
            &with_stream("{ error_events: [error, error] }"),
            6,
            41,
            "listeners[0].routes[0].stream.error_events[1]",
            "duplicate event name",
        );
        only(
            &with_stream("{ error_evnts: [x] }"),
            6,
            19,
            "listeners[0].routes[0].stream.error_evnts",
            "error_events",
        );
        let long = "x".repeat(65);
        let p = problems(&with_stream(&format!("{{ error_events: [\"{long}\"] }}")));
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].message.contains("1 to 64 bytes"), "{p:#?}");
    }
}
