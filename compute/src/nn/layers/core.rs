//! Dense, the activation layers, and the layers that are only active while
//! training (dropout and noise).

use rayon::prelude::*;
use serde_json::Value;

use super::{
    get_saved, kernel_grad, one_input, saved, size, Back, Ctx, KernelBias, Op, ParamDecl,
    Regularizer, Saved,
};
use crate::nn::activation::Activation;
use crate::nn::config::{Cfg, Parsed};
use crate::nn::gemm::{gemm, Mat};
use crate::nn::init::Init;
use crate::nn::rng::SplitMix64;

pub(crate) fn build(cfg: &Cfg<'_>) -> Parsed<Option<Box<dyn Op>>> {
    Ok(Some(match cfg.class {
        "Dense" => Box::new(Dense::parse(cfg)?),
        "Activation" => Box::new(Act(cfg.activation("activation")?)),
        "ReLU" => {
            let max_value = cfg.opt_f32("max_value")?;
            let negative_slope = cfg.f32_or("negative_slope", 0.0)?;
            let threshold = cfg.f32_or("threshold", 0.0)?;
            Box::new(Act(Activation::Relu {
                negative_slope,
                max_value,
                threshold,
            }))
        }
        "LeakyReLU" => {
            // Keras 3 calls it negative_slope, Keras 2 alpha.
            let slope = match cfg.opt_f32("negative_slope")? {
                Some(s) => s,
                None => cfg.f32_or("alpha", 0.3)?,
            };
            Box::new(Act(Activation::LeakyRelu(slope)))
        }
        "ELU" => Box::new(Act(Activation::Elu(cfg.f32_or("alpha", 1.0)?))),
        "Softmax" => match cfg.get("axis") {
            None => Box::new(Act(Activation::Softmax)),
            Some(v) if v.as_i64() == Some(-1) => Box::new(Act(Activation::Softmax)),
            Some(v) => Box::new(SoftmaxAxis {
                axis: v
                    .as_i64()
                    .ok_or_else(|| cfg.unsupported("axis", v, "one axis"))?,
            }),
        },
        "PReLU" => Box::new(PRelu::parse(cfg)?),
        "Identity" => Box::new(Act(Activation::Linear)),
        "Dropout" | "SpatialDropout1D" | "SpatialDropout2D" | "SpatialDropout3D" => {
            let rate = cfg.f32_or("rate", -1.0)?;
            if !(0.0..1.0).contains(&rate) {
                return Err(cfg.err("option rate is missing or not in [0, 1)"));
            }
            // SpatialDropout drops whole channels: noise shape (1, ..., 1, C).
            let noise_shape = match cfg.get("noise_shape") {
                _ if cfg.class.starts_with("Spatial") => Some(NoiseShape::Channels),
                None => None,
                Some(Value::Array(a)) if a.first().is_some_and(Value::is_null) => {
                    Some(NoiseShape::Dims(
                        a[1..]
                            .iter()
                            .map(|d| d.as_u64().map(|d| d as usize))
                            .collect(),
                    ))
                }
                Some(v) => {
                    return Err(cfg.unsupported(
                        "noise_shape",
                        v,
                        "null, or a shape starting with None (the batch)",
                    ))
                }
            };
            Box::new(Noisy::Dropout { rate, noise_shape })
        }
        "GaussianNoise" => Box::new(Noisy::Gaussian {
            stddev: cfg.f32_or("stddev", 0.0)?,
        }),
        "GaussianDropout" => {
            let rate = cfg.f32_or("rate", 0.0)?;
            if !(0.0..1.0).contains(&rate) {
                return Err(cfg.err("option rate is not in [0, 1)"));
            }
            Box::new(Noisy::GaussianDropout { rate })
        }
        _ => return Ok(None),
    }))
}

/// Options every layer with weights may carry that quern cannot honour.
pub(crate) const CONSTRAINTS: [&str; 4] = [
    "kernel_constraint",
    "bias_constraint",
    "activity_regularizer",
    "quantization_config",
];

/// `Dense(units)` on the last axis of any input.
#[derive(Debug)]
pub(crate) struct Dense {
    units: usize,
    act: Activation,
    w: KernelBias,
}

