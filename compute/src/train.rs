//! Synchronous data-parallel minibatch SGD, the parts every participant
//! shares: feature scaling, the per-step split of the global batch between
//! workers, the worker's state and step, and an in-process trainer that
//! runs the very same algorithm without a cluster (the reference the
//! distributed run is tested against).
//!
//! Each worker holds a shard of records. Every epoch it shuffles its shard
//! with (seed, epoch, worker index); step `i` of the epoch takes the next
//! slice of that permutation, sized in proportion to the shard, so one
//! epoch visits every record once. The workers hold the parameters: each
//! step they add their gradient sums around a ring (`crate::ring`, in a
//! fixed order), divide by the examples actually used and apply the same
//! optimizer step to their own copies.

use crate::nn::{
    BatchSync, DropoutRng, LocalGroup, Loss, Model, NnError, Optimizer, OptimizerConfig, Params,
    SplitMix64, StatSums, Target,
};
use crate::ops::DatasetStats;
use crate::records::{RecordLayout, Records};
use ndarray::{ArrayViewD, IxDyn};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Nn(#[from] NnError),
    #[error(transparent)]
    Records(#[from] crate::records::RecordError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

// ---------------------------------------------------------------- scaling

/// How features are scaled before they reach the model. Written as its
/// command-line name (`minmax`, `standard`, `none`, `1/255`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum ScaleKind {
    None,
    /// (x - min) / (max - min), as sklearn's MinMaxScaler.
    Minmax,
    /// (x - mean) / std, as sklearn's StandardScaler.
    Standard,
    /// x / d for every feature, as Keras's image recipes (`x / 255.0`):
    /// fixed, so it needs no statistics and keeps a pixel's meaning the
    /// same in every position (min-max stretches a corner pixel that is
    /// never bright to the full range).
    Divide(u32),
}

impl std::str::FromStr for ScaleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ScaleKind::None),
            "minmax" => Ok(ScaleKind::Minmax),
            "standard" => Ok(ScaleKind::Standard),
            other => match other.strip_prefix("1/").map(str::parse::<u32>) {
                Some(Ok(d)) if d > 0 => Ok(ScaleKind::Divide(d)),
                _ => Err(format!(
                    "unknown scaling '{other}': use minmax, standard, none or 1/N (such as \
                     1/255 for 8-bit pixels)"
                )),
            },
        }
    }
}

impl std::fmt::Display for ScaleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScaleKind::None => f.write_str("none"),
            ScaleKind::Minmax => f.write_str("minmax"),
            ScaleKind::Standard => f.write_str("standard"),
            ScaleKind::Divide(d) => write!(f, "1/{d}"),
        }
    }
}

impl From<ScaleKind> for String {
    fn from(k: ScaleKind) -> String {
        k.to_string()
    }
}

impl TryFrom<String> for ScaleKind {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// x' = (x - offset) * factor, per feature, for the kinds fitted on
/// statistics; `1/N` divides every feature and keeps no vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scaler {
    pub kind: ScaleKind,
    pub offset: Vec<f32>,
    pub factor: Vec<f32>,
}

impl Scaler {
    pub fn none() -> Scaler {
        Scaler {
            kind: ScaleKind::None,
            offset: Vec::new(),
            factor: Vec::new(),
        }
    }

    /// The scaler of a kind that needs no statistics (`none`, `1/N`);
    /// None for the kinds fitted on them.
    pub fn fixed(kind: ScaleKind) -> Option<Scaler> {
        matches!(kind, ScaleKind::None | ScaleKind::Divide(_)).then(|| Scaler {
            kind,
            offset: Vec::new(),
            factor: Vec::new(),
        })
    }

    /// Fitted on the training set's statistics. A constant feature gets
    /// factor 1, as sklearn does, instead of a division by zero.
    pub fn fit(kind: ScaleKind, stats: &DatasetStats) -> Scaler {
        let (offset, factor) = match kind {
            ScaleKind::None | ScaleKind::Divide(_) => (Vec::new(), Vec::new()),
            ScaleKind::Minmax => stats
                .min
                .iter()
                .zip(&stats.max)
                .map(|(&lo, &hi)| {
                    let range = hi - lo;
                    (lo, if range > 0.0 { 1.0 / range } else { 1.0 })
                })
                .unzip(),
            ScaleKind::Standard => stats
                .mean
                .iter()
                .zip(&stats.std)
                .map(|(&m, &s)| (m as f32, if s > 0.0 { (1.0 / s) as f32 } else { 1.0 }))
                .unzip(),
        };
        Scaler {
            kind,
            offset,
            factor,
        }
    }

    pub fn apply(&self, x: &mut [f32]) {
        match self.kind {
            ScaleKind::None => return,
            // Divided, not multiplied by the nearest float to 1/d: the
            // same values as Keras's `x / 255.0`.
            ScaleKind::Divide(d) => {
                let d = d as f32;
                x.iter_mut().for_each(|v| *v /= d);
                return;
            }
            ScaleKind::Minmax | ScaleKind::Standard => {}
        }
        for ((v, o), f) in x.iter_mut().zip(&self.offset).zip(&self.factor) {
            *v = (*v - o) * f;
        }
    }

    fn check(&self, features: usize) -> Result<()> {
        if matches!(self.kind, ScaleKind::Minmax | ScaleKind::Standard)
            && (self.offset.len() != features || self.factor.len() != features)
        {
            return Err(TrainError::Invalid(format!(
                "the scaler was fitted on {} features but records have {features}",
                self.offset.len()
            )));
        }
        Ok(())
    }
}

/// The records' labels as stored: class indices, or float targets
/// (regression).
#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    Classes(Vec<u32>),
    Values(Vec<f32>),
}

