//! Persistence: the state file and the Redis key (the real 127.0.0.1:6379, a key prefix of
//! its own per test), and two managers sharing Redis.

use std::sync::Arc;

use super::*;
use crate::upstream::release::store::{self, Persisted, Shared};

fn redis_client() -> Arc<crate::admission::ratelimit::fallback::RedisStore> {
    let config = crate::config::parse_str(
        r#"
redis: { url: "redis://127.0.0.1:6379", timeout: 500ms }
listeners: [{ name: a, listen: "127.0.0.1:0", routes: [{ upstream: backend }] }]
upstreams: { backend: { endpoints: ["http://127.0.0.1:9"] } }
"#,
        "proxy.yaml",
        &|_| None,
    )
    .unwrap();
    let mut reg = prometheus_client::registry::Registry::default();
    let limiters = crate::admission::ratelimit::Registry::new(
        crate::admission::ratelimit::Metrics::register(&mut reg),
    );
    limiters.update(&config).unwrap();
    limiters.redis_client().unwrap()
}

fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test:{{releases-{test}-{}-{nanos}}}", std::process::id())
}

#[test]
fn the_state_file_round_trips_and_a_restart_resumes_at_the_saved_weights() {
    let g = Mem::new();
    let (r, _) = manager(&g);
    let id = r.start_at(spec(), T0).unwrap();
    run(&r, &id, T0, 120, |_| g.traffic(100, 0.0, 0.0, 40));
    assert_eq!(g.green_share(), 25);
    let dir = std::env::temp_dir().join(format!("rampart-releases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("releases.json");
    let saved = r.take_dirty().unwrap();
    assert!(r.take_dirty().is_none(), "saved once");
    store::save_file(&path, &saved).unwrap();
    // Atomic: no temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from("releases.json")]);
    let loaded = store::load_file(&path).unwrap().unwrap();
    assert_eq!(loaded, saved);

    // A new process: the groups start at their config weights, the release puts its own
    // back and goes on from the 25 % step.
    let g2 = Mem::new();
    let (r2, _) = manager(&g2);
    r2.restore(loaded);
    assert_eq!(g2.green_share(), 25);
    let rel = r2.get(&id).unwrap();
    assert_eq!(rel.state, State::Running { step: 1 });
    assert_eq!(rel.history, r.get(&id).unwrap().history);
    // The next release id does not reuse this one.
    r2.act_at(&id, "abort", T0).unwrap();
    let next = r2.start_at(spec(), T0).unwrap();
    assert_ne!(next, id);
    assert!(
        store::load_file(&dir.join("absent.json"))
            .unwrap()
            .is_none()
    );
    std::fs::write(&path, b"{not json").unwrap();
    assert!(store::load_file(&path).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_redis_key_round_trips() {
    let shared = Shared {
        client: redis_client(),
        prefix: unique_prefix("roundtrip"),
        instance: "a".into(),
    };
    assert_eq!(shared.load().await.unwrap(), None);
    let g = Mem::new();
    let (r, _) = manager(&g);
    r.start_at(spec(), T0).unwrap();
    let p = r.persisted();
    shared.save(&p).await.unwrap();
    assert_eq!(shared.load().await.unwrap(), Some(p.clone()));
    let back = Persisted::from_bytes(&shared.load_raw().await.unwrap().unwrap()).unwrap();
    assert_eq!(back, p);
}

#[tokio::test]
async fn replicas_sharing_redis_follow_one_driver() {
    let client = redis_client();
    let prefix = unique_prefix("replicas");
    let (ga, gb) = (Mem::new(), Mem::new());
    let (a, _) = manager(&ga);
    let (b, _) = manager(&gb);
    for (m, name) in [(&a, "a"), (&b, "b")] {
        m.store.set_redis(Some(Shared {
            client: client.clone(),
            prefix: prefix.clone(),
            instance: name.into(),
        }));
    }
    let (mut la, mut lb) = (None, None);
    // Nothing to drive: nobody takes the lease.
    a.drive_once(&mut la).await;
    b.drive_once(&mut lb).await;
    assert_eq!((a.driver(), b.driver()), (None, None));
    let lease = |client: Arc<crate::admission::ratelimit::fallback::RedisStore>| {
        let key = format!("{prefix}:lease");
        async move {
            let mut cmd = redis::cmd("GET");
            cmd.arg(key);
            client.redis.query::<Option<String>>(&cmd).await.unwrap()
        }
    };
    assert_eq!(lease(client.clone()).await, None);

    // A starts a release: it takes the lease and drives, B follows its weights.
    let id = a.start(spec()).unwrap();
    a.drive_once(&mut la).await;
    assert_eq!(lease(client.clone()).await.as_deref(), Some("a"));
    b.drive_once(&mut lb).await;
    assert_eq!(b.driver(), Some("a".into()));
    assert_eq!(gb.green_share(), 5, "the follower set the driver's weights");
    assert_eq!(b.get(&id).unwrap().state, State::Running { step: 0 });
    // Actions go to the driver.
    assert!(
        matches!(b.start(spec()), Err(StartError::Conflict(m)) if m.contains("replica a drives"))
    );
    assert!(matches!(b.act(&id, "abort"), Err(ActionError::Conflict(_))));

    // Done: A gives the lease up; B takes the final state.
    a.act(&id, "abort").unwrap();
    a.drive_once(&mut la).await;
    assert_eq!(lease(client.clone()).await, None);
    b.drive_once(&mut lb).await;
    assert_eq!(b.driver(), None);
    assert_eq!(b.get(&id).unwrap().state, State::Aborted);
    assert_eq!(gb.green_share(), 0);

    // B starts the next; A follows; B dies (its lease expires): A takes over from the
    // saved state and drives on.
    let id2 = b.start(spec()).unwrap();
    b.drive_once(&mut lb).await;
    a.drive_once(&mut la).await;
    assert_eq!(a.driver(), Some("b".into()));
    assert_eq!(ga.green_share(), 5);
    let mut cmd = redis::cmd("DEL");
    cmd.arg(format!("{prefix}:lease"));
    client.redis.query::<i64>(&cmd).await.unwrap();
    a.drive_once(&mut la).await;
    assert_eq!(a.driver(), None);
    assert_eq!(lease(client.clone()).await.as_deref(), Some("a"));
    assert_eq!(a.get(&id2).unwrap().state, State::Running { step: 0 });
    a.act(&id2, "promote").unwrap();
    a.drive_once(&mut la).await;
    assert_eq!(ga.green_share(), 100);
    b.drive_once(&mut lb).await;
    assert_eq!(gb.green_share(), 100);
    let mut cmd = redis::cmd("DEL");
    cmd.arg(format!("{prefix}:lease"))
        .arg(format!("{prefix}:state"));
    client.redis.query::<i64>(&cmd).await.unwrap();
}
