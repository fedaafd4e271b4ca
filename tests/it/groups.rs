//! Endpoint groups (`upstreams.<name>.groups`, issue 20): the weighted split over real
//! sockets, sticky keys, fallback when a group is down, weights changed at run time and
//! kept across a reload, and bad files refused.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use rampart::app::Running;
use rampart::config::Config;

use crate::support::process::one_shot;
use crate::support::*;

/// One route to upstream `up` with groups blue and green; `extra` is spliced under `up`.
fn config(blue: &[&str], green: &[&str], weights: (u32, u32), extra: &str) -> String {
    let list = |eps: &[&str]| {
        eps.iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: false }}
trusted_proxies: ["127.0.0.1/32"]
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes:
      - name: all
        match: {{ path_prefix: / }}
        upstream: up
        upgrades: [websocket]
upstreams:
  up:
    groups:
      blue: {{ endpoints: [{}], weight: {} }}
      green: {{ endpoints: [{}], weight: {} }}
    connect_timeout: 1s
{extra}
"#,
        list(blue),
        weights.0,
        list(green),
        weights.1
    )
}

/// Which upstream answered `/echo`: its address is the Host rampart sent it.
fn served_by(body: &Bytes, blue: &Upstream, green: &Upstream) -> &'static str {
    let text = String::from_utf8_lossy(body);
    if text.contains(&format!("\"host\":\"{}\"", blue.addr)) {
        "blue"
    } else if text.contains(&format!("\"host\":\"{}\"", green.addr)) {
        "green"
    } else {
        panic!("answered by neither: {text}")
    }
}

async fn metrics(r: &Running) -> String {
    r.encode_metrics()
}

async fn set_weights(r: &Running, body: &str) -> (u16, String) {
    one_shot(r.admin_addr, "POST", "/admin/weights", body.as_bytes())
        .await
        .expect("the admin listener answers")
}

/// 10,000 requests at 95/5 from 40 keep-alive connections at once: green takes 5 % of
/// them within +-1 % (smooth round robin makes it exact), and the group figures say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_split_five_ninety_five() {
    let (blue, green) = (Upstream::start().await, Upstream::start().await);
    let r = start(&config(&[&blue.url()], &[&green.url()], (95, 5), "")).await;
    let addr = r.addr("main").unwrap();
    let client = http1();
    let run = async {
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..250 {
                    let (resp, _) = send(&client, get(addr, "/ok")).await;
                    ok += usize::from(resp.status() == 200);
                }
                ok
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += t.await.unwrap();
        }
        ok
    };
    let ok = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("10,000 requests within 2 minutes");
    assert_eq!(ok, 10_000);
    assert_eq!(blue.requests() + green.requests(), 10_000);
    let g = green.requests();
    assert!((400..=600).contains(&g), "green took {g} of 10000 at 5 %");

    let text = metrics(&r).await;
    let series = |group: &str| {
        sample(
            &text,
            &format!(
                "rampart_upstream_group_requests_total{{upstream=\"up\",group=\"{group}\",class=\"2xx\"}}"
            ),
        )
    };
    assert_eq!(series("green"), Some(g as f64), "{text}");
    assert_eq!(series("blue"), Some(blue.requests() as f64));
    assert_eq!(
        sample(
            &text,
            "rampart_upstream_group_weight{upstream=\"up\",group=\"green\"}"
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            "rampart_upstream_group_request_duration_seconds_count{upstream=\"up\",group=\"green\"}"
        ),
        Some(g as f64)
    );
    let (status, doc) = admin_get_doc(&r, "/admin/upstreams").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let groups = &v["upstreams"][0]["groups"];
    assert_eq!(groups[1]["name"], "green");
    assert_eq!(groups[1]["weight"], 5);
    assert_eq!(groups[1]["totals"]["requests"], g as u64);
    assert_eq!(groups[0]["totals"]["requests"], blue.requests() as u64);
    assert_eq!(groups[0]["health"]["available"], 1);
    assert_eq!(
        groups[0]["health"]["checks_passing"],
        serde_json::Value::Null
    );
    assert_eq!(groups[0]["endpoints"][0], format!("{}/", blue.url()));
    r.shutdown().await;
}

