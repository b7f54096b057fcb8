//! Normalization: BatchNormalization (batch statistics while training,
//! moving statistics at inference), LayerNormalization, and ConvNeXt's
//! LayerScale.

use rayon::prelude::*;
use serde_json::Value;

use super::{
    get_saved, one_input, saved, size, Back, Ctx, Op, ParamDecl, Regularizer, Saved, StatSums,
};
use crate::nn::config::{Cfg, Parsed};
use crate::nn::init::Init;

pub(crate) fn build(cfg: &Cfg<'_>) -> Parsed<Option<Box<dyn Op>>> {
    Ok(Some(match cfg.class {
        "BatchNormalization" => Box::new(BatchNorm::parse(cfg)?),
        "LayerNormalization" => Box::new(LayerNorm::parse(cfg)?),
        "LayerScale" => Box::new(LayerScale {
            init: cfg.f32_or("init_values", 1e-6)?,
            dim: cfg.usize("projection_dim")?,
        }),
        _ => return Ok(None),
    }))
}

/// Only the last (channel) axis is normalized over; other axes are
/// refused at build time with this hint.
fn last_axis_only(cfg: &Cfg<'_>, default: i64) -> Parsed<i64> {
    match cfg.get("axis") {
        None => Ok(default),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| cfg.err("option axis is not an integer")),
        Some(Value::Array(a)) if a.len() == 1 => a[0]
            .as_i64()
            .ok_or_else(|| cfg.err("option axis is not an integer")),
        Some(v) => Err(cfg.unsupported("axis", v, "one axis, the last (channels)")),
    }
}

fn check_last(axis: i64, shape: &[usize]) -> Result<(), String> {
    let rank = shape.len() as i64 + 1;
    if axis == -1 || axis == rank - 1 {
        Ok(())
    } else {
        Err(format!(
            "normalizes axis {axis} of a rank-{rank} input; only the last axis (channels_last) \
             is supported"
        ))
    }
}

/// Rows of a per-channel reduction: `(rows, channels)`.
fn rows_channels(x: &[f32], shape: &[usize]) -> (usize, usize) {
    let c = *shape.last().unwrap_or(&1);
    (x.len() / c.max(1), c)
}

/// Rows per block of a per-channel sum: fixed, so the order of additions
/// does not depend on the number of threads.
const SUM_BLOCK: usize = 1024;

/// Per-channel sums of `dy` over its rows.
fn row_sums(dy: &[f32], rows: usize, c: usize) -> Vec<f64> {
    channel_sums(rows, c, |r, acc| {
        for (a, d) in acc.iter_mut().zip(&dy[r * c..(r + 1) * c]) {
            *a += *d as f64;
        }
    })
}

/// `dst += sums`, rounded to f32.
fn add_sums(dst: &mut [f32], sums: &[f64]) {
    dst.iter_mut().zip(sums).for_each(|(w, s)| *w += *s as f32);
}

