//! Training jobs on a datanode: the job's records stay decoded in memory
//! between steps; each step receives parameters and returns gradient sums.

use crate::node::Node;
use crate::tasks::{fetch_remote, read_local};
use quern_compute::ops;
use quern_compute::train::{f32s_from_le, f32s_to_le, StepRequest, Worker, WorkerSpec};
use quern_proto::msg::*;
use quern_proto::transport::ServerStream;
use quern_proto::{Access, ErrorCode, Principal, WireError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A job nobody stepped for this long is dropped (its coordinator died).
const IDLE_LIMIT: Duration = Duration::from_secs(1800);

pub(crate) struct Job {
    /// Who opened it: only they may step or close it.
    owner: Principal,
    worker: Mutex<Worker>,
    last_used: Mutex<Instant>,
}

#[derive(Default)]
pub(crate) struct Jobs {
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
}

impl Jobs {
    fn get(&self, id: u64) -> Option<Arc<Job>> {
        let jobs = self.jobs.lock().ok()?;
        let job = jobs.get(&id).cloned();
        if let Some(j) = &job {
            if let Ok(mut t) = j.last_used.lock() {
                *t = Instant::now();
            }
        }
        job
    }

    fn sweep(&self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.retain(|id, j| {
                let idle = j.last_used.lock().map(|t| t.elapsed()).unwrap_or_default();
                if idle > IDLE_LIMIT {
                    tracing::info!(job = id, "dropping an idle training job");
                }
                idle <= IDLE_LIMIT
            });
        }
    }
}

fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Internal, e.to_string())
}

fn owned(node: &Node, job: Arc<Job>, caller: &Principal) -> Result<Arc<Job>, WireError> {
    if job.owner.role != caller.role {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied by {}: the training job belongs to {}, not {}",
                node.describe(),
                job.owner,
                caller
            ),
        ));
    }
    Ok(job)
}

pub(crate) async fn open(
    node: &Arc<Node>,
    caller: &Principal,
    req: TrainOpen,
) -> Result<TrainOpened, WireError> {
    node.jobs.sweep();
    if req.sources.len() != req.chunks.len() || req.tokens.len() != req.chunks.len() {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            "TrainOpen: one source list and one token per chunk",
        ));
    }
    for (meta, token) in req.chunks.iter().zip(&req.tokens) {
        node.authorize(token.as_ref(), meta.id, &[Access::TASK])?;
    }
    let job = match node.jobs.get(req.job) {
        Some(j) => owned(node, j, caller)?,
        None => {
            let spec: WorkerSpec = ops::decode(&req.spec).map_err(|e| {
                WireError::new(
                    ErrorCode::InvalidArgument,
                    format!("training job spec: {e}"),
                )
            })?;
            let worker = Worker::new(spec).map_err(|e| {
                WireError::new(
                    ErrorCode::InvalidArgument,
                    format!("{}: cannot join training job: {e}", node.describe()),
                )
            })?;
            let job = Arc::new(Job {
                owner: caller.clone(),
                worker: Mutex::new(worker),
                last_used: Mutex::new(Instant::now()),
            });
            node.jobs
                .jobs
                .lock()
                .map_err(internal)?
                .entry(req.job)
                .or_insert(job)
                .clone()
        }
    };
    let (mut local_bytes, mut fetched_bytes) = (0, 0);
    let mut records = 0;
    for ((meta, sources), token) in req.chunks.iter().zip(&req.sources).zip(&req.tokens) {
        let local = if node.store.get(meta.id).is_some() {
            match read_local(node, *meta).await {
                Ok(b) => Some(b),
                // The bad replica is reported by read_local; this worker
                // keeps its share and takes the chunk from another holder.
                Err(e) if e.code == ErrorCode::ChecksumMismatch => {
                    tracing::warn!(chunk = %meta.id, "{e}; fetching it from another replica");
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let bytes = if let Some(b) = local {
            local_bytes += b.len() as u64;
            b
        } else {
            let b = fetch_remote(node, *meta, sources, token.as_ref()).await?;
            fetched_bytes += b.len() as u64;
            b
        };
        let job = job.clone();
        records = tokio::task::spawn_blocking(move || {
            let mut w = job.worker.lock().map_err(internal)?;
            w.add_chunk(&bytes).map_err(|e| {
                WireError::new(ErrorCode::InvalidArgument, format!("decoding records: {e}"))
            })
        })
        .await
        .map_err(internal)??;
    }
    Ok(TrainOpened {
        records,
        local_bytes,
        fetched_bytes,
    })
}

/// One round: parameters arrive as raw bytes after the frame; the result
/// goes back as a frame followed by the raw gradient (or parameters).
pub(crate) async fn step(
    node: &Arc<Node>,
    req: TrainStep,
    stream: &mut ServerStream,
) -> Result<(), quern_proto::Error> {
    let outcome = run_step(node, req, stream).await;
    match outcome {
        Ok((out, values)) => {
            stream.reply_header(&Ok(out)).await?;
            stream.send_piece(values).await?;
            stream.finish();
            Ok(())
        }
        Err(e) => stream.reply::<TrainStepOutput>(&Err(e)).await,
    }
}

async fn run_step(
    node: &Arc<Node>,
    req: TrainStep,
    stream: &mut ServerStream,
) -> Result<(TrainStepOutput, bytes::Bytes), WireError> {
    let raw = stream.recv_body(req.params_len).await.map_err(|e| {
        WireError::new(
            ErrorCode::Protocol,
            format!("training step parameters: {e}"),
        )
    })?;
    let caller = stream.caller.clone();
    let job = node.jobs.get(req.job).ok_or_else(|| {
        WireError::new(
            ErrorCode::NotFound,
            format!(
                "{}: no training job {:016x} (expired or never opened)",
                node.describe(),
                req.job
            ),
        )
    })?;
    let job = owned(node, job, &caller)?;
    let mut request: StepRequest = ops::decode(&req.request)
        .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("training step: {e}")))?;
    let describe = node.describe();
    tokio::task::spawn_blocking(move || {
        request.params = f32s_from_le(&raw)
            .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("parameters: {e}")))?;
        let mut w = job.worker.lock().map_err(internal)?;
        let mut r = w.step(request).map_err(|e| {
            WireError::new(
                ErrorCode::InvalidArgument,
                format!("{describe}: training step failed: {e}"),
            )
        })?;
        let values = bytes::Bytes::from(f32s_to_le(&std::mem::take(&mut r.values)));
        let result = ops::encode(&r).map_err(internal)?;
        Ok((
            TrainStepOutput {
                result,
                values_len: values.len() as u64,
            },
            values,
        ))
    })
    .await
    .map_err(internal)?
}

pub(crate) fn close(node: &Node, caller: &Principal, req: TrainClose) -> Result<(), WireError> {
    let mut jobs = node.jobs.jobs.lock().map_err(internal)?;
    if let Some(job) = jobs.get(&req.job) {
        owned(node, job.clone(), caller)?;
        jobs.remove(&req.job);
    }
    Ok(())
}
