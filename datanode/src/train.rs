//! Training jobs on a datanode: the job's records stay decoded in memory
//! between steps. Under exact SGD the node also holds the parameters: each
//! step it adds its gradient sum with the other workers' around a ring of
//! datanodes and applies the optimizer itself; under `--sync K` and the
//! local plan, parameters come with each round and go back after it.
//!
//! A job lives under a lease. Every TrainOpen, TrainStep and TrainRenew of
//! its coordinator renews it, and a job with a request in progress is never
//! freed (so a step longer than the lease is safe). A job that has had
//! neither for a whole lease belongs to a coordinator that died or lost its
//! way here: the sweeper frees it, without waiting for another job to come.
//! Jobs are admitted against a memory budget, charged with the bytes their
//! decoded records take.

use crate::jobs::{internal, owned, Job, RingIn};
use crate::node::Node;
use crate::shared_ring::{Inbound, Outbound};
use crate::tasks::{fetch_remote, read_local};
use quern_compute::nn::BatchSync;
use quern_compute::ops;
use quern_compute::ring;
use quern_compute::train::{
    f32s_from_le, f32s_to_le, f64s_from_le, f64s_to_le, Commit, StepRequest, Worker, WorkerSpec,
};
use quern_proto::msg::*;
use quern_proto::transport::ServerStream;
use quern_proto::{Access, ErrorCode, Principal, WireError};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(crate) async fn open(
    node: &Arc<Node>,
    caller: &Principal,
    req: TrainOpen,
) -> Result<TrainOpened, WireError> {
    if req.sources.len() != req.chunks.len() || req.tokens.len() != req.chunks.len() {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            "TrainOpen: one source list and one token per chunk",
        ));
    }
    for (meta, token) in req.chunks.iter().zip(&req.tokens) {
        node.authorize(token.as_ref(), meta.id, &[Access::TASK])?;
    }
    let spec: WorkerSpec = ops::decode(&req.spec).map_err(|e| {
        WireError::new(
            ErrorCode::InvalidArgument,
            format!("training job spec: {e}"),
        )
    })?;
    let chunk_bytes: u64 = req.chunks.iter().map(|c| c.size).sum();
    let need = Worker::decoded_bytes(&spec.layout, chunk_bytes);
    let adding = chunk_bytes / spec.layout.record_size().max(1) as u64;
    let here = node.describe();
    let busy = node.jobs.admit(&here, req.job, caller, need, || {
        Worker::new(spec).map_err(|e| {
            WireError::new(
                ErrorCode::InvalidArgument,
                format!("{here}: cannot join training job: {e}"),
            )
        })
    })?;
    let job = busy.0.clone();
    // Room for every record of this open at once, as charged.
    let mut reserve = adding;
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
        let reserve = std::mem::take(&mut reserve);
        records = tokio::task::spawn_blocking(move || {
            let mut w = job.worker.lock().map_err(internal)?;
            w.reserve(reserve);
            let n = w.add_chunk(&bytes).map_err(|e| {
                WireError::new(ErrorCode::InvalidArgument, format!("decoding records: {e}"))
            })?;
            job.bytes.fetch_max(w.memory_bytes(), Ordering::SeqCst);
            Ok::<_, WireError>(n)
        })
        .await
        .map_err(internal)??;
    }
    drop(busy);
    Ok(TrainOpened {
        records,
        local_bytes,
        fetched_bytes,
        lease_ms: u64::try_from(node.jobs.lease().as_millis()).unwrap_or(u64::MAX),
    })
}

/// One round: parameters (or a seed) arrive as raw bytes after the frame;
/// the result goes back as a frame followed by the raw gradient or
/// parameters (nothing, when the ring summed the gradient here).
pub(crate) async fn step(
    node: &Arc<Node>,
    req: TrainStep,
    stream: &mut ServerStream,
) -> Result<(), quern_proto::Error> {
    let started = std::time::Instant::now();
    let (job, params_len) = (req.job, req.params_len);
    let outcome = run_step(node, req, stream).await;
    match outcome {
        Ok((out, values, ring_bytes)) => {
            node.metrics.step(
                job,
                started.elapsed(),
                params_len,
                values.len() as u64,
                ring_bytes,
            );
            stream.reply_header(&Ok(TrainStepMsg::Done(out))).await?;
            stream.send_piece(values).await?;
            stream.finish();
            Ok(())
        }
        Err(e) => stream.reply::<TrainStepMsg>(&Err(e)).await,
    }
}

