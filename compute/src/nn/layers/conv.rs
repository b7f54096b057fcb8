//! Convolutions: Conv1D and Conv2D (strides, dilation, groups),
//! DepthwiseConv2D, SeparableConv2D and Conv2DTranspose, all NHWC.
//!
//! Dense convolutions multiply im2col blocks of about 1 MiB with the kernel;
//! depthwise convolutions are memory-bound, so they run as direct loops.

use rayon::prelude::*;

use super::core::{finish_linear, unfinish_linear, CONSTRAINTS};
use super::{
    column_sums, kernel_grad, one_input, size, Back, Ctx, KernelBias, Op, Padding, ParamDecl,
    Regularizer, Saved,
};
use crate::nn::activation::Activation;
use crate::nn::config::{Cfg, Parsed};
use crate::nn::gemm::{gemm_serial, Mat};
use crate::nn::init::{Init, GLOROT_UNIFORM};

pub(crate) fn build(cfg: &Cfg<'_>) -> Parsed<Option<Box<dyn Op>>> {
    Ok(Some(match cfg.class {
        "Conv2D" | "Convolution2D" => Box::new(Conv::parse(cfg, 2)?),
        "Conv1D" | "Convolution1D" => Box::new(Conv::parse(cfg, 1)?),
        "Conv2DTranspose" | "Convolution2DTranspose" => Box::new(ConvTranspose::parse(cfg)?),
        "DepthwiseConv2D" => Box::new(Depthwise::parse(cfg, "kernel")?),
        "SeparableConv2D" | "SeparableConvolution2D" => Box::new(Separable::parse(cfg)?),
        _ => return Ok(None),
    }))
}

/// Padding with the causal mode Conv1D adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pad {
    Keras(Padding),
    Causal,
}

fn parse_pad(cfg: &Cfg<'_>, rank: usize) -> Parsed<Pad> {
    match cfg.get("padding").and_then(|v| v.as_str()) {
        Some("causal") if rank == 1 => Ok(Pad::Causal),
        _ => cfg.padding().map(Pad::Keras),
    }
}

/// Geometry of a sliding window over one HWC sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub dh: usize,
    pub dw: usize,
    pub oh: usize,
    pub ow: usize,
    pub pt: usize,
    pub pl: usize,
}

impl Geom {
    /// None when the window does not fit the input.
    pub fn new(
        hwc: [usize; 3],
        kernel: [usize; 2],
        strides: [usize; 2],
        dilation: [usize; 2],
        pad: Pad,
    ) -> Option<Geom> {
        let [h, w, c] = hwc;
        let eh = (kernel[0] - 1) * dilation[0] + 1;
        let ew = (kernel[1] - 1) * dilation[1] + 1;
        let ((oh, pt), (ow, pl)) = match pad {
            Pad::Keras(p) => (
                p.output_and_pad(h, eh, strides[0])?,
                p.output_and_pad(w, ew, strides[1])?,
            ),
            // Causal: everything padded before, output as long as the input.
            Pad::Causal => (
                (h.div_ceil(strides[0]), 0),
                (w.div_ceil(strides[1]), ew - 1),
            ),
        };
        (oh > 0 && ow > 0).then_some(Geom {
            h,
            w,
            c,
            kh: kernel[0],
            kw: kernel[1],
            sh: strides[0],
            sw: strides[1],
            dh: dilation[0],
            dw: dilation[1],
            oh,
            ow,
            pt,
            pl,
        })
    }

    pub fn per_in(&self) -> usize {
        self.h * self.w * self.c
    }

