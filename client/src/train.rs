//! The training coordinator: places a dataset's chunks on the datanodes
//! that hold them, then runs synchronous data-parallel SGD, one round of
//! TrainStep requests per step. Under exact SGD the workers hold the
//! parameters and add their gradients around a ring among themselves; the
//! coordinator sends each step's shares and the previous step's commit and
//! collects losses and counts. A worker that fails hands its chunks to
//! other holders, a survivor's parameters seed the new set of workers, and
//! the step runs again.

use crate::dataset::Dataset;
use crate::history::{model_name, Reporter};
use crate::job::JobOptions;
use crate::plan::{self, Decision, Plan, PlanInputs, WorkerSet};
use crate::scheduler::Scheduler;
use crate::{Client, Error, Result};
use quern_compute::nn::{Optimizer, OptimizerConfig};
use quern_compute::ops::{self, Operator, Partial};
use quern_compute::train::{
    exchanges, f32s_from_le, f32s_to_le, f64s_from_le, f64s_to_le, Commit, HeldHead, HeldParams,
    Hold, LocalStep, ModelAverage, Objective, PredictOp, Predictions, ScaleKind, Scaler, ScoreOp,
    Scores, StepPlan, StepRequest, StepResult, StepStats, StepSum, WorkerSpec,
};
use quern_proto::msg::*;
use quern_proto::NodeId;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub model_json: String,
    /// Initial parameters, flat in Keras order.
    pub init: Vec<f32>,
    pub optimizer: OptimizerConfig,
    pub epochs: u64,
    pub batch: u64,
    pub max_iter: Option<u64>,
    pub seed: u64,
    pub scale: ScaleKind,
    /// Report every this many iterations (0: only at epoch ends).
    pub display: u64,
    /// Local steps per worker between model averages; 1 is exact
    /// synchronous minibatch SGD.
    pub sync: u64,
    /// The loss and what it compares outputs with.
    pub objective: Objective,
    /// A fresh order of each worker's records every epoch; off, stored
    /// order (Keras's `shuffle=False`).
    pub shuffle: bool,
    /// One worker keeping the parameters, every holder a worker, or
    /// whichever is estimated faster.
    pub plan: Plan,
    /// The distributed plan's number of workers (at least 2, at most the
    /// live datanodes); None: every holder when the plan is named, the
    /// estimate's choice under `auto`.
    pub workers: Option<usize>,
}

/// What happens during a job, as it happens.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// Where the job runs and why, before any worker opens.
    Planned(Decision),
    Started {
        workers: Vec<(String, u64)>,
        /// Each worker's chunks, as indices into the dataset's chunks in
        /// part order (what a replay in one process needs).
        shards: Vec<Vec<usize>>,
        records: u64,
        steps_per_epoch: u64,
        iterations: u64,
    },
    Step {
        iteration: u64,
        epoch: u64,
        loss: f64,
        accuracy: f64,
        samples_per_sec: f64,
        /// Each worker's compute time per step in the last round (ms).
        worker_ms: Vec<(String, f64)>,
        /// Bytes of steps on the wire so far (as `TrainSummary::step_bytes`).
        bytes_moved: u64,
    },
    Epoch {
        epoch: u64,
        iterations: u64,
        loss: f64,
        accuracy: f64,
        val_loss: Option<f64>,
        val_accuracy: Option<f64>,
        seconds: f64,
    },
    WorkerLost {
        iteration: u64,
        worker: String,
        error: String,
        chunks_moved: usize,
    },
}

/// What a finished job reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainSummary {
    pub iterations: u64,
    pub samples: u64,
    pub wall_s: f64,
    pub samples_per_sec: f64,
    pub workers: usize,
    /// Dataset bytes read from the workers' own disks / fetched over the network.
    pub local_bytes: u64,
    pub dataset_bytes_over_network: u64,
    /// Steps on the wire: requests and results between the coordinator and
    /// the workers, and under exact SGD the ring's partial sums.
    pub step_bytes: u64,
    /// The part of `step_bytes` the workers sent each other around the ring.
    pub ring_bytes: u64,
    /// The part of `ring_bytes` that went through shared memory between
    /// workers on one host, not through their connections.
    pub ring_shared_bytes: u64,
    pub step_bytes_per_iteration: u64,
    /// `samples_per_sec` over every round but the first, which also seeds
    /// the workers and warms their buffers (0 with a single round).
    pub settled_samples_per_sec: f64,
    /// Share of step time not spent computing on the slowest worker.
    pub wait_share: f64,
    pub workers_lost: usize,
    /// The plan the job ran.
    pub plan: Plan,
}

pub struct TrainOutcome {
    pub params: Vec<f32>,
    pub scaler: Scaler,
    pub events: Vec<TrainEvent>,
    pub summary: TrainSummary,
}

struct WorkerState {
    node: NodeAddr,
    /// Indices into the job's chunk list, in order.
    chunks: Vec<usize>,
    records: u64,
}

/// Adds chunk `i` to `node`'s share, making it a worker if it is not.
fn give(workers: &mut Vec<WorkerState>, node: NodeAddr, i: usize) {
    match workers.iter_mut().find(|w| w.node.id == node.id) {
        Some(w) => w.chunks.push(i),
        None => workers.push(WorkerState {
            node,
            chunks: vec![i],
            records: 0,
        }),
    }
}

/// Every chunk of dataset `dir` on a worker, as `sched` places them.
fn place(sched: &mut Scheduler, chunks: &[Chunk], dir: &str) -> Result<Vec<WorkerState>> {
    let placed = sched.assign_all(&chunks.iter().map(|c| c.holders.clone()).collect::<Vec<_>>());
    let mut workers = Vec::new();
    for (i, a) in placed.iter().enumerate() {
        let a = a.ok_or_else(|| {
            Error::Job(format!(
                "chunk {i} of {dir} has no live datanode to train on"
            ))
        })?;
        give(&mut workers, a.node, i);
    }
    Ok(workers)
}

/// Accounts for a worker that loaded its chunks.
fn opened(
    summary: &mut TrainSummary,
    workers: &mut [WorkerState],
    node: NodeAddr,
    o: &TrainOpened,
) {
    summary.local_bytes += o.local_bytes;
    summary.dataset_bytes_over_network += o.fetched_bytes;
    if let Some(w) = workers.iter_mut().find(|w| w.node.id == node.id) {
        w.records = o.records;
    }
}

struct Chunk {
    meta: ChunkMeta,
    token: quern_proto::ChunkToken,
    holders: Vec<NodeAddr>,
    all: Vec<NodeAddr>,
}