/// Per-channel sums of `f(row)` over rows, in a fixed order.
fn channel_sums(rows: usize, c: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = (0..rows.div_ceil(SUM_BLOCK))
        .into_par_iter()
        .map(|bi| {
            let mut acc = vec![0.0f64; c];
            for r in bi * SUM_BLOCK..((bi + 1) * SUM_BLOCK).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f64; c];
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
    out
}

/// gamma and beta (when the layer has them), moving mean and variance.
type BnWeights<'a> = (Option<&'a [f32]>, Option<&'a [f32]>, &'a [f32], &'a [f32]);

#[derive(Debug)]
pub(crate) struct BatchNorm {
    axis: i64,
    momentum: f32,
    epsilon: f32,
    center: bool,
    scale: bool,
    beta_init: Init,
    gamma_init: Init,
    mean_init: Init,
    var_init: Init,
    beta_reg: Option<Regularizer>,
    gamma_reg: Option<Regularizer>,
}

/// What training-mode forward keeps: the normalized input, 1/std, and the
/// batch's sums for the moving statistics.
struct BnTrain {
    xhat: Vec<f32>,
    rstd: Vec<f32>,
    stats: StatSums,
    /// Rows of the whole batch (over every worker).
    rows: f64,
}

impl Drop for BnTrain {
    fn drop(&mut self) {
        crate::nn::buffers::hand_back(std::mem::take(&mut self.xhat));
    }
}

impl BatchNorm {
    fn parse(cfg: &Cfg<'_>) -> Parsed<BatchNorm> {
        cfg.require_null(&["beta_constraint", "gamma_constraint"])?;
        if cfg.bool("renorm", false)? {
            return Err(cfg.err("unsupported option renorm = true (supported: false)"));
        }
        Ok(BatchNorm {
            axis: last_axis_only(cfg, -1)?,
            momentum: cfg.f32_or("momentum", 0.99)?,
            epsilon: cfg.f32_or("epsilon", 1e-3)?,
            center: cfg.bool("center", true)?,
            scale: cfg.bool("scale", true)?,
            beta_init: cfg.initializer("beta_initializer", Init::Constant(0.0))?,
            gamma_init: cfg.initializer("gamma_initializer", Init::Constant(1.0))?,
            mean_init: cfg.initializer("moving_mean_initializer", Init::Constant(0.0))?,
            var_init: cfg.initializer("moving_variance_initializer", Init::Constant(1.0))?,
            beta_reg: cfg.regularizer("beta_regularizer")?,
            gamma_reg: cfg.regularizer("gamma_regularizer")?,
        })
    }

    /// (gamma, beta, moving mean, moving variance) from the weights.
    fn split<'a>(&self, w: &[&'a [f32]]) -> BnWeights<'a> {
        let mut i = 0;
        let gamma = self.scale.then(|| {
            i += 1;
            w[i - 1]
        });
        let beta = self.center.then(|| {
            i += 1;
            w[i - 1]
        });
        (gamma, beta, w[i], w[i + 1])
    }

    /// Adds gamma's gradient (the sums of dy * xhat) and beta's (the sums
    /// of dy) to the layer's weight gradients.
    fn add_affine_grads(&self, dw: &mut [&mut [f32]], sum_dy: &[f64], sum_dy_xhat: &[f64]) {
        if self.scale {
            add_sums(dw[0], sum_dy_xhat);
        }
        if self.center {
            add_sums(dw[self.scale as usize], sum_dy);
        }
    }
}

