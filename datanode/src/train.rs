//! Training jobs on a datanode: the job's records stay decoded in memory
//! between steps; each step receives parameters and returns gradient sums.
//!
//! A job lives under a lease. Every TrainOpen, TrainStep and TrainRenew of
//! its coordinator renews it, and a job with a request in progress is never
//! freed (so a step longer than the lease is safe). A job that has had
//! neither for a whole lease belongs to a coordinator that died or lost its
//! way here: the sweeper frees it, without waiting for another job to come.
//! Jobs are admitted against a memory budget, charged with the bytes their
//! decoded records take.

use crate::node::Node;
use crate::tasks::{fetch_remote, read_local};
use quern_compute::ops;
use quern_compute::train::{f32s_from_le, f32s_to_le, StepRequest, Worker, WorkerSpec};
use quern_proto::msg::*;
use quern_proto::size::format_size;
use quern_proto::transport::ServerStream;
use quern_proto::{Access, ErrorCode, Principal, WireError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The job memory budget when none is configured: a quarter of the
/// machine's memory, or 4 GiB where that cannot be learned. Decoded records
/// are f32, four times the bytes of u8 images on disk; the rest of memory
/// is left to the page cache that chunk reads come from, to map tasks, and
/// to the other datanodes of a shared host (three on one machine stay under
/// three quarters of it together).
pub fn default_job_memory() -> u64 {
    // SAFETY: sysconf only reads system configuration values.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && page > 0 {
        (pages as u64).saturating_mul(page as u64) / 4
    } else {
        4 << 30
    }
}

pub(crate) struct Job {
    /// Who opened it: only they may step, renew or close it.
    owner: Principal,
    worker: Mutex<Worker>,
    /// When the lease was last renewed.
    renewed: Mutex<Instant>,
    /// Requests of the job in progress; the job outlives its lease while
    /// any runs (the coordinator that sent it was alive then).
    busy: AtomicUsize,
    /// Bytes charged against the budget: the decoded size of the records
    /// admitted so far, raised to the worker's measured memory when that
    /// is more.
    bytes: AtomicU64,
}

impl Job {
    fn renew(&self) {
        *self.renewed.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle(&self) -> Duration {
        self.renewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

/// A request of a job in progress: holds the job alive, and renews its
/// lease once more when the request ends, however it ends.
struct Busy(Arc<Job>);

impl Busy {
    fn new(job: Arc<Job>) -> Busy {
        job.busy.fetch_add(1, Ordering::SeqCst);
        job.renew();
        Busy(job)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.renew();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) struct Jobs {
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
    lease: Duration,
    budget: u64,
}

impl Jobs {
    pub(crate) fn new(lease: Duration, budget: u64) -> Jobs {
        Jobs {
            jobs: Mutex::new(HashMap::new()),
            lease,
            budget,
        }
    }

    /// The job, owned by `caller`, marked busy. Taken under the map's lock,
    /// so that the sweeper cannot free a job between lookup and use.
    fn acquire(&self, here: &str, id: u64, caller: &Principal) -> Result<Busy, WireError> {
        let jobs = self.jobs.lock().map_err(internal)?;
        let job = jobs.get(&id).cloned().ok_or_else(|| {
            WireError::new(
                ErrorCode::NotFound,
                format!(
                    "{here}: no training job {id:016x} (its lease of {:?} expired, or it was \
                     closed or never opened)",
                    self.lease
                ),
            )
        })?;
        Ok(Busy::new(owned(here, job, caller)?))
    }

    /// Admits `need` more bytes of records for job `id` (made by `make`
    /// when new) if they fit the budget, and marks the job busy.
    fn admit(
        &self,
        here: &str,
        id: u64,
        caller: &Principal,
        need: u64,
        make: impl FnOnce() -> Result<Worker, WireError>,
    ) -> Result<Busy, WireError> {
        // Expired jobs hold no budget.
        self.sweep();
        let fresh = if self.jobs.lock().map_err(internal)?.contains_key(&id) {
            None
        } else {
            // Parsing the model is quick but needs no lock.
            Some(make()?)
        };
        let mut jobs = self.jobs.lock().map_err(internal)?;
        let held: u64 = jobs.values().map(|j| j.bytes.load(Ordering::SeqCst)).sum();
        let mine = match jobs.get(&id) {
            Some(j) => {
                owned(here, j.clone(), caller)?;
                j.bytes.load(Ordering::SeqCst)
            }
            None => 0,
        };
        if held.saturating_add(need) > self.budget {
            let others = jobs.len() - usize::from(jobs.contains_key(&id));
            return Err(WireError::new(
                ErrorCode::NoSpace,
                format!(
                    "{here}: training job {id:016x} does not fit in memory: its records here \
                     need {} ({} bytes) but the job memory budget is {} ({} bytes, \
                     --job-memory), of which {} is held by {others} other job(s); train on more \
                     datanodes or raise --job-memory",
                    format_size(mine + need),
                    mine + need,
                    format_size(self.budget),
                    self.budget,
                    format_size(held - mine),
                ),
            ));
        }
        let job = match (jobs.get(&id), fresh) {
            (Some(j), _) => j.clone(),
            (None, Some(worker)) => {
                let j = Arc::new(Job {
                    owner: caller.clone(),
                    worker: Mutex::new(worker),
                    renewed: Mutex::new(Instant::now()),
                    busy: AtomicUsize::new(0),
                    bytes: AtomicU64::new(0),
                });
                jobs.insert(id, j.clone());
                j
            }
            (None, None) => {
                return Err(WireError::new(
                    ErrorCode::NotFound,
                    format!("{here}: training job {id:016x} was closed while being opened"),
                ))
            }
        };
        job.bytes.fetch_add(need, Ordering::SeqCst);
        Ok(Busy::new(job))
    }

    /// Renews the caller's jobs among `ids`; returns those it does not hold.
    fn renew(&self, ids: &[u64], caller: &Principal) -> Vec<u64> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter()
            .copied()
            .filter(|id| match jobs.get(id) {
                Some(j) if j.owner.role == caller.role => {
                    j.renew();
                    false
                }
                _ => true,
            })
            .collect()
    }

    /// Frees jobs idle for longer than the lease.
    fn sweep(&self) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.retain(|id, j| {
            let keep = j.busy.load(Ordering::SeqCst) > 0 || j.idle() <= self.lease;
            if !keep {
                tracing::info!(
                    job = format!("{id:016x}"),
                    bytes = j.bytes.load(Ordering::SeqCst),
                    "freeing a training job whose lease of {:?} expired (its coordinator is gone)",
                    self.lease
                );
            }
            keep
        });
    }

    /// Jobs held and the bytes charged for them, for heartbeats.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = jobs.values().map(|j| j.bytes.load(Ordering::SeqCst)).sum();
        (jobs.len() as u64, bytes)
    }

    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }
}