/// The datanodes a job was opened on, kept alive and cleaned up.
///
/// A datanode frees a job's records once the job has had no request for a
/// lease (`--job-lease`, learned from `TrainOpened::lease_ms`). Between
/// steps the coordinator can be busy for longer than that (a validation
/// pass, reopening a lost worker's share, a slow worker's step), so a
/// background task renews every worker with a `TrainRenew` every third of
/// the shortest lease, for as long as the job runs: two renewals may be
/// lost before a live job expires.
///
/// Every worker an open was sent to is closed when the job ends, however
/// it ends: explicitly at the end of [`Client::train`] (success or error),
/// at once when a worker is lost, and from `Drop` when the training future
/// is dropped (cancelled, or its task aborted). A coordinator that dies
/// closes nothing; the lease frees its jobs.
struct JobLease {
    client: Client,
    job: u64,
    state: Arc<Mutex<LeaseState>>,
    renewer: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct LeaseState {
    nodes: Vec<NodeAddr>,
    /// The shortest lease of the workers opened so far.
    lease: Option<Duration>,
}

impl JobLease {
    fn start(client: Client, job: u64) -> JobLease {
        let state = Arc::new(Mutex::new(LeaseState::default()));
        let renewer = tokio::spawn(renew_leases(client.clone(), job, state.clone()));
        JobLease {
            client,
            job,
            state,
            renewer,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before an open is sent: the node may hold the job from now on.
    fn opening(&self, node: NodeAddr) {
        let mut s = self.lock();
        if !s.nodes.iter().any(|n| n.id == node.id) {
            s.nodes.push(node);
        }
    }

    fn opened(&self, lease_ms: u64) {
        let lease = Duration::from_millis(lease_ms);
        let mut s = self.lock();
        s.lease = Some(s.lease.map_or(lease, |l| l.min(lease)));
    }

    /// A worker the job no longer uses: closed now (it may be alive and
    /// holding records) and no longer renewed, so its lease frees the job
    /// there even when the close does not arrive.
    fn lost(&self, node: NodeAddr) {
        self.lock().nodes.retain(|n| n.id != node.id);
        let (client, job) = (self.client.clone(), self.job);
        tokio::spawn(async move { close_worker(&client, job, node).await });
    }

    /// Closes every worker at once; nothing is left for `Drop`.
    async fn close(&mut self) {
        self.renewer.abort();
        let nodes = std::mem::take(&mut self.lock().nodes);
        let mut set = tokio::task::JoinSet::new();
        for node in nodes {
            let (client, job) = (self.client.clone(), self.job);
            set.spawn(async move { close_worker(&client, job, node).await });
        }
        while set.join_next().await.is_some() {}
    }
}

impl Drop for JobLease {
    fn drop(&mut self) {
        self.renewer.abort();
        let nodes = std::mem::take(&mut self.lock().nodes);
        if nodes.is_empty() {
            return;
        }
        // Without a runtime (it is shutting down) nothing can be sent; the
        // datanodes' leases free the job.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for node in nodes {
            let (client, job) = (self.client.clone(), self.job);
            rt.spawn(async move { close_worker(&client, job, node).await });
        }
    }
}

async fn close_worker(client: &Client, job: u64, node: NodeAddr) {
    if let Err(e) = client.endpoint().call(node, TrainClose { job }).await {
        tracing::debug!(worker = %node.addr, "closing training job {job:016x}: {e}");
    }
}

/// Renews the job on every worker each third of the lease; nothing is
/// sent until the first worker has opened and told its lease.
async fn renew_leases(client: Client, job: u64, state: Arc<Mutex<LeaseState>>) {
    let mut every = Duration::from_millis(100);
    loop {
        tokio::time::sleep(every).await;
        // Read after the wait: a worker lost meanwhile is not renewed.
        let (nodes, lease) = {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            (s.nodes.clone(), s.lease)
        };
        let Some(lease) = lease else {
            continue;
        };
        every = (lease / 3).max(Duration::from_millis(10));
        // One task per worker: a dead worker's timeout must not delay the
        // others' renewals.
        for node in nodes {
            let client = client.clone();
            tokio::spawn(async move {
                let call = client.endpoint().call(node, TrainRenew { jobs: vec![job] });
                match tokio::time::timeout(lease, call).await {
                    Ok(Ok(r)) if !r.unknown.is_empty() => tracing::debug!(
                        worker = %node.addr,
                        "training job {job:016x} is not held there (yet, or any more)"
                    ),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(worker = %node.addr, "renewing training job {job:016x}: {e}")
                    }
                    Err(_) => {
                        tracing::debug!(worker = %node.addr, "renewing training job {job:016x} timed out")
                    }
                }
            });
        }
    }
}

impl Client {
    /// The scaler a job uses: fitted on the dataset's statistics, which
    /// are computed by map tasks first when the manifest has none.
    pub async fn scaler_for(&self, ds: &mut Dataset, kind: ScaleKind) -> Result<Scaler> {
        if let Some(fixed) = Scaler::fixed(kind) {
            return Ok(fixed);
        }
        if ds.manifest.stats.is_none() {
            self.dataset_stats(ds, &JobOptions::default()).await?;
        }
        let stats = ds
            .manifest
            .stats
            .as_ref()
            .ok_or_else(|| Error::Dataset(format!("{}: no statistics", ds.dir)))?;
        Ok(Scaler::fit(kind, stats))
    }

    /// Scores a model on a dataset by map tasks, as a job in the cluster's
    /// history.
    pub async fn score(
        &self,
        ds: &Dataset,
        model_json: &str,
        params: &[f32],
        scaler: &Scaler,
        objective: Objective,
    ) -> Result<(Scores, crate::JobSummary)> {
        self.as_job(
            JobKind::Score,
            model_name(model_json),
            &ds.dir,
            self.score_here(ds, model_json, params, scaler, objective),
            |(s, j)| {
                format!(
                    "loss {:.4}, accuracy {:.4} on {} records ({} tasks, {} node-local)",
                    s.loss(),
                    s.accuracy(),
                    s.count,
                    j.tasks,
                    j.node_local
                )
            },
        )
        .await
    }

    /// [`Client::score`] within a job already in the history.
    async fn score_here(
        &self,
        ds: &Dataset,
        model_json: &str,
        params: &[f32],
        scaler: &Scaler,
        objective: Objective,
    ) -> Result<(Scores, crate::JobSummary)> {
        let op = Operator::Score(ScoreOp {
            model_json: model_json.to_string(),
            params: params.to_vec(),
            scaler: scaler.clone(),
            objective,
            held: None,
        });
        self.run_score(ds, op, &JobOptions::default()).await
    }

