//! Optimizers with Keras 3's update formulas, on flat parameter vectors:
//! SGD (momentum, Nesterov), Adam, AdamW, RMSprop (momentum, centered),
//! Adagrad and Nadam, with Keras's clipping (clipnorm, global_clipnorm,
//! clipvalue), weight decay and learning-rate schedules.
//!
//! Keras applies, each step: the learning rate of the schedule at the
//! current iteration, gradient clipping, weight decay (`w -= w * wd * lr`),
//! then the algorithm's update, to trainable variables only.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::error::{NnError, Result};

/// Keras `SGD(learning_rate, momentum, nesterov)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub nesterov: bool,
}

impl Default for Sgd {
    fn default() -> Self {
        Sgd {
            lr: 0.01,
            momentum: 0.0,
            nesterov: false,
        }
    }
}

/// Keras `Adam(learning_rate, beta_1, beta_2, epsilon)` without amsgrad;
/// the same fields serve AdamW and Nadam.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Adam {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
}

impl Default for Adam {
    fn default() -> Self {
        Adam {
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-7,
        }
    }
}

/// Keras `RMSprop(learning_rate, rho, momentum, epsilon, centered)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RmsProp {
    pub lr: f32,
    pub rho: f32,
    pub momentum: f32,
    pub epsilon: f32,
    pub centered: bool,
}

impl Default for RmsProp {
    fn default() -> Self {
        RmsProp {
            lr: 0.001,
            rho: 0.9,
            momentum: 0.0,
            epsilon: 1e-7,
            centered: false,
        }
    }
}

/// Keras `Adagrad(learning_rate, initial_accumulator_value, epsilon)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Adagrad {
    pub lr: f32,
    pub initial_accumulator: f32,
    pub epsilon: f32,
}

impl Default for Adagrad {
    fn default() -> Self {
        Adagrad {
            lr: 0.001,
            initial_accumulator: 0.1,
            epsilon: 1e-7,
        }
    }
}

/// The update rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Algorithm {
    Sgd(Sgd),
    Adam(Adam),
    /// Adam with decoupled weight decay (Keras's default 0.004 unless the
    /// config's `weight_decay` says otherwise).
    AdamW(Adam),
    RmsProp(RmsProp),
    Adagrad(Adagrad),
    Nadam(Adam),
}

impl Algorithm {
    fn lr(&self) -> f32 {
        match self {
            Algorithm::Sgd(s) => s.lr,
            Algorithm::Adam(a) | Algorithm::AdamW(a) | Algorithm::Nadam(a) => a.lr,
            Algorithm::RmsProp(r) => r.lr,
            Algorithm::Adagrad(a) => a.lr,
        }
    }
}

/// Keras's learning-rate schedules, evaluated at the optimizer's iteration
/// count before the step (as Keras does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    Exponential {
        initial: f32,
        decay_steps: f32,
        decay_rate: f32,
        staircase: bool,
    },
    /// `values[i]` while `step <= boundaries[i]`; the last value after.
    PiecewiseConstant {
        boundaries: Vec<f32>,
        values: Vec<f32>,
    },
    Cosine {
        initial: f32,
        decay_steps: f32,
        alpha: f32,
        warmup_target: Option<f32>,
        warmup_steps: f32,
    },
}

impl Schedule {
    pub fn at(&self, step: u64) -> f32 {
        let step = step as f32;
        match self {
            Schedule::Exponential {
                initial,
                decay_steps,
                decay_rate,
                staircase,
            } => {
                let mut p = step / decay_steps;
                if *staircase {
                    p = p.floor();
                }
                initial * decay_rate.powf(p)
            }
            Schedule::PiecewiseConstant { boundaries, values } => {
                let i = boundaries
                    .iter()
                    .position(|b| step <= *b)
                    .unwrap_or(boundaries.len());
                values.get(i).copied().unwrap_or(0.0)
            }
            Schedule::Cosine {
                initial,
                decay_steps,
                alpha,
                warmup_target,
                warmup_steps,
            } => {
                let decay = |s: f32, from: f32| {
                    let frac = s / decay_steps;
                    let cosine = 0.5 * (1.0 + (std::f32::consts::PI * frac).cos());
                    from * ((1.0 - alpha) * cosine + alpha)
                };
                match warmup_target {
                    None => decay(step.min(*decay_steps), *initial),
                    Some(target) => {
                        let s = step.min(decay_steps + warmup_steps);
                        if s < *warmup_steps {
                            (target - initial) * (s / warmup_steps) + initial
                        } else {
                            decay(s - warmup_steps, *target)
                        }
                    }
                }
            }
        }
    }
}

