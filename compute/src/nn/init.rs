//! Keras 3's built-in initializers, so a model without weights starts from
//! the distributions Keras would draw from. The draws come from
//! [`SplitMix64`] keyed by (seed, tensor), so the same seed gives the same
//! model everywhere; they are not Keras's own random streams.

use serde_json::Value;

use super::rng::SplitMix64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanMode {
    In,
    Out,
    Avg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    Uniform,
    /// Normal truncated at two standard deviations, rescaled so the
    /// variance is still `scale / fan`.
    TruncatedNormal,
    UntruncatedNormal,
}

/// A parameter's initializer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Constant(f32),
    VarianceScaling {
        scale: f64,
        mode: FanMode,
        distribution: Distribution,
    },
    RandomNormal {
        mean: f64,
        stddev: f64,
    },
    TruncatedNormal {
        mean: f64,
        stddev: f64,
    },
    RandomUniform {
        min: f64,
        max: f64,
    },
    Orthogonal {
        gain: f64,
    },
    Identity {
        gain: f64,
    },
}

/// Glorot uniform: Keras's default for kernels.
pub const GLOROT_UNIFORM: Init = Init::VarianceScaling {
    scale: 1.0,
    mode: FanMode::Avg,
    distribution: Distribution::Uniform,
};

pub const SUPPORTED: &str = "Zeros, Ones, Constant, GlorotUniform, GlorotNormal, HeUniform, \
     HeNormal, LecunUniform, LecunNormal, VarianceScaling, RandomNormal, RandomUniform, \
     TruncatedNormal, Orthogonal, Identity";

/// Keras divides a truncated normal's stddev by this so that, cut at two
/// standard deviations, it keeps the requested variance.
const TRUNCATION_STDDEV: f64 = 0.879_625_661_034_239_8;

impl Init {
    /// Reads a Keras 3 initializer: a name or `{"class_name", "config"}`.
    pub fn from_value(v: &Value) -> Result<Init, String> {
        let class = v
            .as_str()
            .or_else(|| v.get("class_name").and_then(Value::as_str))
            .ok_or_else(|| format!("{v} is not an initializer"))?;
        let cfg = v.get("config");
        let num = |key: &str, default: f64| -> Result<f64, String> {
            match cfg.and_then(|c| c.get(key)) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_f64()
                    .ok_or_else(|| format!("{class}: {key} = {x} is not a number")),
            }
        };
        let vs = |scale: f64, mode, distribution| Init::VarianceScaling {
            scale,
            mode,
            distribution,
        };
        use Distribution::*;
        use FanMode::*;
        Ok(match class {
            "Zeros" | "zeros" => Init::Constant(0.0),
            "Ones" | "ones" => Init::Constant(1.0),
            "Constant" | "constant" => Init::Constant(num("value", 0.0)? as f32),
            "GlorotUniform" | "glorot_uniform" => vs(1.0, Avg, Uniform),
            "GlorotNormal" | "glorot_normal" => vs(1.0, Avg, TruncatedNormal),
            "HeUniform" | "he_uniform" => vs(2.0, In, Uniform),
            "HeNormal" | "he_normal" => vs(2.0, In, TruncatedNormal),
            "LecunUniform" | "lecun_uniform" => vs(1.0, In, Uniform),
            "LecunNormal" | "lecun_normal" => vs(1.0, In, TruncatedNormal),
            "VarianceScaling" | "variance_scaling" => {
                let text = |key: &str, default: &str| -> String {
                    cfg.and_then(|c| c.get(key))
                        .and_then(Value::as_str)
                        .unwrap_or(default)
                        .to_string()
                };
                let mode = match text("mode", "fan_in").as_str() {
                    "fan_in" => In,
                    "fan_out" => Out,
                    "fan_avg" => Avg,
                    m => {
                        return Err(format!(
                            "VarianceScaling mode {m:?} is not one of fan_in, fan_out, fan_avg"
                        ))
                    }
                };
                let distribution = match text("distribution", "truncated_normal").as_str() {
                    "uniform" => Uniform,
                    "truncated_normal" => TruncatedNormal,
                    "untruncated_normal" | "normal" => UntruncatedNormal,
                    d => return Err(format!(
                        "VarianceScaling distribution {d:?} is not one of uniform, truncated_normal, untruncated_normal"
                    )),
                };
                vs(num("scale", 1.0)?, mode, distribution)
            }
            "RandomNormal" | "random_normal" => Init::RandomNormal {
                mean: num("mean", 0.0)?,
                stddev: num("stddev", 0.05)?,
            },
            "TruncatedNormal" | "truncated_normal" => Init::TruncatedNormal {
                mean: num("mean", 0.0)?,
                stddev: num("stddev", 0.05)?,
            },
            "RandomUniform" | "random_uniform" => Init::RandomUniform {
                min: num("minval", -0.05)?,
                max: num("maxval", 0.05)?,
            },
            "Orthogonal" | "orthogonal" => Init::Orthogonal {
                gain: num("gain", 1.0)?,
            },
            "Identity" | "identity" | "IdentityInitializer" => Init::Identity {
                gain: num("gain", 1.0)?,
            },
            other => {
                return Err(format!(
                    "initializer {other} is not supported (supported: {SUPPORTED})"
                ))
            }
        })
    }

    /// Fills `dst` (a tensor of `shape`) from stream `(seed, tensor)`.
    pub fn fill(&self, dst: &mut [f32], shape: &[usize], seed: u64, tensor: u64) {
        let mut rng = SplitMix64::derive(seed, 0x1417, tensor);
        match *self {
            Init::Constant(c) => dst.fill(c),
            Init::VarianceScaling {
                scale,
                mode,
                distribution,
            } => {
                let (fan_in, fan_out) = fans(shape);
                let fan = match mode {
                    FanMode::In => fan_in,
                    FanMode::Out => fan_out,
                    FanMode::Avg => (fan_in + fan_out) / 2.0,
                };
                let var = scale / fan.max(1.0);
                match distribution {
                    Distribution::Uniform => {
                        let limit = (3.0 * var).sqrt();
                        uniform(dst, &mut rng, -limit, limit)
                    }
                    Distribution::TruncatedNormal => {
                        truncated(dst, &mut rng, 0.0, var.sqrt() / TRUNCATION_STDDEV)
                    }
                    Distribution::UntruncatedNormal => normal(dst, &mut rng, 0.0, var.sqrt()),
                }
            }
            Init::RandomNormal { mean, stddev } => normal(dst, &mut rng, mean, stddev),
            Init::TruncatedNormal { mean, stddev } => truncated(dst, &mut rng, mean, stddev),
            Init::RandomUniform { min, max } => uniform(dst, &mut rng, min, max),
            Init::Orthogonal { gain } => orthogonal(dst, shape, &mut rng, gain),
            Init::Identity { gain } => {
                dst.fill(0.0);
                if let [rows, cols] = *shape {
                    for i in 0..rows.min(cols) {
                        dst[i * cols + i] = gain as f32;
                    }
                }
            }
        }
    }
}

