//! Preprocessing layers found inside real models: Rescaling and
//! Normalization (with the mean and variance it stores).

use rayon::prelude::*;
use serde_json::Value;

use super::{one_input, Back, Ctx, Op, ParamDecl, Saved};
use crate::nn::config::{Cfg, Parsed};
use crate::nn::init::Init;

pub(crate) fn build(cfg: &Cfg<'_>) -> Parsed<Option<Box<dyn Op>>> {
    Ok(Some(match cfg.class {
        "Rescaling" => Box::new(Rescaling {
            scale: per_channel(cfg, "scale", 1.0)?,
            offset: per_channel(cfg, "offset", 0.0)?,
        }),
        "Normalization" => Box::new(Normalization::parse(cfg)?),
        _ => return Ok(None),
    }))
}

/// A number, or a list of numbers (one per channel).
fn per_channel(cfg: &Cfg<'_>, key: &str, default: f32) -> Parsed<Vec<f32>> {
    match cfg.get(key) {
        None => Ok(vec![default]),
        Some(Value::Number(n)) => Ok(vec![n.as_f64().unwrap_or(default as f64) as f32]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| cfg.err(format!("option {key} is not a number or a list of numbers"))),
        Some(v) => Err(cfg.unsupported(key, v, "a number or a list of numbers")),
    }
}

/// Broadcasts a per-channel vector (or a scalar) along rows of `c`.
fn check_channels(v: &[f32], c: usize, what: &str) -> Result<(), String> {
    if v.len() == 1 || v.len() == c {
        Ok(())
    } else {
        Err(format!(
            "{what} has {} values but the input has {c} channels",
            v.len()
        ))
    }
}

fn at(v: &[f32], j: usize) -> f32 {
    if v.len() == 1 {
        v[0]
    } else {
        v[j]
    }
}

#[derive(Debug)]
pub(crate) struct Rescaling {
    scale: Vec<f32>,
    offset: Vec<f32>,
}

impl Op for Rescaling {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        let c = *s.last().unwrap_or(&1);
        check_channels(&self.scale, c, "scale")?;
        check_channels(&self.offset, c, "offset")?;
        Ok(s.clone())
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let c = *cx.out.last().unwrap_or(&1);
        let mut y = xs[0].to_vec();
        y.par_chunks_mut(c * 256).for_each(|b| {
            for r in b.chunks_exact_mut(c) {
                for (j, v) in r.iter_mut().enumerate() {
                    *v = *v * at(&self.scale, j) + at(&self.offset, j);
                }
            }
        });
        (y, None)
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let c = *cx.out.last().unwrap_or(&1);
        vec![b.need[0].then(|| {
            let mut dx = b.dy;
            dx.par_chunks_mut(c * 256).for_each(|b| {
                for r in b.chunks_exact_mut(c) {
                    for (j, v) in r.iter_mut().enumerate() {
                        *v *= at(&self.scale, j);
                    }
                }
            });
            dx
        })]
    }
}

/// `(x - mean) / max(sqrt(variance), 1e-7)` on the last axis. The mean and
/// variance come from the config, or else are the layer's (non-trainable)
/// weights `mean`, `variance`, `count`, as `adapt()` leaves them.
#[derive(Debug)]
pub(crate) struct Normalization {
    fixed: Option<(Vec<f32>, Vec<f32>)>,
    axis: i64,
}

/// Keras's `backend.epsilon()`.
const EPSILON: f32 = 1e-7;

impl Normalization {
    fn parse(cfg: &Cfg<'_>) -> Parsed<Normalization> {
        if cfg.bool("invert", false)? {
            return Err(cfg.err("unsupported option invert = true (supported: false)"));
        }
        let axis = match cfg.get("axis") {
            None => -1,
            Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
            Some(Value::Array(a)) if a.len() == 1 => a[0].as_i64().unwrap_or(0),
            Some(v) => return Err(cfg.unsupported("axis", v, "one axis, the last (channels)")),
        };
        let fixed = match (cfg.get("mean"), cfg.get("variance")) {
            (Some(m), Some(v)) => {
                let list = |v: &Value| -> Option<Vec<f32>> {
                    match v {
                        Value::Number(n) => Some(vec![n.as_f64()? as f32]),
                        Value::Array(a) => a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect(),
                        _ => None,
                    }
                };
                Some((
                    list(m).ok_or_else(|| cfg.err("option mean is not a number or a list"))?,
                    list(v).ok_or_else(|| cfg.err("option variance is not a number or a list"))?,
                ))
            }
            _ => None,
        };
        Ok(Normalization { fixed, axis })
    }

    fn stats<'a>(&'a self, w: &[&'a [f32]]) -> (&'a [f32], &'a [f32]) {
        match &self.fixed {
            Some((m, v)) => (m, v),
            None => (w[0], w[1]),
        }
    }
}

impl Op for Normalization {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        let rank = s.len() as i64 + 1;
        if self.axis != -1 && self.axis != rank - 1 {
            return Err(format!(
                "normalizes along axis {} of a rank-{rank} input; only the last axis \
                 (channels) is supported",
                self.axis
            ));
        }
        if let Some((m, v)) = &self.fixed {
            let c = *s.last().unwrap_or(&1);
            check_channels(m, c, "mean")?;
            check_channels(v, c, "variance")?;
        }
        Ok(s.clone())
    }

    fn params(&self, ins: &[Vec<usize>]) -> Vec<ParamDecl> {
        if self.fixed.is_some() {
            return Vec::new();
        }
        let c = *ins[0].last().unwrap_or(&1);
        vec![
            ParamDecl::new("mean", vec![c], Init::Constant(0.0)).frozen(),
            ParamDecl::new("variance", vec![c], Init::Constant(1.0)).frozen(),
            ParamDecl::new("count", vec![], Init::Constant(0.0))
                .frozen()
                .integer(),
        ]
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let c = *cx.out.last().unwrap_or(&1);
        let (m, v) = self.stats(cx.w);
        let inv: Vec<f32> = (0..c).map(|j| 1.0 / at(v, j).sqrt().max(EPSILON)).collect();
        let mut y = xs[0].to_vec();
        y.par_chunks_mut(c * 256).for_each(|b| {
            for r in b.chunks_exact_mut(c) {
                for (j, x) in r.iter_mut().enumerate() {
                    *x = (*x - at(m, j)) * inv[j];
                }
            }
        });
        (y, None)
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let c = *cx.out.last().unwrap_or(&1);
        let (_, v) = self.stats(cx.w);
        vec![b.need[0].then(|| {
            let inv: Vec<f32> = (0..c).map(|j| 1.0 / at(v, j).sqrt().max(EPSILON)).collect();
            let mut dx = b.dy;
            dx.par_chunks_mut(c * 256).for_each(|b| {
                for r in b.chunks_exact_mut(c) {
                    r.iter_mut().zip(&inv).for_each(|(d, i)| *d *= i);
                }
            });
            dx
        })]
    }
}
