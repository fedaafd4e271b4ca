//! Values at the edges of what `rampart check` accepts: every accepted configuration
//! starts, serves and reloads (a property test over each key's whole range), and a reload
//! that panics while it is applied is a failed reload, never the end of the process.

use std::time::Duration;

use rampart::reload::ReloadResult;

use crate::support::{self, Upstream, get, http1, one_route, send};

/// `apply` takes a configuration as it is, past validation: tokio's Semaphore panics when
/// a listener asks for more than 2^61 - 1 connections. Before: the supervisor task died
/// with the panic, and with it every listener and the process (`rampart run` exits when
/// the supervisor is gone).
#[tokio::test]
async fn a_panic_while_a_reload_is_applied_fails_the_reload_and_changes_nothing() {
    let up = Upstream::start().await;
    let yaml = one_route(&up.url(), "", "");
    let r = support::start(&yaml).await;
    let addr = r.addr("main").unwrap();
    assert_eq!(send(&http1(), get(addr, "/ok")).await.0.status(), 200);

    let mut bad = support::parse(&yaml);
    bad.listeners[0].max_connections = usize::MAX;
    // A second listener that would have been added: it must not stay behind either.
    let mut extra = bad.listeners[0].clone();
    extra.name = "extra".into();
    extra.max_connections = 10;
    bad.listeners.insert(0, extra);
    let report = tokio::time::timeout(Duration::from_secs(10), r.apply(bad))
        .await
        .expect("the reload answers");
    assert_eq!(report.result, ReloadResult::Error, "{report:?}");
    assert!(
        report.errors.iter().any(|e| e.contains("panicked")),
        "{report:?}"
    );
    // The running listener still serves, on the same address, and nothing was added.
    assert_eq!(r.addr("main"), Some(addr));
    assert_eq!(r.addr("extra"), None);
    for _ in 0..3 {
        assert_eq!(send(&http1(), get(addr, "/ok")).await.0.status(), 200);
    }
    // The reload machinery is still there: a good configuration applies.
    let report = r
        .apply(support::parse(
            &yaml.replace("connect_timeout: 1s", "connect_timeout: 2s"),
        ))
        .await;
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(send(&http1(), get(addr, "/ok")).await.0.status(), 200);
    assert!(r.shutdown().await);
}