impl Labels {
    /// Empty labels of the kind `layout` stores.
    pub fn for_layout(layout: &RecordLayout) -> Labels {
        if layout.classified() {
            Labels::Classes(Vec::new())
        } else {
            Labels::Values(Vec::new())
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Labels::Classes(c) => c.len(),
            Labels::Values(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn capacity(&self) -> usize {
        match self {
            Labels::Classes(c) => c.capacity(),
            Labels::Values(v) => v.capacity(),
        }
    }

    fn reserve_exact(&mut self, n: usize) {
        match self {
            Labels::Classes(c) => c.reserve_exact(n),
            Labels::Values(v) => v.reserve_exact(n),
        }
    }

    /// Appends `other`'s labels; both must be of one kind.
    fn extend(&mut self, other: &Labels) -> Result<()> {
        match (self, other) {
            (Labels::Classes(a), Labels::Classes(b)) => a.extend_from_slice(b),
            (Labels::Values(a), Labels::Values(b)) => a.extend_from_slice(b),
            _ => {
                return Err(TrainError::Invalid(
                    "records mix class labels and float targets".into(),
                ))
            }
        }
        Ok(())
    }

    /// The labels at `idx`, in that order, into `out` (reusing its
    /// buffer when it holds labels of the same kind).
    fn gather_into(&self, idx: &[u32], out: &mut Labels) {
        fn pick<T: Copy>(from: &[T], idx: &[u32], to: &mut Vec<T>) {
            to.clear();
            to.extend(idx.iter().map(|&i| from[i as usize]));
        }
        match (self, &mut *out) {
            (Labels::Classes(a), Labels::Classes(b)) => pick(a, idx, b),
            (Labels::Values(a), Labels::Values(b)) => pick(a, idx, b),
            _ => {
                *out = self.same_kind();
                self.gather_into(idx, out);
            }
        }
    }

    fn same_kind(&self) -> Labels {
        match self {
            Labels::Classes(_) => Labels::Classes(Vec::new()),
            Labels::Values(_) => Labels::Values(Vec::new()),
        }
    }
}

/// Decodes and scales every record of a chunk: (features, labels).
pub fn decode_scaled(records: &Records, scaler: &Scaler) -> Result<(Vec<f32>, Labels)> {
    let f = records.layout().features();
    scaler.check(f)?;
    let n = records.len();
    let mut x = vec![0f32; n * f];
    for (i, row) in x.chunks_exact_mut(f).enumerate() {
        records.features_into(i, row);
        scaler.apply(row);
    }
    let y = if records.layout().classified() {
        Labels::Classes((0..n).map(|i| records.label(i)).collect())
    } else {
        Labels::Values((0..n).map(|i| records.target(i)).collect())
    };
    Ok((x, y))
}

// ---------------------------------------------------------------- the plan

/// How the global batch is split between workers at each step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    /// Records per worker, in worker order.
    pub shards: Vec<u64>,
    pub batch: u64,
}

/// One worker's part of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Position in the worker's epoch permutation.
    pub start: u64,
    pub count: u64,
    /// Position of the share's first example in the global batch (keys the
    /// dropout masks, so a split batch gets the masks of the whole one).
    pub first_sample: u64,
}

impl StepPlan {
    pub fn total(&self) -> u64 {
        self.shards.iter().sum()
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.total().div_ceil(self.batch.max(1))
    }

    /// Every worker's share of step `i` (0-based within the epoch).
    pub fn shares(&self, i: u64) -> Vec<Share> {
        let total = self.total().max(1) as u128;
        let steps = self.steps_per_epoch();
        let mut first = 0;
        self.shards
            .iter()
            .map(|&n| {
                let at = |k: u64| -> u64 {
                    if k >= steps {
                        n
                    } else {
                        ((k as u128 * self.batch as u128 * n as u128) / total).min(n as u128) as u64
                    }
                };
                let (start, end) = (at(i), at(i + 1));
                let s = Share {
                    start,
                    count: end - start,
                    first_sample: first,
                };
                first += s.count;
                s
            })
            .collect()
    }
}

// ---------------------------------------------------------------- a worker

/// Parameters and gradients travel as raw little-endian bytes after the
/// request and reply frames (not through serde, which would copy them
/// value by value).
pub fn f32s_to_le(v: &[f32]) -> Vec<u8> {
    to_le(v, f32::to_le_bytes)
}

pub fn f32s_from_le(bytes: &[u8]) -> Result<Vec<f32>, String> {
    from_le(bytes, "float32", f32::from_le_bytes)
}

/// BatchNormalization's sums travel as raw little-endian f64.
pub fn f64s_to_le(v: &[f64]) -> Vec<u8> {
    to_le(v, f64::to_le_bytes)
}

pub fn f64s_from_le(bytes: &[u8]) -> Result<Vec<f64>, String> {
    from_le(bytes, "float64", f64::from_le_bytes)
}

fn to_le<T: Copy, const N: usize>(v: &[T], bytes_of: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(v.len() * N);
    for &x in v {
        bytes.extend_from_slice(&bytes_of(x));
    }
    bytes
}

fn from_le<T, const N: usize>(
    bytes: &[u8],
    what: &str,
    value_of: fn([u8; N]) -> T,
) -> Result<Vec<T>, String> {
    if !bytes.len().is_multiple_of(N) {
        return Err(format!(
            "{} bytes is not a whole number of {what} values",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(N)
        .map(|b| {
            let mut a = [0u8; N];
            a.copy_from_slice(b);
            value_of(a)
        })
        .collect())
}

/// What the model's outputs are compared with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// The records' class labels.
    #[default]
    Labels,
    /// The (scaled) input itself: an autoencoder.
    Input,
}

impl std::str::FromStr for TargetKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "labels" => Ok(TargetKind::Labels),
            "input" => Ok(TargetKind::Input),
            other => Err(format!("unknown target '{other}': use labels or input")),
        }
    }
}

/// The loss and what it compares the outputs with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    pub loss: Loss,
    pub target: TargetKind,
}

