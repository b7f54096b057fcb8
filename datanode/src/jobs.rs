//! The datanode's table of training jobs: each job's decoded records, its
//! owner, its lease and the memory it is charged against the budget. The
//! request handlers (`train`) admit and use jobs; the sweeper frees those
//! whose coordinator went silent. It depends on nothing else of the node.

use crate::shared_ring::{Inbound, Outbound};
use quern_compute::train::Worker;
use quern_proto::msg::SharedRing;
use quern_proto::size::format_size;
use quern_proto::transport::ServerStream;
use quern_proto::{ErrorCode, Principal, WireError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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
    pub(crate) owner: Principal,
    pub(crate) worker: Mutex<Worker>,
    /// When the lease was last renewed.
    pub(crate) renewed: Mutex<Instant>,
    /// Requests of the job in progress; the job outlives its lease while
    /// any runs (the coordinator that sent it was alive then).
    pub(crate) busy: AtomicUsize,
    /// Bytes charged against the budget: the decoded size of the records
    /// admitted so far, raised to the worker's measured memory when that
    /// is more.
    pub(crate) bytes: AtomicU64,
    /// Ring streams from the previous worker, by step round: whichever of
    /// the stream and this node's step comes first waits for the other.
    inbox: Mutex<HashMap<u64, Inbox>>,
    /// This worker's side of the ring's shared memory.
    pub(crate) ring_out: Mutex<RingOut>,
    /// The previous worker's last offer of a region, and the region mapped
    /// (none when it could not be: another host, say), so that an offer
    /// repeated every step is tried once.
    pub(crate) inbound: Mutex<Option<(SharedRing, Option<Arc<Inbound>>)>>,
    /// The threads its steps compute on while other workers share the
    /// host (see [`Job::pool`]).
    pool: Mutex<Option<Arc<rayon::ThreadPool>>>,
}

/// What a worker keeps of the shared memory it offers the next worker of
/// its ring.
#[derive(Default)]
pub(crate) struct RingOut {
    /// Where it writes the pieces it sends when the next worker shares its
    /// host: made at the first ring step, taken by each step's ring and
    /// put back when it ends well.
    pub(crate) region: Option<Outbound>,
    /// The region's size once the next worker accepted it, charged with
    /// the job's memory.
    pub(crate) charged: u64,
    /// The next worker that declined a region (another host, say): not
    /// offered one again.
    pub(crate) declined_by: Option<quern_proto::NodeId>,
}

/// A ring stream from the previous worker, with its region when the two
/// share a host.
pub(crate) struct RingIn {
    pub(crate) stream: ServerStream,
    pub(crate) shared: Option<Arc<Inbound>>,
}

/// One round's meeting point between a ring stream and the step.
struct Inbox {
    tx: Option<oneshot::Sender<RingIn>>,
    rx: Option<oneshot::Receiver<RingIn>>,
}

impl Inbox {
    fn new() -> Inbox {
        let (tx, rx) = oneshot::channel();
        Inbox {
            tx: Some(tx),
            rx: Some(rx),
        }
    }
}

