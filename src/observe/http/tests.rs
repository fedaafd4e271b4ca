use super::*;

#[test]
fn a_route_only_exports_what_happened() {
    let mut reg = Registry::with_prefix("rampart");
    let m = HttpMetrics::register(&mut reg);
    let r = m.route("main", "api", "backend", None);
    r.finished(0, 200, Some(Duration::from_millis(20)), 0, 10);
    r.finished(2, 503, Some(Duration::from_millis(20)), 5, 10);
    let text = super::super::encode_registry(&Arc::new(reg));
    assert!(text.contains(
        "rampart_http_requests_total{listener=\"main\",route=\"api\",upstream=\"backend\",method=\"GET\",status=\"2xx\"} 1"
    ), "{text}");
    assert!(text.contains("method=\"POST\",status=\"5xx\"} 1"), "{text}");
    assert!(!text.contains("method=\"PUT\""), "{text}");
    assert!(
        !text.contains("http_stream_duration_seconds_bucket"),
        "{text}"
    );
    let (requests, errors, hist) = r.totals();
    assert_eq!((requests, errors, hist.count()), (2, 1, 2));
}

#[test]
fn tunnels_are_counted_open_and_by_how_they_ended() {
    let mut reg = Registry::with_prefix("rampart");
    let m = HttpMetrics::register(&mut reg);
    let r = m.route("main", "ws", "backend", None);
    let reg = Arc::new(reg);
    let text = super::super::encode_registry(&reg);
    assert!(!text.contains("rampart_tunnels_active{"), "{text}");
    let a = r.tunnel_opened();
    let b = r.tunnel_opened();
    a.from_client.inc_by(10);
    b.from_upstream.inc_by(7);
    let text = super::super::encode_registry(&reg);
    let labels = "listener=\"main\",route=\"ws\"";
    assert!(
        text.contains(&format!("rampart_tunnels_active{{{labels}}} 2")),
        "{text}"
    );
    a.ended("client_closed");
    b.ended("idle_timeout");
    let text = super::super::encode_registry(&reg);
    for line in [
        format!("rampart_tunnels_active{{{labels}}} 0"),
        format!("rampart_tunnels_total{{{labels},outcome=\"client_closed\"}} 1"),
        format!("rampart_tunnels_total{{{labels},outcome=\"idle_timeout\"}} 1"),
        format!("rampart_tunnel_bytes_total{{{labels},direction=\"from_client\"}} 10"),
        format!("rampart_tunnel_bytes_total{{{labels},direction=\"from_upstream\"}} 7"),
    ] {
        assert!(text.contains(&line), "{line} missing: {text}");
    }
}

#[test]
fn tokens_are_counted_by_kind_once_a_route_sees_them() {
    let mut reg = Registry::with_prefix("rampart");
    let m = HttpMetrics::register(&mut reg);
    let r = m.route("main", "chat", "llm", None);
    let reg = Arc::new(reg);
    r.finished(2, 200, None, 0, 0);
    let text = super::super::encode_registry(&reg);
    assert!(!text.contains("rampart_llm_tokens_total{"), "{text}");
    r.tokens(&Usage {
        prompt: 120,
        completion: 30,
    });
    r.tokens(&Usage {
        prompt: 5,
        completion: 0,
    });
    let text = super::super::encode_registry(&reg);
    let labels = "listener=\"main\",route=\"chat\",upstream=\"llm\"";
    for line in [
        "# HELP rampart_llm_tokens Tokens of LLM answers".to_owned(),
        "# TYPE rampart_llm_tokens counter".to_owned(),
        format!("rampart_llm_tokens_total{{{labels},kind=\"prompt\"}} 125"),
        format!("rampart_llm_tokens_total{{{labels},kind=\"completion\"}} 30"),
    ] {
        assert!(text.contains(&line), "{line} missing: {text}");
    }
    // Another route's handle for the same labels adds to the same series.
    m.route("main", "chat", "llm", None).tokens(&Usage {
        prompt: 1,
        completion: 1,
    });
    let text = super::super::encode_registry(&reg);
    assert!(
        text.contains(&format!(
            "rampart_llm_tokens_total{{{labels},kind=\"completion\"}} 31"
        )),
        "{text}"
    );
}

#[test]
fn handles_for_the_same_labels_share_counts() {
    let mut reg = Registry::default();
    let m = HttpMetrics::register(&mut reg);
    let a = m.route("main", "api", "backend", None);
    a.finished(0, 200, None, 0, 0);
    let b = m.route("main", "api", "backend", None);
    b.finished(0, 200, None, 0, 0);
    assert_eq!(b.totals().0, 2);
}