    /// Input pixel for output (oy, ox) and window offset (ky, kx), or None
    /// inside the padding.
    #[inline]
    pub fn src(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<usize> {
        let iy = (oy * self.sh + ky * self.dh).checked_sub(self.pt)?;
        let ix = (ox * self.sw + kx * self.dw).checked_sub(self.pl)?;
        (iy < self.h && ix < self.w).then_some(iy * self.w + ix)
    }

    /// One row per output position, columns in (ky, kx, channel) order over
    /// channels `c0..c0 + cg`, matching an HWIO kernel viewed as a
    /// (kh*kw*cg, cout) matrix.
    fn im2col(&self, x: &[f32], col: &mut [f32], c0: usize, cg: usize) {
        let kd = self.kh * self.kw * cg;
        let per_col = self.oh * self.ow * kd;
        let c = self.c;
        for (dst, src) in col
            .chunks_mut(per_col.max(1))
            .zip(x.chunks(self.per_in().max(1)))
        {
            let mut r = 0;
            for oy in 0..self.oh {
                for ox in 0..self.ow {
                    let row = &mut dst[r..r + kd];
                    r += kd;
                    let mut o = 0;
                    for ky in 0..self.kh {
                        for kx in 0..self.kw {
                            match self.src(oy, ox, ky, kx) {
                                Some(p) => {
                                    let s = p * c + c0;
                                    row[o..o + cg]
                                        .iter_mut()
                                        .zip(&src[s..s + cg])
                                        .for_each(|(d, s)| *d = *s)
                                }
                                None => row[o..o + cg].fill(0.0),
                            }
                            o += cg;
                        }
                    }
                }
            }
        }
    }

    /// The im2col matrix transposed: one row per window offset and channel
    /// (`(ky, kx, channel)` order, channels `c0..c0 + cg`), one column per
    /// output position of every sample in `x`. Each row is a run of input
    /// pixels, so for inputs with few channels (a first layer's one or
    /// three) it is built by copying runs instead of a value at a time.
    fn im2col_t(&self, x: &[f32], colt: &mut [f32], c0: usize, cg: usize) {
        let per_in = self.per_in().max(1);
        let samples = x.len() / per_in;
        let positions = self.oh * self.ow;
        let cols = samples * positions;
        let c = self.c;
        let mut k = 0;
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                // Output columns whose window reaches inside the input.
                let ox_of = |ix: usize| (ix + self.pl).checked_sub(kx * self.dw);
                let lo = ox_of(0).map_or(0, |v| v.div_ceil(self.sw));
                let hi = ox_of(self.w)
                    .map_or(0, |v| v.div_ceil(self.sw))
                    .min(self.ow);
                for ci in 0..cg {
                    let row = &mut colt[k * cols..(k + 1) * cols];
                    k += 1;
                    for (s, src) in x.chunks_exact(per_in).enumerate() {
                        for oy in 0..self.oh {
                            let dst = &mut row[s * positions + oy * self.ow..][..self.ow];
                            let iy = (oy * self.sh + ky * self.dh).checked_sub(self.pt);
                            let Some(iy) = iy.filter(|&iy| iy < self.h) else {
                                dst.fill(0.0);
                                continue;
                            };
                            dst[..lo.min(self.ow)].fill(0.0);
                            for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                                let ix = ox * self.sw + kx * self.dw - self.pl;
                                *d = src[(iy * self.w + ix) * c + c0 + ci];
                            }
                            if hi > lo {
                                dst[hi..].fill(0.0);
                            } else {
                                dst.fill(0.0);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Thin inputs (few channels per group) build their columns
    /// transposed; see [`im2col_t`](Self::im2col_t).
    fn thin(&self, cg: usize) -> bool {
        cg < 8
    }

    /// Scatter-adds im2col-shaped gradients back into the input layout.
    fn col2im(&self, dcol: &[f32], dx: &mut [f32], c0: usize, cg: usize) {
        let kd = self.kh * self.kw * cg;
        let per_col = self.oh * self.ow * kd;
        let c = self.c;
        for (dst, src) in dx
            .chunks_mut(self.per_in().max(1))
            .zip(dcol.chunks(per_col.max(1)))
        {
            let mut r = 0;
            for oy in 0..self.oh {
                for ox in 0..self.ow {
                    let row = &src[r..r + kd];
                    r += kd;
                    let mut o = 0;
                    for ky in 0..self.kh {
                        for kx in 0..self.kw {
                            if let Some(p) = self.src(oy, ox, ky, kx) {
                                let s = p * c + c0;
                                dst[s..s + cg]
                                    .iter_mut()
                                    .zip(&row[o..o + cg])
                                    .for_each(|(d, s)| *d += s);
                            }
                            o += cg;
                        }
                    }
                }
            }
        }
    }

    /// Samples per im2col block: about 1 MiB of columns, so a block stays in
    /// cache between being written and being multiplied. Depends only on
    /// the layer's shape, which keeps the summation order fixed.
    fn chunk_samples(&self, kd: usize) -> usize {
        self.samples_in(1 << 18, kd)
    }

    /// Samples per block in backward: about 2 MiB of columns. The kernel
    /// gradient's product sums over the block's rows, and a single sample
    /// of a 14x14 layer (196 rows) is too short a sum to run at speed; at
    /// 2 MiB the seed CNN's second convolution backward went from about
    /// 28 to 23 ms per batch of 100 (AVX-512 EPYC, 2 threads).
    fn chunk_samples_backward(&self, kd: usize) -> usize {
        self.samples_in(1 << 19, kd)
    }

    fn samples_in(&self, floats: usize, kd: usize) -> usize {
        (floats / (self.oh * self.ow * kd).max(1)).max(1)
    }

    /// A 1x1 convolution with stride 1 and no padding: the input already is
    /// the im2col matrix, one row per pixel.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.pt == 0 && self.pl == 0
    }

    /// `y = conv(x, w)` for an HWIO kernel with `groups` groups; `y` is
    /// overwritten.
    pub fn conv(&self, x: &[f32], w: &[f32], filters: usize, groups: usize, y: &mut [f32]) {
        self.conv_then(x, w, filters, groups, y, &|_| {}, false);
    }

    /// [`conv`](Self::conv), running `then` on each block of finished
    /// output rows while the block is still in cache (the bias and the
    /// activation). With `keep` (a training step), what the backward pass
    /// would otherwise compute again (a Winograd layer's input transforms)
    /// is returned for it.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_then(
        &self,
        x: &[f32],
        w: &[f32],
        filters: usize,
        groups: usize,
        y: &mut [f32],
        then: &(dyn Fn(&mut [f32]) + Sync),
        keep: bool,
    ) -> Option<super::winograd::InputTransforms> {
        if groups == 1 && self.is_pointwise() {
            let rows = y.len() / filters.max(1);
            crate::nn::gemm::gemm(
                rows,
                self.c,
                filters,
                Mat::rows(x, self.c),
                Mat::rows(w, filters),
                y,
                false,
            );
            then(y);
            return None;
        }
        if super::winograd::applies(self, filters, groups) {
            return super::winograd::forward(self, x, w, filters, y, then, keep);
        }
        let per_out = self.oh * self.ow * filters;
        if super::direct::applies(self, filters, groups) {
            const SAMPLES: usize = 4;
            y.par_chunks_mut((SAMPLES * per_out).max(1))
                .zip(x.par_chunks((SAMPLES * self.per_in()).max(1)))
                .for_each(|(yc, xc)| {
                    super::direct::conv(self, xc, w, filters, yc);
                    then(yc);
                });
            return None;
        }
        self.conv_then_im2col(x, w, filters, groups, y, then);
        None
    }

    /// The general path: blocks of im2col columns times the kernel.
    pub(crate) fn conv_then_im2col(
        &self,
        x: &[f32],
        w: &[f32],
        filters: usize,
        groups: usize,
        y: &mut [f32],
        then: &(dyn Fn(&mut [f32]) + Sync),
    ) {
        let per_out = self.oh * self.ow * filters;
        let cg = self.c / groups;
        let fg = filters / groups;
        let kd = self.kh * self.kw * cg;
        let cs = self.chunk_samples(kd);
        y.par_chunks_mut((cs * per_out).max(1))
            .zip(x.par_chunks((cs * self.per_in()).max(1)))
            .for_each(|(yc, xc)| {
                crate::nn::buffers::with_scratch(|col, tmp| {
                    let rows = yc.len() / filters.max(1);
                    col.resize(rows * kd, 0.0);
                    for g in 0..groups {
                        let a = if self.thin(cg) {
                            self.im2col_t(xc, col, g * cg, cg);
                            Mat::rows_t(col, rows)
                        } else {
                            self.im2col(xc, col, g * cg, cg);
                            Mat::rows(col, kd)
                        };
                        let wg = Mat {
                            data: &w[g * fg..],
                            rs: filters,
                            cs: 1,
                        };
                        if groups == 1 {
                            gemm_serial(rows, kd, filters, a, wg, yc, false);
                        } else {
                            tmp.resize(rows * fg, 0.0);
                            gemm_serial(rows, kd, fg, a, wg, tmp, false);
                            for (yr, tr) in yc.chunks_exact_mut(filters).zip(tmp.chunks_exact(fg)) {
                                yr[g * fg..(g + 1) * fg].copy_from_slice(tr);
                            }
                        }
                    }
                    then(yc);
                })
            });
    }

    /// Kernel gradient (added into `dw` when given) and, when `need_dx`,
    /// the input gradient. Blocks of samples run in parallel; each block sums
    /// its kernel gradient in sample order and blocks are added in order.
    /// `kept`: what the forward pass kept for it, if anything.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_backward(
        &self,
        x: &[f32],
        w: &[f32],
        filters: usize,
        groups: usize,
        dy: &[f32],
        dw: Option<&mut [f32]>,
        need_dx: bool,
        kept: Option<&super::winograd::InputTransforms>,
    ) -> Option<Vec<f32>> {
        let per_out = self.oh * self.ow * filters;
        let n = dy.len() / per_out.max(1);
        if groups == 1 && self.is_pointwise() {
            let rows = n * self.oh * self.ow;
            if let Some(dw) = dw {
                crate::nn::gemm::gemm(
                    self.c,
                    rows,
                    filters,
                    Mat::rows_t(x, self.c),
                    Mat::rows(dy, filters),
                    dw,
                    true,
                );
            }
            return need_dx.then(|| {
                let mut dx = crate::nn::buffers::zeroed(rows * self.c);
                crate::nn::gemm::gemm(
                    rows,
                    filters,
                    self.c,
                    Mat::rows(dy, filters),
                    Mat::rows_t(w, filters),
                    &mut dx,
                    false,
                );
                dx
            });
        }
        if super::winograd::applies(self, filters, groups) {
            return super::winograd::backward(self, x, w, filters, dy, dw, need_dx, kept);
        }
        if super::direct::grad_applies(self, filters, groups) {
            if let Some(dw) = dw {
                super::direct::kernel_grad(self, x, dy, filters, dw);
            }
            return need_dx
                .then(|| self.conv_backward_im2col(x, w, filters, groups, dy, None, true))
                .flatten();
        }
        self.conv_backward_im2col(x, w, filters, groups, dy, dw, need_dx)
    }

    /// The general backward path, through im2col columns.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv_backward_im2col(
        &self,
        x: &[f32],
        w: &[f32],
        filters: usize,
        groups: usize,
        dy: &[f32],
        dw: Option<&mut [f32]>,
        need_dx: bool,
    ) -> Option<Vec<f32>> {
        let cg = self.c / groups;
        let fg = filters / groups;
        let kd = self.kh * self.kw * cg;
        let per_in = self.per_in();
        let per_out = self.oh * self.ow * filters;
        let n = dy.len() / per_out.max(1);
        let cs = self.chunk_samples_backward(kd);
        let group = group_samples(n, cs, kd * filters);
        let ngroups = n.div_ceil(group);
        let want_dw = dw.is_some();
        let work = |gi: usize, mut dxg: Option<&mut [f32]>| -> Vec<f32> {
            let s0 = gi * group;
            let s1 = (s0 + group).min(n);
            let mut part = if want_dw {
                crate::nn::buffers::zeroed(kd * filters)
            } else {
                Vec::new()
            };
            let mut tmp = vec![0.0f32; if groups > 1 { kd * fg } else { 0 }];
            crate::nn::buffers::with_scratch(|col, dcol| {
                let mut s = s0;
                while s < s1 {
                    let e = (s + cs).min(s1);
                    let rows = (e - s) * self.oh * self.ow;
                    let dyc = &dy[s * per_out..e * per_out];
                    col.resize(rows * kd, 0.0);
                    for g in 0..groups {
                        let dyg = Mat {
                            data: &dyc[g * fg..],
                            rs: filters,
                            cs: 1,
                        };
                        if want_dw {
                            let xs = &x[s * per_in..e * per_in];
                            let colt = if self.thin(cg) {
                                self.im2col_t(xs, col, g * cg, cg);
                                Mat::rows(col, rows)
                            } else {
                                self.im2col(xs, col, g * cg, cg);
                                Mat::rows_t(col, kd)
                            };
                            if groups == 1 {
                                gemm_serial(kd, rows, fg, colt, dyg, &mut part, true);
                            } else {
                                gemm_serial(kd, rows, fg, colt, dyg, &mut tmp, false);
                                for (pr, tr) in
                                    part.chunks_exact_mut(filters).zip(tmp.chunks_exact(fg))
                                {
                                    pr[g * fg..(g + 1) * fg]
                                        .iter_mut()
                                        .zip(tr)
                                        .for_each(|(p, t)| *p += t);
                                }
                            }
                        }
                        if let Some(dxg) = dxg.as_deref_mut() {
                            dcol.resize(rows * kd, 0.0);
                            let wt = Mat {
                                data: &w[g * fg..],
                                rs: 1,
                                cs: filters,
                            };
                            gemm_serial(rows, fg, kd, dyg, wt, dcol, false);
                            let off = (s - s0) * per_in;
                            self.col2im(dcol, &mut dxg[off..off + (e - s) * per_in], g * cg, cg);
                        }
                    }
                    s = e;
                }
            });
            part
        };
        // Added into by col2im.
        let mut dx = need_dx.then(|| crate::nn::buffers::zeroed(n * per_in));
        let parts: Vec<Vec<f32>> = match dx.as_mut() {
            Some(dx) => dx
                .par_chunks_mut((group * per_in).max(1))
                .enumerate()
                .map(|(gi, dxg)| work(gi, Some(dxg)))
                .collect(),
            None => (0..ngroups)
                .into_par_iter()
                .map(|gi| work(gi, None))
                .collect(),
        };
        if let Some(dw) = dw {
            for p in &parts {
                dw.iter_mut().zip(p).for_each(|(d, v)| *d += v);
            }
        }
        parts.into_iter().for_each(crate::nn::buffers::hand_back);
        dx
    }
}

/// Bytes the per-group partial kernel gradients of one backward pass may
/// take together.
const PARTIALS_BUDGET: usize = 64 << 20;

/// Samples per group of a backward pass that sums one partial kernel
/// gradient (`partial` floats) per group and adds them in group order:
/// whole blocks of `block` samples, one block per group so every core has
/// work, unless the partials together would pass [`PARTIALS_BUDGET`]. The
/// grouping depends only on the batch and the layer, never on the number
/// of threads.
pub(crate) fn group_samples(n: usize, block: usize, partial: usize) -> usize {
    let blocks = n.div_ceil(block);
    let allowed = (PARTIALS_BUDGET / (partial * 4).max(1)).max(1);
    (block * blocks.div_ceil(blocks.min(allowed).max(1))).max(1)
}

/// The spatial view of an input: (h, w, c), with 1-D inputs as h = 1.
fn hwc(shape: &[usize], rank: usize) -> Result<[usize; 3], String> {
    match (rank, shape) {
        (2, [h, w, c]) => Ok([*h, *w, *c]),
        (1, [s, c]) => Ok([1, *s, *c]),
        _ => Err(format!(
            "needs a {} input, got {}",
            if rank == 2 {
                "(batch, height, width, channels)"
            } else {
                "(batch, steps, channels)"
            },
            super::shape_str(shape)
        )),
    }
}

fn out_spatial(rank: usize, g: &Geom, channels: usize) -> Vec<usize> {
    if rank == 2 {
        vec![g.oh, g.ow, channels]
    } else {
        vec![g.ow, channels]
    }
}

/// Kernel, stride and dilation options as 2-D pairs (1-D as height 1).
fn window(cfg: &Cfg<'_>, rank: usize) -> Parsed<([usize; 2], [usize; 2], [usize; 2])> {
    if rank == 2 {
        let kernel = cfg
            .tuple::<2>("kernel_size")?
            .ok_or_else(|| cfg.err("option kernel_size is missing"))?;
        Ok((
            kernel,
            cfg.tuple::<2>("strides")?.unwrap_or([1, 1]),
            cfg.tuple::<2>("dilation_rate")?.unwrap_or([1, 1]),
        ))
    } else {
        let kernel = cfg
            .tuple::<1>("kernel_size")?
            .ok_or_else(|| cfg.err("option kernel_size is missing"))?;
        let s = cfg.tuple::<1>("strides")?.unwrap_or([1]);
        let d = cfg.tuple::<1>("dilation_rate")?.unwrap_or([1]);
        Ok(([1, kernel[0]], [1, s[0]], [1, d[0]]))
    }
}

fn check_stride_dilation(cfg: &Cfg<'_>, strides: [usize; 2], dilation: [usize; 2]) -> Parsed<()> {
    if strides.iter().any(|&s| s > 1) && dilation.iter().any(|&d| d > 1) {
        return Err(cfg.err(
            "strides > 1 together with dilation_rate > 1 is not supported (Keras refuses it too)",
        ));
    }
    Ok(())
}

/// Conv1D and Conv2D.
#[derive(Debug)]
pub(crate) struct Conv {
    rank: usize,
    filters: usize,
    kernel: [usize; 2],
    strides: [usize; 2],
    dilation: [usize; 2],
    pad: Pad,
    groups: usize,
    act: Activation,
    w: KernelBias,
}

impl Conv {
    fn parse(cfg: &Cfg<'_>, rank: usize) -> Parsed<Conv> {
        cfg.require_null(&CONSTRAINTS)?;
        cfg.channels_last()?;
        let (kernel, strides, dilation) = window(cfg, rank)?;
        check_stride_dilation(cfg, strides, dilation)?;
        let filters = cfg.usize("filters")?;
        let groups = cfg.usize_or("groups", 1)?;
        if filters % groups != 0 {
            return Err(cfg.err(format!(
                "filters ({filters}) must be a multiple of groups ({groups})"
            )));
        }
        Ok(Conv {
            rank,
            filters,
            kernel,
            strides,
            dilation,
            pad: parse_pad(cfg, rank)?,
            groups,
            act: cfg.activation("activation")?,
            w: KernelBias::parse(cfg, "kernel")?,
        })
    }