/// An optimizer as `compile()` configures it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    pub algorithm: Algorithm,
    /// Overrides the algorithm's constant learning rate.
    #[serde(default)]
    pub schedule: Option<Schedule>,
    #[serde(default)]
    pub weight_decay: Option<f32>,
    /// Per-variable L2-norm clipping.
    #[serde(default)]
    pub clipnorm: Option<f32>,
    /// Clipping of the norm of all gradients together.
    #[serde(default)]
    pub global_clipnorm: Option<f32>,
    #[serde(default)]
    pub clipvalue: Option<f32>,
}

impl From<Algorithm> for OptimizerConfig {
    fn from(algorithm: Algorithm) -> Self {
        let weight_decay = matches!(algorithm, Algorithm::AdamW(_)).then_some(0.004);
        OptimizerConfig {
            algorithm,
            schedule: None,
            weight_decay,
            clipnorm: None,
            global_clipnorm: None,
            clipvalue: None,
        }
    }
}

impl From<Sgd> for OptimizerConfig {
    fn from(s: Sgd) -> Self {
        Algorithm::Sgd(s).into()
    }
}

impl From<Adam> for OptimizerConfig {
    fn from(a: Adam) -> Self {
        Algorithm::Adam(a).into()
    }
}

impl OptimizerConfig {
    /// The learning rate at `iteration`.
    pub fn lr_at(&self, iteration: u64) -> f32 {
        match &self.schedule {
            Some(s) => s.at(iteration),
            None => self.algorithm.lr(),
        }
    }
}

/// An optimizer and its state (serialisable, to checkpoint a job).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Optimizer {
    pub config: OptimizerConfig,
    /// Steps taken so far (Keras's `iterations`).
    pub iterations: u64,
    /// SGD velocity, Adam's first moment, Adagrad's accumulator, RMSprop's
    /// momentum.
    m: Vec<f32>,
    /// Adam's second moment, RMSprop's velocity.
    v: Vec<f32>,
    /// Centered RMSprop's average gradient.
    #[serde(default)]
    a: Vec<f32>,
    /// Nadam's running product of momentum schedule terms.
    #[serde(default = "one")]
    u_product: f32,
    /// The trainable variables as (offset, length): clipnorm clips each
    /// alone, and nothing outside them moves. Empty means one variable
    /// covering everything.
    #[serde(default)]
    variables: Vec<(usize, usize)>,
}

fn one() -> f32 {
    1.0
}

/// Elements per parallel block: element-wise updates, so splitting cannot
/// change results.
const BLOCK: usize = 1 << 15;

impl Optimizer {
    /// State for `n` parameters, all zero (Adagrad's accumulator at its
    /// initial value), as Keras starts.
    pub fn new(config: impl Into<OptimizerConfig>, n: usize) -> Self {
        let config = config.into();
        let (m, v, a) = match config.algorithm {
            Algorithm::Sgd(s) if s.momentum == 0.0 => (0, 0, 0),
            Algorithm::Sgd(_) => (n, 0, 0),
            Algorithm::Adam(_) | Algorithm::AdamW(_) | Algorithm::Nadam(_) => (n, n, 0),
            Algorithm::RmsProp(r) => (
                if r.momentum > 0.0 { n } else { 0 },
                n,
                if r.centered { n } else { 0 },
            ),
            Algorithm::Adagrad(_) => (n, 0, 0),
        };
        let mut m = vec![0.0; m];
        if let Algorithm::Adagrad(g) = config.algorithm {
            m.fill(g.initial_accumulator);
        }
        Optimizer {
            config,
            iterations: 0,
            m,
            v: vec![0.0; v],
            a: vec![0.0; a],
            u_product: 1.0,
            variables: Vec::new(),
        }
    }

    /// Limits updates to these variables, `(offset, length)` each in the
    /// flat vector: the model's trainable weights.
    pub fn with_variables(mut self, variables: Vec<(usize, usize)>) -> Self {
        self.variables = variables;
        self
    }