impl Op for BatchNorm {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        check_last(self.axis, s)?;
        Ok(s.clone())
    }

    fn params(&self, ins: &[Vec<usize>]) -> Vec<ParamDecl> {
        let c = *ins[0].last().unwrap_or(&1);
        let mut p = Vec::new();
        if self.scale {
            p.push(ParamDecl::new("gamma", vec![c], self.gamma_init).regularized(self.gamma_reg));
        }
        if self.center {
            p.push(ParamDecl::new("beta", vec![c], self.beta_init).regularized(self.beta_reg));
        }
        p.push(ParamDecl::new("moving_mean", vec![c], self.mean_init).frozen());
        p.push(ParamDecl::new("moving_variance", vec![c], self.var_init).frozen());
        p
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let x = xs[0];
        let (rows, c) = rows_channels(x, &cx.ins[0]);
        let (gamma, beta, mm, mv) = self.split(cx.w);
        let mut y = crate::nn::buffers::zeroed(x.len());
        if !(cx.train && cx.trainable) {
            // tf.nn.batch_normalization: x * inv + (beta - mean * inv).
            let inv: Vec<f32> = (0..c)
                .map(|j| (1.0 / (mv[j] + self.epsilon).sqrt()) * gamma.map_or(1.0, |g| g[j]))
                .collect();
            let off: Vec<f32> = (0..c)
                .map(|j| beta.map_or(0.0, |b| b[j]) - mm[j] * inv[j])
                .collect();
            y.par_chunks_mut(c * 64)
                .zip(x.par_chunks(c * 64))
                .for_each(|(yb, xb)| {
                    for (yr, xr) in yb.chunks_exact_mut(c).zip(xb.chunks_exact(c)) {
                        for j in 0..c {
                            yr[j] = xr[j] * inv[j] + off[j];
                        }
                    }
                });
            return (y, None);
        }
        let sum = channel_sums(rows, c, |r, acc| {
            for (a, v) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]) {
                *a += *v as f64;
            }
        });
        // With the batch split between workers, the mean and variance are
        // the whole batch's: the sums (and the row count) are added over
        // the workers before use.
        let mut global = sum.clone();
        global.push(rows as f64);
        if let Some(s) = cx.sync {
            s.all_reduce(&mut global);
        }
        let m = global[c].max(1.0);
        let mean: Vec<f64> = global[..c].iter().map(|s| s / m).collect();
        let mut sq = channel_sums(rows, c, |r, acc| {
            for ((a, v), mu) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]).zip(&mean) {
                let d = *v as f64 - mu;
                *a += d * d;
            }
        });
        // This share's sums of x^2, from its sums centred on the batch
        // mean, so that the workers' shares add up to the batch's moving
        // statistics.
        let sum_sq: Vec<f64> = sq
            .iter()
            .zip(&mean)
            .zip(&sum)
            .map(|((q, mu), s)| q + 2.0 * mu * s - rows as f64 * mu * mu)
            .collect();
        if let Some(s) = cx.sync {
            s.all_reduce(&mut sq);
        }
        let var: Vec<f64> = sq.iter().map(|s| s / m).collect();
        let rstd: Vec<f32> = var
            .iter()
            .map(|v| (1.0 / (*v + self.epsilon as f64).sqrt()) as f32)
            .collect();
        let meanf: Vec<f32> = mean.iter().map(|v| *v as f32).collect();
        let mut xhat = crate::nn::buffers::zeroed(x.len());
        xhat.par_chunks_mut(c * 64)
            .zip(y.par_chunks_mut(c * 64))
            .zip(x.par_chunks(c * 64))
            .for_each(|((hb, yb), xb)| {
                for ((hr, yr), xr) in hb
                    .chunks_exact_mut(c)
                    .zip(yb.chunks_exact_mut(c))
                    .zip(xb.chunks_exact(c))
                {
                    for j in 0..c {
                        let h = (xr[j] - meanf[j]) * rstd[j];
                        hr[j] = h;
                        yr[j] = h * gamma.map_or(1.0, |g| g[j]) + beta.map_or(0.0, |b| b[j]);
                    }
                }
            });
        let stats = StatSums {
            sum,
            sum_sq,
            count: rows as u64,
        };
        (
            y,
            saved(BnTrain {
                xhat,
                rstd,
                stats,
                rows: m,
            }),
        )
    }

    fn backward(&self, cx: &Ctx<'_>, mut b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let x = b.xs[0];
        let (rows, c) = rows_channels(x, &cx.ins[0]);
        let (gamma, _, mm, mv) = self.split(cx.w);
        let dy = &b.dy;
        let g = |j: usize| gamma.map_or(1.0, |g| g[j]);
        match get_saved::<BnTrain>(b.saved) {
            Some(t) => {
                let sum_dy = row_sums(dy, rows, c);
                let sum_dy_xhat = channel_sums(rows, c, |r, acc| {
                    let (d, h) = (&dy[r * c..(r + 1) * c], &t.xhat[r * c..(r + 1) * c]);
                    for ((a, d), h) in acc.iter_mut().zip(d).zip(h) {
                        *a += (*d as f64) * (*h as f64);
                    }
                });
                if !b.dw.is_empty() {
                    self.add_affine_grads(b.dw, &sum_dy, &sum_dy_xhat);
                }
                let dx = b.need[0].then(|| {
                    // dx depends on the whole batch's sums; gamma's and
                    // beta's gradients are this share's part of a sum the
                    // coordinator adds up.
                    let mut sums = [sum_dy.as_slice(), sum_dy_xhat.as_slice()].concat();
                    if let Some(s) = cx.sync {
                        s.all_reduce(&mut sums);
                    }
                    let m = t.rows;
                    let mean_dy: Vec<f32> = sums[..c].iter().map(|s| (*s / m) as f32).collect();
                    let mean_dyh: Vec<f32> = sums[c..].iter().map(|s| (*s / m) as f32).collect();
                    let scale: Vec<f32> = (0..c).map(|j| g(j) * t.rstd[j]).collect();
                    // Written over dy: each value reads only its own dy.
                    let mut dx = std::mem::take(&mut b.dy);
                    dx.par_chunks_mut(c * 64)
                        .zip(t.xhat.par_chunks(c * 64))
                        .for_each(|(xb, hb)| {
                            for (xr, hr) in xb.chunks_exact_mut(c).zip(hb.chunks_exact(c)) {
                                for j in 0..c {
                                    xr[j] = scale[j] * (xr[j] - mean_dy[j] - hr[j] * mean_dyh[j]);
                                }
                            }
                        });
                    dx
                });
                crate::nn::buffers::hand_back(b.dy);
                vec![dx]
            }
            None => {
                // Inference mode (a frozen layer): a fixed affine map.
                let rstd: Vec<f32> = mv.iter().map(|v| 1.0 / (v + self.epsilon).sqrt()).collect();
                if !b.dw.is_empty() {
                    let sum_dy = row_sums(dy, rows, c);
                    let sum_dy_xhat = channel_sums(rows, c, |r, acc| {
                        for j in 0..c {
                            let h = (x[r * c + j] - mm[j]) * rstd[j];
                            acc[j] += (dy[r * c + j] * h) as f64;
                        }
                    });
                    self.add_affine_grads(b.dw, &sum_dy, &sum_dy_xhat);
                }
                let dx = b.need[0].then(|| {
                    let scale: Vec<f32> = (0..c).map(|j| g(j) * rstd[j]).collect();
                    let mut dx = b.dy;
                    dx.par_chunks_mut(c * 64).for_each(|xb| {
                        for xr in xb.chunks_exact_mut(c) {
                            xr.iter_mut().zip(&scale).for_each(|(v, s)| *v *= s);
                        }
                    });
                    dx
                });
                vec![dx]
            }
        }
    }

    fn keeps_moving_stats(&self) -> bool {
        true
    }

    fn stat_sums(&self, saved: &Saved) -> Option<StatSums> {
        get_saved::<BnTrain>(saved).map(|t| t.stats.clone())
    }

    fn apply_stats(&self, w: &mut [&mut [f32]], stats: &StatSums) {
        let m = stats.count.max(1) as f64;
        let mom = self.momentum;
        let [.., mm, mv] = w else {
            return;
        };
        for (((mm, mv), s), sq) in mm
            .iter_mut()
            .zip(mv.iter_mut())
            .zip(&stats.sum)
            .zip(&stats.sum_sq)
        {
            let mean = s / m;
            let var = (sq / m - mean * mean).max(0.0);
            *mm = *mm * mom + mean as f32 * (1.0 - mom);
            *mv = *mv * mom + var as f32 * (1.0 - mom);
        }
    }

    fn flops(&self, ins: &[Vec<usize>], _out: &[usize]) -> f64 {
        2.0 * size(&ins[0]) as f64
    }
}

