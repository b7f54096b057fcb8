//! Layers that move values without arithmetic: Flatten, Reshape, Permute,
//! ZeroPadding2D, Cropping2D and UpSampling2D (nearest; bilinear
//! interpolates as `tf.image.resize` does, with half-pixel centres).

use rayon::prelude::*;
use serde_json::Value;

use super::{one_input, shape_str, size, Back, Ctx, Op, Saved};
use crate::nn::config::{Cfg, Parsed};

pub(crate) fn build(cfg: &Cfg<'_>) -> Parsed<Option<Box<dyn Op>>> {
    Ok(Some(match cfg.class {
        "Flatten" => {
            cfg.channels_last()?;
            Box::new(Move::Flatten)
        }
        "Reshape" => {
            let target = match cfg.get("target_shape") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| v.as_i64().filter(|&d| d > 0 || d == -1))
                    .collect::<Option<Vec<i64>>>(),
                _ => None,
            }
            .ok_or_else(|| {
                cfg.err("option target_shape is missing or not a list of sizes (-1 allowed once)")
            })?;
            if target.iter().filter(|&&d| d == -1).count() > 1 {
                return Err(cfg.err("target_shape may hold -1 only once"));
            }
            Box::new(Move::Reshape(target))
        }
        "Permute" => {
            let dims = match cfg.get("dims") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| v.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<usize>>>(),
                _ => None,
            }
            .ok_or_else(|| cfg.err("option dims is missing or not a list of axes"))?;
            let mut sorted = dims.clone();
            sorted.sort_unstable();
            if sorted != (1..=dims.len()).collect::<Vec<_>>() {
                return Err(cfg.err(format!(
                    "dims {dims:?} is not a permutation of 1..={}",
                    dims.len()
                )));
            }
            Box::new(Move::Permute(dims))
        }
        "ZeroPadding2D" | "Cropping2D" => {
            cfg.channels_last()?;
            let key = if cfg.class == "ZeroPadding2D" {
                "padding"
            } else {
                "cropping"
            };
            let amounts = pairs(cfg, key)?;
            if cfg.class == "ZeroPadding2D" {
                Box::new(Move::Pad(amounts))
            } else {
                Box::new(Move::Crop(amounts))
            }
        }
        "UpSampling2D" => {
            cfg.channels_last()?;
            let size = cfg.tuple::<2>("size")?.unwrap_or([2, 2]);
            match cfg.str_or("interpolation", "nearest")? {
                "nearest" => Box::new(Move::Upsample(size)),
                "bilinear" => Box::new(Bilinear { size }),
                other => {
                    return Err(cfg.unsupported(
                        "interpolation",
                        &Value::String(other.to_string()),
                        "\"nearest\", \"bilinear\"",
                    ))
                }
            }
        }
        _ => return Ok(None),
    }))
}

/// `((top, bottom), (left, right))` from an int, a pair, or a pair of
/// pairs, as ZeroPadding2D and Cropping2D accept.
fn pairs(cfg: &Cfg<'_>, key: &str) -> Parsed<[[usize; 2]; 2]> {
    let bad = || {
        cfg.err(format!(
            "option {key} is not an int, a pair, or a pair of pairs"
        ))
    };
    let int = |v: &Value| v.as_u64().map(|u| u as usize).ok_or_else(bad);
    match cfg.get(key) {
        None => Ok([[1, 1], [1, 1]]),
        Some(Value::Number(_)) => {
            let v = int(cfg.get(key).unwrap_or(&Value::Null))?;
            Ok([[v, v], [v, v]])
        }
        Some(Value::Array(a)) if a.len() == 2 => {
            let mut out = [[0usize; 2]; 2];
            for (o, v) in out.iter_mut().zip(a) {
                *o = match v {
                    Value::Array(p) if p.len() == 2 => [int(&p[0])?, int(&p[1])?],
                    v => {
                        let x = int(v)?;
                        [x, x]
                    }
                };
            }
            Ok(out)
        }
        Some(_) => Err(bad()),
    }
}

/// Index moves: each output position reads one input position or zero.
#[derive(Debug)]
pub(crate) enum Move {
    Flatten,
    Reshape(Vec<i64>),
    /// Keras's 1-based axis order.
    Permute(Vec<usize>),
    Pad([[usize; 2]; 2]),
    Crop([[usize; 2]; 2]),
    Upsample([usize; 2]),
}