    /// Moves the state vectors out as one flat vector (velocity or first
    /// moment, then second moment, then centered average), leaving the
    /// counters: the small part travels in a message frame, the large one
    /// as raw bytes after it.
    pub fn take_state(&mut self) -> Vec<f32> {
        let mut flat = std::mem::take(&mut self.m);
        flat.append(&mut self.v);
        flat.append(&mut self.a);
        flat
    }

    /// Puts back what [`Optimizer::take_state`] took, for `n` parameters;
    /// a vector of the wrong length for this optimizer is refused.
    pub fn put_state(&mut self, n: usize, flat: Vec<f32>) -> Result<()> {
        let fresh = Optimizer::new(self.config.clone(), n);
        let (m, v) = (fresh.m.len(), fresh.v.len());
        let want = fresh.state_len();
        if flat.len() != want {
            return Err(NnError::Optimizer(format!(
                "optimizer state of {} values for {n} parameters, which need {want}",
                flat.len()
            )));
        }
        let mut flat = flat;
        let a = flat.split_off(m + v);
        let v = flat.split_off(m);
        (self.m, self.v, self.a) = (flat, v, a);
        Ok(())
    }

    /// Values of state kept (velocity, moments), for memory accounting.
    pub fn state_len(&self) -> usize {
        self.m.len() + self.v.len() + self.a.len()
    }

    fn variables(&self, n: usize) -> Vec<(usize, usize)> {
        if self.variables.is_empty() {
            vec![(0, n)]
        } else {
            self.variables.clone()
        }
    }

    /// Keras's `_clip_gradients`: clipnorm per variable, else the global
    /// norm, else clipvalue. Norms are summed in a fixed order.
    fn clip(&self, vars: &[(usize, usize)], grad: &[f32]) -> Option<Vec<f32>> {
        let c = &self.config;
        let norm = |g: &[f32]| g.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>();
        if let Some(cn) = c.clipnorm.filter(|v| *v > 0.0) {
            let mut g = grad.to_vec();
            for &(o, l) in vars {
                let denom = (norm(&g[o..o + l]).sqrt() as f32).max(cn);
                g[o..o + l].iter_mut().for_each(|v| *v = *v * cn / denom);
            }
            return Some(g);
        }
        if let Some(gn) = c.global_clipnorm.filter(|v| *v > 0.0) {
            let total = vars
                .iter()
                .map(|&(o, l)| norm(&grad[o..o + l]))
                .sum::<f64>()
                .sqrt() as f32;
            let scale = gn * (1.0 / total).min(1.0 / gn);
            return Some(grad.iter().map(|v| v * scale).collect());
        }
        if let Some(cv) = c.clipvalue.filter(|v| *v > 0.0) {
            return Some(grad.iter().map(|v| v.clamp(-cv, cv)).collect());
        }
        None
    }

    /// One update with the mean gradient over the global batch.
    pub fn step(&mut self, params: &mut [f32], grad_mean: &[f32]) -> Result<()> {
        if params.len() != grad_mean.len() {
            return Err(NnError::Optimizer(format!(
                "{} parameters but {} gradient values",
                params.len(),
                grad_mean.len()
            )));
        }
        let state_len = self.m.len().max(self.v.len());
        if state_len != 0 && state_len != params.len() {
            return Err(NnError::Optimizer(format!(
                "state for {state_len} parameters, given {}",
                params.len()
            )));
        }
        let vars = self.variables(params.len());
        if let Some(&(o, l)) = vars.iter().find(|(o, l)| o + l > params.len()) {
            return Err(NnError::Optimizer(format!(
                "variable {o}..{} is past the {} parameters",
                o + l,
                params.len()
            )));
        }
        let lr = self.config.lr_at(self.iterations);
        let clipped = self.clip(&vars, grad_mean);
        let grad = clipped.as_deref().unwrap_or(grad_mean);
        if let Some(wd) = self.config.weight_decay {
            for &(o, l) in &vars {
                params[o..o + l]
                    .par_chunks_mut(BLOCK)
                    .for_each(|w| w.iter_mut().for_each(|w| *w -= *w * wd * lr));
            }
        }
        // Nadam's momentum-schedule product advances once per step,
        // before the variables are updated.
        let t = (self.iterations + 1) as f32;
        if let Algorithm::Nadam(a) = self.config.algorithm {
            self.u_product *= a.beta1 * (1.0 - 0.5 * 0.96f32.powf(t));
        }
        let u_product = self.u_product;
        let algorithm = self.config.algorithm;
        for &(o, l) in &vars {
            let w = &mut params[o..o + l];
            let g = &grad[o..o + l];
            let m: &mut [f32] = if self.m.is_empty() {
                &mut []
            } else {
                &mut self.m[o..o + l]
            };
            let v: &mut [f32] = if self.v.is_empty() {
                &mut []
            } else {
                &mut self.v[o..o + l]
            };
            let a: &mut [f32] = if self.a.is_empty() {
                &mut []
            } else {
                &mut self.a[o..o + l]
            };
            update(algorithm, lr, t, u_product, w, g, m, v, a);
        }
        self.iterations += 1;
        Ok(())
    }
}