    /// A model's outputs for every record of a dataset, computed by map
    /// tasks where the chunks are, in record order.
    pub async fn predict(
        &self,
        ds: &Dataset,
        model_json: &str,
        params: &[f32],
        scaler: &Scaler,
    ) -> Result<Predictions> {
        let op = Operator::Predict(PredictOp {
            model_json: model_json.to_string(),
            params: params.to_vec(),
            scaler: scaler.clone(),
        });
        let work = async {
            let (p, j) = self
                .run_map(
                    &ds.part_paths(),
                    &ds.manifest.layout,
                    op,
                    &JobOptions::default(),
                )
                .await?;
            match p {
                Partial::Predict(p) => Ok((p, j)),
                other => Err(Error::Job(format!(
                    "a predict job returned {} results",
                    other.name()
                ))),
            }
        };
        let (p, _) = self
            .as_job(
                JobKind::Predict,
                model_name(model_json),
                &ds.dir,
                work,
                |(p, j)| {
                    format!(
                        "{} records predicted ({} tasks, {} node-local)",
                        p.values.len() / p.outputs.max(1),
                        j.tasks,
                        j.node_local
                    )
                },
            )
            .await?;
        Ok(p)
    }

    /// Scores with the parameters a training job's workers hold, on those
    /// workers, after `commit`: no parameters travel.
    async fn score_held(
        &self,
        ds: &Dataset,
        opts: &TrainOptions,
        scaler: &Scaler,
        held: HeldParams,
        workers: &[WorkerState],
    ) -> Result<(Scores, crate::JobSummary)> {
        let op = Operator::Score(ScoreOp {
            model_json: opts.model_json.clone(),
            params: Vec::new(),
            scaler: scaler.clone(),
            objective: opts.objective,
            held: Some(held),
        });
        let nodes = workers.iter().map(|w| w.node).collect();
        let jobs = JobOptions {
            nodes: Some(nodes),
            ..JobOptions::default()
        };
        self.run_score(ds, op, &jobs).await
    }

    async fn run_score(
        &self,
        ds: &Dataset,
        op: Operator,
        jobs: &JobOptions,
    ) -> Result<(Scores, crate::JobSummary)> {
        let (p, summary) = self
            .run_map(&ds.part_paths(), &ds.manifest.layout, op, jobs)
            .await?;
        match p {
            Partial::Score(s) => Ok((s, summary)),
            other => Err(Error::Job(format!("scoring returned {}", other.name()))),
        }
    }

    /// Trains on `ds`, validating on `val` after each epoch.
    pub async fn train(
        &self,
        ds: &mut Dataset,
        val: Option<&Dataset>,
        opts: &TrainOptions,
        mut on_event: impl FnMut(&TrainEvent) + Send,
    ) -> Result<TrainOutcome> {
        // Not generic below this line: the coordinator's hot loop is then
        // compiled (and optimised) in this crate, not in the caller's.
        let mut report = Reporter::start(
            self,
            JobKind::Train,
            model_name(&opts.model_json),
            ds.dir.clone(),
        );
        let mut lease = JobLease::start(self.clone(), rand::random());
        let mut events = |e: &TrainEvent| {
            report.train_event(e);
            on_event(e);
        };
        let outcome = self.train_job(&lease, ds, val, opts, &mut events).await;
        // Success or error, the workers free the job's records now rather
        // than a lease later.
        lease.close().await;
        report
            .finish(&outcome, |o| {
                let s = &o.summary;
                format!(
                    "{} iterations, {} samples in {:.1} s ({:.0} samples/s) on {} workers, plan {}",
                    s.iterations, s.samples, s.wall_s, s.samples_per_sec, s.workers, s.plan
                )
            })
            .await;
        outcome
    }

