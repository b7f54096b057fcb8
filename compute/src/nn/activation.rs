//! Activation functions with Keras 3's exact formulas, as `activation=`
//! options and as layers (ReLU, LeakyReLU, ELU, Softmax, Activation).

use rayon::prelude::*;
use serde_json::Value;

/// Element-wise (or, for softmax, per-row along the last axis) functions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Linear,
    /// Keras `relu(x, negative_slope, max_value, threshold)`; plain `relu`
    /// is the default of all three.
    Relu {
        negative_slope: f32,
        max_value: Option<f32>,
        threshold: f32,
    },
    LeakyRelu(f32),
    Elu(f32),
    Selu,
    /// `approximate` picks the tanh form over the erf form.
    Gelu {
        approximate: bool,
    },
    Sigmoid,
    HardSigmoid,
    Tanh,
    /// swish / silu: x * sigmoid(x).
    Swish,
    /// hard_swish / hard_silu: x * hard_sigmoid(x).
    HardSwish,
    Softplus,
    Softsign,
    Exponential,
    Mish,
    Celu,
    HardTanh,
    LogSigmoid,
    Softmax,
    /// Per row along the last axis, like softmax.
    LogSoftmax,
}

pub const RELU: Activation = Activation::Relu {
    negative_slope: 0.0,
    max_value: None,
    threshold: 0.0,
};

/// The names `activation=` accepts, for error messages.
pub const SUPPORTED: &str = "linear, relu, relu6, leaky_relu, elu, selu, gelu, sigmoid, \
     hard_sigmoid, tanh, swish, silu, hard_swish, hard_silu, softplus, softsign, exponential, \
     mish, celu, hard_tanh, log_sigmoid, softmax, log_softmax";

const SELU_ALPHA: f32 = 1.673_263_2;
const SELU_SCALE: f32 = 1.050_701;
/// Elements per parallel task in element-wise loops.
const BLOCK: usize = 1 << 15;

impl Activation {
    /// The activation a Keras name stands for (`activation="swish"`).
    pub fn from_keras(name: &str) -> Option<Activation> {
        Some(match name {
            "linear" | "identity" => Activation::Linear,
            "relu" => RELU,
            "relu6" => Activation::Relu {
                negative_slope: 0.0,
                max_value: Some(6.0),
                threshold: 0.0,
            },
            "leaky_relu" => Activation::LeakyRelu(0.2),
            "elu" => Activation::Elu(1.0),
            "selu" => Activation::Selu,
            "gelu" => Activation::Gelu { approximate: false },
            "sigmoid" => Activation::Sigmoid,
            "hard_sigmoid" => Activation::HardSigmoid,
            "tanh" => Activation::Tanh,
            "swish" | "silu" => Activation::Swish,
            "hard_swish" | "hard_silu" => Activation::HardSwish,
            "softplus" => Activation::Softplus,
            "softsign" => Activation::Softsign,
            "exponential" => Activation::Exponential,
            "mish" => Activation::Mish,
            "celu" => Activation::Celu,
            "hard_tanh" => Activation::HardTanh,
            "log_sigmoid" => Activation::LogSigmoid,
            "softmax" => Activation::Softmax,
            "log_softmax" => Activation::LogSoftmax,
            _ => return None,
        })
    }

    /// Reads `activation=` as Keras 3 serialises it: a name, or
    /// `{"class_name": ..., "config": {"name": ...}}`.
    pub fn from_value(v: &Value) -> Option<Activation> {
        if v.is_null() {
            return Some(Activation::Linear);
        }
        let name = v.as_str().or_else(|| {
            v.get("config")
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
        })?;
        Activation::from_keras(name)
    }

