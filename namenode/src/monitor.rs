//! Background duties (lease expiry, dead datanodes, re-replication) and the
//! health check that reports on them.

use crate::state::State;
use quern_proto::msg::{DatanodeCommand, Fsck, FsckFile, FsckReport, Health, LIST_PAGE};
use quern_proto::{NodeId, RemotePath, WireError};
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
        state.cluster().note_transitions();
        if last_replication.elapsed() >= state.cfg.replication_interval {
            last_replication = Instant::now();
            if state.safe_mode().is_none() {
                schedule_replication(&state);
            }
        }
    }
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

/// Brings every chunk back to its target: copies from a good replica when
/// too few live ones exist (a corrupt holder may take the fresh copy), drops
/// extras, and deletes corrupt replicas once enough good ones exist.
fn schedule_replication(state: &State) {
    let mut c = state.cluster();
    let mut inflight = state.replicating.lock().unwrap_or_else(|p| p.into_inner());
    let patience = state.cfg.replication_interval * 4 + Duration::from_secs(10);
    inflight.retain(|_, since| since.elapsed() < patience);
    let ids: Vec<_> = c
        .chunks
        .iter()
        .filter(|(_, e)| e.size.is_some())
        .map(|(id, _)| *id)
        .collect();
    for id in ids {
        let Some(entry) = c.chunks.get(&id) else {
            continue;
        };
        let good: Vec<NodeId> = entry
            .replicas
            .iter()
            .filter(|n| !entry.corrupt.contains_key(n) && c.is_live(**n))
            .copied()
            .collect();
        let target = entry.target as usize;
        let corrupt: Vec<NodeId> = entry.corrupt.keys().copied().collect();
        let (Some(size), Some(digest)) = (entry.size, entry.digest) else {
            continue;
        };
        if good.is_empty() {
            continue;
        }
        if good.len() < target {
            if inflight.contains_key(&id) {
                continue;
            }
            let exclude: Vec<NodeId> = entry
                .replicas
                .iter()
                .filter(|n| !entry.corrupt.contains_key(n))
                .copied()
                .collect();
            let targets = c.choose_targets(target - good.len(), &exclude, size);
            if targets.is_empty() {
                continue;
            }
            let source = good[id.0 as usize % good.len()];
            tracing::info!(chunk = %id, %source, targets = targets.len(), "re-replicating");
            c.queue(
                source,
                DatanodeCommand::Replicate {
                    chunk: quern_proto::msg::ChunkMeta { id, size, digest },
                    targets,
                    token: state
                        .tokens
                        .sign(id, quern_proto::Access::REPLICATE, "namenode"),
                },
            );
            inflight.insert(id, Instant::now());
        } else {
            let mut drop: Vec<NodeId> = corrupt;
            if good.len() > target {
                let mut extra = good.clone();
                extra.sort_by_key(|n| {
                    std::cmp::Reverse(c.nodes.get(n).map(|e| e.used).unwrap_or(0))
                });
                drop.extend(extra.into_iter().take(good.len() - target));
            }
            for node in drop {
                if let Some(e) = c.chunks.get_mut(&id) {
                    e.replicas.remove(&node);
                    e.corrupt.remove(&node);
                }
                c.queue(node, DatanodeCommand::Delete(vec![id]));
            }
        }
    }
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
            .position(|(p, _)| p.to_string() == *after)
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
    let c = state.cluster();
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
        live_datanodes: c.live_count() as u32,
        safe_mode,
    };
    for (n, (fpath, inode)) in files.into_iter().enumerate() {
        let mut f = FsckFile {
            path: fpath.to_string(),
            health: Health::Healthy,
            size: inode.size,
            chunks: inode.chunks.len() as u32,
            replication: inode.replication,
            problems: Vec::new(),
        };
        for (i, meta) in inode.chunks.iter().enumerate() {
            report.chunks += 1;
            let entry = c.chunks.get(&meta.id);
            let mut live = 0;
            let mut dead = Vec::new();
            if let Some(e) = entry {
                for node in &e.replicas {
                    let addr = c
                        .addr(*node)
                        .map(|a| a.addr.to_string())
                        .unwrap_or_else(|| "unknown address".into());
                    if let Some(why) = e.corrupt.get(node) {
                        report.corrupt_replicas += 1;
                        f.health = f.health.max(Health::Corrupt);
                        f.problems.push(format!(
                            "chunk {i} ({}): replica on {node} ({addr}) is CORRUPT: {why}",
                            meta.id
                        ));
                    } else if c.is_live(*node) {
                        live += 1;
                    } else {
                        dead.push(format!("{node} ({addr})"));
                    }
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
        report.health = report.health.max(f.health);
        if page.contains(&n) {
            report.files.push(f);
        }
    }
    Ok(report)
}