async fn run_step(
    node: &Arc<Node>,
    req: TrainStep,
    stream: &mut ServerStream,
) -> Result<(TrainStepOutput, bytes::Bytes, u64), WireError> {
    let raw = stream.recv_body(req.params_len).await.map_err(|e| {
        WireError::new(
            ErrorCode::Protocol,
            format!("training step parameters: {e}"),
        )
    })?;
    let caller = stream.caller.clone();
    // Held until the step's computation ends, not while the reply is sent:
    // a coordinator that died mid-step must not keep the job from expiring.
    let busy = node.jobs.acquire(&node.describe(), req.job, &caller)?;
    let job = busy.0.clone();
    let mut request: StepRequest = ops::decode(&req.request)
        .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("training step: {e}")))?;
    let iteration = request.steps.first().map_or(0, |s| s.iteration);
    // The totals of an exchange come back once the slowest worker of the
    // step reaches the same point: wait as long as the job lives unrenewed,
    // not a piece's idle time (the coordinator resets the stream if it
    // gives up first).
    let wait = node.jobs.lease();
    let (ring, buckets_out) = match &req.ring {
        Some(r) if request.hold.is_none() => {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "training step of round {}: a ring step must hold the parameters",
                    r.round
                ),
            ))
        }
        Some(r) if r.peers.len() > 1 => {
            // The ring starts now and sums each bucket of the gradient as
            // soon as the backward pass hands it over.
            let buckets = job.worker.lock().map_err(internal)?.buckets().to_vec();
            let (tx, parts) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::spawn(all_reduce(
                node.clone(),
                job.clone(),
                req.job,
                r.clone(),
                job.ring_stream(r.round),
                buckets,
                parts,
                wait,
            ));
            (Some((r.round, RingTask(task))), Some(tx))
        }
        _ => (None, None),
    };
    let describe = node.describe();
    let (link, mut coordinator) = if request.exchange {
        let (link, side) = StreamSync::new();
        (Some(link), Some(side))
    } else {
        (None, None)
    };
    let held = job.clone();
    let mut task = tokio::task::spawn_blocking(move || {
        request.params = f32s_from_le(&raw)
            .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("parameters: {e}")))?;
        let pool = job.pool(request.host_workers);
        let mut w = job.worker.lock().map_err(internal)?;
        let sync = link.as_ref().map(|l| l as &dyn BatchSync);
        let mut send = |b: usize, values: &[f32]| {
            if let Some(tx) = &buckets_out {
                // A ring that stopped has said why; its error is reported.
                let _ = tx.send((b, quern_compute::nn::copied(values)));
            }
        };
        let worker: &mut Worker = &mut w;
        let run = move || worker.step_streamed(request, sync, &mut send);
        let r = match pool {
            Some(p) => p.install(run),
            None => run(),
        };
        let r = r.map_err(|e| {
            WireError::new(
                ErrorCode::InvalidArgument,
                format!("{describe}: training step failed: {e}"),
            )
        })?;
        // The batch buffers, a --sync K optimizer and the ring's shared
        // region come at the first steps: charge what the worker really
        // holds.
        let region = job.ring_out.lock().map_or(0, |o| o.charged);
        job.bytes
            .fetch_max(w.memory_bytes() + region, Ordering::SeqCst);
        drop(w);
        drop(busy);
        Ok::<_, WireError>(r)
    });
    // While the step computes, its BatchNormalization sums go to the
    // coordinator and the whole batch's come back.
    let mut r = loop {
        tokio::select! {
            done = &mut task => break done.map_err(internal)??,
            Some(sums) = next_ask(&mut coordinator) => {
                let Some(side) = &coordinator else { continue };
                match exchange(stream, &sums, wait).await {
                    Ok(total) => {
                        let _ = side.answers.send(total);
                    }
                    Err(e) => {
                        side.fail(e.to_string());
                        // Dropping the channels lets the computation see
                        // the exchange fail and end.
                        coordinator = None;
                    }
                }
            }
        }
    };
    if req.ring.is_some() {
        let mut total = std::mem::take(&mut r.values);
        if let Some((round, mut task)) = ring {
            // A coordinator that gave up on the step stops its stream: the
            // ring stops waiting for the other workers then.
            let stopped = stream.stopped();
            let (sums, sent) = tokio::select! {
                done = &mut task.0 => done.map_err(internal)??,
                () = stopped => return Err(WireError::new(
                    ErrorCode::Protocol,
                    format!("{}: the coordinator gave up on round {round}", node.describe()),
                )),
            };
            // The step's own gradient, sent round already, takes the sums:
            // no second gradient-sized buffer to zero each step.
            for (range, values) in sums {
                total
                    .get_mut(range.clone())
                    .ok_or_else(|| internal(format!("ring bucket {range:?} past the gradient")))?
                    .copy_from_slice(&values);
                quern_compute::nn::recycle(values);
            }
            r.ring_bytes = sent.bytes;
            r.ring_shared_bytes = sent.shared;
        }
        let describe = node.describe();
        let mut w = held.worker.lock().map_err(internal)?;
        w.hold_total(iteration, total)
            .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("{describe}: {e}")))?;
    }
    let sums = std::mem::take(&mut r.values);
    let values = bytes::Bytes::from(f32s_to_le(&sums));
    quern_compute::nn::recycle(sums);
    let result = ops::encode(&r).map_err(internal)?;
    Ok((
        TrainStepOutput {
            result,
            values_len: values.len() as u64,
        },
        values,
        r.ring_bytes,
    ))
}