    async fn train_job(
        &self,
        lease: &JobLease,
        ds: &mut Dataset,
        val: Option<&Dataset>,
        opts: &TrainOptions,
        on_event: &mut (dyn FnMut(&TrainEvent) + Send),
    ) -> Result<TrainOutcome> {
        let started = Instant::now();
        let scaler = self.scaler_for(ds, opts.scale).await?;
        let mut events = Vec::new();
        let mut emit = |e: TrainEvent, events: &mut Vec<TrainEvent>| {
            on_event(&e);
            events.push(e);
        };
        let mut chunks = Vec::new();
        for p in ds.part_paths() {
            for c in self.locate(&p).await?.chunks {
                chunks.push(Chunk {
                    meta: c.meta,
                    token: c.token,
                    holders: c
                        .replicas
                        .iter()
                        .filter(|r| r.state == ReplicaState::Live)
                        .map(|r| r.node)
                        .collect(),
                    all: c
                        .replicas
                        .iter()
                        .filter(|r| r.state != ReplicaState::Corrupt)
                        .map(|r| r.node)
                        .collect(),
                });
            }
        }
        if chunks.is_empty() {
            return Err(Error::Dataset(format!("{}: holds no records", ds.dir)));
        }
        let live: Vec<NodeAddr> = self.live_datanodes().await?;
        let mut sched = Scheduler::new(live);
        let mut workers = place(&mut sched, &chunks, &ds.dir)?;
        let model = quern_compute::nn::Model::from_keras_json(&opts.model_json)
            .map_err(|e| Error::Job(format!("the job's model: {e}")))?;
        let decision = self
            .plan(opts, &model, &chunks, &mut workers, &mut sched, ds)
            .await?;
        emit(TrainEvent::Planned(decision.clone()), &mut events);
        let mut local_plan = decision.plan == Plan::Local;
        let job = lease.job;
        let spec = ops::encode(&WorkerSpec {
            model_json: opts.model_json.clone(),
            layout: ds.manifest.layout.clone(),
            scaler: scaler.clone(),
            seed: opts.seed,
            objective: opts.objective,
            shuffle: opts.shuffle,
        })
        .map_err(|e| Error::Job(e.to_string()))?;
        let mut summary = TrainSummary {
            plan: decision.plan,
            ..TrainSummary::default()
        };
        let mut lost: HashSet<NodeId> = HashSet::new();
        // Open every worker; one that fails to open is handled like one
        // that fails a step.
        let mut pending: Vec<(NodeAddr, Vec<usize>)> =
            workers.iter().map(|w| (w.node, w.chunks.clone())).collect();
        while let Some((node, idx)) = pending.pop() {
            // Lost since this open was queued: its chunks moved already.
            if lost.contains(&node.id) {
                continue;
            }
            match self.open_worker(lease, &spec, node, &idx, &chunks).await {
                Ok(o) => opened(&mut summary, &mut workers, node, &o),
                Err(e) => {
                    // All of the worker's chunks move, not only this open's:
                    // a share moved to it earlier (say, from a node whose
                    // memory budget was full) would be dropped otherwise.
                    let gone = match workers.iter().position(|w| w.node.id == node.id) {
                        Some(p) => workers.remove(p).chunks,
                        None => idx,
                    };
                    lease.lost(node);
                    let moved = self.reassign(
                        &mut workers,
                        &mut sched,
                        &mut lost,
                        node,
                        &gone,
                        &chunks,
                        &e,
                    )?;
                    emit(
                        TrainEvent::WorkerLost {
                            iteration: 0,
                            worker: node.addr.to_string(),
                            error: e.to_string(),
                            chunks_moved: gone.len(),
                        },
                        &mut events,
                    );
                    pending.extend(moved);
                }
            }
        }
        let mut params = opts.init.clone();
        let mut opt = Optimizer::new(opts.optimizer.clone(), params.len())
            .with_variables(model.trainable_variables());
        let total: u64 = workers.iter().map(|w| w.records).sum();
        let steps_per_epoch = total.div_ceil(opts.batch.max(1));
        let iterations = opts
            .max_iter
            .unwrap_or(u64::MAX)
            .min(steps_per_epoch * opts.epochs);
        emit(
            TrainEvent::Started {
                workers: workers
                    .iter()
                    .map(|w| (w.node.addr.to_string(), w.records))
                    .collect(),
                shards: workers.iter().map(|w| w.chunks.clone()).collect(),
                records: total,
                steps_per_epoch,
                iterations,
            },
            &mut events,
        );
        let mut iteration = 0u64;
        let sync = opts.sync.max(1);
        // Exact SGD: the workers hold the parameters once seeded; the
        // coordinator's copy is refreshed only when it needs one.
        let mut held = Held::default();
        // Workers step on their own, with their own optimizer, between
        // parameter exchanges: K steps under --sync K, or on the local
        // plan's single worker up to the next progress report.
        let mut local_rounds = sync > 1 || local_plan;
        let report_every = if opts.display > 0 {
            opts.display
        } else {
            steps_per_epoch
        };
        // Rounds stay well inside the RPC timeout, measured as they go.
        let mut step_secs = 0.0f64;
        let (mut wait_us, mut step_us) = (0u128, 0u128);
        // The first round's time and examples, left out of the settled rate.
        let mut first_round: Option<(u128, u64)> = None;
        let mut window = (Instant::now(), 0u64);
        for epoch in 0..opts.epochs {
            let epoch_start = Instant::now();
            let (mut e_loss, mut e_correct, mut e_count) = (0.0f64, 0u64, 0u64);
            let mut i = 0;
            while i < steps_per_epoch {
                if iteration >= iterations {
                    break;
                }
                // The local plan's worker could not take the whole dataset
                // (its memory budget, or it was lost and its chunks went to
                // several holders): go on as exact distributed SGD.
                if local_plan && workers.len() > 1 {
                    tracing::warn!(
                        workers = workers.len(),
                        "the local plan's data is now on several workers; continuing distributed"
                    );
                    local_plan = false;
                    local_rounds = sync > 1;
                    summary.plan = Plan::Distributed;
                }
                let plan = StepPlan {
                    shards: workers.iter().map(|w| w.records).collect(),
                    batch: opts.batch,
                };
                // A round is one step, K local steps under --sync K, or on
                // the local plan the steps to the next report (never across
                // an epoch's end).
                let want = if local_plan {
                    let budget = self.endpoint().rpc_timeout().as_secs_f64() / 4.0;
                    let fit = if step_secs > 0.0 {
                        ((budget / step_secs) as u64).max(1)
                    } else {
                        report_every.min(8)
                    };
                    (report_every - iteration % report_every).min(fit)
                } else {
                    sync
                };
                let round = want.min(steps_per_epoch - i).min(iterations - iteration);
                let shares: Vec<Vec<_>> = (0..round).map(|j| plan.shares(i + j)).collect();
                let t = Instant::now();
                let hold = !local_rounds;
                // Encoded once, shared by every worker's stream: the
                // parameters each round, or under exact SGD a seed when the
                // workers hold none yet.
                let seed = (hold && !held.seeded).then(|| {
                    let mut o = opt.clone();
                    let state = o.take_state();
                    let mut values = params.clone();
                    values.extend(state);
                    let head = HeldHead {
                        optimizer: o,
                        version: iteration,
                        params_len: params.len() as u64,
                    };
                    (head, values)
                });
                let raw_params = match &seed {
                    Some((_, values)) => bytes::Bytes::from(f32s_to_le(values)),
                    None if hold => bytes::Bytes::new(),
                    None => bytes::Bytes::from(f32s_to_le(&params)),
                };
                held.round += 1;
                let ring_peers: Vec<NodeAddr> = workers.iter().map(|w| w.node).collect();
                // One step at a time: the workers with examples in it add
                // their BatchNormalization sums through the coordinator.
                let exchange = if round == 1 && !local_rounds {
                    exchanges(&shares[0])
                } else {
                    vec![false; workers.len()]
                };
                let mut links = sum_links(&exchange);
                let mut set = tokio::task::JoinSet::new();
                for (w, worker) in workers.iter().enumerate() {
                    let link = links[w].take();
                    let req = StepRequest {
                        worker: w as u32,
                        steps: (0..round)
                            .map(|j| LocalStep {
                                epoch,
                                iteration: iteration + j,
                                share: shares[j as usize][w],
                            })
                            .collect(),
                        local: local_rounds.then(|| opts.optimizer.clone()),
                        exchange: exchange[w],
                        hold: hold.then(|| Hold {
                            seed: seed.as_ref().map(|(head, _)| head.clone()),
                            commit: if seed.is_some() {
                                None
                            } else {
                                held.commit.clone()
                            },
                        }),
                        host_workers: workers
                            .iter()
                            .filter(|o| o.node.addr.ip() == worker.node.addr.ip())
                            .count() as u32,
                        params: Vec::new(),
                    };
                    let ring = hold.then(|| Ring {
                        round: held.round,
                        peers: ring_peers.clone(),
                        position: w as u32,
                    });
                    let client = self.clone();
                    let node = worker.node;
                    let raw = raw_params.clone();
                    set.spawn(async move {
                        (
                            w,
                            node,
                            client.step_worker(job, node, &req, raw, ring, link).await,
                        )
                    });
                }
                let mut results: Vec<Option<(StepResult, u64)>> =
                    (0..workers.len()).map(|_| None).collect();
                let mut failures = Failures::default();
                while let Some(j) = set.join_next().await {
                    let (w, node, r) = match j {
                        Ok(x) => x,
                        // Cancelled below, after another worker failed.
                        Err(e) if e.is_cancelled() && failures.any() => continue,
                        Err(e) => return Err(Error::Job(format!("step task failed: {e}"))),
                    };
                    match r {
                        Ok(x) => results[w] = Some(x),
                        Err(e) => {
                            // Workers that exchange statistics or ring sums
                            // would wait for the lost one: stop them now.
                            // A worker that reports its ring peer failed is
                            // not the one lost; the peer's own failure is
                            // still to come.
                            let peer = e.code() == Some(quern_proto::ErrorCode::Peer);
                            if !peer && (hold || exchange.iter().any(|&e| e)) {
                                set.abort_all();
                            }
                            failures.add(node, e, peer);
                        }
                    }
                }
                if let Some((node, e)) = failures.lost() {
                    let Some(pos) = workers.iter().position(|w| w.node.id == node.id) else {
                        return Err(e);
                    };
                    let gone = workers.remove(pos);
                    lease.lost(node);
                    let moved = self.reassign(
                        &mut workers,
                        &mut sched,
                        &mut lost,
                        node,
                        &gone.chunks,
                        &chunks,
                        &e,
                    )?;
                    emit(
                        TrainEvent::WorkerLost {
                            iteration,
                            worker: node.addr.to_string(),
                            error: e.to_string(),
                            chunks_moved: gone.chunks.len(),
                        },
                        &mut events,
                    );
                    let mut queue = moved;
                    while let Some((n, idx)) = queue.pop() {
                        if lost.contains(&n.id) {
                            continue;
                        }
                        match self.open_worker(lease, &spec, n, &idx, &chunks).await {
                            Ok(o) => opened(&mut summary, &mut workers, n, &o),
                            Err(e2) => {
                                if let Some(p) = workers.iter().position(|w| w.node.id == n.id) {
                                    let g = workers.remove(p);
                                    lease.lost(n);
                                    queue.extend(self.reassign(
                                        &mut workers,
                                        &mut sched,
                                        &mut lost,
                                        n,
                                        &g.chunks,
                                        &chunks,
                                        &e2,
                                    )?);
                                }
                            }
                        }
                    }
                    summary.workers_lost += 1;
                    if hold && held.seeded {
                        // A survivor's parameters seed the new set of
                        // workers.
                        let (head, values) =
                            self.held_state(job, &workers, held.commit.as_ref()).await?;
                        if head.version != iteration {
                            return Err(Error::Job(format!(
                                "the workers hold the parameters before step {}, the job is at \
                                 step {iteration}",
                                head.version
                            )));
                        }
                        (params, opt) = held_split(&head, values)?;
                        held.seeded = false;
                        held.commit = None;
                    }
                    // The step runs again on the new split.
                    continue;
                }
                let mut slowest = 0u64;
                let worker_ms: Vec<(String, f64)> = workers
                    .iter()
                    .zip(&results)
                    .filter_map(|(w, r)| {
                        let (r, _) = r.as_ref()?;
                        Some((
                            w.node.addr.to_string(),
                            r.compute_us as f64 / 1e3 / round as f64,
                        ))
                    })
                    .collect();
                for (r, bytes) in results.iter().flatten() {
                    slowest = slowest.max(r.compute_us);
                    summary.step_bytes += bytes + r.ring_bytes;
                    summary.ring_bytes += r.ring_bytes;
                    summary.ring_shared_bytes += r.ring_shared_bytes;
                }
                let job_err = |e: quern_compute::train::TrainError| Error::Job(e.to_string());
                let stats: StepStats = if local_rounds {
                    let mut avg = ModelAverage::new(params.len());
                    for (r, _) in results.iter().flatten() {
                        avg.add(r).map_err(job_err)?;
                    }
                    avg.apply(&mut params).map_err(job_err)?
                } else {
                    let mut sum = StepSum::new();
                    for (r, _) in results.iter().flatten() {
                        sum.add(r).map_err(job_err)?;
                    }
                    let (stats, commit) = sum.finish(iteration).map_err(job_err)?;
                    held.seeded = true;
                    held.commit = Some(commit);
                    stats
                };
                let took = t.elapsed().as_micros();
                step_secs = took as f64 / 1e6 / round as f64;
                step_us += took;
                first_round.get_or_insert((took, stats.count));
                wait_us += took.saturating_sub(u128::from(slowest));
                e_loss += stats.loss * stats.count as f64;
                e_correct += (stats.accuracy * stats.count as f64).round() as u64;
                e_count += stats.count;
                summary.samples += stats.count;
                window.1 += stats.count;
                let before = iteration;
                iteration += round;
                i += round;
                if opts.display > 0 && iteration / opts.display != before / opts.display {
                    let secs = window.0.elapsed().as_secs_f64().max(1e-9);
                    emit(
                        TrainEvent::Step {
                            iteration,
                            epoch: epoch + 1,
                            loss: stats.loss,
                            accuracy: stats.accuracy,
                            samples_per_sec: window.1 as f64 / secs,
                            worker_ms,
                            bytes_moved: summary.step_bytes,
                        },
                        &mut events,
                    );
                    window = (Instant::now(), 0);
                }
            }
            let train_secs = epoch_start.elapsed().as_secs_f64();
            let (val_loss, val_accuracy) = match val {
                // The workers score with the parameters they hold.
                Some(v) if held.seeded => {
                    let at = HeldParams {
                        job,
                        commit: held.commit.clone(),
                    };
                    let (s, _) = self.score_held(v, opts, &scaler, at, &workers).await?;
                    (Some(s.loss()), Some(s.accuracy()))
                }
                Some(v) => {
                    let (s, _) = self
                        .score_here(v, &opts.model_json, &params, &scaler, opts.objective)
                        .await?;
                    (Some(s.loss()), Some(s.accuracy()))
                }
                None => (None, None),
            };
            emit(
                TrainEvent::Epoch {
                    epoch: epoch + 1,
                    iterations: iteration,
                    loss: e_loss / e_count.max(1) as f64,
                    accuracy: e_correct as f64 / e_count.max(1) as f64,
                    val_loss,
                    val_accuracy,
                    seconds: train_secs,
                },
                &mut events,
            );
            if iteration >= iterations {
                break;
            }
        }
        if held.seeded {
            let (head, values) = self.held_state(job, &workers, held.commit.as_ref()).await?;
            (params, _) = held_split(&head, values)?;
        }
        summary.iterations = iteration;
        summary.wall_s = started.elapsed().as_secs_f64();
        summary.samples_per_sec = if step_us > 0 {
            summary.samples as f64 / (step_us as f64 / 1e6)
        } else {
            0.0
        };
        summary.workers = workers.len();
        summary.step_bytes_per_iteration = summary.step_bytes / iteration.max(1);
        summary.settled_samples_per_sec = match first_round {
            Some((us, n)) if step_us > us => {
                (summary.samples - n) as f64 / ((step_us - us) as f64 / 1e6)
            }
            _ => 0.0,
        };
        summary.wait_share = if step_us > 0 {
            wait_us as f64 / step_us as f64
        } else {
            0.0
        };
        Ok(TrainOutcome {
            params,
            scaler,
            events,
            summary,
        })
    }