/// One algorithm's update of one variable, in parallel blocks.
#[allow(clippy::too_many_arguments)]
fn update(
    algorithm: Algorithm,
    lr: f32,
    t: f32,
    u_product: f32,
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    a: &mut [f32],
) {
    match algorithm {
        Algorithm::Sgd(s) if s.momentum == 0.0 => {
            w.par_chunks_mut(BLOCK)
                .zip(g.par_chunks(BLOCK))
                .for_each(|(w, g)| w.iter_mut().zip(g).for_each(|(w, g)| *w -= g * lr));
        }
        Algorithm::Sgd(s) => {
            w.par_chunks_mut(BLOCK)
                .zip(g.par_chunks(BLOCK))
                .zip(m.par_chunks_mut(BLOCK))
                .for_each(|((w, g), m)| {
                    for ((w, g), m) in w.iter_mut().zip(g).zip(m.iter_mut()) {
                        *m = *m * s.momentum - g * lr;
                        if s.nesterov {
                            *w += *m * s.momentum - g * lr;
                        } else {
                            *w += *m;
                        }
                    }
                });
        }
        Algorithm::Adam(p) | Algorithm::AdamW(p) => {
            // Computed in f32, as Keras does for float32 variables.
            let alpha = lr * (1.0 - p.beta2.powf(t)).sqrt() / (1.0 - p.beta1.powf(t));
            w.par_chunks_mut(BLOCK)
                .zip(g.par_chunks(BLOCK))
                .zip(m.par_chunks_mut(BLOCK))
                .zip(v.par_chunks_mut(BLOCK))
                .for_each(|(((w, g), m), v)| {
                    for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                    {
                        *m += (g - *m) * (1.0 - p.beta1);
                        *v += (g * g - *v) * (1.0 - p.beta2);
                        *w -= (*m * alpha) / (v.sqrt() + p.epsilon);
                    }
                });
        }
        Algorithm::Nadam(p) => {
            let u_t = p.beta1 * (1.0 - 0.5 * 0.96f32.powf(t));
            let u_t1 = p.beta1 * (1.0 - 0.5 * 0.96f32.powf(t + 1.0));
            let u_product_t1 = u_product * u_t1;
            let beta2_power = p.beta2.powf(t);
            w.par_chunks_mut(BLOCK)
                .zip(g.par_chunks(BLOCK))
                .zip(m.par_chunks_mut(BLOCK))
                .zip(v.par_chunks_mut(BLOCK))
                .for_each(|(((w, g), m), v)| {
                    for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                    {
                        *m += (g - *m) * (1.0 - p.beta1);
                        *v += (g * g - *v) * (1.0 - p.beta2);
                        let m_hat =
                            u_t1 * *m / (1.0 - u_product_t1) + (1.0 - u_t) * g / (1.0 - u_product);
                        let v_hat = *v / (1.0 - beta2_power);
                        *w -= (m_hat * lr) / (v_hat.sqrt() + p.epsilon);
                    }
                });
        }
        Algorithm::RmsProp(r) => {
            for (i, (w, g)) in w.iter_mut().zip(g).enumerate() {
                v[i] = r.rho * v[i] + (1.0 - r.rho) * g * g;
                let denominator = if r.centered {
                    a[i] = r.rho * a[i] + (1.0 - r.rho) * g;
                    v[i] - a[i] * a[i] + r.epsilon
                } else {
                    v[i] + r.epsilon
                };
                let increment = lr * g / denominator.sqrt();
                if r.momentum > 0.0 {
                    m[i] = r.momentum * m[i] + increment;
                    *w -= m[i];
                } else {
                    *w -= increment;
                }
            }
        }
        Algorithm::Adagrad(p) => {
            w.par_chunks_mut(BLOCK)
                .zip(g.par_chunks(BLOCK))
                .zip(m.par_chunks_mut(BLOCK))
                .for_each(|((w, g), acc)| {
                    for ((w, g), acc) in w.iter_mut().zip(g).zip(acc.iter_mut()) {
                        *acc += g * g;
                        *w -= lr * g / (*acc + p.epsilon).sqrt();
                    }
                });
        }
    }
}

