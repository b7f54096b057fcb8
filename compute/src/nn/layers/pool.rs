//! Pooling: max and average over windows (1-D and 2-D, strides, padding)
//! and over everything (global, with keepdims).

use rayon::prelude::*;

use super::conv::{Geom, Pad};
use super::{get_saved, one_input, saved, shape_str, size, Back, Ctx, Op, Saved};
use crate::nn::config::{Cfg, Parsed};

pub(crate) fn build(cfg: &Cfg<'_>) -> Parsed<Option<Box<dyn Op>>> {
    let class = cfg.class;
    Ok(Some(match class {
        "MaxPooling2D" | "MaxPool2D" | "AveragePooling2D" | "AvgPool2D" | "MaxPooling1D"
        | "MaxPool1D" | "AveragePooling1D" | "AvgPool1D" => {
            cfg.channels_last()?;
            let rank = if class.ends_with("1D") { 1 } else { 2 };
            let (pool, strides) = if rank == 2 {
                let pool = cfg.tuple::<2>("pool_size")?.unwrap_or([2, 2]);
                (pool, cfg.tuple::<2>("strides")?.unwrap_or(pool))
            } else {
                let pool = cfg.tuple::<1>("pool_size")?.unwrap_or([2]);
                let s = cfg.tuple::<1>("strides")?.unwrap_or(pool);
                ([1, pool[0]], [1, s[0]])
            };
            Box::new(Pool {
                rank,
                max: class.starts_with("Max"),
                pool,
                strides,
                pad: cfg.padding()?,
            })
        }
        "GlobalAveragePooling2D"
        | "GlobalAvgPool2D"
        | "GlobalMaxPooling2D"
        | "GlobalMaxPool2D"
        | "GlobalAveragePooling1D"
        | "GlobalAvgPool1D"
        | "GlobalMaxPooling1D"
        | "GlobalMaxPool1D" => {
            cfg.channels_last()?;
            Box::new(Global {
                rank: if class.ends_with("1D") { 1 } else { 2 },
                max: class.starts_with("GlobalMax"),
                keepdims: cfg.bool("keepdims", false)?,
            })
        }
        _ => return Ok(None),
    }))
}

#[derive(Debug)]
pub(crate) struct Pool {
    rank: usize,
    max: bool,
    pool: [usize; 2],
    strides: [usize; 2],
    pad: super::Padding,
}

/// Index within the sample's input of each max-pooled output element;
/// handed back to the step's buffers when dropped.
struct Argmax(Vec<u32>);

impl Drop for Argmax {
    fn drop(&mut self) {
        crate::nn::buffers::hand_back_indices(std::mem::take(&mut self.0));
    }
}

impl Pool {
    fn geom(&self, shape: &[usize]) -> Result<Geom, String> {
        let hwc = match (self.rank, shape) {
            (2, [h, w, c]) => [*h, *w, *c],
            (1, [s, c]) => [1, *s, *c],
            _ => {
                return Err(format!(
                    "needs a rank-{} input, got {}",
                    self.rank + 2,
                    shape_str(shape)
                ))
            }
        };
        Geom::new(hwc, self.pool, self.strides, [1, 1], Pad::Keras(self.pad)).ok_or_else(|| {
            format!(
                "pool {:?} is larger than the input {}",
                self.pool,
                shape_str(shape)
            )
        })
    }

    /// Number of input cells under each output window (padding excluded,
    /// as TensorFlow's average pooling does).
    fn window_count(g: &Geom, oy: usize, ox: usize) -> usize {
        let mut count = 0;
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                count += g.src(oy, ox, ky, kx).is_some() as usize;
            }
        }
        count.max(1)
    }
}