impl Dense {
    fn parse(cfg: &Cfg<'_>) -> Parsed<Dense> {
        cfg.require_null(&CONSTRAINTS)?;
        if let Some(v) = cfg.get("lora_rank") {
            return Err(cfg.unsupported("lora_rank", v, "null"));
        }
        Ok(Dense {
            units: cfg.usize("units")?,
            act: cfg.activation("activation")?,
            w: KernelBias::parse(cfg, "kernel")?,
        })
    }
}

/// The pre-activation, when the activation's derivative needs it.
struct PreAct(Vec<f32>);

impl Drop for PreAct {
    fn drop(&mut self) {
        crate::nn::buffers::hand_back(std::mem::take(&mut self.0));
    }
}

/// Adds the bias row to every row, then applies the activation; keeps the
/// pre-activation when the backward pass will need it.
pub(crate) fn finish_linear(
    y: &mut [f32],
    bias: Option<&[f32]>,
    width: usize,
    act: Activation,
) -> Saved {
    if let Some(b) = bias {
        y.par_chunks_mut(width * 64).for_each(|block| {
            for row in block.chunks_exact_mut(width) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        });
    }
    let keep = act
        .needs_input()
        .then(|| PreAct(crate::nn::buffers::copied(y)));
    act.apply(y, width);
    keep.and_then(saved)
}

/// Turns the output gradient into the pre-activation gradient.
pub(crate) fn unfinish_linear(
    act: Activation,
    saved: &Saved,
    y: &[f32],
    dy: &mut [f32],
    width: usize,
) {
    let pre = get_saved::<PreAct>(saved).map(|p| p.0.as_slice());
    act.backward(pre, y, dy, width);
}

impl Op for Dense {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        if s.is_empty() {
            return Err("needs an input with at least one axis besides the batch".into());
        }
        let mut out = s.clone();
        *out.last_mut().unwrap_or(&mut 0) = self.units;
        Ok(out)
    }

    fn params(&self, ins: &[Vec<usize>]) -> Vec<ParamDecl> {
        let fin = ins[0].last().copied().unwrap_or(1);
        self.w.decls("kernel", vec![fin, self.units], self.units)
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let fin = cx.ins[0].last().copied().unwrap_or(1);
        let rows = xs[0].len() / fin.max(1);
        // The GEMM writes every value, unless there is no input to sum.
        let mut y = match fin {
            0 => crate::nn::buffers::zeroed(rows * self.units),
            _ => crate::nn::buffers::overwritten(rows * self.units),
        };
        gemm(
            rows,
            fin,
            self.units,
            Mat::rows(xs[0], fin),
            Mat::rows(cx.w[0], self.units),
            &mut y,
            false,
        );
        let bias = self.w.use_bias.then(|| cx.w[1]);
        let s = finish_linear(&mut y, bias, self.units, self.act);
        (y, s)
    }

    fn backward(&self, cx: &Ctx<'_>, mut b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let fin = cx.ins[0].last().copied().unwrap_or(1);
        let rows = b.xs[0].len() / fin.max(1);
        if !b.skip_act {
            unfinish_linear(self.act, b.saved, b.y, &mut b.dy, self.units);
        }
        if let Some(dk) = kernel_grad(b.dw, &b.dy, self.units) {
            gemm(
                fin,
                rows,
                self.units,
                Mat::rows_t(b.xs[0], fin),
                Mat::rows(&b.dy, self.units),
                dk,
                false,
            );
        }
        let dx = b.need[0].then(|| {
            // The GEMM writes every value.
            let mut dx = crate::nn::buffers::overwritten(rows * fin);
            gemm(
                rows,
                self.units,
                fin,
                Mat::rows(&b.dy, self.units),
                Mat::rows_t(cx.w[0], self.units),
                &mut dx,
                false,
            );
            dx
        });
        crate::nn::buffers::hand_back(b.dy);
        vec![dx]
    }

    fn activation(&self) -> Option<Activation> {
        Some(self.act)
    }

    fn flops(&self, ins: &[Vec<usize>], out: &[usize]) -> f64 {
        2.0 * size(&ins[0]) as f64 * *out.last().unwrap_or(&1) as f64
    }
}

/// An activation as a layer.
#[derive(Debug)]
pub(crate) struct Act(pub Activation);