impl Job {
    /// The pool a step computes on when `host_workers` workers of it share
    /// this host: its share of the cores (at least one thread). None: all
    /// of them, on rayon's global pool. Every worker using every core, they
    /// preempted each other at each of the step's joins: two workers on a
    /// 2-core host trained the seed CNN 9% slower than with a thread each.
    /// Results do not depend on the number of threads.
    pub(crate) fn pool(&self, host_workers: u32) -> Option<Arc<rayon::ThreadPool>> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / host_workers.max(1) as usize).max(1);
        if threads >= cores {
            return None;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pool.as_ref().filter(|p| p.current_num_threads() == threads) {
            return Some(p.clone());
        }
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("quern-train-{i}"))
            .build();
        match built {
            Ok(p) => {
                let p = Arc::new(p);
                *pool = Some(p.clone());
                Some(p)
            }
            Err(e) => {
                tracing::warn!(
                    "no thread pool of {threads} for a training step, using all cores: {e}"
                );
                None
            }
        }
    }

    /// Hands the previous worker's ring stream for `round` to the step
    /// that waits for it (now or when it starts); gives it back when the
    /// round already has one or its step is gone.
    pub(crate) fn deliver(&self, round: u64, ring: RingIn) -> Option<RingIn> {
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        match inbox.entry(round).or_insert_with(Inbox::new).tx.take() {
            Some(tx) => tx.send(ring).err(),
            None => Some(ring),
        }
    }

    /// Where the step of `round` receives its ring stream. Rounds before it
    /// were given up: their streams are dropped, which ends them.
    pub(crate) fn ring_stream(&self, round: u64) -> oneshot::Receiver<RingIn> {
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        inbox.retain(|&r, _| r >= round);
        match inbox.entry(round).or_insert_with(Inbox::new).rx.take() {
            Some(rx) => rx,
            // Asked twice for one round: the second ask never gets a stream.
            None => oneshot::channel().1,
        }
    }

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
pub(crate) struct Busy(pub(crate) Arc<Job>);

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
    pub(crate) jobs: Mutex<HashMap<u64, Arc<Job>>>,
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
    pub(crate) fn acquire(
        &self,
        here: &str,
        id: u64,
        caller: &Principal,
    ) -> Result<Busy, WireError> {
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

    /// The job, whoever owns it: for the other datanodes of its ring.
    pub(crate) fn find(&self, here: &str, id: u64) -> Result<Arc<Job>, WireError> {
        let jobs = self.jobs.lock().map_err(internal)?;
        jobs.get(&id).cloned().ok_or_else(|| {
            WireError::new(
                ErrorCode::NotFound,
                format!("{here}: no training job {id:016x} to add ring sums to"),
            )
        })
    }

    /// Admits `need` more bytes of records for job `id` (made by `make`
    /// when new) if they fit the budget, and marks the job busy.
    pub(crate) fn admit(
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
                    inbox: Mutex::new(HashMap::new()),
                    ring_out: Mutex::default(),
                    pool: Mutex::default(),
                    inbound: Mutex::new(None),
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
    pub(crate) fn renew(&self, ids: &[u64], caller: &Principal) -> Vec<u64> {
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

pub(crate) fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Internal, e.to_string())
}

pub(crate) fn owned(here: &str, job: Arc<Job>, caller: &Principal) -> Result<Arc<Job>, WireError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use quern_compute::records::{DType, RecordLayout};
    use quern_compute::train::Scaler;
    use quern_compute::train::WorkerSpec;
    use quern_proto::Role;

    const HERE: &str = "datanode 0000000000000007 (127.0.0.1:9)";

    fn worker() -> Result<Worker, WireError> {
        let model = r#"{"class_name": "Sequential", "config": {"layers": [
            {"class_name": "InputLayer", "config": {"batch_shape": [null, 4]}},
            {"class_name": "Dense", "config": {"units": 2, "activation": "softmax"}}]}}"#;
        Worker::new(WorkerSpec {
            objective: Default::default(),
            model_json: model.into(),
            layout: RecordLayout::new(vec![4], DType::U8, DType::U8).map_err(internal)?,
            scaler: Scaler::none(),
            seed: 1,
            shuffle: true,
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

    /// A worker alone on its host computes on every core; workers sharing
    /// it split the cores between them, one thread each at least, and a
    /// job keeps its pool from step to step.
    #[test]
    fn workers_sharing_a_host_split_its_cores() {
        let jobs = Jobs::new(Duration::from_secs(60), 1 << 20);
        let busy = jobs.admit(HERE, 1, &user("alice"), 1000, worker).unwrap();
        let job = &busy.0;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(job.pool(0).is_none() && job.pool(1).is_none());
        let threads = |k: u32| job.pool(k).map_or(cores, |p| p.current_num_threads());
        for k in 2..6u32 {
            assert_eq!(
                threads(k),
                (cores / k as usize).max(1),
                "{k} workers, {cores} cores"
            );
        }
        if cores >= 2 {
            let (a, b) = (job.pool(2).unwrap(), job.pool(2).unwrap());
            assert!(Arc::ptr_eq(&a, &b), "the pool is kept between steps");
        }
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