    /// Resolves the job's plan; on the local plan, `workers` becomes the
    /// one live node holding the most chunks, with every chunk; on a
    /// distributed plan of fewer workers than holders, the chosen nodes
    /// share the chunks (and `sched` knows only them).
    async fn plan(
        &self,
        opts: &TrainOptions,
        model: &quern_compute::nn::Model,
        chunks: &[Chunk],
        workers: &mut Vec<WorkerState>,
        sched: &mut Scheduler,
        ds: &Dataset,
    ) -> Result<Decision> {
        let records = ds.manifest.records;
        // Holders first (in the order the chunks placed them), then live
        // nodes holding nothing, which would fetch what they train on.
        let mut candidates: Vec<NodeAddr> = workers.iter().map(|w| w.node).collect();
        for n in sched.live() {
            if !candidates.iter().any(|c| c.id == n.id) {
                candidates.push(*n);
            }
        }
        let holders = workers.len();
        // One worker is the local plan; more need a distributed one, and
        // no more than the live datanodes.
        let requested = match (opts.plan, opts.workers) {
            (Plan::Local, Some(n)) if n != 1 => {
                return Err(Error::Job(format!(
                    "--workers {n} with --plan local: the local plan runs on one worker; \
                     use --plan distributed or auto"
                )))
            }
            (Plan::Auto, Some(1)) => Plan::Local,
            (plan, Some(n)) if plan != Plan::Local && (n < 2 || n > candidates.len()) => {
                let live = candidates.len();
                let range = if live < 2 {
                    format!("needs 2 live datanodes or more, and {live} is live")
                } else {
                    format!(
                        "takes 2 to {live} workers here ({live} live datanodes, \
                         {holders} holding the data)"
                    )
                };
                return Err(Error::Job(format!(
                    "--workers {n}: a distributed plan {range}; --workers 1 is --plan local"
                )));
            }
            (plan, _) => plan,
        };
        let chunk_holders: Vec<Vec<usize>> = chunks
            .iter()
            .map(|c| {
                (0..candidates.len())
                    .filter(|&k| c.holders.contains(&candidates[k]))
                    .collect()
            })
            .collect();
        let sizes: Vec<u64> = chunks.iter().map(|c| c.meta.size).collect();
        let hosts: Vec<std::net::IpAddr> = candidates.iter().map(|n| n.addr.ip()).collect();
        let set = |k: usize| plan::pick_workers(&hosts, &chunk_holders, &sizes, k);
        let holds = |n: &NodeAddr| chunks.iter().filter(|c| c.holders.contains(n)).count();
        let best = workers
            .iter()
            .map(|w| w.node)
            .max_by_key(|n| (holds(n), std::cmp::Reverse(n.addr)));
        let fetch_bytes = best.map_or(0, |b| {
            chunks
                .iter()
                .filter(|c| !c.holders.contains(&b))
                .map(|c| c.meta.size)
                .sum()
        });
        let decision = match plan::settled(requested, holders, opts.workers) {
            Some(d) => d,
            None => {
                let rates = self.training_rates(&hosts).await?;
                let steps_per_epoch = records.div_ceil(opts.batch.max(1)).max(1);
                let counts = match opts.workers {
                    Some(n) => n..=n,
                    None => 2..=holders,
                };
                plan::decide(&PlanInputs {
                    step_flops: model.flops_per_sample().1 * opts.batch as f64,
                    params: model.param_count(),
                    local: WorkerSet {
                        workers: best.map(|b| b.addr.ip()).into_iter().collect(),
                        flops_per_s: best
                            .and_then(|b| candidates.iter().position(|c| c.id == b.id))
                            .map(|k| rates[k])
                            .into_iter()
                            .collect(),
                        fetch_bytes,
                    },
                    distributed: counts
                        .map(|k| {
                            let (chosen, fetch_bytes) = set(k);
                            WorkerSet {
                                workers: chosen.iter().map(|&c| hosts[c]).collect(),
                                flops_per_s: chosen.iter().map(|&c| rates[c]).collect(),
                                fetch_bytes,
                            }
                        })
                        .collect(),
                    iterations: opts
                        .max_iter
                        .unwrap_or(u64::MAX)
                        .min(steps_per_epoch * opts.epochs),
                    round: if opts.display > 0 {
                        opts.display
                    } else {
                        steps_per_epoch
                    },
                })
            }
        };
        if decision.plan == Plan::Local {
            if let Some(node) = best {
                *workers = vec![WorkerState {
                    node,
                    chunks: (0..chunks.len()).collect(),
                    records: 0,
                }];
            }
        } else if decision.workers != holders {
            if chunks.len() < decision.workers {
                return Err(Error::Job(format!(
                    "--workers {}: {} has {} chunk{}, and a worker trains on one or more",
                    decision.workers,
                    ds.dir,
                    chunks.len(),
                    if chunks.len() == 1 { "" } else { "s" }
                )));
            }
            let (chosen, _) = set(decision.workers);
            let nodes: Vec<NodeAddr> = chosen.iter().map(|&c| candidates[c]).collect();
            *sched = Scheduler::new(nodes.clone());
            *workers = place(sched, chunks, &ds.dir)?;
            // A chosen node holding none of the data takes half the
            // busiest worker's chunks and fetches them.
            for node in nodes {
                if workers.iter().any(|w| w.node.id == node.id) {
                    continue;
                }
                let Some(busiest) = workers.iter_mut().max_by_key(|w| w.chunks.len()) else {
                    break;
                };
                let keep = busiest.chunks.len() - busiest.chunks.len() / 2;
                let moved = busiest.chunks.split_off(keep);
                workers.push(WorkerState {
                    node,
                    chunks: moved,
                    records: 0,
                });
            }
        }
        Ok(decision)
    }