#[derive(Debug)]
pub(crate) struct LayerNorm {
    /// Keras axes (negative from the end); they must be the trailing axes.
    axes: Vec<i64>,
    epsilon: f32,
    center: bool,
    scale: bool,
    /// Keras's deprecated `rms_scaling`: x / std * gamma, no centring of
    /// the output and no beta.
    rms: bool,
    beta_init: Init,
    gamma_init: Init,
    beta_reg: Option<Regularizer>,
    gamma_reg: Option<Regularizer>,
}

/// Normalized input, 1/std per row.
struct LnSaved {
    xhat: Vec<f32>,
    rstd: Vec<f32>,
}

impl Drop for LnSaved {
    fn drop(&mut self) {
        crate::nn::buffers::hand_back(std::mem::take(&mut self.xhat));
    }
}

impl LayerNorm {
    fn parse(cfg: &Cfg<'_>) -> Parsed<LayerNorm> {
        cfg.require_null(&["beta_constraint", "gamma_constraint"])?;
        let axes = match cfg.get("axis") {
            None => vec![-1],
            Some(Value::Number(n)) => vec![n
                .as_i64()
                .ok_or_else(|| cfg.err("option axis is not an integer"))?],
            Some(Value::Array(a)) => a
                .iter()
                .map(Value::as_i64)
                .collect::<Option<Vec<i64>>>()
                .ok_or_else(|| cfg.err("option axis is not a list of integers"))?,
            Some(v) => return Err(cfg.unsupported("axis", v, "an axis or a list of axes")),
        };
        Ok(LayerNorm {
            axes,
            epsilon: cfg.f32_or("epsilon", 1e-3)?,
            center: cfg.bool("center", true)?,
            scale: cfg.bool("scale", true)?,
            rms: cfg.bool("rms_scaling", false)?,
            beta_init: cfg.initializer("beta_initializer", Init::Constant(0.0))?,
            gamma_init: cfg.initializer("gamma_initializer", Init::Constant(1.0))?,
            beta_reg: cfg.regularizer("beta_regularizer")?,
            gamma_reg: cfg.regularizer("gamma_regularizer")?,
        })
    }