async fn admin_get_doc(r: &Running, path: &str) -> (u16, String) {
    crate::support::process::admin_get(r.admin_addr, path)
        .await
        .expect("the admin listener answers")
}

/// How one sticky key kind is put on a request.
#[derive(Clone, Copy)]
enum Key {
    Header,
    Cookie,
    ClientIp,
}

fn keyed(addr: std::net::SocketAddr, kind: Key, i: usize) -> Request<Full<Bytes>> {
    let b = Request::get(format!("http://{addr}/echo"));
    let b = match kind {
        Key::Header => b.header("x-user", format!("user-{i}")),
        Key::Cookie => b.header("cookie", format!("theme=dark; sid=s{i}; x=1")),
        // The test client is 127.0.0.1, a trusted proxy: the address before it counts.
        Key::ClientIp => b.header(
            "x-forwarded-for",
            format!("198.51.{}.{}, 127.0.0.1", i / 250, i % 250 + 1),
        ),
    };
    b.body(Full::new(Bytes::new())).unwrap()
}

/// Each key's group, twice over (they must agree).
async fn groups_of(
    r: &Running,
    kind: Key,
    keys: usize,
    blue: &Upstream,
    green: &Upstream,
) -> Vec<&'static str> {
    let addr = r.addr("main").unwrap();
    let client = http1();
    let mut out = Vec::with_capacity(keys);
    for i in 0..keys {
        let (_, first) = send(&client, keyed(addr, kind, i)).await;
        let (_, again) = send(&client, keyed(addr, kind, i)).await;
        let (a, b) = (
            served_by(&first, blue, green),
            served_by(&again, blue, green),
        );
        assert_eq!(a, b, "key {i} moved between groups at fixed weights");
        out.push(a);
    }
    out
}

/// Header, cookie and client address keys stay in their group at fixed weights; at
/// 75/25 after 95/5 only blue keys move, to green, about a fifth of them; requests without
/// the key follow the round robin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_keys_stay_and_only_the_moved_share_moves() {
    const KEYS: usize = 300;
    for (kind, sticky) in [
        (Key::Header, "header:X-User"),
        (Key::Cookie, "cookie:sid"),
        (Key::ClientIp, "client_ip"),
    ] {
        let (blue, green) = (Upstream::start().await, Upstream::start().await);
        let extra = format!("    sticky: \"{sticky}\"");
        let r = start(&config(&[&blue.url()], &[&green.url()], (95, 5), &extra)).await;
        let before = groups_of(&r, kind, KEYS, &blue, &green).await;
        let green_before = before.iter().filter(|g| **g == "green").count();
        assert!(
            (3..=40).contains(&green_before),
            "{sticky}: {green_before} of {KEYS} keys in green at 5 %"
        );

        let (status, body) =
            set_weights(&r, r#"{"upstream":"up","weights":{"blue":75,"green":25}}"#).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            r#"{"upstream":"up","weights":{"blue":75,"green":25}}"#
        );
        let after = groups_of(&r, kind, KEYS, &blue, &green).await;
        let mut moved = 0;
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert!(
                b == a || (*b == "blue" && *a == "green"),
                "{sticky}: key {i} moved {b} -> {a}"
            );
            moved += usize::from(b != a);
        }
        assert!(
            (25..=100).contains(&moved),
            "{sticky}: {moved} of {KEYS} keys moved for a 20 % shift"
        );

        // No key: the smooth sequence of 75/25 (3/1), one green in four.
        let addr = r.addr("main").unwrap();
        let green_seen = green.requests();
        let client = http1();
        for _ in 0..8 {
            let (resp, _) = send(&client, get(addr, "/ok")).await;
            assert_eq!(resp.status(), 200);
        }
        // (Every request has a client address: none goes by the round robin.)
        if !matches!(kind, Key::ClientIp) {
            assert_eq!(
                green.requests() - green_seen,
                2,
                "{sticky}: 2 of 8 without a key"
            );
        }
        r.shutdown().await;
    }
}