impl Objective {
    /// Refuses a model whose outputs cannot be compared with the targets.
    pub fn check(&self, model: &Model) -> Result<()> {
        let out: usize = model.output_shape().iter().product();
        let inp: usize = model.input_shape().iter().product();
        match self.target {
            TargetKind::Input if out != inp => Err(TargetKind::mismatch(model)),
            TargetKind::Labels
                if matches!(self.loss, Loss::SparseCategoricalCrossentropy { .. })
                    && model.output_shape().len() != 1 =>
            {
                Err(TrainError::Invalid(format!(
                    "model {} outputs {:?} per example; class labels need one score per class",
                    model.name(),
                    model.output_shape()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Refuses a loss that cannot compare the model's outputs with the
    /// labels `layout` stores: float targets need a regression loss and a
    /// model with one output.
    pub fn check_labels(&self, model: &Model, layout: &RecordLayout) -> Result<()> {
        if self.target != TargetKind::Labels || layout.classified() {
            return Ok(());
        }
        if matches!(
            self.loss,
            Loss::SparseCategoricalCrossentropy { .. } | Loss::CategoricalCrossentropy { .. }
        ) {
            return Err(TrainError::Invalid(format!(
                "the records hold float targets, not classes, so {} does not apply: use a \
                 regression loss (--loss mean_squared_error, mean_absolute_error or huber)",
                self.loss.to_keras()["class_name"]
            )));
        }
        let out: usize = model.output_shape().iter().product();
        if out != 1 {
            return Err(TrainError::Invalid(format!(
                "the records hold one float target each but model {} outputs {:?} per example; \
                 end it with Dense(1)",
                model.name(),
                model.output_shape()
            )));
        }
        Ok(())
    }

    fn target<'a>(&self, labels: &'a Labels, x: &'a [f32]) -> Target<'a> {
        match (self.target, labels) {
            (TargetKind::Input, _) => Target::Values(x),
            (TargetKind::Labels, Labels::Classes(c)) => Target::Classes(c),
            (TargetKind::Labels, Labels::Values(v)) => Target::Values(v),
        }
    }
}

impl TargetKind {
    fn mismatch(model: &Model) -> TrainError {
        TrainError::Invalid(format!(
            "--target input needs a model whose output has the input's shape; {} maps {:?} to {:?}",
            model.name(),
            model.input_shape(),
            model.output_shape()
        ))
    }
}

/// What a worker needs to know to join a training job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub model_json: String,
    pub layout: RecordLayout,
    pub scaler: Scaler,
    pub seed: u64,
    #[serde(default)]
    pub objective: Objective,
    /// Each epoch takes the shard's records in a fresh random order; off,
    /// in stored order (Keras's `fit(shuffle=False)`).
    #[serde(default = "shuffled")]
    pub shuffle: bool,
}

fn shuffled() -> bool {
    true
}

/// One iteration's part for one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalStep {
    pub epoch: u64,
    /// Global iteration (keys the dropout masks).
    pub iteration: u64,
    pub share: Share,
}

/// One round's request to one worker: one step (exact minibatch SGD, the
/// worker returns its gradient sum) or, with `local`, several steps the
/// worker takes on its own with that optimizer before returning its
/// parameters for the coordinator to average (`--sync K`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRequest {
    /// The worker's index in the coordinator's worker order.
    pub worker: u32,
    pub steps: Vec<LocalStep>,
    pub local: Option<OptimizerConfig>,
    /// The step's batch is split between several workers that exchange
    /// BatchNormalization's sums during the step (one step, no local
    /// optimizer), so every share is normalized over the whole batch.
    #[serde(default)]
    pub exchange: bool,
    /// The worker holds the parameters between steps and applies the
    /// optimizer itself (exact SGD over a ring all-reduce); None, they come
    /// with every request.
    #[serde(default)]
    pub hold: Option<Hold>,
    /// Workers of this step on the worker's host, itself included: they
    /// share its cores, so it computes on its share of them (0 or 1: on
    /// all of them).
    #[serde(default)]
    pub host_workers: u32,
    /// Sent as raw bytes after the request frame: the parameters, or with
    /// `hold.seed` the parameters followed by the optimizer's state.
    #[serde(skip)]
    pub params: Vec<f32>,
}

/// A step's total over every worker, which each worker folds into the
/// parameters it holds: its gradient total came round the ring, the rest
/// (examples used, BatchNormalization's batch sums) comes from the
/// coordinator with the next request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub iteration: u64,
    pub count: u64,
    pub stats: Vec<StatSums>,
}

/// How a step uses the parameters the worker holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hold {
    /// Replaces the held state (the job's first step, or the first after
    /// the workers changed); its vectors are the request's raw values.
    pub seed: Option<HeldHead>,
    /// Applies the previous step first.
    pub commit: Option<Commit>,
}

/// Held state without its vectors: those travel as raw values after the
/// frame, the parameters then the optimizer's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldHead {
    /// The optimizer with its counters; its state vectors follow the
    /// parameters.
    pub optimizer: Optimizer,
    /// Steps applied so far: the iteration of the next step.
    pub version: u64,
    pub params_len: u64,
}

/// What a worker holds between steps under [`Hold`].
struct Held {
    params: Params,
    opt: Optimizer,
    version: u64,
    /// This worker's copy of the last step's total, until it is committed.
    pending: Option<(u64, Vec<f32>)>,
}

impl Held {
    fn seed(model: &Model, head: HeldHead, mut values: Vec<f32>) -> Result<Held> {
        let n = usize::try_from(head.params_len).unwrap_or(usize::MAX);
        if values.len() < n {
            return Err(TrainError::Invalid(format!(
                "seed of {} values for {n} parameters",
                values.len()
            )));
        }
        let state = values.split_off(n);
        let params = model.params_from_flat(values)?;
        let mut opt = head.optimizer;
        opt.put_state(n, state)?;
        Ok(Held {
            params,
            opt,
            version: head.version,
            pending: None,
        })
    }

    fn commit(&mut self, model: &Model, c: &Commit) -> Result<()> {
        if self.version == c.iteration + 1 {
            // Applied already (the step after it began here before a
            // failure elsewhere).
            return Ok(());
        }
        match self.pending.take() {
            Some((it, mut total)) if it == c.iteration && self.version == it => {
                apply_total(
                    &mut self.opt,
                    model,
                    self.params.as_mut_slice(),
                    &mut total,
                    c.count,
                    &c.stats,
                )?;
                crate::nn::recycle(total);
                self.version += 1;
                Ok(())
            }
            _ => Err(TrainError::Invalid(format!(
                "cannot apply step {}: this worker holds the parameters before step {} and no \
                 total for step {}",
                c.iteration, self.version, c.iteration
            ))),
        }
    }
}

/// Divides a step's gradient total by the examples used, applies the
/// optimizer, and folds the batch statistics into the moving averages.
pub fn apply_total(
    opt: &mut Optimizer,
    model: &Model,
    params: &mut [f32],
    total: &mut [f32],
    count: u64,
    stats: &[StatSums],
) -> Result<()> {
    if count == 0 {
        return Err(TrainError::Invalid("a step with no examples".into()));
    }
    let inv = 1.0 / count as f32;
    total.iter_mut().for_each(|g| *g *= inv);
    opt.step(params, total)?;
    model.update_moving_stats(params, stats)?;
    Ok(())
}