impl Op for Act {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        one_input(ins).cloned()
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let mut y = crate::nn::buffers::copied(xs[0]);
        self.0.apply(&mut y, *cx.out.last().unwrap_or(&1));
        (y, None)
    }

    fn backward(&self, cx: &Ctx<'_>, mut b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        if !b.need[0] {
            return vec![None];
        }
        if !b.skip_act {
            let x = self.0.needs_input().then_some(b.xs[0]);
            self.0
                .backward(x, b.y, &mut b.dy, *cx.out.last().unwrap_or(&1));
        }
        vec![Some(b.dy)]
    }

    fn activation(&self) -> Option<Activation> {
        Some(self.0)
    }
}

/// `PReLU`: a learned slope for negative inputs, shared along
/// `shared_axes`.
#[derive(Debug)]
pub(crate) struct PRelu {
    init: Init,
    reg: Option<Regularizer>,
    /// Keras axes (1-based) along which one slope is shared.
    shared: Vec<usize>,
}

impl PRelu {
    fn parse(cfg: &Cfg<'_>) -> Parsed<PRelu> {
        cfg.require_null(&["alpha_constraint"])?;
        let shared = match cfg.get("shared_axes") {
            None => Vec::new(),
            Some(Value::Number(n)) => vec![n.as_u64().unwrap_or(0) as usize],
            Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(0) as usize).collect(),
            Some(v) => return Err(cfg.unsupported("shared_axes", v, "an axis or a list of axes")),
        };
        if shared.contains(&0) {
            return Err(
                cfg.err("shared_axes must be positive axes (1 is the first after the batch)")
            );
        }
        Ok(PRelu {
            init: cfg.initializer("alpha_initializer", Init::Constant(0.0))?,
            reg: cfg.regularizer("alpha_regularizer")?,
            shared,
        })
    }

    fn alpha_shape(&self, s: &[usize]) -> Vec<usize> {
        s.iter()
            .enumerate()
            .map(|(i, &d)| if self.shared.contains(&(i + 1)) { 1 } else { d })
            .collect()
    }

    /// Index into alpha of element `i` of a sample of shape `s`.
    fn alpha_index(&self, s: &[usize], a: &[usize], mut i: usize) -> usize {
        let mut idx = 0;
        let mut stride = 1;
        for (d, ad) in s.iter().zip(a).rev() {
            let coord = i % d;
            i /= d;
            if *ad != 1 {
                idx += coord * stride;
            }
            stride *= ad;
        }
        idx
    }
}

impl Op for PRelu {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        if let Some(a) = self.shared.iter().find(|&&a| a > s.len()) {
            return Err(format!("shared axis {a} is beyond the input's rank"));
        }
        Ok(s.clone())
    }

    fn params(&self, ins: &[Vec<usize>]) -> Vec<ParamDecl> {
        vec![ParamDecl::new("alpha", self.alpha_shape(&ins[0]), self.init).regularized(self.reg)]
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let s = &cx.ins[0];
        let a = self.alpha_shape(s);
        let per = size(s);
        let alpha = cx.w[0];
        let mut y = crate::nn::buffers::copied(xs[0]);
        y.par_chunks_mut(per.max(1)).for_each(|row| {
            for (i, v) in row.iter_mut().enumerate() {
                if *v < 0.0 {
                    *v *= alpha[self.alpha_index(s, &a, i)];
                }
            }
        });
        (y, None)
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let s = &cx.ins[0];
        let a = self.alpha_shape(s);
        let per = size(s).max(1);
        let x = b.xs[0];
        if !b.dw.is_empty() {
            for (xr, dr) in x.chunks_exact(per).zip(b.dy.chunks_exact(per)) {
                for (i, (xv, d)) in xr.iter().zip(dr).enumerate() {
                    if *xv < 0.0 {
                        b.dw[0][self.alpha_index(s, &a, i)] += d * xv;
                    }
                }
            }
        }
        let dx = b.need[0].then(|| {
            let mut dx = b.dy;
            let alpha = cx.w[0];
            dx.par_chunks_mut(per)
                .zip(x.par_chunks(per))
                .for_each(|(dr, xr)| {
                    for (i, (d, xv)) in dr.iter_mut().zip(xr).enumerate() {
                        if *xv < 0.0 {
                            *d *= alpha[self.alpha_index(s, &a, i)];
                        } else if *xv == 0.0 {
                            *d = 0.0;
                        }
                    }
                });
            dx
        });
        vec![dx]
    }
}