    /// The first normalized axis of a sample of shape `s`: the axes must
    /// be the trailing ones, each once.
    fn first(&self, s: &[usize]) -> Result<usize, String> {
        let full = s.len() as i64 + 1;
        let mut axes: Vec<i64> = self
            .axes
            .iter()
            .map(|&a| if a < 0 { a + full } else { a })
            .collect();
        axes.sort_unstable();
        axes.dedup();
        let first = full - axes.len() as i64;
        if axes.len() != self.axes.len()
            || axes.iter().enumerate().any(|(i, &a)| a != first + i as i64)
            || first < 1
        {
            return Err(format!(
                "normalizes axes {:?} of a rank-{full} input; only the trailing axes \
                 (ending with the last) are supported",
                self.axes
            ));
        }
        Ok(first as usize - 1)
    }

    fn has_gamma(&self) -> bool {
        self.scale || self.rms
    }

    fn has_beta(&self) -> bool {
        self.center && !self.rms
    }
}

impl Op for LayerNorm {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        self.first(s)?;
        Ok(s.clone())
    }

    fn params(&self, ins: &[Vec<usize>]) -> Vec<ParamDecl> {
        let s = &ins[0];
        let shape = s[self.first(s).unwrap_or(0)..].to_vec();
        let mut p = Vec::new();
        if self.has_gamma() {
            p.push(
                ParamDecl::new("gamma", shape.clone(), self.gamma_init).regularized(self.gamma_reg),
            );
        }
        if self.has_beta() {
            p.push(ParamDecl::new("beta", shape, self.beta_init).regularized(self.beta_reg));
        }
        p
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let x = xs[0];
        let s = &cx.ins[0];
        let c = size(&s[self.first(s).expect("shapes checked at build")..]).max(1);
        let rows = x.len() / c;
        let gamma = self.has_gamma().then(|| cx.w[0]);
        let beta = self.has_beta().then(|| cx.w[self.has_gamma() as usize]);
        let mut y = crate::nn::buffers::zeroed(x.len());
        let mut xhat = crate::nn::buffers::zeroed(x.len());
        let mut rstd = vec![0.0f32; rows];
        y.par_chunks_mut(c)
            .zip(xhat.par_chunks_mut(c))
            .zip(rstd.par_iter_mut())
            .zip(x.par_chunks(c))
            .for_each(|(((yr, hr), rs), xr)| {
                let mean = xr.iter().map(|v| *v as f64).sum::<f64>() / c as f64;
                let var = xr
                    .iter()
                    .map(|v| (*v as f64 - mean) * (*v as f64 - mean))
                    .sum::<f64>()
                    / c as f64;
                let r = (1.0 / (var + self.epsilon as f64).sqrt()) as f32;
                *rs = r;
                for j in 0..c {
                    let h = (xr[j] - mean as f32) * r;
                    hr[j] = h;
                    let g = gamma.map_or(1.0, |g| g[j]);
                    yr[j] = if self.rms {
                        xr[j] * r * g
                    } else {
                        h * g + beta.map_or(0.0, |b| b[j])
                    };
                }
            });
        (y, saved(LnSaved { xhat, rstd }))
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let x = b.xs[0];
        let s = &cx.ins[0];
        let c = size(&s[self.first(s).expect("shapes checked at build")..]).max(1);
        let rows = x.len() / c;
        let Some(sv) = get_saved::<LnSaved>(b.saved) else {
            unreachable!("layer normalization always saves its statistics")
        };
        let gamma = self.has_gamma().then(|| cx.w[0]);
        let dy = &b.dy;
        if !b.dw.is_empty() {
            // d gamma: dy times what gamma multiplies (x*r for rms, else xhat).
            let sum_dy_h = channel_sums(rows, c, |r, acc| {
                for j in 0..c {
                    let h = if self.rms {
                        x[r * c + j] * sv.rstd[r]
                    } else {
                        sv.xhat[r * c + j]
                    };
                    acc[j] += (dy[r * c + j] * h) as f64;
                }
            });
            if self.has_gamma() {
                add_sums(b.dw[0], &sum_dy_h);
            }
            if self.has_beta() {
                add_sums(b.dw[self.has_gamma() as usize], &row_sums(dy, rows, c));
            }
        }
        let dx = b.need[0].then(|| {
            let mut dx = crate::nn::buffers::zeroed(x.len());
            dx.par_chunks_mut(c)
                .zip(dy.par_chunks(c).zip(x.par_chunks(c)))
                .zip(sv.xhat.par_chunks(c).zip(sv.rstd.par_iter()))
                .for_each(|((xr, (dr, inr)), (hr, rs))| {
                    let g = |j: usize| dr[j] * gamma.map_or(1.0, |g| g[j]);
                    if self.rms {
                        // y = x r g with r from the centred variance.
                        let s: f32 = (0..c).map(|j| g(j) * inr[j]).sum();
                        for j in 0..c {
                            xr[j] = rs * g(j) - rs * rs * hr[j] * s / c as f32;
                        }
                    } else {
                        let mut mean_g = 0.0f32;
                        let mut mean_gh = 0.0f32;
                        for (j, h) in hr.iter().enumerate() {
                            mean_g += g(j);
                            mean_gh += g(j) * h;
                        }
                        mean_g /= c as f32;
                        mean_gh /= c as f32;
                        for j in 0..c {
                            xr[j] = rs * (g(j) - mean_g - hr[j] * mean_gh);
                        }
                    }
                });
            dx
        });
        crate::nn::buffers::hand_back(b.dy);
        vec![dx]
    }

    fn flops(&self, ins: &[Vec<usize>], _out: &[usize]) -> f64 {
        5.0 * size(&ins[0]) as f64
    }
}

