//! Losses with Keras 3's definitions: each sample's loss is the mean over
//! its output values (Keras's mean over the last axis, then over the rest),
//! and a batch's loss is the mean over samples. quern works with sums over
//! samples, so workers' partial results add up.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::activation::{sigmoid, Activation};

/// Keras clips probabilities to [EPS, 1 - EPS] before taking the log.
pub(crate) const EPSILON: f32 = 1e-7;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Loss {
    SparseCategoricalCrossentropy {
        from_logits: bool,
    },
    CategoricalCrossentropy {
        from_logits: bool,
        label_smoothing: f32,
    },
    BinaryCrossentropy {
        from_logits: bool,
        label_smoothing: f32,
    },
    MeanSquaredError,
    MeanAbsoluteError,
    Huber {
        delta: f32,
    },
}

impl Default for Loss {
    fn default() -> Self {
        Loss::SparseCategoricalCrossentropy { from_logits: false }
    }
}

/// What the model's outputs are compared with.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// One class index per sample.
    Classes(&'a [u32]),
    /// As many values per sample as the model outputs (regression, or the
    /// input itself for an autoencoder).
    Values(&'a [f32]),
}

impl Target<'_> {
    pub fn len(&self, per: usize) -> usize {
        match self {
            Target::Classes(c) => c.len(),
            Target::Values(v) => v.len() / per.max(1),
        }
    }
}

pub const SUPPORTED: &str = "sparse_categorical_crossentropy, categorical_crossentropy, \
     binary_crossentropy (from_logits, label_smoothing), mean_squared_error, \
     mean_absolute_error, huber";

/// A batch's loss sum, correct predictions (classification losses only)
/// and the gradient w.r.t. the output (or, when `preact`, w.r.t. the last
/// layer's input to its softmax or sigmoid).
pub(crate) struct Evaluated {
    pub loss_sum: f64,
    pub correct: u64,
    pub dy: Vec<f32>,
    pub preact: bool,
}

