//! The task executor: map tasks run here, next to the chunk they read, on a
//! bounded pool so that tasks never starve reads and writes of CPU.

use crate::jobs::internal;
use crate::node::Node;
use bytes::Bytes;
use quern_compute::ops::{Operator, Task};
use quern_compute::train::{HeldParams, ScoreOp};
use quern_proto::chunk::fetch_chunk;
use quern_proto::msg::*;
use quern_proto::{Access, ChunkToken, Digest, ErrorCode, Principal, WireError};
use std::io::Read;
use std::sync::Arc;

/// Runs one map task and returns its encoded partial result.
pub(crate) async fn run_task(
    node: &Arc<Node>,
    caller: &Principal,
    req: RunTask,
) -> Result<TaskOutput, WireError> {
    let mut timer = TaskTimer {
        node,
        op: "unknown",
        ok: false,
        started: std::time::Instant::now(),
    };
    let _slot = node
        .task_slots
        .acquire()
        .await
        .map_err(|_| WireError::new(ErrorCode::Internal, "task pool closed"))?;
    let meta = req.chunk;
    node.authorize(req.token.as_ref(), meta.id, &[Access::TASK])?;
    let (bytes, local_bytes, fetched_bytes) = if node.store.get(meta.id).is_some() {
        let bytes = read_local(node, meta).await?;
        let n = bytes.len() as u64;
        (bytes, n, 0)
    } else if !req.sources.is_empty() {
        let bytes = fetch_remote(node, meta, &req.sources, req.token.as_ref()).await?;
        let n = bytes.len() as u64;
        (bytes, 0, n)
    } else {
        return Err(WireError::new(
            ErrorCode::NotFound,
            format!(
                "{}: holds no replica of {} and was given no source to fetch it from",
                node.describe(),
                meta.id
            ),
        ));
    };
    let mut task: Task = quern_compute::ops::decode(&req.task)
        .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("map task: {e}")))?;
    timer.op = task.op.name();
    if let Operator::Score(ScoreOp {
        held: Some(held),
        params,
        ..
    }) = &mut task.op
    {
        *params = held_params(node, caller, held).await?;
    }
    let chunk = meta.id;
    let partial = tokio::task::spawn_blocking(move || quern_compute::ops::run(&task, &bytes))
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("task panicked: {e}")))?
        .map_err(|e| {
            WireError::new(
                ErrorCode::InvalidArgument,
                format!("{}: task on {chunk} failed: {e}", node.describe()),
            )
        })?;
    timer.ok = true;
    Ok(TaskOutput {
        partial,
        local_bytes,
        fetched_bytes,
    })
}

/// Counts a task and its time however it ends (every `?` included).
struct TaskTimer<'a> {
    node: &'a Node,
    op: &'static str,
    ok: bool,
    started: std::time::Instant,
}

impl Drop for TaskTimer<'_> {
    fn drop(&mut self) {
        self.node
            .metrics
            .task(self.op, self.ok, self.started.elapsed());
    }
}

/// The parameters a training job's worker holds here, for a score task
/// of the job's own coordinator.
async fn held_params(
    node: &Arc<Node>,
    caller: &Principal,
    held: &HeldParams,
) -> Result<Vec<f32>, WireError> {
    let busy = node.jobs.acquire(&node.describe(), held.job, caller)?;
    let commit = held.commit.clone();
    let describe = node.describe();
    tokio::task::spawn_blocking(move || {
        let mut w = busy.0.worker.lock().map_err(internal)?;
        w.held_params(commit.as_ref())
            .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("{describe}: {e}")))
    })
    .await
    .map_err(internal)?
}

/// Reads a whole local replica and checks it against the digest the
/// namenode knows; a bad replica is reported so it gets replaced.
pub(crate) async fn read_local(node: &Arc<Node>, meta: ChunkMeta) -> Result<Bytes, WireError> {
    let store = node.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        let (mut file, info) = store.open_chunk(meta.id)?;
        let mut buf = Vec::with_capacity(info.size as usize);
        file.read_to_end(&mut buf)
            .map_err(|e| crate::store::StoreError::io("reading", &store.data_path(meta.id), e))?;
        let digest = Digest::of(&buf);
        Ok::<_, crate::store::StoreError>((Bytes::from(buf), digest))
    })
    .await
    .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
    let (bytes, digest) = read.map_err(|e| node.store_error(&e))?;
    if digest != meta.digest || bytes.len() as u64 != meta.size {
        let reason = format!(
            "digest mismatch found by a map task: {} bytes with digest {digest}, expected {} bytes with {}",
            bytes.len(),
            meta.size,
            meta.digest
        );
        tracing::warn!(chunk = %meta.id, "local replica fails its digest check; reporting it");
        let report = ReportBadReplica {
            chunk: meta.id,
            node: node.id,
            reason: reason.clone(),
            token: None,
        };
        let _ = node.endpoint.call(node.namenode(), report).await;
        return Err(WireError::new(
            ErrorCode::ChecksumMismatch,
            format!("{}: {} {reason}", node.describe(), meta.id),
        ));
    }
    Ok(bytes)
}

/// A remote task: pull the chunk from the sources with the same hedged,
/// digest-checked read a client uses.
/// The caller's task token (which also grants reading) goes to the source.
pub(crate) async fn fetch_remote(
    node: &Arc<Node>,
    meta: ChunkMeta,
    sources: &[NodeAddr],
    token: Option<&ChunkToken>,
) -> Result<Bytes, WireError> {
    let ep = &node.endpoint;
    let (fetched, failures) = fetch_chunk(ep, sources, &meta, token, ep.hedge()).await;
    if let Some(f) = fetched {
        return Ok(f.bytes);
    }
    let tried: Vec<String> = failures
        .iter()
        .map(|f| format!("{}: {}", f.node.addr, f.error))
        .collect();
    Err(WireError::new(
        ErrorCode::Io,
        format!(
            "{}: could not fetch {} for a remote task: {}",
            node.describe(),
            meta.id,
            tried.join("; ")
        ),
    ))
}