/// The ring task of one step; stopped when the step ends early.
struct RingTask(tokio::task::JoinHandle<Result<(RingSums, RingSent), WireError>>);

/// The ring's totals, bucket by bucket: each bucket's range of the
/// gradient and its values.
type RingSums = Vec<(std::ops::Range<usize>, Vec<f32>)>;

impl Drop for RingTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This worker's turns of the ring, bucket by bucket as the backward pass
/// hands them over: sends partial sums to the next worker, adds (then
/// copies) what the previous one sends. Pieces go through shared memory
/// where the neighbour shares this host ([`crate::shared_ring`]). Returns
/// the totals bucket by bucket and the bytes sent (what it receives,
/// another worker counts as sent).
#[allow(clippy::too_many_arguments)]
async fn all_reduce(
    node: Arc<Node>,
    held: Arc<Job>,
    job: u64,
    ring: Ring,
    inbox: tokio::sync::oneshot::Receiver<RingIn>,
    buckets: Vec<std::ops::Range<usize>>,
    mut parts: tokio::sync::mpsc::UnboundedReceiver<(usize, Vec<f32>)>,
    wait: std::time::Duration,
) -> Result<(RingSums, RingSent), WireError> {
    let n = ring.peers.len();
    let pos = ring.position as usize;
    if pos >= n {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!("ring position {pos} of {n} workers"),
        ));
    }
    let (next, prev) = (ring.peers[(pos + 1) % n], ring.peers[(pos + n - 1) % n]);
    let here = node.describe();
    let lost = |peer: NodeAddr, e: &dyn std::fmt::Display| {
        WireError::new(
            ErrorCode::Peer,
            format!(
                "{here}: ring peer {} (datanode {}) failed in round {}: {e}",
                peer.addr, peer.id, ring.round
            ),
        )
    };
    let mut region = outbound(&node, &held, next.id, sent_per_round(&buckets, pos, n));
    let request = TrainRing {
        job,
        round: ring.round,
        from: ring.position,
        shared: region.as_ref().map(|r| r.offer().clone()),
    };
    let mut out = node
        .endpoint
        .request_within(next, request, wait)
        .await
        .map_err(|e| lost(next, &e))?;
    let RingIn {
        stream: mut inc,
        shared: inbound,
    } = match tokio::time::timeout(wait, inbox).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Err(lost(prev, &"its stream was replaced")),
        Err(_) => return Err(lost(prev, &format!("sent nothing within {wait:?}"))),
    };
    // Answered before waiting for the next worker's answer: every worker
    // asks first, so no one waits on a worker that waits on it.
    let joined = RingJoined {
        shared: inbound.is_some(),
    };
    inc.reply_header(&Ok(joined))
        .await
        .map_err(|e| lost(prev, &e))?;
    let joined: RingJoined = out.reply().await.map_err(|e| lost(next, &e))?;
    if let Some(r) = &region {
        let mut kept = held.ring_out.lock().map_err(internal)?;
        if joined.shared {
            kept.charged = r.offer().len;
        } else {
            // Neither kept nor charged for a neighbour that cannot read it.
            kept.declined_by = Some(next.id);
            region = None;
        }
    }
    let mut via_memory = region.as_mut();
    let mut sums = Vec::with_capacity(buckets.len());
    let mut sent = RingSent::default();
    // Offsets in the regions: this worker's writes, and the previous
    // worker's as this one reads them, in the same order.
    let (mut write_at, mut read_at) = (0u64, 0u64);
    for (b, range) in buckets.iter().enumerate() {
        let Some((got, mut values)) = parts.recv().await else {
            // The computation failed; the step reports why.
            return Err(WireError::new(
                ErrorCode::Internal,
                format!("{here}: the step ended before bucket {b} of its gradient"),
            ));
        };
        if got != b || values.len() != range.len() {
            return Err(internal(format!(
                "bucket {got} of {} values where bucket {b} of {} was due",
                values.len(),
                range.len()
            )));
        }
        let segs = ring::segments(values.len(), n);
        for turn in ring::turns(pos, n) {
            let outgoing = &values[segs[turn.send].clone()];
            let len = outgoing.len() as u64 * 4;
            let piece = match via_memory.as_deref_mut() {
                Some(region) => {
                    region.write(write_at, outgoing).map_err(internal)?;
                    sent.shared += len;
                    bytes::Bytes::copy_from_slice(&write_at.to_le_bytes())
                }
                None => bytes::Bytes::from(f32s_to_le(outgoing)),
            };
            write_at += len;
            sent.bytes += len;
            let incoming = segs[turn.recv].clone();
            let want = match inbound {
                Some(_) => 8,
                None => incoming.len() as u64 * 4,
            };
            let (done, arrived) = tokio::join!(
                out.send_piece_waiting(piece, wait),
                inc.recv_body_waiting(want, wait)
            );
            done.map_err(|e| lost(next, &e))?;
            let arrived = arrived.map_err(|e| lost(prev, &e))?;
            let mine = &mut values[incoming];
            let src = match &inbound {
                Some(region) => {
                    let at = <[u8; 8]>::try_from(&arrived[..])
                        .map(u64::from_le_bytes)
                        .map_err(|_| lost(prev, &"a shared piece's offset is not 8 bytes"))?;
                    if at != read_at {
                        return Err(lost(
                            prev,
                            &format!("a shared piece at offset {at} where {read_at} was due"),
                        ));
                    }
                    region.piece(at, mine.len()).map_err(|e| lost(prev, &e))?
                }
                None => &arrived[..],
            };
            ring::take_arrived(mine, src, turn.add);
            read_at += mine.len() as u64 * 4;
        }
        sums.push((range.clone(), values));
    }
    out.finish().map_err(|e| lost(next, &e))?;
    // Everything the previous worker wrote has been read: it may reuse
    // its region from the next step on.
    let _ = inc.send_piece(bytes::Bytes::from_static(&[1])).await;
    inc.finish();
    out.recv_body_waiting(1, wait)
        .await
        .map_err(|e| lost(next, &e))?;
    if region.is_some() {
        held.ring_out.lock().map_err(internal)?.region = region;
    }
    Ok((sums, sent))
}

