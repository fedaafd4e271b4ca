//! A release end to end (issue 20): real endpoint groups, real upstreams, the admin API and
//! the driver's own clock. A healthy green is promoted through every step; a green that
//! answers 500s is rolled back, after which every request goes to blue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

use crate::cache::{Reply, Script, Scripted};
use crate::support::*;
use rampart::app::Running;

fn config(blue: &str, green: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: false }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes: [{{ upstream: app }}]
upstreams:
  app:
    groups:
      blue: {{ endpoints: ["{blue}"], weight: 100 }}
      green: {{ endpoints: ["{green}"], weight: 0 }}
    connect_timeout: 1s
    health_check: {{ path: /health, interval: 200ms, unhealthy_interval: 200ms, fast_interval: 50ms, healthy_after: 1 }}
"#
    )
}

async fn releases(admin: SocketAddr) -> Value {
    let (_, body) = send(&http1(), get(admin, "/admin/releases")).await;
    serde_json::from_slice(&body).unwrap()
}

async fn start_release(admin: SocketAddr, body: &str) -> (u16, Value) {
    let req = Request::post(format!("http://{admin}/admin/releases"))
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let (resp, body) = send(&http1(), req).await;
    (
        resp.status().as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// GETs at ~200/s until stopped (bounded to 30 s).
fn traffic(addr: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let c = http1();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let _ = send(&c, get(addr, "/")).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    })
}

async fn wait_state(admin: SocketAddr, want: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = releases(admin).await;
        if v["releases"][0]["state"] == want {
            return v;
        }
        assert!(Instant::now() < deadline, "never {want}: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Blue and green upstreams, a proxy over them, a moment for the health checks to see
/// green; green answers 500 on `/` when `broken`.
async fn blue_green(broken: bool) -> (Arc<Script>, Arc<Script>, [Scripted; 2], Running) {
    let (blue, green) = (Arc::new(Script::default()), Arc::new(Script::default()));
    if broken {
        green.set("/", Reply::ok("broken").status(500));
    }
    let ups = [
        Scripted::start(blue.clone()).await,
        Scripted::start(green.clone()).await,
    ];
    let p = start(&config(&ups[0].url(), &ups[1].url())).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    (blue, green, ups, p)
}

/// Starts a release under load and waits for it to end in `end`: its JSON.
async fn release_under_load(p: &Running, body: &str, end: &str) -> Value {
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(p.addr("main").unwrap(), stop.clone());
    let (status, v) = start_release(p.admin_addr, body).await;
    assert!((200..300).contains(&status), "{status}: {v}");
    let v = wait_state(p.admin_addr, end, Duration::from_secs(20)).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    v
}

/// The next 20 requests all reach `to`, none `other`.
async fn all_go_to(addr: SocketAddr, to: &Script, other: &Script) {
    let before = (to.seen("/"), other.seen("/"));
    for _ in 0..20 {
        assert_eq!(send(&http1(), get(addr, "/")).await.0.status(), 200);
    }
    assert_eq!((to.seen("/"), other.seen("/")), (before.0 + 20, before.1));
}

#[tokio::test]
async fn a_healthy_green_is_promoted_through_every_step() {
    let (blue, green, _ups, p) = blue_green(false).await;
    let v = release_under_load(
        &p,
        r#"{"upstream":"app","to":"green","steps":[10,50,100],"step_for":"1s","gate":{"max_error_rate":"5%","max_p95":"500ms","min_requests":5}}"#,
        "promoted",
    )
    .await;
    let history = v["releases"][0]["history"].to_string();
    for pct in ["10", "50", "100"] {
        assert!(history.contains(pct), "{history}");
    }
    all_go_to(p.addr("main").unwrap(), &green, &blue).await;
}

#[tokio::test]
async fn a_green_answering_500s_is_rolled_back_and_blue_takes_everything() {
    let (blue, green, _ups, p) = blue_green(true).await;
    let v = release_under_load(
        &p,
        r#"{"upstream":"app","to":"green","steps":[25,50,100],"step_for":"1s","gate":{"max_error_rate":"1%","max_p95":"500ms","min_requests":5}}"#,
        "rolled_back",
    )
    .await;
    let why = v["releases"][0].to_string();
    assert!(why.contains("error"), "{why}");
    // Green took some of the 25 % step, and nothing after the rollback.
    assert!(green.seen("/") > 0);
    all_go_to(p.addr("main").unwrap(), &blue, &green).await;
}

#[tokio::test]
async fn a_release_to_an_unhealthy_green_is_refused_before_traffic_moves() {
    let blue = Arc::new(Script::default());
    let b = Scripted::start(blue.clone()).await;
    // Nothing listens for green.
    let (_sock, dead) = refusing_addr();
    let p = start(&config(&b.url(), &format!("http://{dead}"))).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, v) = start_release(
        p.admin_addr,
        r#"{"upstream":"app","to":"green","steps":[5,100],"step_for":"1s","gate":{"max_error_rate":"1%","max_p95":"500ms","min_requests":5}}"#,
    )
    .await;
    assert_eq!(status, 422, "{v}");
    let addr = p.addr("main").unwrap();
    for _ in 0..10 {
        assert_eq!(send(&http1(), get(addr, "/")).await.0.status(), 200);
    }
    assert_eq!(blue.seen("/"), 10);
}

/// Two replicas sharing Redis follow one release: it is started on one, and the other's
/// traffic moves with it.
#[tokio::test]
async fn two_replicas_sharing_redis_follow_one_release() {
    let Some(redis) = crate::support::redis::RedisServer::own("release_two_replicas").await else {
        return;
    };
    let (blue, green) = (Arc::new(Script::default()), Arc::new(Script::default()));
    let (b, g) = (
        Scripted::start(blue.clone()).await,
        Scripted::start(green.clone()).await,
    );
    let yaml = config(&b.url(), &g.url()) + &format!("redis:\n  url: \"{}\"\n", redis.url);
    let one = start(&yaml).await;
    let two = start(&yaml).await;
    let (a1, a2) = (one.addr("main").unwrap(), two.addr("main").unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(a1, stop.clone());
    let (status, v) = start_release(
        one.admin_addr,
        r#"{"upstream":"app","to":"green","steps":[50,100],"step_for":"1s","gate":{"max_error_rate":"5%","max_p95":"500ms","min_requests":5}}"#,
    )
    .await;
    assert!((200..300).contains(&status), "{status}: {v}");
    wait_state(one.admin_addr, "promoted", Duration::from_secs(15)).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    // The other replica applies the driver's weights every tick.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = (blue.seen("/"), green.seen("/"));
        for _ in 0..10 {
            assert_eq!(send(&http1(), get(a2, "/")).await.0.status(), 200);
        }
        if blue.seen("/") == before.0 && green.seen("/") == before.1 + 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica two never followed the release"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And shows the driver's state (read from Redis every tick).
    wait_state(two.admin_addr, "promoted", Duration::from_secs(5)).await;
}