    /// The training FLOP/s each of `hosts` sustains: the sgemm rate its
    /// datanodes measured (the fastest report of a host's nodes: they
    /// measure one machine, perhaps while sharing it), at the share of it a
    /// training step reaches; where no node of a host has reported yet,
    /// this machine's, measured once.
    async fn training_rates(&self, hosts: &[std::net::IpAddr]) -> Result<Vec<f64>> {
        let reported = self.report().await?.datanodes;
        let mut here: Option<f64> = None;
        let mut rates = Vec::with_capacity(hosts.len());
        for h in hosts {
            let mut g = reported
                .iter()
                .filter(|d| d.node.addr.ip() == *h)
                .map(|d| d.gflops)
                .fold(0.0, f64::max);
            if g <= 0.0 {
                if here.is_none() {
                    here = Some(
                        tokio::task::spawn_blocking(quern_compute::nn::quick_sgemm_gflops)
                            .await
                            .unwrap_or(50.0),
                    );
                }
                g = here.unwrap_or(50.0);
            }
            rates.push(g * 1e9 * STEP_SHARE_OF_SGEMM);
        }
        Ok(rates)
    }

    async fn open_worker(
        &self,
        lease: &JobLease,
        spec: &[u8],
        node: NodeAddr,
        idx: &[usize],
        chunks: &[Chunk],
    ) -> Result<TrainOpened> {
        lease.opening(node);
        let req = TrainOpen {
            job: lease.job,
            spec: spec.to_vec(),
            chunks: idx.iter().map(|&i| chunks[i].meta).collect(),
            sources: idx.iter().map(|&i| chunks[i].all.clone()).collect(),
            tokens: idx.iter().map(|&i| Some(chunks[i].token.clone())).collect(),
        };
        // Loading decodes every record: allow more than one RPC timeout.
        let call = self.endpoint().call(node, req);
        match tokio::time::timeout(
            self.endpoint().rpc_timeout() * 4 + Duration::from_secs(60),
            call,
        )
        .await
        {
            Ok(r) => {
                let o = r?;
                lease.opened(o.lease_ms);
                Ok(o)
            }
            Err(_) => Err(Error::Job(format!(
                "{}: loading the job's records timed out",
                node.addr
            ))),
        }
    }