/// Bytes a ring worker sends in one step.
#[derive(Debug, Default, Clone, Copy)]
struct RingSent {
    bytes: u64,
    /// Of which written to shared memory for the next worker to read.
    shared: u64,
}

/// Bytes worker `pos` of `n` sends in one step: the segments of its
/// turns, bucket by bucket.
fn sent_per_round(buckets: &[std::ops::Range<usize>], pos: usize, n: usize) -> u64 {
    buckets
        .iter()
        .map(|b| {
            let segs = ring::segments(b.len(), n);
            ring::turns(pos, n)
                .iter()
                .map(|t| segs[t.send].len() as u64 * 4)
                .sum::<u64>()
        })
        .sum()
}

/// The job's region for `len` bytes of pieces to `next`: the one of the
/// last step, or a new one; none where shared memory is turned off or
/// cannot be had, or `next` declined it.
fn outbound(node: &Node, job: &Job, next: quern_proto::NodeId, len: u64) -> Option<Outbound> {
    if !node.cfg.ring_shared_memory {
        return None;
    }
    let kept = {
        let mut out = job.ring_out.lock().ok()?;
        if out.declined_by == Some(next) {
            return None;
        }
        out.region.take()
    };
    if let Some(region) = kept.filter(|r| r.offer().len == len) {
        return Some(region);
    }
    match Outbound::create(len) {
        Ok(region) => Some(region),
        Err(e) => {
            tracing::debug!("ring pieces through the connection: no shared memory: {e}");
            None
        }
    }
}

