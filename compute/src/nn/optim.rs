//! Optimizers with Keras 3's update formulas, on flat parameter vectors.

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

/// Keras `Adam(learning_rate, beta_1, beta_2, epsilon)` without amsgrad.
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

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum OptimizerConfig {
    Sgd(Sgd),
    Adam(Adam),
}

impl From<Sgd> for OptimizerConfig {
    fn from(s: Sgd) -> Self {
        OptimizerConfig::Sgd(s)
    }
}

impl From<Adam> for OptimizerConfig {
    fn from(a: Adam) -> Self {
        OptimizerConfig::Adam(a)
    }
}

/// An optimizer and its state (serialisable, to checkpoint a job).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Optimizer {
    pub config: OptimizerConfig,
    /// Steps taken so far (Keras's `iterations`).
    pub iterations: u64,
    /// SGD velocity, or Adam first moment.
    m: Vec<f32>,
    /// Adam second moment.
    v: Vec<f32>,
}

impl Optimizer {
    /// State for `n` parameters, all zero, as Keras starts.
    pub fn new(config: impl Into<OptimizerConfig>, n: usize) -> Self {
        let config = config.into();
        let (m, v) = match config {
            OptimizerConfig::Sgd(s) if s.momentum == 0.0 => (Vec::new(), Vec::new()),
            OptimizerConfig::Sgd(_) => (vec![0.0; n], Vec::new()),
            OptimizerConfig::Adam(_) => (vec![0.0; n], vec![0.0; n]),
        };
        Optimizer {
            config,
            iterations: 0,
            m,
            v,
        }
    }

    /// Values of state kept (velocity, moments), for memory accounting.
    pub fn state_len(&self) -> usize {
        self.m.len() + self.v.len()
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
        // Element-wise, so splitting into blocks cannot change results.
        const BLOCK: usize = 1 << 15;
        match self.config {
            OptimizerConfig::Sgd(s) if s.momentum == 0.0 => {
                params
                    .par_chunks_mut(BLOCK)
                    .zip(grad_mean.par_chunks(BLOCK))
                    .for_each(|(w, g)| w.iter_mut().zip(g).for_each(|(w, g)| *w -= g * s.lr));
            }
            OptimizerConfig::Sgd(s) => {
                params
                    .par_chunks_mut(BLOCK)
                    .zip(grad_mean.par_chunks(BLOCK))
                    .zip(self.m.par_chunks_mut(BLOCK))
                    .for_each(|((w, g), m)| {
                        for ((w, g), m) in w.iter_mut().zip(g).zip(m.iter_mut()) {
                            *m = *m * s.momentum - g * s.lr;
                            if s.nesterov {
                                *w += *m * s.momentum - g * s.lr;
                            } else {
                                *w += *m;
                            }
                        }
                    });
            }
            OptimizerConfig::Adam(a) => {
                // Computed in f32, as Keras does for float32 variables.
                let t = (self.iterations + 1) as f32;
                let b1p = a.beta1.powf(t);
                let b2p = a.beta2.powf(t);
                let alpha = a.lr * (1.0 - b2p).sqrt() / (1.0 - b1p);
                params
                    .par_chunks_mut(BLOCK)
                    .zip(grad_mean.par_chunks(BLOCK))
                    .zip(self.m.par_chunks_mut(BLOCK))
                    .zip(self.v.par_chunks_mut(BLOCK))
                    .for_each(|(((w, g), m), v)| {
                        for (((w, g), m), v) in
                            w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                        {
                            *m += (g - *m) * (1.0 - a.beta1);
                            *v += (g * g - *v) * (1.0 - a.beta2);
                            *w -= (*m * alpha) / (v.sqrt() + a.epsilon);
                        }
                    });
            }
        }
        self.iterations += 1;
        Ok(())
    }
}

impl OptimizerConfig {
    /// The optimizer as Keras serialises it in a model's `compile_config`.
    pub fn to_keras(&self) -> serde_json::Value {
        let (class, config) = match *self {
            OptimizerConfig::Sgd(s) => (
                "SGD",
                serde_json::json!({
                    "name": "SGD",
                    "learning_rate": s.lr,
                    "momentum": s.momentum,
                    "nesterov": s.nesterov,
                }),
            ),
            OptimizerConfig::Adam(a) => (
                "Adam",
                serde_json::json!({
                    "name": "adam",
                    "learning_rate": a.lr,
                    "beta_1": a.beta1,
                    "beta_2": a.beta2,
                    "epsilon": a.epsilon,
                    "amsgrad": false,
                }),
            ),
        };
        serde_json::json!({
            "module": "keras.optimizers",
            "class_name": class,
            "config": config,
            "registered_name": null,
        })
    }

    /// A `compile_config` for a classifier trained with this optimizer and
    /// sparse categorical cross-entropy, as quern trains it.
    pub fn keras_compile_config(&self) -> serde_json::Value {
        serde_json::json!({
            "optimizer": self.to_keras(),
            "loss": "sparse_categorical_crossentropy",
            "loss_weights": null,
            "metrics": ["accuracy"],
            "weighted_metrics": null,
            "run_eagerly": false,
            "steps_per_execution": 1,
            "jit_compile": false,
        })
    }
}