/// One worker's sums for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub loss_sum: f64,
    pub correct: u64,
    pub count: u64,
    /// The gradient sum (one step), or the worker's parameters after its
    /// local steps.
    /// Sent as raw bytes after the reply frame.
    #[serde(skip)]
    pub values: Vec<f32>,
    /// Time the worker spent computing, for the coordinator's accounting
    /// of how much of a step is waiting on the network.
    pub compute_us: u64,
    /// BatchNormalization's batch sums over the share (one step), for the
    /// moving statistics.
    #[serde(default)]
    pub stats: Vec<StatSums>,
    /// Bytes this worker sent around the ring in the step.
    #[serde(default)]
    pub ring_bytes: u64,
    /// Of which it wrote to shared memory for a worker on the same host.
    #[serde(default)]
    pub ring_shared_bytes: u64,
}

/// A worker's state for the life of a job: the model and its decoded,
/// scaled records.
pub struct Worker {
    model: Model,
    spec: WorkerSpec,
    x: Vec<f32>,
    y: Labels,
    features: usize,
    perm: Option<(u64, u32, Vec<u32>)>,
    batch_x: Vec<f32>,
    batch_y: Labels,
    /// The worker's own optimizer state under `--sync K`, kept across rounds.
    local_opt: Option<Optimizer>,
    /// The parameters and optimizer of exact SGD over the ring.
    held: Option<Held>,
    /// The gradient's buckets, in the order they go round the ring.
    buckets: Vec<std::ops::Range<usize>>,
}