impl Loss {
    /// Reads a loss as a compile_config names it: a string or a serialised
    /// loss object.
    pub fn from_keras(v: &Value) -> Result<Loss, String> {
        let (name, cfg) = match v {
            Value::String(s) => (s.clone(), None),
            v => (
                v.get("class_name")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                v.get("config"),
            ),
        };
        let flag = |k: &str| {
            cfg.and_then(|c| c.get(k))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        let num = |k: &str, d: f32| {
            cfg.and_then(|c| c.get(k))
                .and_then(Value::as_f64)
                .map_or(d, |f| f as f32)
        };
        Ok(match name.as_str() {
            "sparse_categorical_crossentropy" | "SparseCategoricalCrossentropy" => {
                Loss::SparseCategoricalCrossentropy {
                    from_logits: flag("from_logits"),
                }
            }
            "categorical_crossentropy" | "CategoricalCrossentropy" => {
                Loss::CategoricalCrossentropy {
                    from_logits: flag("from_logits"),
                    label_smoothing: num("label_smoothing", 0.0),
                }
            }
            "binary_crossentropy" | "BinaryCrossentropy" => Loss::BinaryCrossentropy {
                from_logits: flag("from_logits"),
                label_smoothing: num("label_smoothing", 0.0),
            },
            "mse" | "mean_squared_error" | "MeanSquaredError" => Loss::MeanSquaredError,
            "mae" | "mean_absolute_error" | "MeanAbsoluteError" => Loss::MeanAbsoluteError,
            "huber" | "huber_loss" | "Huber" => Loss::Huber {
                delta: num("delta", 1.0),
            },
            other => return Err(format!("loss {other} (supported: {SUPPORTED})")),
        })
    }

    /// The name Keras's `compile(loss=...)` takes for this loss (its
    /// options are written by [`to_keras`](Self::to_keras)).
    pub fn to_keras(&self) -> Value {
        let (class, config) = match *self {
            Loss::SparseCategoricalCrossentropy { from_logits } => (
                "SparseCategoricalCrossentropy",
                serde_json::json!({"from_logits": from_logits}),
            ),
            Loss::CategoricalCrossentropy {
                from_logits,
                label_smoothing,
            } => (
                "CategoricalCrossentropy",
                serde_json::json!({"from_logits": from_logits, "label_smoothing": label_smoothing}),
            ),
            Loss::BinaryCrossentropy {
                from_logits,
                label_smoothing,
            } => (
                "BinaryCrossentropy",
                serde_json::json!({"from_logits": from_logits, "label_smoothing": label_smoothing}),
            ),
            Loss::MeanSquaredError => ("MeanSquaredError", serde_json::json!({})),
            Loss::MeanAbsoluteError => ("MeanAbsoluteError", serde_json::json!({})),
            Loss::Huber { delta } => ("Huber", serde_json::json!({"delta": delta})),
        };
        serde_json::json!({
            "module": "keras.losses",
            "class_name": class,
            "config": config,
            "registered_name": null,
        })
    }

    /// Whether accuracy means something: the loss compares classes.
    pub fn is_classification(&self) -> bool {
        matches!(
            self,
            Loss::SparseCategoricalCrossentropy { .. }
                | Loss::CategoricalCrossentropy { .. }
                | Loss::BinaryCrossentropy { .. }
        )
    }

    /// Loss sum, correct count and output gradient for `n` samples of
    /// `per` outputs. `last` is the activation the model's last layer
    /// applies: a softmax (or sigmoid) followed by cross-entropy is
    /// differentiated as one, on its input, as Keras does.
    pub(crate) fn evaluate(
        &self,
        out: &[f32],
        per: usize,
        target: Target<'_>,
        last: Option<Activation>,
    ) -> Result<Evaluated, String> {
        let n = out.len() / per.max(1);
        if target.len(per) != n {
            return Err(format!("{n} outputs but {} targets", target.len(per)));
        }
        // The target values of sample i.
        let targets: Vec<f32> = match (self, target) {
            (Loss::SparseCategoricalCrossentropy { .. }, Target::Classes(c))
            | (Loss::CategoricalCrossentropy { .. }, Target::Classes(c)) => {
                let mut y = vec![0.0f32; n * per];
                for (i, &l) in c.iter().enumerate() {
                    if l as usize >= per {
                        return Err(format!("label {l} is out of range for {per} classes"));
                    }
                    y[i * per + l as usize] = 1.0;
                }
                y
            }
            (Loss::SparseCategoricalCrossentropy { .. }, Target::Values(_)) => {
                return Err("sparse categorical cross-entropy compares classes, not values".into())
            }
            (_, Target::Classes(c)) => {
                if per != 1 {
                    return Err(format!(
                        "class labels give one target per sample but the model has {per} \
                         outputs; use a one-output model or value targets"
                    ));
                }
                c.iter().map(|&l| l as f32).collect()
            }
            (_, Target::Values(v)) => v.to_vec(),
        };
        let pf = per as f32;
        let mut dy = vec![0.0f32; out.len()];
        let mut loss_sum = 0.0f64;
        let mut correct = 0u64;
        let mut preact = false;
        match *self {
            Loss::SparseCategoricalCrossentropy { from_logits }
            | Loss::CategoricalCrossentropy { from_logits, .. } => {
                let smoothing = match *self {
                    Loss::CategoricalCrossentropy {
                        label_smoothing, ..
                    } => label_smoothing,
                    _ => 0.0,
                };
                let softmax_last = last == Some(Activation::Softmax);
                preact = softmax_last && !from_logits;
                for ((o, y), d) in out
                    .chunks_exact(per)
                    .zip(targets.chunks_exact(per))
                    .zip(dy.chunks_exact_mut(per))
                {
                    let y: Vec<f32> = y
                        .iter()
                        .map(|t| t * (1.0 - smoothing) + smoothing / pf)
                        .collect();
                    let p: Vec<f32> = if from_logits {
                        let mut p = o.to_vec();
                        super::activation::softmax_row(&mut p);
                        p
                    } else {
                        o.to_vec()
                    };
                    let sum: f32 = p.iter().sum();
                    let mut l = 0.0f64;
                    for (pj, yj) in p.iter().zip(&y) {
                        if *yj != 0.0 {
                            // Keras renormalizes probabilities that do not
                            // come from a softmax.
                            let norm = if from_logits || softmax_last {
                                1.0
                            } else {
                                sum
                            };
                            let q = (pj / norm).clamp(EPSILON, 1.0 - EPSILON);
                            l -= (*yj as f64) * (q as f64).ln();
                        }
                    }
                    loss_sum += l;
                    correct += (argmax(o) == argmax(&y)) as u64;
                    for j in 0..per {
                        d[j] = if from_logits || softmax_last {
                            // d(-sum y log softmax)/d logits = p - y.
                            p[j] - y[j]
                        } else if p[j] > EPSILON && p[j] < 1.0 - EPSILON {
                            -y[j] / p[j] + y.iter().sum::<f32>() / sum
                        } else {
                            0.0
                        };
                    }
                }
            }
            Loss::BinaryCrossentropy {
                from_logits,
                label_smoothing,
            } => {
                let sigmoid_last = last == Some(Activation::Sigmoid);
                preact = sigmoid_last && !from_logits;
                for (j, (o, t)) in out.iter().zip(&targets).enumerate() {
                    let y = t * (1.0 - label_smoothing) + 0.5 * label_smoothing;
                    let (l, d) = if from_logits {
                        let z = *o;
                        let l = z.max(0.0) - z * y + (-z.abs()).exp().ln_1p();
                        (l, sigmoid(z) - y)
                    } else {
                        let p = o.clamp(EPSILON, 1.0 - EPSILON);
                        let l = -(y * p.ln() + (1.0 - y) * (1.0 - p).ln());
                        let d = if sigmoid_last {
                            o - y
                        } else if *o > EPSILON && *o < 1.0 - EPSILON {
                            -y / p + (1.0 - y) / (1.0 - p)
                        } else {
                            0.0
                        };
                        (l, d)
                    };
                    loss_sum += (l / pf) as f64;
                    dy[j] = d / pf;
                    let positive = if from_logits { *o > 0.0 } else { *o > 0.5 };
                    if per == 1 {
                        correct += (positive == (*t > 0.5)) as u64;
                    }
                }
            }
            Loss::MeanSquaredError | Loss::MeanAbsoluteError | Loss::Huber { .. } => {
                for (j, (o, y)) in out.iter().zip(&targets).enumerate() {
                    let x = o - y;
                    let (l, d) = match *self {
                        Loss::MeanSquaredError => (x * x, 2.0 * x),
                        Loss::MeanAbsoluteError => (x.abs(), x.signum() * (x != 0.0) as u8 as f32),
                        Loss::Huber { delta } => {
                            if x.abs() <= delta {
                                (0.5 * x * x, x)
                            } else {
                                (delta * (x.abs() - 0.5 * delta), delta * x.signum())
                            }
                        }
                        _ => unreachable!("regression losses only"),
                    };
                    loss_sum += (l / pf) as f64;
                    dy[j] = d / pf;
                }
            }
        }
        Ok(Evaluated {
            loss_sum,
            correct,
            dy,
            preact,
        })
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (j, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = j;
        }
    }
    best
}