/// The previous worker's region as `offer` names it, mapped once per
/// offer; none when it cannot be (another host, another user).
fn inbound(node: &Node, job: &Job, from: u32, offer: &SharedRing) -> Option<Arc<Inbound>> {
    let mut last = job.inbound.lock().ok()?;
    if let Some((o, mapped)) = last.as_ref() {
        if o == offer {
            return mapped.clone();
        }
    }
    let mapped = match Inbound::attach(offer) {
        Ok(region) => {
            tracing::info!(
                "{}: ring pieces from worker {from} through shared memory",
                node.describe()
            );
            Some(Arc::new(region))
        }
        Err(e) => {
            tracing::info!(
                "{}: ring pieces from worker {from} through the connection: {e}",
                node.describe()
            );
            None
        }
    };
    *last = Some((offer.clone(), mapped.clone()));
    mapped
}

/// A ring stream from the previous worker: handed to this node's step of
/// the same round, which answers and reads it.
pub(crate) async fn ring_in(node: &Arc<Node>, req: TrainRing, mut stream: ServerStream) {
    if !matches!(stream.caller.role, quern_proto::Role::Datanode(_)) {
        let e = WireError::new(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied by {}: only datanodes send ring sums, not {}",
                node.describe(),
                stream.caller
            ),
        );
        let _ = stream.reply::<RingJoined>(&Err(e)).await;
        return;
    }
    let job = match node.jobs.find(&node.describe(), req.job) {
        Ok(j) => j,
        Err(e) => {
            let _ = stream.reply::<RingJoined>(&Err(e)).await;
            return;
        }
    };
    let shared = match &req.shared {
        Some(offer) if node.cfg.ring_shared_memory => inbound(node, &job, req.from, offer),
        _ => None,
    };
    if let Some(mut taken) = job.deliver(req.round, RingIn { stream, shared }) {
        let e = WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "{}: round {} of job {:016x} already has its ring stream (from worker {})",
                node.describe(),
                req.round,
                req.job,
                req.from
            ),
        );
        let _ = taken.stream.reply::<RingJoined>(&Err(e)).await;
    }
}

/// The parameters and optimizer state this worker holds, after a commit.
pub(crate) async fn state(node: &Arc<Node>, req: TrainState, stream: &mut ServerStream) {
    let got = held_state(node, &stream.caller.clone(), req).await;
    match got {
        Ok((header, values)) => {
            if stream.reply_header(&Ok(header)).await.is_ok()
                && stream.send_piece(values).await.is_ok()
            {
                stream.finish();
            }
        }
        Err(e) => {
            let _ = stream.reply::<TrainStateHeader>(&Err(e)).await;
        }
    }
}