impl Worker {
    pub fn new(spec: WorkerSpec) -> Result<Worker> {
        let model = Model::from_keras_json(&spec.model_json)?;
        let features = spec.layout.features();
        let wants: usize = model.input_shape().iter().product();
        if wants != features {
            return Err(TrainError::Invalid(format!(
                "model {} takes inputs of shape {:?} ({wants} values) but the records hold {:?} ({features})",
                model.name(),
                model.input_shape(),
                spec.layout.feature_shape
            )));
        }
        spec.scaler.check(features)?;
        spec.objective.check(&model)?;
        spec.objective.check_labels(&model, &spec.layout)?;
        let y = Labels::for_layout(&spec.layout);
        Ok(Worker {
            batch_y: y.same_kind(),
            y,
            spec,
            x: Vec::new(),
            features,
            perm: None,
            batch_x: Vec::new(),
            local_opt: None,
            held: None,
            buckets: crate::ring::buckets(
                &model
                    .param_specs()
                    .iter()
                    .map(|s| s.offset..s.offset + s.len)
                    .collect::<Vec<_>>(),
                crate::ring::BUCKET_VALUES,
            ),
            model,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The gradient's buckets, in the order they go round the ring.
    pub fn buckets(&self) -> &[std::ops::Range<usize>] {
        &self.buckets
    }

    /// Adds one chunk's records to the shard; returns the shard's size.
    pub fn add_chunk(&mut self, bytes: &[u8]) -> Result<u64> {
        let records = self.spec.layout.view("chunk", bytes)?;
        let (x, y) = decode_scaled(&records, &self.spec.scaler)?;
        self.y.extend(&y)?;
        self.x.extend_from_slice(&x);
        self.perm = None;
        Ok(self.records())
    }

    pub fn records(&self) -> u64 {
        self.y.len() as u64
    }

    /// Memory one record takes once decoded: its features as f32, its
    /// label, and its place in the epoch's shuffled order.
    pub fn bytes_per_record(layout: &RecordLayout) -> u64 {
        (layout.features() as u64 + 2) * 4
    }

    /// Memory the records in `chunk_bytes` encoded bytes take once a worker
    /// holds them: what a datanode charges a job before loading them.
    /// Features are stored as f32, so u8 images take four times their
    /// encoded size.
    pub fn decoded_bytes(layout: &RecordLayout, chunk_bytes: u64) -> u64 {
        let records = chunk_bytes / layout.record_size().max(1) as u64;
        records.saturating_mul(Self::bytes_per_record(layout))
    }

    /// Makes room for `records` more records at once, so loading a job's
    /// chunks allocates what was charged for them: a vector grown chunk by
    /// chunk can hold up to twice its length.
    pub fn reserve(&mut self, records: u64) {
        let n = usize::try_from(records).unwrap_or(usize::MAX);
        self.x.reserve_exact(n.saturating_mul(self.features));
        self.y.reserve_exact(n);
    }

    /// Bytes this worker holds: records, their shuffled order, the batch
    /// buffers and the optimizer state of `--sync K`.
    pub fn memory_bytes(&self) -> u64 {
        let perm = self.perm.as_ref().map_or(0, |(_, _, p)| p.capacity());
        let opt = self
            .local_opt
            .as_ref()
            .map_or(0, |o| o.state_len() as u64 * 4);
        let held = self.held.as_ref().map_or(0, |h| {
            let pending = h.pending.as_ref().map_or(0, |(_, t)| t.len());
            (h.params.len() + h.opt.state_len() + pending) as u64 * 4
        });
        let words = self.x.capacity()
            + self.y.capacity()
            + perm
            + self.batch_x.capacity()
            + self.batch_y.capacity();
        words as u64 * 4 + opt + held
    }

    /// The shard's order in `epoch`: Fisher-Yates keyed by the job's seed,
    /// the epoch and the worker's index (stored order without shuffling).
    fn permutation(&mut self, epoch: u64, worker: u32) -> &[u32] {
        let fresh = !matches!(&self.perm, Some((e, w, p)) if *e == epoch && *w == worker && p.len() == self.y.len());
        if fresh {
            let mut p: Vec<u32> = (0..self.y.len() as u32).collect();
            let mut rng = SplitMix64::derive(self.spec.seed, epoch, u64::from(worker));
            let swaps = if self.spec.shuffle { p.len() } else { 0 };
            for i in (1..swaps).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                p.swap(i, j);
            }
            self.perm = Some((epoch, worker, p));
        }
        match &self.perm {
            Some((_, _, p)) => p,
            None => &[],
        }
    }

    /// One round: the gradient sum over the share (one step), or the
    /// parameters after `steps.len()` local optimizer steps. A step with
    /// `exchange` set needs `sync`, its link to the step's other workers.
    pub fn step(&mut self, req: StepRequest, sync: Option<&dyn BatchSync>) -> Result<StepResult> {
        self.step_streamed(req, sync, &mut |_, _| {})
    }

    /// [`Worker::step`] that, on held parameters, hands each bucket of the
    /// gradient sum to `send` as soon as the backward pass has finished it
    /// (bucket index, values), every bucket once and in order, so the ring
    /// can sum it while the pass goes on.
    pub fn step_streamed(
        &mut self,
        mut req: StepRequest,
        sync: Option<&dyn BatchSync>,
        send: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<StepResult> {
        let started = std::time::Instant::now();
        let sync =
            match (req.exchange, sync) {
                (false, _) => None,
                (true, Some(s)) if req.local.is_none() && req.steps.len() == 1 => Some(s),
                (true, Some(_)) => return Err(TrainError::Invalid(
                    "batch statistics are exchanged only in single steps without a local optimizer"
                        .into(),
                )),
                (true, None) => {
                    return Err(TrainError::Invalid(
                        "a step that exchanges batch statistics needs a link to the other workers"
                            .into(),
                    ))
                }
            };
        if let Some(hold) = req.hold.take() {
            return self.held_step(req, hold, sync, started, send);
        }
        let mut params = self
            .model
            .params_from_flat(std::mem::take(&mut req.params))?;
        let (mut loss_sum, mut correct, mut count) = (0.0, 0, 0);
        let mut stats = Vec::new();
        let values = match (req.local, req.steps.as_slice()) {
            (None, [one]) => {
                let g = self.grad_sum(&params, req.worker, one, sync, &mut |_, _| {})?;
                (loss_sum, correct, count) = (g.loss_sum, g.correct, g.count);
                stats = g.stats;
                g.grad
            }
            (None, steps) => {
                return Err(TrainError::Invalid(format!(
                    "{} steps in a round need a local optimizer",
                    steps.len()
                )))
            }
            (Some(cfg), steps) => {
                let n = params.len();
                let opt = self
                    .local_opt
                    .take()
                    .filter(|o| o.config == cfg)
                    .unwrap_or_else(|| {
                        Optimizer::new(cfg, n).with_variables(self.model.trainable_variables())
                    });
                let mut opt = opt;
                for s in steps {
                    let mut g = self.grad_sum(&params, req.worker, s, None, &mut |_, _| {})?;
                    loss_sum += g.loss_sum;
                    correct += g.correct;
                    count += g.count;
                    if g.count > 0 {
                        let inv = 1.0 / g.count as f32;
                        g.grad.iter_mut().for_each(|v| *v *= inv);
                        opt.step(params.as_mut_slice(), &g.grad)?;
                        self.model
                            .update_moving_stats(params.as_mut_slice(), &g.stats)?;
                    }
                    crate::nn::recycle(g.grad);
                }
                self.local_opt = Some(opt);
                params.into_vec()
            }
        };
        Ok(StepResult {
            loss_sum,
            correct,
            count,
            values,
            compute_us: started.elapsed().as_micros() as u64,
            stats,
            ring_bytes: 0,
            ring_shared_bytes: 0,
        })
    }

    /// A step on the held parameters: seed or commit, then this worker's
    /// gradient sum, which the caller adds around the ring and hands back
    /// with [`Worker::hold_total`].
    fn held_step(
        &mut self,
        mut req: StepRequest,
        hold: Hold,
        sync: Option<&dyn BatchSync>,
        started: std::time::Instant,
        send: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<StepResult> {
        let [step] = req.steps.as_slice() else {
            return Err(TrainError::Invalid(
                "a worker holding the parameters takes one step per request".into(),
            ));
        };
        if req.local.is_some() {
            return Err(TrainError::Invalid(
                "a worker holding the parameters has no local optimizer".into(),
            ));
        }
        if let Some(head) = hold.seed {
            self.held = Some(Held::seed(
                &self.model,
                head,
                std::mem::take(&mut req.params),
            )?);
        }
        let mut held = self.held.take().ok_or_else(|| {
            TrainError::Invalid(
                "this worker holds no parameters for the job (lost with a restart?); the \
                 coordinator seeds them again"
                    .into(),
            )
        })?;
        let ready = match &hold.commit {
            Some(c) => held.commit(&self.model, c),
            None => Ok(()),
        }
        .and_then(|()| {
            held.pending = None;
            if held.version == step.iteration {
                Ok(())
            } else {
                Err(TrainError::Invalid(format!(
                    "this worker holds the parameters before step {}, asked for step {}",
                    held.version, step.iteration
                )))
            }
        });
        let mut outbox = crate::ring::Outbox::new(self.buckets.clone());
        let g = ready.and_then(|()| {
            self.grad_sum(&held.params, req.worker, step, sync, &mut |range, grad| {
                outbox.done(range, grad, send)
            })
        });
        self.held = Some(held);
        let g = g?;
        outbox.flush(&g.grad, send);
        Ok(StepResult {
            loss_sum: g.loss_sum,
            correct: g.correct,
            count: g.count,
            values: g.grad,
            compute_us: started.elapsed().as_micros() as u64,
            stats: g.stats,
            ring_bytes: 0,
            ring_shared_bytes: 0,
        })
    }

    /// Keeps the step's total over every worker, to apply when the
    /// coordinator commits the step.
    pub fn hold_total(&mut self, iteration: u64, total: Vec<f32>) -> Result<()> {
        match &mut self.held {
            Some(h) if h.version == iteration && total.len() == h.params.len() => {
                h.pending = Some((iteration, total));
                Ok(())
            }
            Some(h) => Err(TrainError::Invalid(format!(
                "a total of {} values for step {iteration}; this worker holds {} parameters \
                 before step {}",
                total.len(),
                h.params.len(),
                h.version
            ))),
            None => Err(TrainError::Invalid(
                "a step total for a worker that holds no parameters".into(),
            )),
        }
    }

    /// The held state after `commit`: its head and its vectors (the
    /// parameters, then the optimizer's state). A step begun but not
    /// committed is dropped.
    pub fn held_state(&mut self, commit: Option<&Commit>) -> Result<(HeldHead, Vec<f32>)> {
        let held = self.held.as_mut().ok_or_else(|| {
            TrainError::Invalid("this worker holds no parameters for the job".into())
        })?;
        if let Some(c) = commit {
            held.commit(&self.model, c)?;
        }
        held.pending = None;
        let mut optimizer = held.opt.clone();
        let state = optimizer.take_state();
        let mut values = Vec::with_capacity(held.params.len() + state.len());
        values.extend_from_slice(held.params.as_slice());
        values.extend_from_slice(&state);
        Ok((
            HeldHead {
                optimizer,
                version: held.version,
                params_len: held.params.len() as u64,
            },
            values,
        ))
    }

    /// A copy of the held parameters after `commit`, for scoring.
    pub fn held_params(&mut self, commit: Option<&Commit>) -> Result<Vec<f32>> {
        let held = self.held.as_mut().ok_or_else(|| {
            TrainError::Invalid("this worker holds no parameters for the job".into())
        })?;
        if let Some(c) = commit {
            held.commit(&self.model, c)?;
        }
        Ok(held.params.as_slice().to_vec())
    }

    /// The loss, correct count and gradient summed over one share.
    fn grad_sum(
        &mut self,
        params: &Params,
        worker: u32,
        step: &LocalStep,
        sync: Option<&dyn BatchSync>,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<crate::nn::GradSum> {
        let n = self.y.len() as u64;
        let Share {
            start,
            count,
            first_sample,
        } = step.share;
        if start + count > n {
            return Err(TrainError::Invalid(format!(
                "share {start}..{} is past the end of this worker's {n} records",
                start + count
            )));
        }
        let f = self.features;
        let idx: Vec<u32> =
            self.permutation(step.epoch, worker)[start as usize..(start + count) as usize].to_vec();
        self.batch_x.clear();
        for &i in &idx {
            let i = i as usize;
            self.batch_x.extend_from_slice(&self.x[i * f..(i + 1) * f]);
        }
        self.y.gather_into(&idx, &mut self.batch_y);
        let mut dims = vec![count as usize];
        dims.extend_from_slice(self.model.input_shape());
        let xv = ArrayViewD::from_shape(IxDyn(&dims), &self.batch_x)
            .map_err(|e| TrainError::Invalid(format!("batch shape: {e}")))?;
        let dropout = DropoutRng {
            seed: SplitMix64::derive(self.spec.seed, 0xd0, step.iteration).next_u64(),
            first_sample,
        };
        let target = self.spec.objective.target(&self.batch_y, &self.batch_x);
        Ok(self.model.loss_and_grad_sum_streamed(
            &self.spec.objective.loss,
            params,
            xv,
            target,
            Some(dropout),
            sync,
            ready,
        )?)
    }
}

// ---------------------------------------------------------------- the coordinator's arithmetic

/// Adds the small part of the workers' results in worker order: loss,
/// counts and batch statistics (the gradients go round the ring).
#[derive(Default)]
pub struct StepSum {
    pub loss_sum: f64,
    pub correct: u64,
    pub count: u64,
    /// Batch statistics summed over workers, None before the first.
    pub stats: Option<Vec<StatSums>>,
}

impl StepSum {
    pub fn new() -> StepSum {
        StepSum::default()
    }

    pub fn add(&mut self, r: &StepResult) -> Result<()> {
        self.loss_sum += r.loss_sum;
        self.correct += r.correct;
        self.count += r.count;
        match &mut self.stats {
            None => self.stats = Some(r.stats.clone()),
            Some(acc) => {
                if acc.len() != r.stats.len() {
                    return Err(TrainError::Invalid(format!(
                        "a worker sent statistics of {} BatchNormalization calls, another of {}",
                        r.stats.len(),
                        acc.len()
                    )));
                }
                for (a, b) in acc.iter_mut().zip(&r.stats) {
                    a.add(b).map_err(TrainError::Invalid)?;
                }
            }
        }
        Ok(())
    }

    /// The step's figures, and what the workers need to apply it.
    pub fn finish(self, iteration: u64) -> Result<(StepStats, Commit)> {
        if self.count == 0 {
            return Err(TrainError::Invalid("a step with no examples".into()));
        }
        Ok((
            StepStats {
                loss: self.loss_sum / self.count as f64,
                accuracy: self.correct as f64 / self.count as f64,
                count: self.count,
            },
            Commit {
                iteration,
                count: self.count,
                stats: self.stats.unwrap_or_default(),
            },
        ))
    }
}

/// Under `--sync K`: the workers' parameters averaged, weighted by the
/// examples each one used, added in worker order.
pub struct ModelAverage {
    loss_sum: f64,
    correct: u64,
    count: u64,
    sum: Vec<f64>,
}

impl ModelAverage {
    pub fn new(params: usize) -> ModelAverage {
        ModelAverage {
            loss_sum: 0.0,
            correct: 0,
            count: 0,
            sum: vec![0.0; params],
        }
    }

    pub fn add(&mut self, r: &StepResult) -> Result<()> {
        if r.values.len() != self.sum.len() {
            return Err(TrainError::Invalid(format!(
                "a worker sent {} parameters, the model has {}",
                r.values.len(),
                self.sum.len()
            )));
        }
        self.loss_sum += r.loss_sum;
        self.correct += r.correct;
        self.count += r.count;
        let w = r.count as f64;
        for (a, b) in self.sum.iter_mut().zip(&r.values) {
            *a += w * f64::from(*b);
        }
        Ok(())
    }

    /// Replaces `params` with the average.
    pub fn apply(self, params: &mut [f32]) -> Result<StepStats> {
        if self.count == 0 {
            return Err(TrainError::Invalid("a round with no examples".into()));
        }
        let inv = 1.0 / self.count as f64;
        for (p, s) in params.iter_mut().zip(&self.sum) {
            *p = (s * inv) as f32;
        }
        Ok(StepStats {
            loss: self.loss_sum / self.count as f64,
            accuracy: self.correct as f64 / self.count as f64,
            count: self.count,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    pub loss: f64,
    pub accuracy: f64,
    pub count: u64,
}

/// Which workers of a step exchange BatchNormalization's sums: those with
/// examples in the step, when there are at least two of them.
pub fn exchanges(shares: &[Share]) -> Vec<bool> {
    let busy = shares.iter().filter(|s| s.count > 0).count();
    shares.iter().map(|s| busy > 1 && s.count > 0).collect()
}

/// The same algorithm in one process: `workers` play the datanodes, each
/// holding the parameters, their gradients added in the ring's order.
pub fn train_local(
    workers: &mut [Worker],
    params: &mut Params,
    optimizer: OptimizerConfig,
    batch: u64,
    epochs: u64,
    max_iter: Option<u64>,
    mut on_step: impl FnMut(u64, &StepStats),
) -> Result<()> {
    let plan = StepPlan {
        shards: workers.iter().map(Worker::records).collect(),
        batch,
    };
    let model = workers
        .first()
        .map(|w| w.model().clone())
        .ok_or_else(|| TrainError::Invalid("no workers".into()))?;
    let mut opt =
        Optimizer::new(optimizer, params.len()).with_variables(model.trainable_variables());
    let mut seed_values = params.as_slice().to_vec();
    seed_values.extend(opt.take_state());
    let mut seed = Some(HeldHead {
        optimizer: opt,
        version: 0,
        params_len: params.len() as u64,
    });
    let mut commit: Option<Commit> = None;
    let mut iteration = 0;
    'epochs: for epoch in 0..epochs {
        for i in 0..plan.steps_per_epoch() {
            if max_iter.is_some_and(|m| iteration >= m) {
                break 'epochs;
            }
            let shares = plan.shares(i);
            let exchange = exchanges(&shares);
            let seeding = seed.take();
            let requests: Vec<StepRequest> = shares
                .iter()
                .enumerate()
                .map(|(w, &share)| StepRequest {
                    worker: w as u32,
                    steps: vec![LocalStep {
                        epoch,
                        iteration,
                        share,
                    }],
                    local: None,
                    exchange: exchange[w],
                    hold: Some(Hold {
                        seed: seeding.clone(),
                        commit: commit.clone(),
                    }),
                    host_workers: 1,
                    params: if seeding.is_some() {
                        seed_values.clone()
                    } else {
                        Vec::new()
                    },
                })
                .collect();
            // Workers that exchange statistics run side by side, as on the
            // datanodes; the others run alone.
            let group = LocalGroup::new(exchange.iter().filter(|&&e| e).count());
            let results: Vec<Result<StepResult>> = std::thread::scope(|s| {
                let mut members = 0;
                let handles: Vec<_> = workers
                    .iter_mut()
                    .zip(requests)
                    .map(|(worker, req)| {
                        let member = req.exchange.then(|| {
                            members += 1;
                            group.member(members - 1)
                        });
                        s.spawn(move || {
                            let sync = member.as_ref().map(|m| m as &dyn BatchSync);
                            worker.step(req, sync)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(TrainError::Invalid("a worker's step panicked".into()))
                        })
                    })
                    .collect()
            });
            let results = results.into_iter().collect::<Result<Vec<_>>>()?;
            let mut sum = StepSum::new();
            for r in &results {
                sum.add(r)?;
            }
            let parts: Vec<&[f32]> = results.iter().map(|r| r.values.as_slice()).collect();
            let buckets = workers
                .first()
                .map(|w| w.buckets().to_vec())
                .unwrap_or_default();
            let total = crate::ring::sum_in_buckets(&parts, &buckets);
            for w in workers.iter_mut() {
                w.hold_total(iteration, total.clone())?;
            }
            let (stats, c) = sum.finish(iteration)?;
            commit = Some(c);
            on_step(iteration, &stats);
            iteration += 1;
        }
    }
    if let Some(w) = workers.first_mut() {
        if seed.is_none() {
            let (head, mut values) = w.held_state(commit.as_ref())?;
            values.truncate(head.params_len as usize);
            *params = model.params_from_flat(values)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(shuffle: bool) -> Worker {
        let model = serde_json::json!({"class_name": "Sequential", "config": {"name": "m",
        "layers": [
            {"class_name": "InputLayer", "config": {"name": "in", "batch_shape": [null, 2]}},
            {"class_name": "Dense", "config": {"name": "out", "units": 3, "activation": "softmax"}}
        ]}});
        let layout = RecordLayout::new(
            vec![2],
            crate::records::DType::F32,
            crate::records::DType::U8,
        )
        .unwrap();
        let mut bytes = Vec::new();
        for i in 0..50 {
            crate::records::encode_record(&layout, &[i as f32, 1.0], (i % 3) as f64, &mut bytes);
        }
        let mut w = Worker::new(WorkerSpec {
            model_json: model.to_string(),
            layout,
            scaler: Scaler::none(),
            seed: 7,
            objective: Objective::default(),
            shuffle,
        })
        .unwrap();
        w.add_chunk(&bytes).unwrap();
        w
    }

    #[test]
    fn without_shuffling_every_epoch_takes_the_stored_order() {
        let stored: Vec<u32> = (0..50).collect();
        let mut w = worker(false);
        for epoch in 0..3 {
            assert_eq!(w.permutation(epoch, 1), stored.as_slice());
        }
        let mut w = worker(true);
        let first = w.permutation(0, 1).to_vec();
        assert_ne!(first, stored, "shuffled");
        assert_ne!(
            w.permutation(1, 1),
            first.as_slice(),
            "a new order each epoch"
        );
    }

    #[test]
    fn pixels_divided_by_255_are_keras_values_in_every_position() {
        let kind: ScaleKind = "1/255".parse().unwrap();
        assert_eq!(kind, ScaleKind::Divide(255));
        assert_eq!(kind.to_string(), "1/255");
        // Written as its command-line name, so train.json and Python read it.
        assert_eq!(serde_json::to_string(&kind).unwrap(), "\"1/255\"");
        let back: ScaleKind = serde_json::from_str("\"minmax\"").unwrap();
        assert_eq!(back, ScaleKind::Minmax);
        for bad in ["1/0", "1/x", "2/255", "minmx"] {
            let e = bad.parse::<ScaleKind>().unwrap_err();
            assert!(e.contains(bad) && e.contains("1/255"), "{e}");
        }
        // A corner pixel never brighter than 16 keeps its meaning: min-max
        // would stretch it to 1.0.
        let stats = DatasetStats {
            min: vec![0.0, 0.0],
            max: vec![16.0, 255.0],
            count: 1,
            mean: vec![8.0, 100.0],
            std: vec![1.0, 1.0],
            label_counts: vec![1],
        };
        let s = Scaler::fit(kind, &stats);
        let mut x: Vec<f32> = vec![16.0, 77.0];
        s.apply(&mut x);
        assert_eq!(x, vec![16.0f32 / 255.0, 77.0f32 / 255.0]);
        let mut m = vec![16.0, 77.0];
        Scaler::fit(ScaleKind::Minmax, &stats).apply(&mut m);
        assert_eq!(m[0], 1.0);
        assert!(Scaler::fixed(ScaleKind::Minmax).is_none());
    }

    #[test]
    fn shares_cover_every_record_once_per_epoch() {
        for (shards, batch) in [
            (vec![100, 50, 77], 32),
            (vec![1, 1, 1], 2),
            (vec![1000], 100),
            (vec![10, 0, 5], 7),
        ] {
            let plan = StepPlan {
                shards: shards.clone(),
                batch,
            };
            let mut seen = vec![0u64; shards.len()];
            for i in 0..plan.steps_per_epoch() {
                let shares = plan.shares(i);
                let total: u64 = shares.iter().map(|s| s.count).sum();
                assert!(total <= batch + shards.len() as u64);
                for (w, s) in shares.iter().enumerate() {
                    assert_eq!(s.start, seen[w], "contiguous");
                    seen[w] += s.count;
                }
            }
            assert_eq!(seen, shards);
        }
    }
}

// ---------------------------------------------------------------- scoring as a map task

/// Loss, accuracy and confusion matrix of a model over records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreOp {
    pub model_json: String,
    /// Empty with `held`: the datanode fills them in.
    pub params: Vec<f32>,
    pub scaler: Scaler,
    #[serde(default)]
    pub objective: Objective,
    /// Score with the parameters a training job's worker holds on the node
    /// that runs the task, rather than parameters sent with every task.
    #[serde(default)]
    pub held: Option<HeldParams>,
}

/// What a map task that runs a model over a chunk starts from: the model,
/// its parameters, and the chunk's records decoded and scaled.
struct MapInput {
    model: Model,
    params: Params,
    x: Vec<f32>,
    y: Labels,
}

impl MapInput {
    fn decode(
        model_json: &str,
        params: &[f32],
        scaler: &Scaler,
        records: &Records,
    ) -> Result<MapInput, crate::ops::OpError> {
        let fail = |e: String| crate::ops::OpError::Invalid(e);
        let model = Model::from_keras_json(model_json).map_err(|e| fail(e.to_string()))?;
        let params = model
            .params_from_flat(params.to_vec())
            .map_err(|e| fail(e.to_string()))?;
        let wants: usize = model.input_shape().iter().product();
        if wants != records.layout().features() {
            return Err(fail(format!(
                "model {} takes {wants} input values but the records hold {}",
                model.name(),
                records.layout().features()
            )));
        }
        let (x, y) = decode_scaled(records, scaler).map_err(|e| fail(e.to_string()))?;
        Ok(MapInput {
            model,
            params,
            x,
            y,
        })
    }

    /// The features as the model's input batch.
    fn view(&self) -> Result<ArrayViewD<'_, f32>, crate::ops::OpError> {
        let mut dims = vec![self.y.len()];
        dims.extend_from_slice(self.model.input_shape());
        ArrayViewD::from_shape(IxDyn(&dims), &self.x)
            .map_err(|e| crate::ops::OpError::Invalid(e.to_string()))
    }
}

/// A model's outputs for every record, as a map task: the predictions come
/// back in chunk order, so a dataset's predictions are in record order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PredictOp {
    pub model_json: String,
    pub params: Vec<f32>,
    pub scaler: Scaler,
}

/// Outputs of consecutive records, `outputs` values each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Predictions {
    pub outputs: usize,
    pub values: Vec<f32>,
}

impl crate::ops::MapOp for PredictOp {
    type Partial = Predictions;

    fn map(&self, records: &Records) -> Result<Predictions, crate::ops::OpError> {
        let fail = |e: String| crate::ops::OpError::Invalid(e);
        let input = MapInput::decode(&self.model_json, &self.params, &self.scaler, records)?;
        let (model, params) = (&input.model, &input.params);
        let xv = input.view()?;
        let out = model.predict(params, xv).map_err(|e| fail(e.to_string()))?;
        let outputs = model.output_shape().iter().product();
        Ok(Predictions {
            outputs,
            values: out.iter().copied().collect(),
        })
    }

    fn combine(&self, mut a: Predictions, b: Predictions) -> Predictions {
        a.values.extend_from_slice(&b.values);
        a.outputs = a.outputs.max(b.outputs);
        a
    }
}

/// Which job's held parameters a score uses, after which step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldParams {
    pub job: u64,
    pub commit: Option<Commit>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub classes: usize,
    pub count: u64,
    pub correct: u64,
    pub loss_sum: f64,
    /// `confusion[label * classes + predicted]`.
    pub confusion: Vec<u64>,
}

impl Scores {
    pub fn accuracy(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.correct as f64 / self.count as f64
        }
    }

    pub fn loss(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.loss_sum / self.count as f64
        }
    }
}

impl crate::ops::MapOp for ScoreOp {
    type Partial = Scores;

    fn map(&self, records: &Records) -> Result<Scores, crate::ops::OpError> {
        let fail = |e: String| crate::ops::OpError::Invalid(e);
        let input = MapInput::decode(&self.model_json, &self.params, &self.scaler, records)?;
        let (model, params) = (&input.model, &input.params);
        let xv = input.view()?;
        self.objective
            .check(model)
            .and_then(|()| self.objective.check_labels(model, records.layout()))
            .map_err(|e| fail(e.to_string()))?;
        let e = model
            .evaluate_with(
                &self.objective.loss,
                params,
                xv,
                self.objective.target(&input.y, &input.x),
            )
            .map_err(|e| fail(e.to_string()))?;
        Ok(Scores {
            classes: e.classes,
            count: e.count,
            correct: e.correct,
            loss_sum: e.loss_sum,
            confusion: e.confusion,
        })
    }

    fn combine(&self, mut a: Scores, b: Scores) -> Scores {
        if a.count == 0 && a.confusion.is_empty() {
            return b;
        }
        a.count += b.count;
        a.correct += b.correct;
        a.loss_sum += b.loss_sum;
        for (x, y) in a.confusion.iter_mut().zip(&b.confusion) {
            *x += y;
        }
        a
    }
}