    pub fn keras_name(self) -> &'static str {
        match self {
            Activation::Linear => "linear",
            Activation::Relu {
                max_value: Some(6.0),
                ..
            } => "relu6",
            Activation::Relu { .. } => "relu",
            Activation::LeakyRelu(_) => "leaky_relu",
            Activation::Elu(_) => "elu",
            Activation::Selu => "selu",
            Activation::Gelu { .. } => "gelu",
            Activation::Sigmoid => "sigmoid",
            Activation::HardSigmoid => "hard_sigmoid",
            Activation::Tanh => "tanh",
            Activation::Swish => "silu",
            Activation::HardSwish => "hard_silu",
            Activation::Softplus => "softplus",
            Activation::Softsign => "softsign",
            Activation::Exponential => "exponential",
            Activation::Mish => "mish",
            Activation::Celu => "celu",
            Activation::HardTanh => "hard_tanh",
            Activation::LogSigmoid => "log_sigmoid",
            Activation::Softmax => "softmax",
            Activation::LogSoftmax => "log_softmax",
        }
    }

    /// Whether the backward pass needs the input; otherwise the output
    /// alone gives the derivative.
    pub fn needs_input(self) -> bool {
        !matches!(
            self,
            Activation::Linear
                | Activation::Sigmoid
                | Activation::Tanh
                | Activation::Softmax
                | Activation::LogSoftmax
                | Activation::Exponential
                | Activation::Relu {
                    negative_slope: 0.0,
                    max_value: None,
                    threshold: 0.0
                }
        )
    }

    /// Applies the function in place; softmax works on rows of `width`.
    pub fn apply(self, y: &mut [f32], width: usize) {
        match self {
            Activation::Linear => {}
            Activation::Softmax => y
                .par_chunks_mut((width * 64).max(1))
                .for_each(|b| b.chunks_exact_mut(width.max(1)).for_each(softmax_row)),
            Activation::LogSoftmax => y
                .par_chunks_mut((width * 64).max(1))
                .for_each(|b| b.chunks_exact_mut(width.max(1)).for_each(log_softmax_row)),
            f => y.par_chunks_mut(BLOCK).for_each(|b| f.apply_block(b)),
        }
    }

    /// [`apply`](Self::apply) on the calling thread, for callers already
    /// running in parallel.
    pub fn apply_serial(self, y: &mut [f32], width: usize) {
        match self {
            Activation::Linear => {}
            Activation::Softmax => y.chunks_exact_mut(width.max(1)).for_each(softmax_row),
            Activation::LogSoftmax => y.chunks_exact_mut(width.max(1)).for_each(log_softmax_row),
            f => f.apply_block(y),
        }
    }

    /// The common functions get loops of their own (the match hoisted out,
    /// so they vectorize); the rest go element by element.
    fn apply_block(self, b: &mut [f32]) {
        fn each(b: &mut [f32], f: impl Fn(f32) -> f32) {
            b.iter_mut().for_each(|v| *v = f(*v));
        }
        match self {
            RELU => each(b, |x| x.max(0.0)),
            Activation::Relu {
                negative_slope: 0.0,
                max_value: Some(m),
                threshold: 0.0,
            } => each(b, |x| x.clamp(0.0, m)),
            Activation::Swish => each(b, |x| x * sigmoid(x)),
            Activation::Sigmoid => each(b, sigmoid),
            Activation::Tanh => each(b, f32::tanh),
            f => each(b, |x| f.scalar(x)),
        }
    }

    /// `d *= f'(x)` over a block, with the same specializations.
    fn grad_block(self, x: &[f32], y: &[f32], d: &mut [f32]) {
        fn each(d: &mut [f32], x: &[f32], f: impl Fn(f32) -> f32) {
            d.iter_mut().zip(x).for_each(|(d, x)| *d *= f(*x));
        }
        match self {
            Activation::Relu {
                negative_slope: 0.0,
                max_value: Some(m),
                threshold: 0.0,
            } => each(d, x, |x| if x > 0.0 && x < m { 1.0 } else { 0.0 }),
            Activation::Swish => each(d, x, |x| {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }),
            f => {
                for ((d, x), y) in d.iter_mut().zip(x).zip(y) {
                    *d *= f.derivative(*x, *y);
                }
            }
        }
    }

    fn scalar(self, x: f32) -> f32 {
        match self {
            Activation::Linear | Activation::Softmax | Activation::LogSoftmax => x,
            Activation::Mish => x * softplus(x).tanh(),
            Activation::Celu => {
                if x > 0.0 {
                    x
                } else {
                    x.exp_m1()
                }
            }
            Activation::HardTanh => x.clamp(-1.0, 1.0),
            Activation::LogSigmoid => -softplus(-x),
            Activation::Relu {
                negative_slope,
                max_value,
                threshold,
            } => {
                let mut y = if x > threshold { x } else { 0.0 };
                if let Some(m) = max_value {
                    y = y.clamp(0.0, m);
                }
                if negative_slope != 0.0 && x < threshold {
                    y -= negative_slope * (threshold - x);
                }
                y
            }
            Activation::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x
                }
            }
            Activation::Elu(a) => {
                if x > 0.0 {
                    x
                } else {
                    a * x.exp_m1()
                }
            }
            Activation::Selu => SELU_SCALE * if x > 0.0 { x } else { SELU_ALPHA * x.exp_m1() },
            Activation::Gelu { approximate: false } => {
                0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
            }
            Activation::Gelu { approximate: true } => 0.5 * x * (1.0 + gelu_tanh_inner(x).tanh()),
            Activation::Sigmoid => sigmoid(x),
            Activation::HardSigmoid => hard_sigmoid(x),
            Activation::Tanh => x.tanh(),
            Activation::Swish => x * sigmoid(x),
            Activation::HardSwish => x * hard_sigmoid(x),
            Activation::Softplus => softplus(x),
            Activation::Softsign => x / (1.0 + x.abs()),
            Activation::Exponential => x.exp(),
        }
    }

    /// d f(x) / dx, from the input `x` and the output `y`.
    fn derivative(self, x: f32, y: f32) -> f32 {
        match self {
            Activation::Linear | Activation::Softmax | Activation::LogSoftmax => 1.0,
            Activation::Mish => {
                let t = softplus(x).tanh();
                t + x * (1.0 - t * t) * sigmoid(x)
            }
            Activation::Celu => {
                if x > 0.0 {
                    1.0
                } else {
                    x.exp()
                }
            }
            Activation::HardTanh => {
                if x > -1.0 && x < 1.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::LogSigmoid => sigmoid(-x),
            Activation::Relu {
                negative_slope,
                max_value,
                threshold,
            } => {
                if x > threshold {
                    match max_value {
                        Some(m) if x >= m => 0.0,
                        _ => 1.0,
                    }
                } else if x < threshold {
                    negative_slope
                } else {
                    0.0
                }
            }
            Activation::LeakyRelu(a) => {
                if x >= 0.0 {
                    1.0
                } else {
                    a
                }
            }
            Activation::Elu(a) => {
                if x > 0.0 {
                    1.0
                } else {
                    a * x.exp()
                }
            }
            Activation::Selu => {
                if x > 0.0 {
                    SELU_SCALE
                } else {
                    SELU_SCALE * SELU_ALPHA * x.exp()
                }
            }
            Activation::Gelu { approximate: false } => {
                let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * x * x).exp() * 0.398_942_3;
                cdf + x * pdf
            }
            Activation::Gelu { approximate: true } => {
                let t = gelu_tanh_inner(x).tanh();
                let inner_d = 0.797_884_6 * (1.0 + 3.0 * 0.044715 * x * x);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * inner_d
            }
            Activation::Sigmoid => y * (1.0 - y),
            Activation::HardSigmoid => {
                if x > -3.0 && x < 3.0 {
                    1.0 / 6.0
                } else {
                    0.0
                }
            }
            Activation::Tanh => 1.0 - y * y,
            Activation::Swish => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
            Activation::HardSwish => {
                if x <= -3.0 {
                    0.0
                } else if x >= 3.0 {
                    1.0
                } else {
                    (2.0 * x + 3.0) / 6.0
                }
            }
            Activation::Softplus => sigmoid(x),
            Activation::Softsign => {
                let d = 1.0 + x.abs();
                1.0 / (d * d)
            }
            Activation::Exponential => y,
        }
    }

    /// Turns the gradient w.r.t. the output into the gradient w.r.t. the
    /// input. `x` is the input, needed when [`needs_input`](Self::needs_input).
    pub fn backward(self, x: Option<&[f32]>, y: &[f32], dy: &mut [f32], width: usize) {
        match (self, x) {
            (Activation::Linear, _) => {}
            (Activation::Softmax, _) => {
                let w = width.max(1);
                dy.par_chunks_mut(w * 64)
                    .zip(y.par_chunks(w * 64))
                    .for_each(|(d, y)| {
                        for (d, y) in d.chunks_exact_mut(w).zip(y.chunks_exact(w)) {
                            let dot: f32 = d.iter().zip(y).map(|(d, y)| d * y).sum();
                            d.iter_mut().zip(y).for_each(|(d, y)| *d = y * (*d - dot));
                        }
                    })
            }
            (Activation::LogSoftmax, _) => {
                // d x_i = dy_i - softmax_i * sum(dy), softmax = exp(y).
                let w = width.max(1);
                dy.par_chunks_mut(w * 64)
                    .zip(y.par_chunks(w * 64))
                    .for_each(|(d, y)| {
                        for (d, y) in d.chunks_exact_mut(w).zip(y.chunks_exact(w)) {
                            let sum: f32 = d.iter().sum();
                            d.iter_mut().zip(y).for_each(|(d, y)| *d -= y.exp() * sum);
                        }
                    })
            }
            (f, Some(x)) => dy
                .par_chunks_mut(BLOCK)
                .zip(x.par_chunks(BLOCK).zip(y.par_chunks(BLOCK)))
                .for_each(|(d, (x, y))| f.grad_block(x, y, d)),
            (Activation::Relu { .. }, None) => dy
                .par_chunks_mut(BLOCK)
                .zip(y.par_chunks(BLOCK))
                .for_each(|(d, y)| {
                    d.iter_mut()
                        .zip(y)
                        .for_each(|(d, y)| *d = if *y > 0.0 { *d } else { 0.0 })
                }),
            (f, None) => dy
                .par_chunks_mut(BLOCK)
                .zip(y.par_chunks(BLOCK))
                .for_each(|(d, y)| {
                    // Only output-derivable functions reach here.
                    d.iter_mut()
                        .zip(y)
                        .for_each(|(d, y)| *d *= f.derivative(0.0, *y))
                }),
        }
    }
}

fn gelu_tanh_inner(x: f32) -> f32 {
    0.797_884_6 * (x + 0.044715 * x * x * x)
}

pub(crate) fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn hard_sigmoid(x: f32) -> f32 {
    (x + 3.0).clamp(0.0, 6.0) / 6.0
}

fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn log_softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
    let log = sum.ln();
    row.iter_mut().for_each(|v| *v = *v - max - log);
}

pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}