fn hwc(s: &[usize]) -> Result<[usize; 3], String> {
    match s {
        [h, w, c] => Ok([*h, *w, *c]),
        _ => Err(format!(
            "needs a (batch, height, width, channels) input, got {}",
            shape_str(s)
        )),
    }
}

impl Move {
    /// Whether values keep their order (a view change only).
    fn is_view(&self) -> bool {
        matches!(self, Move::Flatten | Move::Reshape(_))
    }

    /// For each output position of a sample, the input position it reads.
    fn map(&self, s: &[usize], out: &[usize]) -> Vec<Option<u32>> {
        match self {
            Move::Flatten | Move::Reshape(_) => (0..size(s) as u32).map(Some).collect(),
            Move::Permute(dims) => {
                let mut in_strides = vec![1usize; s.len()];
                for k in (0..s.len().saturating_sub(1)).rev() {
                    in_strides[k] = in_strides[k + 1] * s[k + 1];
                }
                (0..size(out))
                    .map(|mut i| {
                        let mut off = 0;
                        for k in (0..out.len()).rev() {
                            off += (i % out[k]) * in_strides[dims[k] - 1];
                            i /= out[k];
                        }
                        Some(off as u32)
                    })
                    .collect()
            }
            Move::Pad([[t, _], [l, _]]) => {
                let (h, w, c) = (s[0], s[1], s[2]);
                let (oh, ow) = (out[0], out[1]);
                let mut m = Vec::with_capacity(oh * ow * c);
                for y in 0..oh {
                    for x in 0..ow {
                        let src = y
                            .checked_sub(*t)
                            .zip(x.checked_sub(*l))
                            .filter(|&(iy, ix)| iy < h && ix < w);
                        for ch in 0..c {
                            m.push(src.map(|(iy, ix)| ((iy * w + ix) * c + ch) as u32));
                        }
                    }
                }
                m
            }
            Move::Crop([[t, _], [l, _]]) => {
                let (w, c) = (s[1], s[2]);
                let (oh, ow) = (out[0], out[1]);
                let mut m = Vec::with_capacity(oh * ow * c);
                for y in 0..oh {
                    for x in 0..ow {
                        for ch in 0..c {
                            m.push(Some((((y + t) * w + x + l) * c + ch) as u32));
                        }
                    }
                }
                m
            }
            Move::Upsample([sy, sx]) => {
                let (w, c) = (s[1], s[2]);
                let (oh, ow) = (out[0], out[1]);
                let mut m = Vec::with_capacity(oh * ow * c);
                for y in 0..oh {
                    for x in 0..ow {
                        for ch in 0..c {
                            m.push(Some((((y / sy) * w + x / sx) * c + ch) as u32));
                        }
                    }
                }
                m
            }
        }
    }
}

impl Op for Move {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        match self {
            Move::Flatten => Ok(vec![size(s)]),
            Move::Reshape(target) => {
                let known: usize = target
                    .iter()
                    .filter(|&&d| d > 0)
                    .map(|&d| d as usize)
                    .product();
                let total = size(s);
                let out: Vec<usize> = target
                    .iter()
                    .map(|&d| {
                        if d == -1 {
                            total / known.max(1)
                        } else {
                            d as usize
                        }
                    })
                    .collect();
                if size(&out) != total {
                    return Err(format!(
                        "cannot reshape {} ({total} values) to {target:?}",
                        shape_str(s)
                    ));
                }
                Ok(out)
            }
            Move::Permute(dims) => {
                if dims.len() != s.len() {
                    return Err(format!(
                        "dims {dims:?} do not match the input {}",
                        shape_str(s)
                    ));
                }
                Ok(dims.iter().map(|&d| s[d - 1]).collect())
            }
            Move::Pad([[t, b], [l, r]]) => {
                let [h, w, c] = hwc(s)?;
                Ok(vec![h + t + b, w + l + r, c])
            }
            Move::Crop([[t, b], [l, r]]) => {
                let [h, w, c] = hwc(s)?;
                if t + b >= h || l + r >= w {
                    return Err(format!("crops everything of {}", shape_str(s)));
                }
                Ok(vec![h - t - b, w - l - r, c])
            }
            Move::Upsample([sy, sx]) => {
                let [h, w, c] = hwc(s)?;
                Ok(vec![h * sy, w * sx, c])
            }
        }
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        if self.is_view() {
            return (crate::nn::buffers::copied(xs[0]), None);
        }
        let map = self.map(&cx.ins[0], cx.out);
        let (pi, po) = (size(&cx.ins[0]).max(1), size(cx.out).max(1));
        // Every value is set below.
        let mut y = crate::nn::buffers::overwritten(cx.n * po);
        y.par_chunks_mut(po)
            .zip(xs[0].par_chunks(pi))
            .for_each(|(ys, x)| {
                for (v, m) in ys.iter_mut().zip(&map) {
                    *v = m.map_or(0.0, |i| x[i as usize]);
                }
            });
        (y, None)
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        if !b.need[0] {
            return vec![None];
        }
        if self.is_view() {
            return vec![Some(b.dy)];
        }
        let map = self.map(&cx.ins[0], cx.out);
        let (pi, po) = (size(&cx.ins[0]).max(1), size(cx.out).max(1));
        let mut dx = crate::nn::buffers::zeroed(cx.n * pi);
        dx.par_chunks_mut(pi)
            .zip(b.dy.par_chunks(po))
            .for_each(|(d, g)| {
                for (gv, m) in g.iter().zip(&map) {
                    if let Some(i) = m {
                        d[*i as usize] += gv;
                    }
                }
            });
        crate::nn::buffers::hand_back(b.dy);
        vec![Some(dx)]
    }
}

