//! `/admin/releases`: start a release, list them, and pause, resume, abort or promote one
//! (`upstream/release/`). Writes follow `/admin/reload`'s rules: POST only, no `Origin`.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::{AdminCtx, document, json, no_store};
use crate::stream::body::ProxyBody;
use crate::upstream::release::{ActionError, StartError};

/// A release document is a few hundred bytes.
const MAX_BODY: usize = 16 * 1024;
pub(super) const ACTIONS: &[&str] = &["pause", "resume", "abort", "promote"];

fn problem(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    no_store(json(
        status,
        json!({ "code": code, "message": message }).to_string(),
    ))
}

/// `POST /admin/releases`: 201 with the release; 400 for a document that is not one
/// (every problem listed); 409 when a release runs on the upstream (or another replica
/// drives); 422 when the target cannot take traffic (the reason said, nothing moved).
pub(super) async fn start(ctx: &AdminCtx, req: Request<Incoming>) -> Response<ProxyBody> {
    use http_body_util::BodyExt;
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "the body could not be read (at most 16 KiB)",
            );
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "the body is not UTF-8",
        );
    };
    if text.trim().is_empty() {
        return problem(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "expected a JSON object: {\"upstream\", \"to\", \"steps\", \"step_for\", \"gate\": {\"max_error_rate\", \"max_p95\", \"min_requests\"}}",
        );
    }
    let upstreams: Vec<String> = ctx
        .inputs
        .snapshot
        .load()
        .config
        .upstreams
        .keys()
        .cloned()
        .collect();
    let spec = match crate::config::release_from_json(text, &upstreams) {
        Ok(s) => s,
        Err(problems) => {
            return no_store(json(
                StatusCode::BAD_REQUEST,
                json!({
                    "code": "BAD_REQUEST",
                    "message": problems.join("; "),
                    "problems": problems,
                })
                .to_string(),
            ));
        }
    };
    match ctx.releases.start(spec) {
        Ok(id) => {
            let v = ctx
                .releases
                .json_of(&id)
                .unwrap_or_else(|| json!({ "id": id }));
            no_store(json(StatusCode::CREATED, v.to_string()))
        }
        Err(StartError::Conflict(m)) => problem(StatusCode::CONFLICT, "CONFLICT", &m),
        Err(StartError::Refused(m)) => problem(StatusCode::UNPROCESSABLE_ENTITY, "REFUSED", &m),
    }
}

/// `POST /admin/releases/{id}/{action}`: 200 with the release; 404 for an unknown id or
/// action; 409 when the release's state does not allow it.
pub(super) fn act(ctx: &AdminCtx, path: &str) -> Response<ProxyBody> {
    let rest = path.trim_start_matches("/admin/releases/");
    let Some((id, action)) = rest.rsplit_once('/') else {
        return problem(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "expected /admin/releases/{id}/pause|resume|abort|promote",
        );
    };
    if !ACTIONS.contains(&action) {
        return problem(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("no action \"{action}\" (pause, resume, abort, promote)"),
        );
    }
    match ctx.releases.act(id, action) {
        Ok(()) => document(
            ctx.releases
                .json_of(id)
                .unwrap_or_else(|| json!({ "id": id })),
        ),
        Err(ActionError::NotFound(m)) => problem(StatusCode::NOT_FOUND, "NOT_FOUND", &m),
        Err(ActionError::Conflict(m)) => problem(StatusCode::CONFLICT, "CONFLICT", &m),
    }
}

/// Which methods a releases path takes.
pub(super) fn allowed(path: &str, method: &Method) -> bool {
    if path == "/admin/releases" {
        matches!(*method, Method::GET | Method::HEAD | Method::POST)
    } else {
        *method == Method::POST
    }
}