    fn geom(&self, shape: &[usize]) -> Result<Geom, String> {
        let s = hwc(shape, self.rank)?;
        if s[2] % self.groups != 0 {
            return Err(format!(
                "input channels ({}) must be a multiple of groups ({})",
                s[2], self.groups
            ));
        }
        Geom::new(s, self.kernel, self.strides, self.dilation, self.pad).ok_or_else(|| {
            format!(
                "kernel {:?} (dilation {:?}) is larger than the input {}",
                self.kernel,
                self.dilation,
                super::shape_str(shape)
            )
        })
    }

    /// Depthwise as Conv2D(groups = channels = filters), as ConvNeXt
    /// writes it: the kernel (kh, kw, 1, C) has the same layout as a
    /// depthwise kernel (kh, kw, C, 1), and the direct loop is faster.
    fn is_depthwise(&self, g: &Geom) -> bool {
        self.groups > 1 && self.groups == g.c && self.filters == g.c
    }

    fn depthwise(&self, g: &Geom) -> DepthwiseGeom {
        DepthwiseGeom { g: *g, mult: 1 }
    }
}

impl Op for Conv {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        Ok(out_spatial(self.rank, &self.geom(s)?, self.filters))
    }

    fn params(&self, ins: &[Vec<usize>]) -> Vec<ParamDecl> {
        let cin = *ins[0].last().unwrap_or(&1) / self.groups;
        let shape = if self.rank == 2 {
            vec![self.kernel[0], self.kernel[1], cin, self.filters]
        } else {
            vec![self.kernel[1], cin, self.filters]
        };
        self.w.decls("kernel", shape, self.filters)
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let g = self.geom(&cx.ins[0]).expect("shapes checked at build");
        let len = cx.n * size(cx.out);
        let depthwise = self.is_depthwise(&g);
        let mut y = if depthwise {
            vec![0.0f32; len]
        } else {
            // Every path of `conv_then` writes every value.
            crate::nn::buffers::overwritten(len)
        };
        let bias = self.w.use_bias.then(|| cx.w[1]);
        if depthwise {
            self.depthwise(&g).forward(xs[0], cx.w[0], &mut y);
        } else if !self.act.needs_input() {
            // Bias and activation on each block as the GEMM finishes it.
            let filters = self.filters;
            let act = self.act;
            let then = move |block: &mut [f32]| {
                if let Some(b) = bias {
                    for row in block.chunks_exact_mut(filters) {
                        row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                    }
                }
                act.apply_serial(block, filters);
            };
            let (f, groups) = (self.filters, self.groups);
            let kept = g.conv_then(xs[0], cx.w[0], f, groups, &mut y, &then, cx.train);
            return (y, kept.and_then(super::saved));
        } else {
            g.conv(xs[0], cx.w[0], self.filters, self.groups, &mut y);
        }
        let s = finish_linear(
            &mut y,
            self.w.use_bias.then(|| cx.w[1]),
            self.filters,
            self.act,
        );
        (y, s)
    }