/// UpSampling2D(interpolation="bilinear").
#[derive(Debug)]
pub(crate) struct Bilinear {
    size: [usize; 2],
}

/// Source rows (or columns) and weight for each output row: `tf.image.resize`
/// with half-pixel centres, edges clamped.
fn taps(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let lo = src.floor();
            let frac = src - lo;
            let lo = (lo as usize).min(input - 1);
            let hi = (lo + 1).min(input - 1);
            (lo, hi, frac)
        })
        .collect()
}

impl Op for Bilinear {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        Move::Upsample(self.size).out_shape(ins)
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let [h, w, c] = hwc(&cx.ins[0]).expect("shapes checked at build");
        let (oh, ow) = (cx.out[0], cx.out[1]);
        let (ty, tx) = (taps(h, oh), taps(w, ow));
        let mut y = vec![0.0f32; cx.n * oh * ow * c];
        y.par_chunks_mut(oh * ow * c)
            .zip(xs[0].par_chunks(h * w * c))
            .for_each(|(ys, x)| {
                for (oy, &(y0, y1, fy)) in ty.iter().enumerate() {
                    for (ox, &(x0, x1, fx)) in tx.iter().enumerate() {
                        for ch in 0..c {
                            let at = |yy: usize, xx: usize| x[(yy * w + xx) * c + ch];
                            let top = at(y0, x0) + (at(y0, x1) - at(y0, x0)) * fx;
                            let bot = at(y1, x0) + (at(y1, x1) - at(y1, x0)) * fx;
                            ys[(oy * ow + ox) * c + ch] = top + (bot - top) * fy;
                        }
                    }
                }
            });
        (y, None)
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        if !b.need[0] {
            return vec![None];
        }
        let [h, w, c] = hwc(&cx.ins[0]).expect("shapes checked at build");
        let (oh, ow) = (cx.out[0], cx.out[1]);
        let (ty, tx) = (taps(h, oh), taps(w, ow));
        let mut dx = vec![0.0f32; cx.n * h * w * c];
        dx.par_chunks_mut(h * w * c)
            .zip(b.dy.par_chunks(oh * ow * c))
            .for_each(|(d, g)| {
                for (oy, &(y0, y1, fy)) in ty.iter().enumerate() {
                    for (ox, &(x0, x1, fx)) in tx.iter().enumerate() {
                        for ch in 0..c {
                            let gv = g[(oy * ow + ox) * c + ch];
                            d[(y0 * w + x0) * c + ch] += gv * (1.0 - fy) * (1.0 - fx);
                            d[(y0 * w + x1) * c + ch] += gv * (1.0 - fy) * fx;
                            d[(y1 * w + x0) * c + ch] += gv * fy * (1.0 - fx);
                            d[(y1 * w + x1) * c + ch] += gv * fy * fx;
                        }
                    }
                }
            });
        vec![Some(dx)]
    }
}
