//! Release notices (started, promoted, rolled back, aborted: `upstream::release`) through
//! the same sinks and delivery queue as the alerts: a webhook gets a JSON document, Slack a
//! line, Alertmanager an alert `RampartRelease` that ends by itself after a while.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

use super::Alerting;
use super::sinks::{self, Delivery};
use crate::config::{Secret, SinkConfig, SinkKind};
use crate::upstream::release::{Notice, Notify};

/// Alertmanager shows a notice this long, then lets it end.
const SHOWN_FOR: Duration = Duration::from_secs(15 * 60);

impl Notify for Alerting {
    fn release_notice(&self, notice: &Notice) {
        let sinks = self.inner().config.sinks.clone();
        for sink in &sinks {
            self.enqueue(delivery(sink, notice, &self.instance));
        }
    }
}

pub(crate) fn delivery(sink: &SinkConfig, n: &Notice, instance: &str) -> Delivery {
    let (url, body) = match sink.kind {
        SinkKind::Webhook => (sink.url.expose().clone(), webhook_body(n, instance)),
        SinkKind::Slack => (
            sink.url.expose().clone(),
            json!({ "text": slack_text(n, instance) }),
        ),
        SinkKind::Alertmanager => (
            sinks::alertmanager_url(sink.url.expose()),
            alertmanager_body(n, instance),
        ),
    };
    Delivery {
        sink: sink.clone(),
        url: Secret::new(url),
        body: Bytes::from(body.to_string()),
        what: format!("release {} {}", n.id, n.kind),
    }
}

fn webhook_body(n: &Notice, instance: &str) -> Value {
    json!({
        "type": "release",
        "release": n.id,
        "upstream": n.upstream,
        "status": n.kind,
        "summary": n.summary,
        "at": sinks::rfc3339(n.at),
        "instance": instance,
        "source": "rampart",
    })
}

fn slack_text(n: &Notice, instance: &str) -> String {
    let icon = match n.kind {
        "rolled_back" | "aborted" => ":leftwards_arrow_with_hook:",
        "promoted" => ":white_check_mark:",
        _ => ":rocket:",
    };
    format!(
        "{icon} *release {} {}* (upstream {}) on {instance}\n{}",
        n.id, n.kind, n.upstream, n.summary
    )
}

fn alertmanager_body(n: &Notice, instance: &str) -> Value {
    let severity = if n.kind == "rolled_back" {
        "warning"
    } else {
        "info"
    };
    json!([{
        "labels": {
            "alertname": "RampartRelease",
            "release": n.id,
            "upstream": n.upstream,
            "status": n.kind,
            "severity": severity,
            "service": "rampart",
            "instance": instance,
        },
        "annotations": { "summary": n.summary },
        "startsAt": sinks::rfc3339(n.at),
        "endsAt": sinks::rfc3339(n.at + SHOWN_FOR),
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn sink(kind: SinkKind) -> SinkConfig {
        SinkConfig {
            kind,
            url: Secret::new("http://127.0.0.1:9/hook".parse().unwrap()),
            timeout: Duration::from_secs(5),
            max_attempts: 1,
        }
    }

    #[test]
    fn a_release_notice_per_sink() {
        let n = Notice {
            id: "backend-1".into(),
            upstream: "backend".into(),
            kind: "rolled_back",
            summary: "release backend-1 of upstream backend rolled back to blue: gate failed"
                .into(),
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        let body = |d: &Delivery| serde_json::from_slice::<Value>(&d.body).unwrap();
        let w = delivery(&sink(SinkKind::Webhook), &n, "host");
        assert_eq!(body(&w)["status"], "rolled_back");
        assert_eq!(body(&w)["release"], "backend-1");
        assert_eq!(body(&w)["at"], "2023-11-14T22:13:20.000Z");
        let s = delivery(&sink(SinkKind::Slack), &n, "host");
        assert!(
            body(&s)["text"]
                .as_str()
                .unwrap()
                .contains("*release backend-1 rolled_back*")
        );
        let a = delivery(&sink(SinkKind::Alertmanager), &n, "host");
        assert_eq!(a.url.expose().path(), "/hook/api/v2/alerts");
        let v = body(&a);
        assert_eq!(v[0]["labels"]["alertname"], "RampartRelease");
        assert_eq!(v[0]["labels"]["severity"], "warning");
        assert_eq!(v[0]["endsAt"], "2023-11-14T22:28:20.000Z");
    }
}