    fn backward(&self, cx: &Ctx<'_>, mut b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let g = self.geom(&cx.ins[0]).expect("shapes checked at build");
        if !b.skip_act {
            unfinish_linear(self.act, b.saved, b.y, &mut b.dy, self.filters);
        }
        let dk = kernel_grad(b.dw, &b.dy, self.filters);
        let dx = if self.is_depthwise(&g) {
            self.depthwise(&g)
                .backward(b.xs[0], cx.w[0], &b.dy, dk, b.need[0])
        } else {
            g.conv_backward(
                b.xs[0],
                cx.w[0],
                self.filters,
                self.groups,
                &b.dy,
                dk,
                b.need[0],
                super::get_saved::<super::winograd::InputTransforms>(b.saved),
            )
        };
        crate::nn::buffers::hand_back(b.dy);
        vec![dx]
    }

    fn activation(&self) -> Option<Activation> {
        Some(self.act)
    }

    fn flops(&self, ins: &[Vec<usize>], out: &[usize]) -> f64 {
        let cin = *ins[0].last().unwrap_or(&1) / self.groups;
        2.0 * size(out) as f64 * (self.kernel[0] * self.kernel[1] * cin) as f64
    }
}

/// A depthwise convolution's geometry: each input channel convolved with
/// its own `mult` filters; output channel `c * mult + j`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DepthwiseGeom {
    g: Geom,
    mult: usize,
}