/// Blue's only endpoint refuses connections: once it is ejected, requests that the round
/// robin gives blue go to green, counted as fallbacks; nothing fails after the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_endpoints_are_all_down_falls_back() {
    let green = Upstream::start().await;
    let (_hold, down) = refusing_addr();
    let extra = "    ejection: { consecutive_failures: 1, base_ejection: 1m }\n    retry: { attempts: 1, connect_wait: \"off\" }";
    let r = start(&config(
        &[&format!("http://{down}")],
        &[&green.url()],
        (50, 50),
        extra,
    ))
    .await;
    let addr = r.addr("main").unwrap();
    let client = http1();
    let mut failed = 0;
    for _ in 0..20 {
        let (resp, _) = send(&client, get(addr, "/ok")).await;
        failed += usize::from(resp.status() != 200);
    }
    assert_eq!(failed, 1, "only the request that found blue down failed");
    assert_eq!(green.requests(), 19);
    let text = metrics(&r).await;
    assert_eq!(
        sample(
            &text,
            "rampart_upstream_group_fallbacks_total{upstream=\"up\",group=\"blue\"}"
        ),
        Some(9.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "rampart_upstream_group_requests_total{upstream=\"up\",group=\"blue\",class=\"error\"}"
        ),
        Some(1.0)
    );
    let (_, doc) = admin_get_doc(&r, "/admin/upstreams").await;
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let blue = &v["upstreams"][0]["groups"][0];
    assert_eq!(blue["health"]["available"], 0, "{doc}");
    assert_eq!(blue["totals"]["errors"], 1);
    assert_eq!(blue["totals"]["error_rate"], 1.0);
    r.shutdown().await;
}

/// A retry stays in the request's group: blue's refusing endpoint is retried on blue's
/// other one, never on green (weight 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_another_endpoint_of_the_same_group() {
    let (blue, green) = (Upstream::start().await, Upstream::start().await);
    let (_hold, down) = refusing_addr();
    let extra = "    ejection: { consecutive_failures: 100 }\n    retry: { attempts: 2, connect_wait: \"off\" }";
    let r = start(&config(
        &[&format!("http://{down}"), &blue.url()],
        &[&green.url()],
        (100, 0),
        extra,
    ))
    .await;
    let addr = r.addr("main").unwrap();
    let client = http1();
    for _ in 0..10 {
        let (resp, _) = send(&client, get(addr, "/ok")).await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!((blue.requests(), green.requests()), (10, 0));
    let text = metrics(&r).await;
    assert!(
        sample(
            &text,
            "rampart_upstream_retries_total{upstream=\"up\",reason=\"connect_error\"}"
        )
        .is_some_and(|n| n >= 4.0),
        "{text}"
    );
    r.shutdown().await;
}