    /// One worker's step; returns its result and the bytes on the wire.
    /// With `link`, the worker's BatchNormalization sums are added to the
    /// other workers' through it during the step.
    async fn step_worker(
        &self,
        job: u64,
        node: NodeAddr,
        req: &StepRequest,
        params: bytes::Bytes,
        ring: Option<Ring>,
        link: Option<SumLink>,
    ) -> Result<(StepResult, u64)> {
        let request = ops::encode(req).map_err(|e| Error::Job(e.to_string()))?;
        let msg = TrainStep {
            job,
            request,
            params_len: params.len() as u64,
            ring,
        };
        let out_bytes = quern_proto::frame::encode(&DataRequest::TrainStep(msg.clone()))
            .map(|v| v.len() as u64)
            .unwrap_or(0)
            + params.len() as u64;
        let ep = self.endpoint();
        let exchange = async {
            let mut s = ep.request(node, msg).await?;
            s.send_piece(params).await?;
            if link.is_none() {
                s.finish()?;
            }
            let mut sums_bytes = 0u64;
            let out = loop {
                match s.reply::<TrainStepMsg>().await? {
                    TrainStepMsg::Done(out) => break out,
                    TrainStepMsg::Sums { values } => {
                        let Some(link) = &link else {
                            return Err(quern_proto::Error::Malformed(format!(
                                "{} sent batch statistics in a step that exchanges none",
                                node.addr
                            )));
                        };
                        let raw = s.recv_body(values.saturating_mul(8)).await?;
                        let mine = f64s_from_le(&raw).map_err(quern_proto::Error::Malformed)?;
                        let total =
                            link.reduce(mine)
                                .await
                                .ok_or_else(|| quern_proto::Error::Stream {
                                    peer: node.addr.to_string(),
                                    reason: "another worker of the step stopped exchanging batch \
                                         statistics"
                                        .into(),
                                })?;
                        let back = bytes::Bytes::from(f64s_to_le(&total));
                        sums_bytes += raw.len() as u64 + back.len() as u64 + 16;
                        s.send_piece(back).await?;
                    }
                }
            };
            if link.is_some() {
                s.finish()?;
            }
            let raw = s.recv_body(out.values_len).await?;
            Ok::<_, quern_proto::Error>((out, raw, sums_bytes))
        };
        let (out, raw, sums_bytes) = tokio::time::timeout(ep.rpc_timeout(), exchange)
            .await
            .map_err(|_| quern_proto::Error::Timeout {
                peer: node.addr.to_string(),
                what: "TrainStep".into(),
                secs: ep.rpc_timeout().as_secs(),
            })??;
        let back = out.result.len() as u64 + 24 + raw.len() as u64;
        let mut r: StepResult = ops::decode(&out.result)
            .map_err(|e| Error::Job(format!("{}: bad step result: {e}", node.addr)))?;
        r.values = f32s_from_le(&raw).map_err(|e| Error::Job(format!("{}: {e}", node.addr)))?;
        Ok((r, out_bytes + back + sums_bytes))
    }

    /// The parameters and optimizer state the workers hold, from the first
    /// that answers, after `commit`.
    async fn held_state(
        &self,
        job: u64,
        workers: &[WorkerState],
        commit: Option<&Commit>,
    ) -> Result<(HeldHead, Vec<f32>)> {
        let commit = match commit {
            Some(c) => ops::encode(c).map_err(|e| Error::Job(e.to_string()))?,
            None => Vec::new(),
        };
        let mut why = Vec::new();
        for w in workers {
            let ep = self.endpoint();
            let fetch = async {
                let mut s = ep
                    .request(
                        w.node,
                        TrainState {
                            job,
                            commit: commit.clone(),
                        },
                    )
                    .await?;
                s.finish()?;
                let header: TrainStateHeader = s.reply().await?;
                let raw = s.recv_body(header.values_len).await?;
                Ok::<_, quern_proto::Error>((header, raw))
            };
            match fetch.await {
                Ok((header, raw)) => {
                    let head: HeldHead = ops::decode(&header.head)
                        .map_err(|e| Error::Job(format!("{}: bad held state: {e}", w.node.addr)))?;
                    let values = f32s_from_le(&raw)
                        .map_err(|e| Error::Job(format!("{}: {e}", w.node.addr)))?;
                    return Ok((head, values));
                }
                Err(e) => why.push(format!("{}: {e}", w.node.addr)),
            }
        }
        Err(Error::Job(format!(
            "no worker could give the job's parameters, so training cannot go on exactly; run \
             the job again ({})",
            why.join("; ")
        )))
    }