impl OptimizerConfig {
    /// The optimizer as Keras serialises it in a model's `compile_config`.
    pub fn to_keras(&self) -> serde_json::Value {
        let lr = match &self.schedule {
            None => serde_json::json!(self.algorithm.lr()),
            Some(s) => schedule_to_keras(s),
        };
        let (class, mut config) = match self.algorithm {
            Algorithm::Sgd(s) => (
                "SGD",
                serde_json::json!({"name": "SGD", "momentum": s.momentum, "nesterov": s.nesterov}),
            ),
            Algorithm::Adam(a) | Algorithm::AdamW(a) | Algorithm::Nadam(a) => {
                let class = match self.algorithm {
                    Algorithm::AdamW(_) => "AdamW",
                    Algorithm::Nadam(_) => "Nadam",
                    _ => "Adam",
                };
                let mut c = serde_json::json!({
                    "name": class.to_lowercase(), "beta_1": a.beta1, "beta_2": a.beta2,
                    "epsilon": a.epsilon,
                });
                if class != "Nadam" {
                    c["amsgrad"] = false.into();
                }
                (class, c)
            }
            Algorithm::RmsProp(r) => (
                "RMSprop",
                serde_json::json!({"name": "rmsprop", "rho": r.rho, "momentum": r.momentum,
                    "epsilon": r.epsilon, "centered": r.centered}),
            ),
            Algorithm::Adagrad(a) => (
                "Adagrad",
                serde_json::json!({"name": "adagrad",
                    "initial_accumulator_value": a.initial_accumulator, "epsilon": a.epsilon}),
            ),
        };
        config["learning_rate"] = lr;
        config["weight_decay"] = self.weight_decay.into();
        config["clipnorm"] = self.clipnorm.into();
        config["global_clipnorm"] = self.global_clipnorm.into();
        config["clipvalue"] = self.clipvalue.into();
        serde_json::json!({
            "module": "keras.optimizers",
            "class_name": class,
            "config": config,
            "registered_name": null,
        })
    }

    /// A `compile_config` for a model trained with this optimizer and
    /// `loss`.
    pub fn keras_compile_config_with(&self, loss: &super::loss::Loss) -> serde_json::Value {
        let metrics = if loss.is_classification() {
            serde_json::json!(["accuracy"])
        } else {
            serde_json::json!([])
        };
        serde_json::json!({
            "optimizer": self.to_keras(),
            "loss": loss.to_keras(),
            "metrics": metrics,
            "loss_weights": null,
            "weighted_metrics": null,
            "run_eagerly": false,
            "steps_per_execution": 1,
            "jit_compile": false,
        })
    }

    /// [`keras_compile_config_with`](Self::keras_compile_config_with) for
    /// sparse categorical cross-entropy.
    pub fn keras_compile_config(&self) -> serde_json::Value {
        self.keras_compile_config_with(&super::loss::Loss::default())
    }
}

fn schedule_to_keras(s: &Schedule) -> serde_json::Value {
    let (class, config) = match s {
        Schedule::Exponential {
            initial,
            decay_steps,
            decay_rate,
            staircase,
        } => (
            "ExponentialDecay",
            serde_json::json!({"initial_learning_rate": initial, "decay_steps": decay_steps,
                "decay_rate": decay_rate, "staircase": staircase}),
        ),
        Schedule::PiecewiseConstant { boundaries, values } => (
            "PiecewiseConstantDecay",
            serde_json::json!({"boundaries": boundaries, "values": values}),
        ),
        Schedule::Cosine {
            initial,
            decay_steps,
            alpha,
            warmup_target,
            warmup_steps,
        } => (
            "CosineDecay",
            serde_json::json!({"initial_learning_rate": initial, "decay_steps": decay_steps,
                "alpha": alpha, "warmup_target": warmup_target, "warmup_steps": warmup_steps}),
        ),
    };
    serde_json::json!({
        "module": "keras.optimizers.schedules",
        "class_name": class,
        "config": config,
        "registered_name": null,
    })
}