/// `POST /admin/weights` moves the traffic at once, outlives a reload that keeps the group
/// names, and is dropped by one that renames them; bad requests say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_set_at_run_time_take_effect_and_survive_a_reload() {
    let (blue, green) = (Upstream::start().await, Upstream::start().await);
    let yaml = config(&[&blue.url()], &[&green.url()], (100, 0), "");
    let r = start(&yaml).await;
    let addr = r.addr("main").unwrap();
    let client = http1();
    let count = |n: usize| {
        let client = client.clone();
        async move {
            for _ in 0..n {
                let (resp, _) = send(&client, get(addr, "/ok")).await;
                assert_eq!(resp.status(), 200);
            }
        }
    };
    count(10).await;
    assert_eq!((blue.requests(), green.requests()), (10, 0));

    let (status, body) =
        set_weights(&r, r#"{"upstream":"up","weights":{"blue":0,"green":100}}"#).await;
    assert_eq!(status, 200, "{body}");
    count(10).await;
    assert_eq!((blue.requests(), green.requests()), (10, 10));

    // A reload with the same groups (another timeout): still all green.
    let same_groups = yaml.replace("connect_timeout: 1s", "connect_timeout: 2s");
    let report = r.apply(parse(&same_groups)).await;
    assert!(
        report.to_json().starts_with("{\"result\":\"ok\""),
        "{}",
        report.to_json()
    );
    count(10).await;
    assert_eq!((blue.requests(), green.requests()), (10, 20));
    let (_, doc) = admin_get_doc(&r, "/admin/upstreams").await;
    assert!(doc.contains("\"weight\":100"), "{doc}");

    // Refused changes, with the reason.
    let refused = [
        (
            r#"{"upstream":"up","weights":{"purple":1}}"#,
            422,
            r#"{"code":"REFUSED","message":"upstream \"up\" has no group \"purple\" (groups: blue, green)"}"#,
        ),
        (
            r#"{"upstream":"up","weights":{"blue":0,"green":0}}"#,
            422,
            r#"{"code":"REFUSED","message":"every group would have weight 0: at least one must take traffic"}"#,
        ),
        (
            r#"{"upstream":"nope","weights":{"blue":1}}"#,
            404,
            r#"{"code":"NOT_FOUND","message":"no upstream \"nope\" with groups"}"#,
        ),
    ];
    for (req, status, want) in refused {
        let (s, body) = set_weights(&r, req).await;
        assert_eq!((s, body.trim_end()), (status, want));
    }
    count(4).await;
    assert_eq!((blue.requests(), green.requests()), (10, 24));

    // Other group names: the file's weights (all to the renamed blue).
    let renamed = yaml.replace("green:", "canary:");
    let report = r.apply(parse(&renamed)).await;
    assert!(
        report.to_json().starts_with("{\"result\":\"ok\""),
        "{}",
        report.to_json()
    );
    count(5).await;
    assert_eq!((blue.requests(), green.requests()), (15, 24));

    // And back to the file's weights on request.
    let (s, _) = set_weights(&r, r#"{"upstream":"up","weights":{"canary":100,"blue":0}}"#).await;
    assert_eq!(s, 200);
    let (s, body) = set_weights(&r, r#"{"upstream":"up","reset":true}"#).await;
    assert_eq!(
        (s, body.as_str()),
        (
            200,
            r#"{"upstream":"up","weights":{"blue":100,"canary":0}}"#
        )
    );
    count(3).await;
    assert_eq!((blue.requests(), green.requests()), (18, 24));
    r.shutdown().await;
}

/// A WebSocket handshake goes to a group by the weights as well: none to green at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_follow_the_weights() {
    let (blue, green) = (Upstream::start().await, Upstream::start().await);
    let r = start(&config(&[&blue.url()], &[&green.url()], (100, 0), "")).await;
    let addr = r.addr("main").unwrap();
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nhost: {addr}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    for _ in 0..4 {
        let head = raw(addr, handshake.as_bytes(), Duration::from_millis(300)).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    }
    assert_eq!((blue.requests(), green.requests()), (4, 0));
    r.shutdown().await;
}

/// Bad group settings are refused at `file:line:column`, every one of them.
#[test]
fn bad_group_configs_are_refused_with_exact_messages() {
    let dir = crate::support::process::temp_dir("groups-config");
    let path = dir.join("proxy.yaml");
    std::fs::write(
        &path,
        r#"listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes: [{ upstream: both }, { upstream: zero }, { upstream: sticky }]
upstreams:
  both:
    endpoints: ["http://127.0.0.1:1"]
    groups: { a: { endpoints: ["http://127.0.0.1:2"], weight: 1 } }
  zero:
    groups:
      a: { endpoints: ["http://127.0.0.1:3"], weight: 0 }
      b: { endpoints: ["http://127.0.0.1:3"], weight: 20000 }
  sticky:
    groups: { a: { endpoints: ["http://127.0.0.1:4"], weight: 1 } }
    sticky: "header:bad name"
"#,
    )
    .unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    let p = path.display();
    let want = [
        format!(
            "{p}:7:5: upstreams.both.endpoints: \"endpoints\" and \"groups\" cannot both be set: list the endpoints under each group"
        ),
        format!(
            "{p}:12:24: upstreams.zero.groups.b.endpoints[0]: duplicate endpoint \"http://127.0.0.1:3/\" (first used at line 11)"
        ),
        format!("{p}:12:55: upstreams.zero.groups.b.weight: must be at most 10000, got 20000"),
        format!("{p}:15:13: upstreams.sticky.sticky: \"bad name\" is not a header name"),
    ];
    assert_eq!(err.trim_end(), want.join("\n"));
}

/// `rampart check` shows each group's weight and share.
#[test]
fn check_summary_shows_groups_and_weights() {
    let dir = crate::support::process::temp_dir("groups-check");
    let path = dir.join("proxy.yaml");
    std::fs::write(
        &path,
        config(
            &["http://127.0.0.1:3001"],
            &["http://127.0.0.1:3002"],
            (9500, 500),
            "    sticky: client_ip",
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "groups: blue weight 9500 (95.0%) -> http://127.0.0.1:3001/; green weight 500 (5.0%) -> http://127.0.0.1:3002/; sticky client_ip"
        ),
        "{stdout}"
    );
}

/// Header lines to send as they are (bytes a client may put in a value).
type Headers = Vec<(&'static str, Vec<u8>)>;

/// Hostile sticky keys: huge, empty, obs-text bytes, malformed cookies, repeated cookie
/// lines. Each is served (never a 4xx/5xx of rampart's making) and lands in one group
/// every time it is sent.
#[tokio::test]
async fn odd_sticky_keys_are_served_and_stay_in_one_group() {
    for sticky in ["header:X-User", "cookie:sid"] {
        let (blue, green) = (Upstream::start().await, Upstream::start().await);
        let extra = format!("    sticky: \"{sticky}\"");
        let r = start(&config(&[&blue.url()], &[&green.url()], (50, 50), &extra)).await;
        let addr = r.addr("main").unwrap();
        let huge = "u".repeat(6 * 1024);
        // (headers, whether they hold a usable key: the others may go by the round robin)
        let odd: Vec<(Headers, bool)> = vec![
            (
                vec![("x-user", huge.clone().into_bytes())],
                sticky.starts_with("header"),
            ),
            (vec![("x-user", Vec::new())], false),
            (
                vec![("x-user", vec![0x80, 0xff, b' ', 0xfe])],
                sticky.starts_with("header"),
            ),
            (
                vec![("x-user", b"a".to_vec()), ("x-user", b"b".to_vec())],
                false,
            ),
            (vec![("cookie", b"sid".to_vec())], false),
            (vec![("cookie", b"=;;=; sid=".to_vec())], false),
            (
                vec![("cookie", format!("sid={huge}").into_bytes())],
                sticky.starts_with("cookie"),
            ),
            (
                vec![
                    ("cookie", b"a=1".to_vec()),
                    ("cookie", b"sid=x; sid=y".to_vec()),
                ],
                false,
            ),
            (
                vec![("cookie", vec![b's', b'i', b'd', b'=', 0x80, 0xff])],
                sticky.starts_with("cookie"),
            ),
        ];
        for (headers, sticks) in &odd {
            let mut seen = Vec::new();
            for _ in 0..5 {
                let mut b = Request::get(format!("http://{addr}/echo"));
                for (k, v) in headers {
                    b = b.header(*k, http::HeaderValue::from_bytes(v).unwrap());
                }
                let (resp, body) = send(&http1(), b.body(Full::new(Bytes::new())).unwrap()).await;
                assert_eq!(resp.status(), 200, "{sticky} {headers:?}");
                seen.push(served_by(&body, &blue, &green));
            }
            if *sticks {
                assert!(
                    seen.iter().all(|g| *g == seen[0]),
                    "{sticky} {headers:?}: moved between groups {seen:?}"
                );
            }
        }
    }
}