/// Layers that add randomness while training and pass values through at
/// inference.
#[derive(Debug)]
pub(crate) enum Noisy {
    /// One draw per element of the noise shape, broadcast over the rest.
    Dropout {
        rate: f32,
        noise_shape: Option<NoiseShape>,
    },
    Gaussian {
        stddev: f32,
    },
    GaussianDropout {
        rate: f32,
    },
}

struct Mask(Vec<f32>);

impl Drop for Mask {
    fn drop(&mut self) {
        crate::nn::buffers::hand_back(std::mem::take(&mut self.0));
    }
}

/// Dropout's `noise_shape` (per sample): where it is 1 (or SpatialDropout's
/// non-channel axes) one draw covers the whole axis.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NoiseShape {
    /// SpatialDropout: one draw per channel.
    Channels,
    /// Keras's noise_shape without the batch axis; None takes the input's
    /// size.
    Dims(Vec<Option<usize>>),
}

impl NoiseShape {
    /// The per-sample noise dims for input `shape`, or why they do not fit.
    fn dims(&self, shape: &[usize]) -> Result<Vec<usize>, String> {
        match self {
            NoiseShape::Channels => {
                let mut d = vec![1; shape.len()];
                if let (Some(l), Some(c)) = (d.last_mut(), shape.last()) {
                    *l = *c;
                }
                Ok(d)
            }
            NoiseShape::Dims(dims) => {
                if dims.len() != shape.len() {
                    return Err(format!(
                        "noise_shape has {} axes after the batch, the input {}",
                        dims.len(),
                        shape.len()
                    ));
                }
                dims.iter()
                    .zip(shape)
                    .map(|(n, &s)| match n {
                        None => Ok(s),
                        Some(1) => Ok(1),
                        Some(d) if *d == s => Ok(s),
                        Some(d) => Err(format!(
                            "noise_shape size {d} neither 1 nor the input's {s}"
                        )),
                    })
                    .collect()
            }
        }
    }
}

/// For each element of a sample, the index of its draw in the noise.
fn noise_index(shape: &[usize], noise: &[usize]) -> Vec<u32> {
    let mut strides = vec![0usize; noise.len()];
    let mut st = 1;
    for k in (0..noise.len()).rev() {
        strides[k] = if noise[k] == 1 { 0 } else { st };
        st *= noise[k];
    }
    (0..size(shape))
        .map(|mut i| {
            let mut off = 0;
            for k in (0..shape.len()).rev() {
                off += (i % shape[k]) * strides[k];
                i /= shape[k];
            }
            off as u32
        })
        .collect()
}

impl Noisy {
    fn active(&self) -> bool {
        match *self {
            Noisy::Dropout { rate, .. } | Noisy::GaussianDropout { rate } => rate > 0.0,
            Noisy::Gaussian { stddev } => stddev > 0.0,
        }
    }
}