/// `x * gamma`, one learned scale per channel (ConvNeXt).
#[derive(Debug)]
pub(crate) struct LayerScale {
    init: f32,
    dim: usize,
}

impl Op for LayerScale {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        if s.last() != Some(&self.dim) {
            return Err(format!(
                "projection_dim {} does not match the input's {} channels",
                self.dim,
                s.last().unwrap_or(&0)
            ));
        }
        Ok(s.clone())
    }

    fn params(&self, _ins: &[Vec<usize>]) -> Vec<ParamDecl> {
        vec![ParamDecl::new(
            "gamma",
            vec![self.dim],
            Init::Constant(self.init),
        )]
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let g = cx.w[0];
        let mut y = crate::nn::buffers::copied(xs[0]);
        y.par_chunks_mut(self.dim * 64).for_each(|b| {
            for r in b.chunks_exact_mut(self.dim) {
                r.iter_mut().zip(g).for_each(|(v, g)| *v *= g);
            }
        });
        (y, None)
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let c = self.dim;
        let x = b.xs[0];
        if !b.dw.is_empty() {
            let rows = x.len() / c;
            let s = channel_sums(rows, c, |r, acc| {
                for j in 0..c {
                    acc[j] += (b.dy[r * c + j] * x[r * c + j]) as f64;
                }
            });
            add_sums(b.dw[0], &s);
        }
        let dx = b.need[0].then(|| {
            let g = cx.w[0];
            let mut dx = b.dy;
            dx.par_chunks_mut(c * 64).for_each(|blk| {
                for r in blk.chunks_exact_mut(c) {
                    r.iter_mut().zip(g).for_each(|(v, g)| *v *= g);
                }
            });
            dx
        });
        vec![dx]
    }
}
