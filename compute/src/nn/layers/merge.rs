//! Merging layers: element-wise Add, Subtract, Multiply, Average, Maximum,
//! Minimum (with Keras's broadcasting of size-1 axes, as in a
//! squeeze-and-excitation block), and Concatenate along any axis.

use rayon::prelude::*;

use super::{get_saved, saved, shape_str, size, Back, Ctx, Op, Saved};
use crate::nn::config::{Cfg, Parsed};

pub(crate) fn build(cfg: &Cfg<'_>) -> Parsed<Option<Box<dyn Op>>> {
    let kind = match cfg.class {
        "Add" => Kind::Add,
        "Subtract" => Kind::Subtract,
        "Multiply" => Kind::Multiply,
        "Average" => Kind::Average,
        "Maximum" => Kind::Maximum,
        "Minimum" => Kind::Minimum,
        "Concatenate" => {
            let axis = match cfg.get("axis") {
                None => -1,
                Some(v) => v
                    .as_i64()
                    .ok_or_else(|| cfg.err(format!("option axis = {v} is not an integer")))?,
            };
            return Ok(Some(Box::new(Concat { axis })));
        }
        _ => return Ok(None),
    };
    Ok(Some(Box::new(Elementwise { kind })))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Add,
    Subtract,
    Multiply,
    Average,
    Maximum,
    Minimum,
}

#[derive(Debug)]
pub(crate) struct Elementwise {
    kind: Kind,
}

/// For each input, the offset within its sample of every output position
/// (None when the input has the output's shape).
fn broadcast_maps(ins: &[Vec<usize>], out: &[usize]) -> Vec<Option<Vec<u32>>> {
    ins.iter()
        .map(|s| {
            if s.as_slice() == out {
                return None;
            }
            let mut strides = vec![0usize; s.len()];
            let mut st = 1;
            for k in (0..s.len()).rev() {
                strides[k] = if s[k] == 1 { 0 } else { st };
                st *= s[k];
            }
            let total = size(out);
            let mut map = Vec::with_capacity(total);
            for mut i in 0..total {
                let mut off = 0;
                for k in (0..out.len()).rev() {
                    off += (i % out[k]) * strides[k];
                    i /= out[k];
                }
                map.push(off as u32);
            }
            Some(map)
        })
        .collect()
}

/// The input index that won each output element of Maximum/Minimum.
struct Winner(Vec<u8>);

impl Elementwise {
    fn combine(&self, acc: f32, v: f32) -> f32 {
        match self.kind {
            Kind::Add | Kind::Average => acc + v,
            Kind::Subtract => acc - v,
            Kind::Multiply => acc * v,
            Kind::Maximum => acc.max(v),
            Kind::Minimum => acc.min(v),
        }
    }
}

impl Op for Elementwise {
    fn merges(&self) -> bool {
        true
    }

    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        if ins.len() < 2 || (self.kind == Kind::Subtract && ins.len() != 2) {
            return Err(format!(
                "needs {} inputs, got {}",
                if self.kind == Kind::Subtract {
                    "exactly 2"
                } else {
                    "at least 2"
                },
                ins.len()
            ));
        }
        if ins.len() > 255 {
            return Err("takes at most 255 inputs".into());
        }
        let rank = ins[0].len();
        if ins.iter().any(|s| s.len() != rank) {
            let shapes: Vec<String> = ins.iter().map(|s| shape_str(s)).collect();
            return Err(format!("inputs of different ranks: {}", shapes.join(", ")));
        }
        let mut out = vec![1usize; rank];
        for s in ins {
            for (o, &d) in out.iter_mut().zip(s) {
                if *o == 1 {
                    *o = d;
                } else if d != 1 && d != *o {
                    let shapes: Vec<String> = ins.iter().map(|s| shape_str(s)).collect();
                    return Err(format!("inputs do not broadcast: {}", shapes.join(", ")));
                }
            }
        }
        Ok(out)
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let per = size(cx.out).max(1);
        let maps = broadcast_maps(cx.ins, cx.out);
        let pers: Vec<usize> = cx.ins.iter().map(|s| size(s).max(1)).collect();
        let mut y = crate::nn::buffers::zeroed(cx.n * per);
        let track = matches!(self.kind, Kind::Maximum | Kind::Minimum);
        let mut win = vec![0u8; if track { y.len() } else { 0 }];
        let get = |i: usize, s: usize, p: usize| -> f32 {
            match &maps[i] {
                None => xs[i][s * pers[i] + p],
                Some(m) => xs[i][s * pers[i] + m[p] as usize],
            }
        };
        y.par_chunks_mut(per).enumerate().for_each(|(s, ys)| {
            for (p, yv) in ys.iter_mut().enumerate() {
                let mut acc = get(0, s, p);
                for i in 1..xs.len() {
                    acc = self.combine(acc, get(i, s, p));
                }
                *yv = if self.kind == Kind::Average {
                    acc / xs.len() as f32
                } else {
                    acc
                };
            }
        });
        if track {
            win.par_chunks_mut(per).enumerate().for_each(|(s, ws)| {
                for (p, w) in ws.iter_mut().enumerate() {
                    let mut best = get(0, s, p);
                    for i in 1..xs.len() {
                        let v = get(i, s, p);
                        // Ties go to the earlier input, as TensorFlow's
                        // gradient of maximum/minimum does.
                        let better = if self.kind == Kind::Maximum {
                            v > best
                        } else {
                            v < best
                        };
                        if better {
                            best = v;
                            *w = i as u8;
                        }
                    }
                }
            });
            return (y, saved(Winner(win)));
        }
        (y, None)
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let per = size(cx.out).max(1);
        let maps = broadcast_maps(cx.ins, cx.out);
        let k = b.xs.len();
        let winners = get_saved::<Winner>(b.saved);
        let dxs = (0..k)
            .map(|i| {
                if !b.need[i] {
                    return None;
                }
                let pi = size(&cx.ins[i]).max(1);
                // The gradient w.r.t. input i at each output position.
                let local = |s: usize, p: usize| -> f32 {
                    let d = b.dy[s * per + p];
                    match self.kind {
                        Kind::Add => d,
                        Kind::Average => d / k as f32,
                        Kind::Subtract => {
                            if i == 0 {
                                d
                            } else {
                                -d
                            }
                        }
                        Kind::Multiply => {
                            let mut prod = d;
                            for (j, x) in b.xs.iter().enumerate() {
                                if j != i {
                                    let pj = size(&cx.ins[j]).max(1);
                                    let off = match &maps[j] {
                                        None => p,
                                        Some(m) => m[p] as usize,
                                    };
                                    prod *= x[s * pj + off];
                                }
                            }
                            prod
                        }
                        Kind::Maximum | Kind::Minimum => {
                            let w = winners.map_or(0, |w| w.0[s * per + p]);
                            if w as usize == i {
                                d
                            } else {
                                0.0
                            }
                        }
                    }
                };
                let mut dx = crate::nn::buffers::zeroed(cx.n * pi);
                dx.par_chunks_mut(pi)
                    .enumerate()
                    .for_each(|(s, dxs)| match &maps[i] {
                        None => dxs
                            .iter_mut()
                            .enumerate()
                            .for_each(|(p, v)| *v = local(s, p)),
                        Some(m) => {
                            for p in 0..per {
                                dxs[m[p] as usize] += local(s, p);
                            }
                        }
                    });
                Some(dx)
            })
            .collect();
        crate::nn::buffers::hand_back(b.dy);
        dxs
    }
}