impl Op for Noisy {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        match ins {
            [s] => {
                if let Noisy::Dropout {
                    noise_shape: Some(ns),
                    ..
                } = self
                {
                    ns.dims(s)?;
                }
                Ok(s.clone())
            }
            _ => Err(format!("takes one input, got {}", ins.len())),
        }
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let Some(noise) = cx.noise.filter(|_| cx.train && self.active()) else {
            return (crate::nn::buffers::copied(xs[0]), None);
        };
        let per = size(cx.out).max(1);
        let mut y = crate::nn::buffers::copied(xs[0]);
        match *self {
            Noisy::Dropout {
                rate,
                ref noise_shape,
            } => {
                let keep = 1.0 / (1.0 - rate);
                let dims = match noise_shape {
                    Some(ns) => ns.dims(cx.out).unwrap_or_else(|_| cx.out.to_vec()),
                    None => cx.out.to_vec(),
                };
                let draws = size(&dims);
                let index = (draws != per).then(|| noise_index(cx.out, &dims));
                // Every value is drawn below.
                let mut mask = crate::nn::buffers::overwritten(y.len());
                mask.par_chunks_mut(per).enumerate().for_each(|(i, m)| {
                    let mut rng =
                        SplitMix64::derive(noise.seed, noise.stream, noise.first_sample + i as u64);
                    let drawn: Vec<f32> = (0..draws)
                        .map(|_| if rng.next_f32() >= rate { keep } else { 0.0 })
                        .collect();
                    match &index {
                        None => m.copy_from_slice(&drawn),
                        Some(ix) => m
                            .iter_mut()
                            .zip(ix)
                            .for_each(|(v, j)| *v = drawn[*j as usize]),
                    }
                });
                y.iter_mut().zip(&mask).for_each(|(v, m)| *v *= m);
                (y, saved(Mask(mask)))
            }
            Noisy::Gaussian { stddev } => {
                y.par_chunks_mut(per).enumerate().for_each(|(i, row)| {
                    let mut rng =
                        SplitMix64::derive(noise.seed, noise.stream, noise.first_sample + i as u64);
                    for v in row {
                        *v += stddev * rng.next_normal() as f32;
                    }
                });
                (y, None)
            }
            Noisy::GaussianDropout { rate } => {
                let sd = (rate / (1.0 - rate)).sqrt();
                // Every value is drawn below.
                let mut mask = crate::nn::buffers::overwritten(y.len());
                mask.par_chunks_mut(per).enumerate().for_each(|(i, m)| {
                    let mut rng =
                        SplitMix64::derive(noise.seed, noise.stream, noise.first_sample + i as u64);
                    for v in m.iter_mut() {
                        *v = 1.0 + sd * rng.next_normal() as f32;
                    }
                });
                y.iter_mut().zip(&mask).for_each(|(v, m)| *v *= m);
                (y, saved(Mask(mask)))
            }
        }
    }

    fn backward(&self, _cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        if !b.need[0] {
            return vec![None];
        }
        let mut dx = b.dy;
        if let Some(Mask(m)) = get_saved::<Mask>(b.saved) {
            dx.iter_mut().zip(m).for_each(|(d, m)| *d *= m);
        }
        vec![Some(dx)]
    }
}

/// Softmax along an axis other than the last.
#[derive(Debug)]
pub(crate) struct SoftmaxAxis {
    axis: i64,
}

impl SoftmaxAxis {
    /// (outer, length, inner) of the axis within one sample.
    fn split(&self, s: &[usize]) -> Result<(usize, usize, usize), String> {
        let full = s.len() as i64 + 1;
        let a = if self.axis < 0 {
            self.axis + full
        } else {
            self.axis
        };
        if a <= 0 || a >= full {
            return Err(format!(
                "axis {} is out of range for inputs of rank {full}",
                self.axis
            ));
        }
        let a = a as usize - 1;
        Ok((size(&s[..a]), s[a], size(&s[a + 1..])))
    }
}

impl Op for SoftmaxAxis {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        self.split(s)?;
        Ok(s.clone())
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let (_, len, inner) = self.split(&cx.ins[0]).expect("shapes checked at build");
        let mut y = crate::nn::buffers::copied(xs[0]);
        y.par_chunks_mut((len * inner).max(1)).for_each(|block| {
            for i in 0..inner {
                let max = (0..len)
                    .map(|k| block[k * inner + i])
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for k in 0..len {
                    let v = (block[k * inner + i] - max).exp();
                    block[k * inner + i] = v;
                    sum += v;
                }
                for k in 0..len {
                    block[k * inner + i] /= sum;
                }
            }
        });
        (y, None)
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        if !b.need[0] {
            return vec![None];
        }
        let (_, len, inner) = self.split(&cx.ins[0]).expect("shapes checked at build");
        let mut dx = b.dy;
        dx.par_chunks_mut((len * inner).max(1))
            .zip(b.y.par_chunks((len * inner).max(1)))
            .for_each(|(d, y)| {
                for i in 0..inner {
                    let dot: f32 = (0..len).map(|k| d[k * inner + i] * y[k * inner + i]).sum();
                    for k in 0..len {
                        d[k * inner + i] = y[k * inner + i] * (d[k * inner + i] - dot);
                    }
                }
            });
        vec![Some(dx)]
    }
}