/// Keras's `compute_fans`: the last two axes are (in, out); any leading
/// axes are the receptive field.
pub fn fans(shape: &[usize]) -> (f64, f64) {
    match shape {
        [] => (1.0, 1.0),
        [n] => (*n as f64, *n as f64),
        [i, o] => (*i as f64, *o as f64),
        s => {
            let receptive: usize = s[..s.len() - 2].iter().product();
            (
                (s[s.len() - 2] * receptive) as f64,
                (s[s.len() - 1] * receptive) as f64,
            )
        }
    }
}

fn uniform(dst: &mut [f32], rng: &mut SplitMix64, lo: f64, hi: f64) {
    for v in dst {
        *v = (lo + (hi - lo) * rng.next_f64()) as f32;
    }
}

fn normal(dst: &mut [f32], rng: &mut SplitMix64, mean: f64, stddev: f64) {
    for v in dst {
        *v = (mean + stddev * rng.next_normal()) as f32;
    }
}

fn truncated(dst: &mut [f32], rng: &mut SplitMix64, mean: f64, stddev: f64) {
    for v in dst {
        let z = loop {
            let z = rng.next_normal();
            if z.abs() <= 2.0 {
                break z;
            }
        };
        *v = (mean + stddev * z) as f32;
    }
}

/// A (rows x cols) matrix with orthonormal rows or columns (whichever are
/// fewer), from the QR decomposition of a normal matrix, as Keras draws it.
fn orthogonal(dst: &mut [f32], shape: &[usize], rng: &mut SplitMix64, gain: f64) {
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let rows = dst.len() / cols;
    let (r, c) = if rows < cols {
        (cols, rows)
    } else {
        (rows, cols)
    };
    // Columns of an r x c matrix, made orthonormal by Gram-Schmidt.
    let mut q: Vec<Vec<f64>> = (0..c)
        .map(|_| (0..r).map(|_| rng.next_normal()).collect())
        .collect();
    for j in 0..c {
        for k in 0..j {
            let dot: f64 = q[j].iter().zip(&q[k]).map(|(a, b)| a * b).sum();
            let qk = q[k].clone();
            q[j].iter_mut().zip(&qk).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = q[j].iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
        q[j].iter_mut().for_each(|a| *a /= norm);
    }
    for i in 0..rows {
        for j in 0..cols {
            let v = if rows < cols { q[i][j] } else { q[j][i] };
            dst[i * cols + j] = (gain * v) as f32;
        }
    }
}