/// Frees expired jobs in the background, a few times per lease, so that a
/// dead coordinator's records go within the lease and a quarter of it.
pub(crate) async fn sweeper(jobs: Arc<Jobs>) {
    let every = (jobs.lease / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        jobs.sweep();
    }
}

fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Internal, e.to_string())
}

fn owned(here: &str, job: Arc<Job>, caller: &Principal) -> Result<Arc<Job>, WireError> {
    if job.owner.role != caller.role {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied by {here}: the training job belongs to {}, not {}",
                job.owner, caller
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
    // Held until the step's computation ends, not while the reply is sent:
    // a coordinator that died mid-step must not keep the job from expiring.
    let busy = node.jobs.acquire(&node.describe(), req.job, &caller)?;
    let job = busy.0.clone();
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
        // The batch buffers and a --sync K optimizer grow at the first
        // steps: charge what the worker really holds.
        job.bytes.fetch_max(w.memory_bytes(), Ordering::SeqCst);
        drop(w);
        drop(busy);
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
        owned(&node.describe(), job.clone(), caller)?;
        jobs.remove(&req.job);
    }
    Ok(())
}

pub(crate) fn renew(node: &Node, caller: &Principal, req: TrainRenew) -> TrainRenewed {
    TrainRenewed {
        unknown: node.jobs.renew(&req.jobs, caller),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quern_compute::records::{DType, RecordLayout};
    use quern_compute::train::Scaler;
    use quern_proto::Role;

    const HERE: &str = "datanode 0000000000000007 (127.0.0.1:9)";

    fn worker() -> Result<Worker, WireError> {
        let model = r#"{"class_name": "Sequential", "config": {"layers": [
            {"class_name": "InputLayer", "config": {"batch_shape": [null, 4]}},
            {"class_name": "Dense", "config": {"units": 2, "activation": "softmax"}}]}}"#;
        Worker::new(WorkerSpec {
            model_json: model.into(),
            layout: RecordLayout::new(vec![4], DType::U8, DType::U8).map_err(internal)?,
            scaler: Scaler::none(),
            seed: 1,
        })
        .map_err(internal)
    }

    fn user(name: &str) -> Principal {
        Principal::new(Role::User(name.into()))
    }

    #[test]
    fn an_idle_job_expires_and_a_busy_or_renewed_one_does_not() {
        let jobs = Jobs::new(Duration::from_millis(100), 1 << 20);
        let alice = user("alice");
        let busy = jobs.admit(HERE, 1, &alice, 1000, worker).unwrap();
        // A step longer than the lease: the job stays while it runs.
        std::thread::sleep(Duration::from_millis(250));
        jobs.sweep();
        assert_eq!(jobs.usage(), (1, 1000));
        drop(busy);
        // A coordinator busy elsewhere renews it.
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(40));
            assert!(jobs.renew(&[1], &alice).is_empty());
            jobs.sweep();
        }
        assert_eq!(jobs.usage().0, 1);
        // Nobody else can keep it alive, and unknown jobs are named.
        assert_eq!(jobs.renew(&[1, 2], &user("mallory")), vec![1, 2]);
        std::thread::sleep(Duration::from_millis(150));
        jobs.sweep();
        assert_eq!(jobs.usage(), (0, 0));
        let e = jobs.acquire(HERE, 1, &alice).err().unwrap();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("lease"), "{}", e.message);
    }

    #[test]
    fn a_job_over_the_budget_is_refused_naming_node_bytes_and_budget() {
        let jobs = Jobs::new(Duration::from_secs(60), 10_000);
        let (alice, bob) = (user("alice"), user("bob"));
        drop(jobs.admit(HERE, 1, &alice, 8000, worker).unwrap());
        let e = jobs.admit(HERE, 2, &bob, 4000, worker).err().unwrap();
        assert_eq!(e.code, ErrorCode::NoSpace);
        for want in [
            HERE,
            "4000 bytes",
            "10000 bytes",
            "--job-memory",
            "1 other job",
        ] {
            assert!(e.message.contains(want), "{want:?} missing: {}", e.message);
        }
        // Refused means not held: nothing was charged for it.
        assert_eq!(jobs.usage(), (1, 8000));
        // A job that grows past the budget is refused too.
        let e = jobs.admit(HERE, 1, &alice, 2001, worker).err().unwrap();
        assert!(e.message.contains("10001 bytes"), "{}", e.message);
        drop(jobs.admit(HERE, 1, &alice, 2000, worker).unwrap());
        assert_eq!(jobs.usage(), (1, 10_000));
    }
}