async fn held_state(
    node: &Arc<Node>,
    caller: &Principal,
    req: TrainState,
) -> Result<(TrainStateHeader, bytes::Bytes), WireError> {
    let busy = node.jobs.acquire(&node.describe(), req.job, caller)?;
    let commit: Option<Commit> =
        if req.commit.is_empty() {
            None
        } else {
            Some(ops::decode(&req.commit).map_err(|e| {
                WireError::new(ErrorCode::InvalidArgument, format!("step commit: {e}"))
            })?)
        };
    let describe = node.describe();
    tokio::task::spawn_blocking(move || {
        let mut w = busy.0.worker.lock().map_err(internal)?;
        let (head, values) = w
            .held_state(commit.as_ref())
            .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("{describe}: {e}")))?;
        drop(w);
        let values = bytes::Bytes::from(f32s_to_le(&values));
        Ok((
            TrainStateHeader {
                head: ops::encode(&head).map_err(internal)?,
                values_len: values.len() as u64,
            },
            values,
        ))
    })
    .await
    .map_err(internal)?
}

async fn next_ask(side: &mut Option<CoordinatorSide>) -> Option<Vec<f64>> {
    match side {
        Some(s) => s.asks.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends this node's sums on the step's stream and reads back the sums
/// over every worker of the step.
async fn exchange(
    stream: &mut ServerStream,
    sums: &[f64],
    wait: std::time::Duration,
) -> Result<Vec<f64>, quern_proto::Error> {
    let values = sums.len() as u64;
    stream
        .reply_header(&Ok(TrainStepMsg::Sums { values }))
        .await?;
    stream
        .send_piece(bytes::Bytes::from(f64s_to_le(sums)))
        .await?;
    let raw = stream.recv_body_waiting(values * 8, wait).await?;
    let total = f64s_from_le(&raw).map_err(quern_proto::Error::Malformed)?;
    Ok(total)
}

/// The computation's side of the exchange: a blocking thread hands its
/// sums to the async side, which talks to the coordinator.
struct StreamSync {
    ask: tokio::sync::mpsc::UnboundedSender<Vec<f64>>,
    answer: std::sync::Mutex<std::sync::mpsc::Receiver<Vec<f64>>>,
    failure: Failure,
}

/// The async side: the computation's sums to send, the totals to hand back.
struct CoordinatorSide {
    asks: tokio::sync::mpsc::UnboundedReceiver<Vec<f64>>,
    answers: std::sync::mpsc::Sender<Vec<f64>>,
    failure: Failure,
}

/// Why the exchange failed, once it has; either side may say first.
type Failure = Arc<std::sync::Mutex<Option<String>>>;

fn fail(failure: &Failure, why: String) {
    failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert(why);
}

impl CoordinatorSide {
    fn fail(&self, why: String) {
        fail(&self.failure, why);
    }
}

impl StreamSync {
    fn new() -> (StreamSync, CoordinatorSide) {
        let (ask, asks) = tokio::sync::mpsc::unbounded_channel();
        let (answers, answer) = std::sync::mpsc::channel();
        let failure = Failure::default();
        let link = StreamSync {
            ask,
            answer: std::sync::Mutex::new(answer),
            failure: failure.clone(),
        };
        (
            link,
            CoordinatorSide {
                asks,
                answers,
                failure,
            },
        )
    }
}

impl BatchSync for StreamSync {
    fn all_reduce(&self, sums: &mut [f64]) {
        if self.failure().is_some() {
            return;
        }
        let total = self
            .ask
            .send(sums.to_vec())
            .ok()
            .and_then(|()| self.answer.lock().ok()?.recv().ok());
        match total {
            Some(t) if t.len() == sums.len() => sums.copy_from_slice(&t),
            Some(t) => fail(
                &self.failure,
                format!(
                    "the coordinator answered {} sums for {}",
                    t.len(),
                    sums.len()
                ),
            ),
            None => fail(&self.failure, "the coordinator's stream closed".into()),
        }
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub(crate) fn close(node: &Node, caller: &Principal, req: TrainClose) -> Result<(), WireError> {
    let mut jobs = node.jobs.jobs.lock().map_err(internal)?;
    if let Some(job) = jobs.get(&req.job) {
        owned(&node.describe(), job.clone(), caller)?;
        jobs.remove(&req.job);
        node.metrics.job_freed(req.job);
    }
    Ok(())
}

pub(crate) fn renew(node: &Node, caller: &Principal, req: TrainRenew) -> TrainRenewed {
    TrainRenewed {
        unknown: node.jobs.renew(&req.jobs, caller),
    }
}