/// Samples per block of a depthwise kernel gradient: fixed, so the
/// summation order does not depend on the number of threads.
const DEPTHWISE_BLOCK: usize = 4;

impl DepthwiseGeom {
    fn forward(&self, x: &[f32], k: &[f32], y: &mut [f32]) {
        let g = &self.g;
        let (c, m) = (g.c, self.mult);
        let per_out = g.oh * g.ow * c * m;
        y.par_chunks_mut(per_out.max(1))
            .zip(x.par_chunks(g.per_in().max(1)))
            .for_each(|(ys, xs)| {
                ys.fill(0.0);
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let yo = &mut ys[(oy * g.ow + ox) * c * m..][..c * m];
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let Some(p) = g.src(oy, ox, ky, kx) else {
                                    continue;
                                };
                                let xr = &xs[p * c..p * c + c];
                                let kr = &k[(ky * g.kw + kx) * c * m..][..c * m];
                                if m == 1 {
                                    for ((y, x), k) in yo.iter_mut().zip(xr).zip(kr) {
                                        *y += x * k;
                                    }
                                } else {
                                    for (ci, x) in xr.iter().enumerate() {
                                        for j in 0..m {
                                            yo[ci * m + j] += x * kr[ci * m + j];
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            });
    }

    fn backward(
        &self,
        x: &[f32],
        k: &[f32],
        dy: &[f32],
        dk: Option<&mut [f32]>,
        need_dx: bool,
    ) -> Option<Vec<f32>> {
        let g = &self.g;
        let (c, m) = (g.c, self.mult);
        let per_in = g.per_in();
        let per_out = g.oh * g.ow * c * m;
        let n = x.len() / per_in.max(1);
        if let Some(dk) = dk {
            let parts: Vec<Vec<f32>> = (0..n.div_ceil(DEPTHWISE_BLOCK))
                .into_par_iter()
                .map(|bi| {
                    let mut part = vec![0.0f32; k.len()];
                    let s1 = ((bi + 1) * DEPTHWISE_BLOCK).min(n);
                    for s in bi * DEPTHWISE_BLOCK..s1 {
                        let xs = &x[s * per_in..(s + 1) * per_in];
                        let ds = &dy[s * per_out..(s + 1) * per_out];
                        for oy in 0..g.oh {
                            for ox in 0..g.ow {
                                let d = &ds[(oy * g.ow + ox) * c * m..][..c * m];
                                for ky in 0..g.kh {
                                    for kx in 0..g.kw {
                                        let Some(p) = g.src(oy, ox, ky, kx) else {
                                            continue;
                                        };
                                        let xr = &xs[p * c..p * c + c];
                                        let pr = &mut part[(ky * g.kw + kx) * c * m..][..c * m];
                                        if m == 1 {
                                            for ((p, x), d) in pr.iter_mut().zip(xr).zip(d) {
                                                *p += x * d;
                                            }
                                        } else {
                                            for (ci, x) in xr.iter().enumerate() {
                                                for j in 0..m {
                                                    pr[ci * m + j] += x * d[ci * m + j];
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    part
                })
                .collect();
            for p in &parts {
                dk.iter_mut().zip(p).for_each(|(d, v)| *d += v);
            }
        }
        need_dx.then(|| {
            let mut dx = crate::nn::buffers::zeroed(n * per_in);
            dx.par_chunks_mut(per_in.max(1))
                .zip(dy.par_chunks(per_out.max(1)))
                .for_each(|(dxs, ds)| {
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let d = &ds[(oy * g.ow + ox) * c * m..][..c * m];
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let Some(p) = g.src(oy, ox, ky, kx) else {
                                        continue;
                                    };
                                    let kr = &k[(ky * g.kw + kx) * c * m..][..c * m];
                                    let xr = &mut dxs[p * c..p * c + c];
                                    if m == 1 {
                                        for ((x, k), d) in xr.iter_mut().zip(kr).zip(d) {
                                            *x += k * d;
                                        }
                                    } else {
                                        for (ci, x) in xr.iter_mut().enumerate() {
                                            for j in 0..m {
                                                *x += kr[ci * m + j] * d[ci * m + j];
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                });
            dx
        })
    }
}

/// DepthwiseConv2D, and the depthwise half of SeparableConv2D.
#[derive(Debug)]
pub(crate) struct Depthwise {
    weight: &'static str,
    kernel: [usize; 2],
    strides: [usize; 2],
    dilation: [usize; 2],
    pad: Padding,
    mult: usize,
    act: Activation,
    w: KernelBias,
}

impl Depthwise {
    /// `weight`: Keras 3 names the kernel `kernel` in DepthwiseConv2D and
    /// `depthwise_kernel` in SeparableConv2D; both read `depthwise_*` options.
    fn parse(cfg: &Cfg<'_>, weight: &'static str) -> Parsed<Depthwise> {
        cfg.require_null(&[
            "depthwise_constraint",
            "bias_constraint",
            "activity_regularizer",
        ])?;
        cfg.channels_last()?;
        let (kernel, strides, dilation) = window(cfg, 2)?;
        check_stride_dilation(cfg, strides, dilation)?;
        Ok(Depthwise {
            kernel,
            strides,
            dilation,
            pad: cfg.padding()?,
            mult: cfg.usize_or("depth_multiplier", 1)?,
            act: cfg.activation("activation")?,
            weight,
            w: KernelBias::parse(cfg, "depthwise")?,
        })
    }

    fn geom(&self, shape: &[usize]) -> Result<DepthwiseGeom, String> {
        let s = hwc(shape, 2)?;
        let g = Geom::new(
            s,
            self.kernel,
            self.strides,
            self.dilation,
            Pad::Keras(self.pad),
        )
        .ok_or_else(|| {
            format!(
                "kernel {:?} is larger than the input {}",
                self.kernel,
                super::shape_str(shape)
            )
        })?;
        Ok(DepthwiseGeom { g, mult: self.mult })
    }

    fn kernel_shape(&self, c: usize) -> Vec<usize> {
        vec![self.kernel[0], self.kernel[1], c, self.mult]
    }
}

impl Op for Depthwise {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        let d = self.geom(s)?;
        Ok(vec![d.g.oh, d.g.ow, d.g.c * self.mult])
    }

    fn params(&self, ins: &[Vec<usize>]) -> Vec<ParamDecl> {
        let c = *ins[0].last().unwrap_or(&1);
        self.w
            .decls(self.weight, self.kernel_shape(c), c * self.mult)
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let d = self.geom(&cx.ins[0]).expect("shapes checked at build");
        let mut y = crate::nn::buffers::zeroed(cx.n * size(cx.out));
        d.forward(xs[0], cx.w[0], &mut y);
        let width = d.g.c * self.mult;
        let s = finish_linear(&mut y, self.w.use_bias.then(|| cx.w[1]), width, self.act);
        (y, s)
    }

    fn backward(&self, cx: &Ctx<'_>, mut b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let d = self.geom(&cx.ins[0]).expect("shapes checked at build");
        let width = d.g.c * self.mult;
        if !b.skip_act {
            unfinish_linear(self.act, b.saved, b.y, &mut b.dy, width);
        }
        let dk = kernel_grad(b.dw, &b.dy, width);
        let dx = d.backward(b.xs[0], cx.w[0], &b.dy, dk, b.need[0]);
        crate::nn::buffers::hand_back(b.dy);
        vec![dx]
    }

    fn activation(&self) -> Option<Activation> {
        Some(self.act)
    }

    fn flops(&self, _ins: &[Vec<usize>], out: &[usize]) -> f64 {
        2.0 * size(out) as f64 * (self.kernel[0] * self.kernel[1]) as f64
    }
}

/// SeparableConv2D: a depthwise convolution, then a 1x1 convolution with
/// bias and activation. Weights: depthwise_kernel, pointwise_kernel, bias.
#[derive(Debug)]
pub(crate) struct Separable {
    depth: Depthwise,
    filters: usize,
    pointwise_init: Init,
    pointwise_reg: Option<Regularizer>,
}

/// The depthwise output, input of the pointwise product.
struct Mid(Vec<f32>, Saved);

impl Drop for Mid {
    fn drop(&mut self) {
        crate::nn::buffers::hand_back(std::mem::take(&mut self.0));
    }
}

impl Separable {
    fn parse(cfg: &Cfg<'_>) -> Parsed<Separable> {
        cfg.require_null(&["pointwise_constraint"])?;
        let depth = Depthwise::parse(cfg, "depthwise_kernel")?;
        Ok(Separable {
            depth,
            filters: cfg.usize("filters")?,
            pointwise_init: cfg.initializer("pointwise_initializer", GLOROT_UNIFORM)?,
            pointwise_reg: cfg.regularizer("pointwise_regularizer")?,
        })
    }
}

impl Op for Separable {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let mut s = self.depth.out_shape(ins)?;
        *s.last_mut().unwrap_or(&mut 0) = self.filters;
        Ok(s)
    }

    fn params(&self, ins: &[Vec<usize>]) -> Vec<ParamDecl> {
        let c = *ins[0].last().unwrap_or(&1);
        let mid = c * self.depth.mult;
        let mut p = vec![
            self.depth
                .w
                .kernel("depthwise_kernel", self.depth.kernel_shape(c)),
            ParamDecl::new(
                "pointwise_kernel",
                vec![1, 1, mid, self.filters],
                self.pointwise_init,
            )
            .regularized(self.pointwise_reg),
        ];
        p.extend(self.depth.w.bias(self.filters));
        p
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let d = self
            .depth
            .geom(&cx.ins[0])
            .expect("shapes checked at build");
        let mid_c = d.g.c * self.depth.mult;
        let rows = cx.n * d.g.oh * d.g.ow;
        let mut mid = crate::nn::buffers::zeroed(rows * mid_c);
        d.forward(xs[0], cx.w[0], &mut mid);
        let mut y = crate::nn::buffers::zeroed(rows * self.filters);
        crate::nn::gemm::gemm(
            rows,
            mid_c,
            self.filters,
            Mat::rows(&mid, mid_c),
            Mat::rows(cx.w[1], self.filters),
            &mut y,
            false,
        );
        let bias = self.depth.w.use_bias.then(|| cx.w[2]);
        let s = finish_linear(&mut y, bias, self.filters, self.depth.act);
        (y, super::saved(Mid(mid, s)))
    }

    fn backward(&self, cx: &Ctx<'_>, mut b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let d = self
            .depth
            .geom(&cx.ins[0])
            .expect("shapes checked at build");
        let mid_c = d.g.c * self.depth.mult;
        let rows = cx.n * d.g.oh * d.g.ow;
        let Some(Mid(mid, inner)) = super::get_saved::<Mid>(b.saved) else {
            unreachable!("separable forward always saves its middle")
        };
        if !b.skip_act {
            unfinish_linear(self.depth.act, inner, b.y, &mut b.dy, self.filters);
        }
        let want_dw = !b.dw.is_empty();
        if want_dw {
            crate::nn::gemm::gemm(
                mid_c,
                rows,
                self.filters,
                Mat::rows_t(mid, mid_c),
                Mat::rows(&b.dy, self.filters),
                b.dw[1],
                false,
            );
            if self.depth.w.use_bias {
                column_sums(&b.dy, self.filters, b.dw[2]);
            }
        }
        let mut dmid = crate::nn::buffers::zeroed(rows * mid_c);
        crate::nn::gemm::gemm(
            rows,
            self.filters,
            mid_c,
            Mat::rows(&b.dy, self.filters),
            Mat::rows_t(cx.w[1], self.filters),
            &mut dmid,
            false,
        );
        let dk = if want_dw { Some(&mut *b.dw[0]) } else { None };
        let dx = d.backward(b.xs[0], cx.w[0], &dmid, dk, b.need[0]);
        crate::nn::buffers::hand_back(dmid);
        crate::nn::buffers::hand_back(b.dy);
        vec![dx]
    }

    fn activation(&self) -> Option<Activation> {
        Some(self.depth.act)
    }

    fn flops(&self, ins: &[Vec<usize>], out: &[usize]) -> f64 {
        let c = *ins[0].last().unwrap_or(&1) * self.depth.mult;
        let pixels = (size(out) / self.filters.max(1)) as f64;
        2.0 * pixels * c as f64 * (self.depth.kernel[0] * self.depth.kernel[1]) as f64
            + 2.0 * pixels * (c * self.filters) as f64
    }
}

/// Conv2DTranspose: the input gradient of a convolution from the output's
/// shape to the input's, with kernel (kh, kw, filters, in_channels).
#[derive(Debug)]
pub(crate) struct ConvTranspose {
    filters: usize,
    kernel: [usize; 2],
    strides: [usize; 2],
    dilation: [usize; 2],
    pad: Padding,
    act: Activation,
    w: KernelBias,
}

impl ConvTranspose {
    fn parse(cfg: &Cfg<'_>) -> Parsed<ConvTranspose> {
        cfg.require_null(&CONSTRAINTS)?;
        cfg.channels_last()?;
        if let Some(v) = cfg.get("output_padding") {
            return Err(cfg.unsupported("output_padding", v, "null"));
        }
        let (kernel, strides, dilation) = window(cfg, 2)?;
        check_stride_dilation(cfg, strides, dilation)?;
        Ok(ConvTranspose {
            filters: cfg.usize("filters")?,
            kernel,
            strides,
            dilation,
            pad: cfg.padding()?,
            act: cfg.activation("activation")?,
            w: KernelBias::parse(cfg, "kernel")?,
        })
    }

    /// Keras's `deconv_output_length` per axis.
    fn out_len(&self, input: usize, axis: usize) -> usize {
        let k = (self.kernel[axis] - 1) * self.dilation[axis] + 1;
        let s = self.strides[axis];
        match self.pad {
            Padding::Valid => input * s + k.saturating_sub(s),
            Padding::Same => input * s,
        }
    }

    /// The forward convolution whose input gradient this layer computes:
    /// from (out_h, out_w, filters) to the input's (h, w, c).
    fn geom(&self, shape: &[usize]) -> Result<Geom, String> {
        let [h, w, _] = hwc(shape, 2)?;
        let (oh, ow) = (self.out_len(h, 0), self.out_len(w, 1));
        let g = Geom::new(
            [oh, ow, self.filters],
            self.kernel,
            self.strides,
            self.dilation,
            Pad::Keras(self.pad),
        )
        .ok_or("the kernel does not fit")?;
        if (g.oh, g.ow) != (h, w) {
            return Err(format!(
                "cannot invert a convolution onto {}",
                super::shape_str(shape)
            ));
        }
        Ok(g)
    }
}

impl Op for ConvTranspose {
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let s = one_input(ins)?;
        let g = self.geom(s)?;
        Ok(vec![g.h, g.w, self.filters])
    }

    fn params(&self, ins: &[Vec<usize>]) -> Vec<ParamDecl> {
        let c = *ins[0].last().unwrap_or(&1);
        self.w.decls(
            "kernel",
            vec![self.kernel[0], self.kernel[1], self.filters, c],
            self.filters,
        )
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved) {
        let g = self.geom(&cx.ins[0]).expect("shapes checked at build");
        let c = *cx.ins[0].last().unwrap_or(&1);
        // The reference convolution's backward with dy = x gives y as its dx.
        let mut y = g
            .conv_backward_input_only(xs[0], cx.w[0], c, cx.n)
            .unwrap_or_default();
        let s = finish_linear(
            &mut y,
            self.w.use_bias.then(|| cx.w[1]),
            self.filters,
            self.act,
        );
        (y, s)
    }

    fn backward(&self, cx: &Ctx<'_>, mut b: Back<'_>) -> Vec<Option<Vec<f32>>> {
        let g = self.geom(&cx.ins[0]).expect("shapes checked at build");
        let c = *cx.ins[0].last().unwrap_or(&1);
        if !b.skip_act {
            unfinish_linear(self.act, b.saved, b.y, &mut b.dy, self.filters);
        }
        let dk = kernel_grad(b.dw, &b.dy, self.filters);
        // Kernel gradient: the reference convolution's kernel gradient
        // with its input = dy and its output gradient = x.
        if let Some(dk) = dk {
            g.conv_backward(&b.dy, cx.w[0], c, 1, b.xs[0], Some(dk), false, None);
        }
        let dx = b.need[0].then(|| {
            let mut dx = crate::nn::buffers::zeroed(cx.n * size(&cx.ins[0]));
            g.conv(&b.dy, cx.w[0], c, 1, &mut dx);
            dx
        });
        crate::nn::buffers::hand_back(b.dy);
        vec![dx]
    }

    fn activation(&self) -> Option<Activation> {
        Some(self.act)
    }

    fn flops(&self, ins: &[Vec<usize>], _out: &[usize]) -> f64 {
        2.0 * size(&ins[0]) as f64 * (self.kernel[0] * self.kernel[1] * self.filters) as f64
    }
}

impl Geom {
    /// The input gradient of a convolution with `filters` outputs for
    /// output gradient `dy` of `n` samples.
    fn conv_backward_input_only(
        &self,
        dy: &[f32],
        w: &[f32],
        filters: usize,
        n: usize,
    ) -> Option<Vec<f32>> {
        debug_assert_eq!(dy.len(), n * self.oh * self.ow * filters);
        self.conv_backward(&[], w, filters, 1, dy, None, true, None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Padding;
    use super::*;

    /// Every path of the forward convolution writes every output value, so
    /// a buffer from an earlier step can take the output unzeroed: one
    /// full of NaN gives the bits a zeroed one gives.
    #[test]
    fn the_forward_pass_writes_every_output_value() {
        let mut rnd = crate::nn::rng::test_values(3);
        // Pointwise, Winograd, the direct kernel, im2col, im2col in groups,
        // strided and dilated.
        for (hwc, k, strides, dil, filters, groups, pad) in [
            ([6, 5, 8], 1, 1, 1, 12, 1, Padding::Valid),
            ([9, 7, 16], 5, 1, 1, 16, 1, Padding::Same),
            ([11, 9, 1], 5, 1, 1, 32, 1, Padding::Same),
            ([8, 8, 6], 3, 1, 1, 10, 1, Padding::Same),
            ([8, 7, 6], 3, 1, 1, 9, 3, Padding::Valid),
            ([9, 9, 4], 3, 2, 1, 8, 1, Padding::Same),
            ([10, 9, 4], 3, 1, 2, 8, 1, Padding::Valid),
        ] {
            let g = Geom::new(hwc, [k, k], [strides, strides], [dil, dil], Pad::Keras(pad))
                .expect("a valid geometry");
            let n = 3;
            let x: Vec<f32> = (0..n * g.per_in()).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..k * k * hwc[2] / groups * filters)
                .map(|_| rnd())
                .collect();
            let len = n * g.oh * g.ow * filters;
            let mut zeroed = vec![0.0f32; len];
            g.conv_then(&x, &w, filters, groups, &mut zeroed, &|_| {}, false);
            let mut stale = vec![f32::NAN; len];
            g.conv_then(&x, &w, filters, groups, &mut stale, &|_| {}, false);
            let same = stale
                .iter()
                .zip(&zeroed)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{hwc:?} k{k} s{strides} d{dil} groups {groups}");
        }
    }
}