/// Concatenate along `axis` (Keras numbering; negative from the end).
#[derive(Debug)]
pub(crate) struct Concat {
    axis: i64,
}

impl Concat {
    /// The per-sample axis, and (outer count, inner length per input).
    fn split(&self, ins: &[Vec<usize>]) -> Result<(usize, usize, Vec<usize>), String> {
        let rank = ins.first().map_or(0, |s| s.len());
        let full = rank as i64 + 1;
        let a = if self.axis < 0 {
            self.axis + full
        } else {
            self.axis
        };
        if a <= 0 || a >= full {
            return Err(format!(
                "axis {} is out of range for inputs of rank {full} (the batch axis cannot be joined)",
                self.axis
            ));
        }
        let a = a as usize - 1;
        for s in ins {
            let same = s.len() == rank
                && s.iter()
                    .zip(&ins[0])
                    .enumerate()
                    .all(|(k, (x, y))| k == a || x == y);
            if !same {
                let shapes: Vec<String> = ins.iter().map(|s| shape_str(s)).collect();
                return Err(format!(
                    "inputs must match except along axis {}: {}",
                    self.axis,
                    shapes.join(", ")
                ));
            }
        }
        let outer: usize = ins[0][..a].iter().product();
        let inner = ins.iter().map(|s| s[a..].iter().product()).collect();
        Ok((a, outer, inner))
    }
}

impl Op for Concat {
    fn merges(&self) -> bool {
        true
    }

    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        if ins.len() < 2 {
            return Err(format!("needs at least 2 inputs, got {}", ins.len()));
        }
        let (a, _, _) = self.split(ins)?;
        let mut out = ins[0].clone();
        out[a] = ins.iter().map(|s| s[a]).sum();
        Ok(out)
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let (_, outer, inner) = self.split(cx.ins).expect("shapes checked at build");
        let total: usize = inner.iter().sum();
        let mut y = crate::nn::buffers::zeroed(cx.n * outer * total);
        y.par_chunks_mut(total.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let mut o = 0;
                for (x, len) in xs.iter().zip(&inner) {
                    row[o..o + len].copy_from_slice(&x[r * len..(r + 1) * len]);
                    o += len;
                }
            });
        (y, None)
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let (_, outer, inner) = self.split(cx.ins).expect("shapes checked at build");
        let total: usize = inner.iter().sum();
        let rows = cx.n * outer;
        let mut start = 0;
        let dxs = inner
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let o = start;
                start += len;
                b.need[i].then(|| {
                    let mut dx = crate::nn::buffers::zeroed(rows * len);
                    dx.par_chunks_mut(len.max(1))
                        .enumerate()
                        .for_each(|(r, d)| {
                            d.copy_from_slice(&b.dy[r * total + o..r * total + o + len])
                        });
                    dx
                })
            })
            .collect();
        crate::nn::buffers::hand_back(b.dy);
        dxs
    }
}
