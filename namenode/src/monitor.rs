//! Background duties (lease expiry, dead datanodes, re-replication) and the
//! health check that reports on them.

use crate::state::State;
use quern_proto::msg::{Fsck, FsckFile, FsckReport, Health, ReplicaState, LIST_PAGE};
use quern_proto::{RemotePath, WireError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) async fn run(state: Arc<State>) {
    let tick = Duration::from_millis(250).min(state.cfg.replication_interval);
    let mut last_replication = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        expire_leases(&state).await;
        if let Err(e) = state.tokens.rotate(&state.ns) {
            tracing::warn!("could not rotate token keys: {e}");
        }
        let replicate = last_replication.elapsed() >= state.cfg.replication_interval;
        if replicate {
            last_replication = Instant::now();
        }
        // Work on the chunk map runs off the async workers, with the lock
        // handed on fairly between nodes and batches, so heartbeats and
        // reads never wait behind it for long.
        let s = state.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || chunk_duties(&s, replicate)).await {
            tracing::error!("the namenode's chunk duties failed: {e}");
        }
    }
}

/// Declares silent nodes dead (one lock each: each costs that node's
/// chunks) and, every replication interval, works the replication queue.
fn chunk_duties(state: &State, replicate: bool) {
    let dying = state.cluster().silent_nodes();
    for node in dying {
        state.cluster_step(|c| c.declare_dead(node));
    }
    // Until a dead timeout has passed since the start, a node that has
    // not reported yet may be on its way rather than dead; and while
    // registered nodes still owe their reports (safe mode ends at a share
    // of the chunks, not all), a chunk may have replicas not reported yet.
    // Its chunks are not copied elsewhere before then, unless reports
    // stopped coming for a dead timeout.
    if !replicate || state.safe_mode().is_some() {
        return;
    }
    let ready = {
        let c = state.cluster();
        let quiet = c.last_report.elapsed() >= state.cfg.dead_timeout;
        !c.queueing
            && state.started.elapsed() >= state.cfg.dead_timeout
            && (c.reports_owed() == 0 || quiet)
    };
    if ready {
        build_queue(state);
    }
    schedule_replication(state);
}

async fn expire_leases(state: &State) {
    let now = Instant::now();
    let expired: Vec<_> = state
        .leases
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, until)| **until <= now)
        .map(|(id, _)| *id)
        .collect();
    for id in expired {
        tracing::info!(file = %id, "write lease expired");
        if let Err(e) = crate::state::abandon(state, id).await {
            tracing::warn!(file = %id, "could not drop expired file: {e}");
        }
    }
}

/// Builds the replication queue once safe mode is over, a node's chunks
/// per lock.
fn build_queue(state: &State) {
    let started = Instant::now();
    let nodes = {
        let mut c = state.cluster();
        c.queueing = true;
        c.nodes.len()
    };
    for slot in 0..nodes {
        let held = state.cluster().held(slot as crate::chunkmap::Slot);
        for batch in held.chunks(crate::cluster::LOCK_BATCH) {
            state.cluster_step(|c| c.queue_chunks(batch));
        }
    }
    let queued = state.cluster().queue.queued();
    tracing::info!(
        queued,
        ms = started.elapsed().as_millis() as u64,
        "replication queue built from every datanode's chunks"
    );
}

/// Works the replication queue: copies for chunks short of good
/// replicas (a corrupt holder may take the fresh copy), then extras and
/// corrupt replicas dropped once enough good ones exist.
fn schedule_replication(state: &State) {
    let patience = state.cfg.replication_interval * 4 + Duration::from_secs(10);
    let sign = |id| {
        state
            .tokens
            .sign(id, quern_proto::Access::REPLICATE, "namenode")
    };
    crate::replication::work(
        &state.cluster,
        state.cfg.replication_per_node,
        patience,
        &sign,
    );
}

/// Health of everything below a path. The counts cover the whole tree;
/// `files` is one page of it (walk order), so a tree of millions of files
/// is reported in pages that each fit a frame.
pub(crate) fn fsck(state: &State, req: Fsck) -> Result<FsckReport, WireError> {
    let path = RemotePath::parse(&req.path)?;
    let (files, dirs) = state.ns.walk(&path)?;
    let first = match &req.start_after {
        Some(after) => files
            .iter()
            .position(|(p, _, _)| p.to_string() == *after)
            .map_or(files.len(), |i| i + 1),
        None => 0,
    };
    let page = first
        ..first
            .saturating_add(req.limit.clamp(1, LIST_PAGE) as usize)
            .min(files.len());
    let next =
        (page.end < files.len() && !page.is_empty()).then(|| files[page.end - 1].0.to_string());
    let safe_mode = state.safe_mode().is_some();
    let live_datanodes = state.cluster().live_count() as u32;
    let mut report = FsckReport {
        path: path.to_string(),
        health: Health::Healthy,
        files: Vec::with_capacity(page.len()),
        next,
        dirs,
        chunks: 0,
        under_replicated_chunks: 0,
        corrupt_replicas: 0,
        missing_chunks: 0,
        live_datanodes,
        safe_mode,
    };
    for (n, (fpath, id, inode)) in files.into_iter().enumerate() {
        let mut f = FsckFile {
            path: fpath.to_string(),
            health: Health::Healthy,
            size: inode.size,
            chunks: inode.chunk_count,
            replication: inode.replication,
            problems: Vec::new(),
        };
        // The lock is taken per file, after its chunk list is read, and
        // handed on fairly, so checking a large tree never holds up
        // heartbeats for long.
        let chunks = state.ns.file_chunks(id)?;
        let c = state.cluster();
        for (i, meta) in chunks.iter().enumerate() {
            report.chunks += 1;
            let mut live = 0;
            let mut dead = Vec::new();
            for r in c.replicas(meta.id, 0) {
                let node = r.node.id;
                let addr = r.node.addr;
                match r.state {
                    ReplicaState::Corrupt => {
                        let why = c.corrupt_reason(meta.id, node).unwrap_or("corrupt");
                        report.corrupt_replicas += 1;
                        f.health = f.health.max(Health::Corrupt);
                        f.problems.push(format!(
                            "chunk {i} ({}): replica on {node} ({addr}) is CORRUPT: {why}",
                            meta.id
                        ));
                    }
                    ReplicaState::Live => live += 1,
                    ReplicaState::Dead => dead.push(format!("{node} ({addr})")),
                }
            }
            if live == 0 {
                report.missing_chunks += 1;
                f.health = f.health.max(Health::Missing);
                let holders = if dead.is_empty() {
                    String::new()
                } else {
                    format!("; dead holders: {}", dead.join(", "))
                };
                f.problems.push(format!(
                    "chunk {i} ({}): MISSING, no live good replica{holders}",
                    meta.id
                ));
            } else if live < inode.replication as usize {
                report.under_replicated_chunks += 1;
                f.health = f.health.max(Health::UnderReplicated);
                f.problems.push(format!(
                    "chunk {i} ({}): UNDER_REPLICATED, {live} of {} replicas live",
                    meta.id, inode.replication
                ));
            }
        }
        parking_lot::MutexGuard::unlock_fair(c);
        report.health = report.health.max(f.health);
        if page.contains(&n) {
            report.files.push(f);
        }
    }
    Ok(report)
}