    /// Moves a lost worker's chunks to other live holders (or, with none
    /// alive, to any live node that will fetch them). Returns the opens to
    /// send, grouped by node.
    #[allow(clippy::too_many_arguments)]
    fn reassign(
        &self,
        workers: &mut Vec<WorkerState>,
        sched: &mut Scheduler,
        lost: &mut HashSet<NodeId>,
        node: NodeAddr,
        idx: &[usize],
        chunks: &[Chunk],
        why: &Error,
    ) -> Result<Vec<(NodeAddr, Vec<usize>)>> {
        tracing::warn!(worker = %node.addr, "training worker lost, moving its {} chunks: {why}", idx.len());
        lost.insert(node.id);
        sched.forget(node.id);
        let mut opens: Vec<(NodeAddr, Vec<usize>)> = Vec::new();
        for &i in idx {
            let a = sched.assign(&chunks[i].holders, lost).ok_or_else(|| {
                Error::Job(format!(
                    "chunk {i} has no live datanode left to train on (lost: {why})"
                ))
            })?;
            match opens.iter_mut().find(|(n, _)| n.id == a.node.id) {
                Some((_, v)) => v.push(i),
                None => opens.push((a.node, vec![i])),
            }
            give(workers, a.node, i);
        }
        Ok(opens)
    }
}

/// The share of the machine's sgemm rate a training step sustains
/// (docs/performance.md: the seed CNN's step runs at about 60%).
const STEP_SHARE_OF_SGEMM: f64 = 0.6;

/// A request to add one worker's sums to the others' of the same exchange.
type SumAsk = (usize, Vec<f64>, tokio::sync::oneshot::Sender<Vec<f64>>);

/// One worker's handle on the step's sum reducer.
struct SumLink {
    member: usize,
    tx: tokio::sync::mpsc::UnboundedSender<SumAsk>,
}

/// One link per worker that exchanges BatchNormalization sums this step
/// (None for the others), all to one reducer task when there are any.
fn sum_links(exchange: &[bool]) -> Vec<Option<SumLink>> {
    let members = exchange.iter().filter(|&&e| e).count();
    if members == 0 {
        return exchange.iter().map(|_| None).collect();
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<SumAsk>();
    tokio::spawn(reduce_sums(members, rx));
    let mut next = 0;
    exchange
        .iter()
        .map(|&e| {
            e.then(|| {
                next += 1;
                SumLink {
                    member: next - 1,
                    tx: tx.clone(),
                }
            })
        })
        .collect()
}

/// Adds the sums of a step's exchanging workers, in worker order, one
/// exchange after another, and hands every worker the total. It ends when
/// every worker's link is gone; a link gone mid-exchange drops the others'
/// replies, which fails their steps too.
async fn reduce_sums(members: usize, mut rx: tokio::sync::mpsc::UnboundedReceiver<SumAsk>) {
    loop {
        let mut parts: Vec<Option<(Vec<f64>, _)>> = (0..members).map(|_| None).collect();
        for _ in 0..members {
            match rx.recv().await {
                Some((m, sums, reply)) if m < members => parts[m] = Some((sums, reply)),
                _ => return,
            }
        }
        let len = parts
            .first()
            .and_then(|p| p.as_ref())
            .map_or(0, |p| p.0.len());
        let mut total = vec![0.0f64; len];
        let mut replies = Vec::with_capacity(members);
        for p in parts {
            let Some((sums, reply)) = p else { return };
            if sums.len() != len {
                tracing::warn!(
                    "workers sent {} and {len} batch sums for one exchange",
                    sums.len()
                );
                return;
            }
            total.iter_mut().zip(&sums).for_each(|(t, v)| *t += v);
            replies.push(reply);
        }
        for r in replies {
            let _ = r.send(total.clone());
        }
    }
}

impl SumLink {
    /// The sums over every exchanging worker, or None when the exchange
    /// broke down (another worker lost).
    async fn reduce(&self, sums: Vec<f64>) -> Option<Vec<f64>> {
        let (reply, total) = tokio::sync::oneshot::channel();
        self.tx.send((self.member, sums, reply)).ok()?;
        total.await.ok()
    }
}

/// What the coordinator knows of the parameters its workers hold.
#[derive(Default)]
struct Held {
    /// The workers hold the job's parameters (else the next step seeds
    /// them from the coordinator's copy).
    seeded: bool,
    /// The last step, for the workers to apply before the next.
    commit: Option<Commit>,
    /// Step attempts so far: each has its own ring streams.
    round: u64,
}

/// Splits held state into the parameters and the optimizer.
fn held_split(head: &HeldHead, mut values: Vec<f32>) -> Result<(Vec<f32>, Optimizer)> {
    let n = usize::try_from(head.params_len).unwrap_or(usize::MAX);
    if values.len() < n {
        return Err(Error::Job(format!(
            "held state of {} values for {n} parameters",
            values.len()
        )));
    }
    let state = values.split_off(n);
    let mut opt = head.optimizer.clone();
    opt.put_state(n, state)
        .map_err(|e| Error::Job(format!("held optimizer state: {e}")))?;
    Ok((values, opt))
}

/// The failures of one step's workers, and which worker to count as lost:
/// one that failed itself before one that reports its ring peer failed.
#[derive(Default)]
struct Failures {
    own: Vec<(NodeAddr, Error)>,
    peer: Vec<(NodeAddr, Error)>,
}

impl Failures {
    fn add(&mut self, node: NodeAddr, e: Error, peer: bool) {
        if peer {
            self.peer.push((node, e));
        } else {
            self.own.push((node, e));
        }
    }

    fn any(&self) -> bool {
        !self.own.is_empty() || !self.peer.is_empty()
    }

    fn lost(self) -> Option<(NodeAddr, Error)> {
        self.own.into_iter().chain(self.peer).next()
    }
}