impl Op for Pool {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        let g = self.geom(s)?;
        Ok(if self.rank == 2 {
            vec![g.oh, g.ow, g.c]
        } else {
            vec![g.ow, g.c]
        })
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let g = self.geom(&cx.ins[0]).expect("shapes checked at build");
        let per_in = g.per_in();
        let per_out = g.oh * g.ow * g.c;
        let c = g.c;
        let n = cx.n;
        // Each sample's output is set before it is computed, on the
        // thread that computes it.
        let mut y = crate::nn::buffers::overwritten(n * per_out);
        if self.max {
            // Set per sample below, as `y` is: where no value beats minus
            // infinity (NaNs), the gradient goes to the first input.
            let mut arg = crate::nn::buffers::overwritten_indices(n * per_out);
            y.par_chunks_mut(per_out.max(1))
                .zip(arg.par_chunks_mut(per_out.max(1)))
                .zip(xs[0].par_chunks(per_in.max(1)))
                .for_each(|((ys, args), src)| {
                    ys.fill(f32::NEG_INFINITY);
                    args.fill(0);
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let o = (oy * g.ow + ox) * c;
                            let (yrow, arow) = (&mut ys[o..o + c], &mut args[o..o + c]);
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let Some(p) = g.src(oy, ox, ky, kx) else {
                                        continue;
                                    };
                                    let srow = &src[p * c..p * c + c];
                                    let base = (p * c) as u32;
                                    for (ch, ((y, a), v)) in
                                        yrow.iter_mut().zip(arow.iter_mut()).zip(srow).enumerate()
                                    {
                                        // Strict '>' keeps the first maximum, as TensorFlow does.
                                        // Written as arithmetic, not as a select: the
                                        // compiler turned the select into a branch and a
                                        // store per value.
                                        let better = 0u32.wrapping_sub(u32::from(*v > *y));
                                        *a ^= (*a ^ (base + ch as u32)) & better;
                                        *y = y.max(*v);
                                    }
                                }
                            }
                        }
                    }
                });
            (y, saved(Argmax(arg)))
        } else {
            y.par_chunks_mut(per_out.max(1))
                .zip(xs[0].par_chunks(per_in.max(1)))
                .for_each(|(ys, src)| {
                    ys.fill(0.0);
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let o = (oy * g.ow + ox) * c;
                            let yrow = &mut ys[o..o + c];
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    if let Some(p) = g.src(oy, ox, ky, kx) {
                                        yrow.iter_mut()
                                            .zip(&src[p * c..p * c + c])
                                            .for_each(|(y, s)| *y += s);
                                    }
                                }
                            }
                            let inv = 1.0 / Self::window_count(&g, oy, ox) as f32;
                            yrow.iter_mut().for_each(|v| *v *= inv);
                        }
                    }
                });
            (y, None)
        }
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        if !b.need[0] {
            return vec![None];
        }
        let g = self.geom(&cx.ins[0]).expect("shapes checked at build");
        let per_in = g.per_in();
        let per_out = g.oh * g.ow * g.c;
        let c = g.c;
        // Zeroed a sample at a time, on the thread that then adds into it,
        // while it is in that core's cache.
        let mut dx = crate::nn::buffers::overwritten(cx.n * per_in);
        if self.max {
            let Some(Argmax(arg)) = get_saved::<Argmax>(b.saved) else {
                unreachable!("max pooling always records its argmax")
            };
            dx.par_chunks_mut(per_in.max(1))
                .zip(
                    b.dy.par_chunks(per_out.max(1))
                        .zip(arg.par_chunks(per_out.max(1))),
                )
                .for_each(|(dst, (d, a))| {
                    dst.fill(0.0);
                    for (d, a) in d.iter().zip(a) {
                        dst[*a as usize] += d;
                    }
                });
        } else {
            dx.par_chunks_mut(per_in.max(1))
                .zip(b.dy.par_chunks(per_out.max(1)))
                .for_each(|(dst, d)| {
                    dst.fill(0.0);
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let o = (oy * g.ow + ox) * c;
                            let inv = 1.0 / Self::window_count(&g, oy, ox) as f32;
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    if let Some(p) = g.src(oy, ox, ky, kx) {
                                        dst[p * c..p * c + c]
                                            .iter_mut()
                                            .zip(&d[o..o + c])
                                            .for_each(|(x, g)| *x += g * inv);
                                    }
                                }
                            }
                        }
                    }
                });
        }
        crate::nn::buffers::hand_back(b.dy);
        vec![Some(dx)]
    }
}

/// Global pooling over every position of each channel.
#[derive(Debug)]
pub(crate) struct Global {
    rank: usize,
    max: bool,
    keepdims: bool,
}

impl Op for Global {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        if s.len() != self.rank + 1 {
            return Err(format!(
                "needs a rank-{} input, got {}",
                self.rank + 2,
                shape_str(s)
            ));
        }
        let c = s[self.rank];
        Ok(if self.keepdims {
            let mut o = vec![1; self.rank];
            o.push(c);
            o
        } else {
            vec![c]
        })
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let c = *cx.ins[0].last().unwrap_or(&1);
        let per = size(&cx.ins[0]);
        let positions = per / c.max(1);
        if self.max {
            let mut y = vec![f32::NEG_INFINITY; cx.n * c];
            let mut arg = vec![0u32; cx.n * c];
            y.par_chunks_mut(c.max(1))
                .zip(arg.par_chunks_mut(c.max(1)))
                .zip(xs[0].par_chunks(per.max(1)))
                .for_each(|((ys, args), src)| {
                    for (p, row) in src.chunks_exact(c).enumerate() {
                        for ch in 0..c {
                            if row[ch] > ys[ch] {
                                ys[ch] = row[ch];
                                args[ch] = (p * c + ch) as u32;
                            }
                        }
                    }
                });
            (y, saved(Argmax(arg)))
        } else {
            let mut y = vec![0.0f32; cx.n * c];
            let inv = 1.0 / positions.max(1) as f32;
            y.par_chunks_mut(c.max(1))
                .zip(xs[0].par_chunks(per.max(1)))
                .for_each(|(ys, src)| {
                    for row in src.chunks_exact(c) {
                        ys.iter_mut().zip(row).for_each(|(y, v)| *y += v);
                    }
                    ys.iter_mut().for_each(|v| *v *= inv);
                });
            (y, None)
        }
    }

    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        if !b.need[0] {
            return vec![None];
        }
        let c = *cx.ins[0].last().unwrap_or(&1);
        let per = size(&cx.ins[0]);
        let positions = per / c.max(1);
        // Every value is set below, a sample at a time.
        let mut dx = crate::nn::buffers::overwritten(cx.n * per);
        if self.max {
            let Some(Argmax(arg)) = get_saved::<Argmax>(b.saved) else {
                unreachable!("global max pooling always records its argmax")
            };
            dx.par_chunks_mut(per.max(1))
                .zip(b.dy.par_chunks(c.max(1)).zip(arg.par_chunks(c.max(1))))
                .for_each(|(dst, (d, a))| {
                    dst.fill(0.0);
                    for (d, a) in d.iter().zip(a) {
                        dst[*a as usize] += d;
                    }
                });
        } else {
            let inv = 1.0 / positions.max(1) as f32;
            dx.par_chunks_mut(per.max(1))
                .zip(b.dy.par_chunks(c.max(1)))
                .for_each(|(dst, d)| {
                    for row in dst.chunks_exact_mut(c) {
                        row.iter_mut().zip(d).for_each(|(x, g)| *x = g * inv);
                    }
                });
        }
        crate::nn::buffers::hand_back(b.dy);
        vec![Some(dx)]
    }
}
