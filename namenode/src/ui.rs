//! The namenode's web UI: the cluster at a glance, its datanodes, a file
//! browser and the jobs, served as HTML with a little script for the live
//! training curves, plus the JSON those scripts read. It only reads.

use crate::jobs::{now_ms, JobRecord, JobState};
use crate::perm::User;
use crate::service::{list, locate, report, stat};
use crate::state::{lock, State};
use axum::extract::{Path, Query, State as Shared};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum::Router;
use quern_proto::msg::{FileKind, JobPoint, List, Locate, NodeState, ReplicaState, LIST_PAGE};
use quern_proto::WireError;
use quern_web::{escape, human_bytes, Page};
use serde::Deserialize;
use std::fmt::Write;
use std::sync::Arc;

type S = Shared<Arc<State>>;

pub(crate) fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/datanodes", get(datanodes))
        .route("/browse", get(browse))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/api/jobs", get(api_jobs))
        .route("/api/jobs/{id}", get(api_job))
        .with_state(state)
}

/// The UI reads as the superuser: it is the operator's view, and what it
/// may show is decided by who may open it (loopback or the token).
fn viewer() -> User {
    User {
        name: "webui".into(),
        groups: Vec::new(),
        superuser: true,
    }
}

fn failed(e: WireError) -> Response {
    let status = match e.code {
        quern_proto::ErrorCode::NotFound => StatusCode::NOT_FOUND,
        quern_proto::ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut p = Page::new("Not available");
    p.push(&format!(
        "<p class=\"failed\">{}</p>",
        escape(&e.to_string())
    ));
    (status, p).into_response()
}

fn card(out: &mut String, key: &str, value: &str, class: &str) {
    let class = if class.is_empty() {
        "v".to_string()
    } else {
        format!("v {class}")
    };
    let _ = write!(
        out,
        "<div class=\"card\"><div class=\"{class}\">{}</div><div class=\"k\">{}</div></div>",
        escape(value),
        escape(key)
    );
}

fn ago(secs: f64) -> String {
    if secs < 90.0 {
        format!("{secs:.1} s ago")
    } else if secs < 5400.0 {
        format!("{:.0} min ago", secs / 60.0)
    } else {
        format!("{:.1} h ago", secs / 3600.0)
    }
}

fn when(ms: i64) -> String {
    ago((now_ms() - ms).max(0) as f64 / 1000.0)
}

async fn overview(Shared(s): S) -> Response {
    let r = match report(&s) {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let health = s.cluster().health_counts();
    let live: Vec<_> = r
        .datanodes
        .iter()
        .filter(|d| d.state == NodeState::Live)
        .collect();
    let dead = r.datanodes.len() - live.len();
    let capacity: u64 = live.iter().map(|d| d.capacity).sum();
    let used: u64 = live.iter().map(|d| d.used).sum();
    let available: u64 = live.iter().map(|d| d.available).sum();
    let running = s
        .jobs
        .all()
        .map(|all| all.iter().filter(|j| j.state == JobState::Running).count())
        .unwrap_or(0);
    let mut p = Page::new("Overview");
    let mut b = String::new();
    let _ = write!(
        b,
        "<p>Cluster <code id=\"cluster-id\">{}</code></p>",
        escape(&r.cluster_id)
    );
    match &r.safe_mode {
        Some(why) => {
            let _ = write!(b, "<p class=\"warn\" id=\"safe-mode\">{}</p>", escape(why));
        }
        None => b.push_str("<p id=\"safe-mode\">Not in safe mode.</p>"),
    }
    b.push_str("<div class=\"cards\">");
    card(&mut b, "live datanodes", &live.len().to_string(), "live");
    card(
        &mut b,
        "dead datanodes",
        &dead.to_string(),
        if dead > 0 { "dead" } else { "" },
    );
    card(&mut b, "capacity", &human_bytes(capacity), "");
    card(&mut b, "used", &human_bytes(used), "");
    card(&mut b, "available", &human_bytes(available), "");
    card(&mut b, "chunks", &health.chunks.to_string(), "");
    card(
        &mut b,
        "under-replicated chunks",
        &health.under_replicated.to_string(),
        if health.under_replicated > 0 {
            "warn"
        } else {
            ""
        },
    );
    card(
        &mut b,
        "corrupt replicas",
        &health.corrupt_replicas.to_string(),
        if health.corrupt_replicas > 0 {
            "dead"
        } else {
            ""
        },
    );
    card(
        &mut b,
        "missing chunks",
        &health.missing.to_string(),
        if health.missing > 0 { "dead" } else { "" },
    );
    card(&mut b, "running jobs", &running.to_string(), "");
    b.push_str("</div>");
    let _ = write!(
        b,
        "<p>Files being written: {}. Datanodes are dead after {} s without a heartbeat.</p>",
        lock(&s.leases).len(),
        s.cfg.dead_timeout.as_secs()
    );
    p.push(&b);
    p.into_response()
}

async fn datanodes(Shared(s): S) -> Response {
    let r = match report(&s) {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let mut b = String::from(
        "<table id=\"datanodes\"><tr><th>Node</th><th>Address</th><th>State</th>\
         <th class=\"n\">Capacity</th><th class=\"n\">Used</th><th class=\"n\">Available</th>\
         <th class=\"n\">Chunks</th><th>Last heartbeat</th><th>Last scrubber pass</th>\
         <th class=\"n\">Jobs</th><th class=\"n\">sgemm GFLOP/s</th></tr>",
    );
    for d in &r.datanodes {
        let (state, class) = match d.state {
            NodeState::Live if d.full => ("live (full)", "warn"),
            NodeState::Live => ("live", "live"),
            NodeState::Dead => ("dead", "dead"),
        };
        let scrub = match d.scrub.last_pass_end_ms {
            Some(ms) => format!(
                "{}: {} chunks, {} bad",
                when(ms),
                d.scrub.last_pass_chunks,
                d.scrub.errors
            ),
            None => format!("none yet ({} verified)", d.scrub.verified_this_pass),
        };
        let _ = write!(
            b,
            "<tr data-addr=\"{addr}\" data-state=\"{state}\"><td><code>{id}</code></td>\
             <td>{addr}</td><td class=\"{class}\">{state}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td>\
             <td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            human_bytes(d.capacity),
            human_bytes(d.used),
            human_bytes(d.available),
            d.chunks,
            ago(d.since_heartbeat_secs),
            escape(&scrub),
            d.jobs,
            // Measured when the node started; the training planner's speed.
            if d.gflops > 0.0 {
                format!("{:.0}", d.gflops)
            } else {
                "not yet".into()
            },
            addr = d.node.addr,
            id = d.node.id,
        );
    }
    b.push_str("</table>");
    if r.datanodes.is_empty() {
        b.push_str("<p>No datanode has registered.</p>");
    }
    let mut p = Page::new("Datanodes");
    p.push(&b);
    p.into_response()
}

#[derive(Deserialize)]
struct BrowseQuery {
    path: Option<String>,
    after: Option<String>,
}

fn browse_link(path: &str) -> String {
    let mut enc = String::new();
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            enc.push(b as char);
        } else {
            let _ = write!(enc, "%{b:02X}");
        }
    }
    format!("/browse?path={enc}")
}

fn mode_string(kind: FileKind, mode: u32) -> String {
    let mut s = String::from(if kind == FileKind::Dir { "d" } else { "-" });
    for shift in [6, 3, 0] {
        let bits = mode >> shift;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn crumbs(path: &str) -> String {
    let mut out = String::from("<p id=\"crumbs\"><a href=\"/browse?path=/\">/</a>");
    let mut at = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        at.push('/');
        at.push_str(part);
        let _ = write!(
            out,
            " <a href=\"{}\">{}</a> /",
            escape(&browse_link(&at)),
            escape(part)
        );
    }
    out.push_str("</p>");
    out
}

async fn browse(Shared(s): S, Query(q): Query<BrowseQuery>) -> Response {
    let path = q.path.unwrap_or_else(|| "/".into());
    let u = viewer();
    let st = match stat(&s, &u, &path) {
        Ok(st) => st,
        Err(e) => return failed(e),
    };
    let mut p = Page::new(st.path.clone());
    let mut b = crumbs(&st.path);
    if st.kind == FileKind::Dir {
        let listing = match list(
            &s,
            &u,
            List {
                path: st.path.clone(),
                start_after: q.after.clone(),
                limit: 500,
            },
        ) {
            Ok(l) => l,
            Err(e) => return failed(e),
        };
        b.push_str(
            "<table id=\"listing\"><tr><th>Name</th><th>Mode</th><th>Owner</th><th>Group</th>\
             <th class=\"n\">Size</th><th class=\"n\">Replication</th><th class=\"n\">Chunks</th>\
             <th>Modified</th></tr>",
        );
        for e in &listing.entries {
            let name = e.path.rsplit('/').next().unwrap_or(&e.path);
            let shown = if e.kind == FileKind::Dir {
                format!("{name}/")
            } else {
                name.to_string()
            };
            let _ = write!(
                b,
                "<tr data-path=\"{path}\"><td><a href=\"{link}\">{shown}</a></td><td><code>{}</code></td>\
                 <td>{}</td><td>{}</td><td class=\"n\" data-bytes=\"{size}\">{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                mode_string(e.kind, e.mode),
                escape(&e.owner),
                escape(&e.group),
                if e.kind == FileKind::Dir {
                    String::new()
                } else {
                    human_bytes(e.size)
                },
                if e.kind == FileKind::Dir {
                    String::new()
                } else {
                    e.replication.to_string()
                },
                if e.kind == FileKind::Dir {
                    String::new()
                } else {
                    e.chunks.to_string()
                },
                when(e.mtime_ms),
                path = escape(&e.path),
                link = escape(&browse_link(&e.path)),
                shown = escape(&shown),
                size = e.size,
            );
        }
        b.push_str("</table>");
        if listing.entries.is_empty() {
            b.push_str("<p>Empty directory.</p>");
        }
        if listing.more {
            if let Some(last) = listing.entries.last() {
                let name = last.path.rsplit('/').next().unwrap_or_default();
                let _ = write!(
                    b,
                    "<p><a href=\"{}&amp;after={}\">Next page</a></p>",
                    escape(&browse_link(&st.path)),
                    escape(&browse_link(name).replace("/browse?path=", "")),
                );
            }
        }
    } else {
        let _ = write!(
            b,
            "<p id=\"file\">{} ({} bytes), replication {}, chunk size {}, <code>{}</code> {}:{}, \
             modified {}.</p>",
            human_bytes(st.size),
            st.size,
            st.replication,
            human_bytes(st.chunk_size),
            mode_string(st.kind, st.mode),
            escape(&st.owner),
            escape(&st.group),
            when(st.mtime_ms)
        );
        let loc = match locate(
            &s,
            &u,
            Locate {
                path: st.path.clone(),
                first_chunk: 0,
                limit: LIST_PAGE,
            },
        ) {
            Ok(l) => l,
            Err(e) => return failed(e),
        };
        b.push_str(
            "<table id=\"chunks\"><tr><th class=\"n\">#</th><th>Chunk</th><th class=\"n\">Offset</th>\
             <th class=\"n\">Size</th><th>Digest (BLAKE3)</th><th>Holders</th></tr>",
        );
        for c in &loc.chunks {
            let holders: Vec<String> = c
                .replicas
                .iter()
                .map(|r| {
                    let (class, tag) = match r.state {
                        ReplicaState::Live => ("live", ""),
                        ReplicaState::Dead => ("dead", " (dead)"),
                        ReplicaState::Corrupt => ("dead", " (corrupt)"),
                    };
                    format!(
                        "<span class=\"holder {class}\" data-addr=\"{a}\">{a}{tag}</span>",
                        a = r.node.addr
                    )
                })
                .collect();
            let digest = c.meta.digest.to_string();
            let _ = write!(
                b,
                "<tr><td class=\"n\">{}</td><td><code>{}</code></td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}</td><td><code title=\"{digest}\">{}…</code></td><td>{}</td></tr>",
                c.index,
                c.meta.id,
                c.offset,
                c.meta.size,
                &digest[..digest.len().min(16)],
                if holders.is_empty() {
                    "<span class=\"dead\">none</span>".to_string()
                } else {
                    holders.join(", ")
                },
            );
        }
        b.push_str("</table>");
        if loc.more {
            let _ = write!(b, "<p>The first {LIST_PAGE} chunks are shown.</p>");
        }
    }
    p.push(&b);
    p.into_response()
}

fn state_label(j: &JobRecord, now: i64) -> (&'static str, &'static str) {
    match j.state {
        JobState::Running if j.silent(now) => ("silent", "warn"),
        JobState::Running => ("running", "live"),
        JobState::Finished => ("finished", ""),
        JobState::Failed => ("failed", "failed"),
    }
}

fn duration(secs: f64) -> String {
    if secs < 120.0 {
        format!("{secs:.0} s")
    } else if secs < 7200.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

fn progress(j: &JobRecord) -> String {
    match (j.last(), j.iterations) {
        (Some(p), n) if n > 0 => format!(
            "{}/{} ({:.0}%)",
            p.iteration,
            n,
            100.0 * p.iteration as f64 / n as f64
        ),
        (Some(p), _) => format!("step {}", p.iteration),
        (None, _) => String::new(),
    }
}

async fn jobs(Shared(s): S) -> Response {
    let all = match s.jobs.all() {
        Ok(a) => a,
        Err(e) => return failed(e),
    };
    let now = now_ms();
    let mut b = String::from(
        "<table id=\"jobs\"><tr><th class=\"n\">Job</th><th>Kind</th><th>User</th><th>Model</th>\
         <th>Dataset</th><th>State</th><th>Progress</th><th class=\"n\">Samples/s</th>\
         <th>ETA</th><th>Started</th><th>Duration</th></tr>",
    );
    for j in &all {
        let (state, class) = state_label(j, now);
        let end = j.ended_ms.unwrap_or(now);
        let _ = write!(
            b,
            "<tr data-job=\"{id}\" data-state=\"{state}\"><td class=\"n\"><a href=\"/jobs/{id}\">{id}</a></td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{class}\">{state}</td>\
             <td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            j.kind.name(),
            escape(&j.user),
            escape(&j.model),
            escape(&j.dataset),
            progress(j),
            j.last()
                .map(|p| format!("{:.0}", p.samples_per_sec))
                .unwrap_or_default(),
            j.eta_secs(now).map(duration).unwrap_or_default(),
            when(j.started_ms),
            duration((end - j.started_ms).max(0) as f64 / 1000.0),
            id = j.id,
        );
    }
    b.push_str("</table>");
    if all.is_empty() {
        b.push_str(
            "<p>No job yet: training, statistics and scoring jobs show here as they run.</p>",
        );
    }
    let mut p = Page::new("Jobs");
    p.push(&b);
    if all.iter().any(|j| j.state == JobState::Running) {
        p.script("setTimeout(() => location.reload(), 5000);");
    }
    p.into_response()
}

async fn job(Shared(s): S, Path(id): Path<u64>) -> Response {
    let j = match s.jobs.get(id) {
        Ok(Some(j)) => j,
        Ok(None) => {
            return failed(WireError::new(
                quern_proto::ErrorCode::NotFound,
                format!("job {id} is not in the history (it may have been dropped as old)"),
            ))
        }
        Err(e) => return failed(e),
    };
    let mut p = Page::new(format!("Job {id}: {} {}", j.kind.name(), j.model));
    let mut b = String::new();
    let _ = write!(
        b,
        "<table id=\"job\"><tr><th>User</th><td>{}</td></tr><tr><th>Dataset</th><td>{}</td></tr>\
         <tr><th>Plan</th><td>{}</td></tr><tr><th>Workers</th><td id=\"workers\">{}</td></tr>\
         <tr><th>State</th><td id=\"state\">{}</td></tr><tr><th>Progress</th>\
         <td id=\"progress\">{}</td></tr><tr><th>Samples/s</th><td id=\"rate\"></td></tr>\
         <tr><th>ETA</th><td id=\"eta\"></td></tr><tr><th>Bytes moved</th><td id=\"bytes\"></td></tr>\
         <tr><th>Result</th><td id=\"result\">{}</td></tr></table>",
        escape(&j.user),
        escape(&j.dataset),
        escape(&j.plan),
        escape(&j.workers.join(", ")),
        state_label(&j, now_ms()).0,
        progress(&j),
        escape(j.result.as_deref().or(j.error.as_deref()).unwrap_or("")),
    );
    if j.kind == quern_proto::msg::JobKind::Train {
        b.push_str(
            "<h2>Loss</h2><svg id=\"loss\" class=\"chart\" width=\"640\" height=\"240\"></svg>\
             <h2>Accuracy</h2><svg id=\"accuracy\" class=\"chart\" width=\"640\" height=\"240\"></svg>\
             <h2>Step time per worker (last step)</h2><table id=\"step-times\"></table>\
             <h2>Workers lost</h2><ul id=\"lost\"></ul>",
        );
        p.script(&format!("const JOB = {id};\n{JOB_SCRIPT}"));
    }
    p.push(&b);
    p.into_response()
}

/// Polls the job's JSON each second while it runs and redraws the curves
/// as SVG polylines; each polyline carries its point count for tests and
/// for anyone reading the DOM.
const JOB_SCRIPT: &str = include_str!("../assets/job.js");

fn job_json(j: &JobRecord, now: i64, points: Option<Vec<JobPoint>>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": j.id,
        "kind": j.kind.name(),
        "user": j.user,
        "model": j.model,
        "dataset": j.dataset,
        "plan": j.plan,
        "workers": j.workers,
        "iterations": j.iterations,
        "steps_per_epoch": j.steps_per_epoch,
        "started_ms": j.started_ms,
        "updated_ms": j.updated_ms,
        "ended_ms": j.ended_ms,
        "state": j.state,
        "shown_state": state_label(j, now).0,
        "result": j.result,
        "error": j.error,
        "lost": j.lost,
        "eta_secs": j.eta_secs(now),
        "last": j.last(),
    });
    if let Some(points) = points {
        v["points"] = serde_json::to_value(&points).unwrap_or_default();
    }
    v
}

async fn api_jobs(Shared(s): S) -> Response {
    match s.jobs.all() {
        Ok(all) => {
            let now = now_ms();
            Json(
                all.iter()
                    .map(|j| job_json(j, now, None))
                    .collect::<Vec<_>>(),
            )
            .into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn api_job(Shared(s): S, Path(id): Path<u64>) -> Response {
    match s.jobs.get(id) {
        Ok(Some(j)) => match s.jobs.points(id) {
            Ok(points) => Json(job_json(&j, now_ms(), Some(points))).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        },
        Ok(None) => (StatusCode::NOT_FOUND, format!("no job {id}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_as_ls_prints_them() {
        assert_eq!(mode_string(FileKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(FileKind::File, 0o640), "-rw-r-----");
    }

    #[test]
    fn browse_links_survive_odd_names() {
        assert_eq!(browse_link("/a b/c&d"), "/browse?path=/a%20b/c%26d");
    }
}
