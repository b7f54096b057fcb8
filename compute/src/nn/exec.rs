//! Forward and backward passes over flat f32 buffers (NHWC, row-major).
//!
//! Parallel work is split by sample or by fixed matrix blocks, never by
//! thread, and every reduction runs in a fixed order, so results do not
//! depend on the number of threads.

use rayon::prelude::*;

use super::gemm::{gemm, gemm_serial, Mat};
use super::layers::{Activation, Layer, LayerKind, ParamSpec};
use super::rng::SplitMix64;

/// Dropout randomness for one call: the mask of sample `i` of the batch is
/// drawn from a stream keyed by `(seed, layer, first_sample + i)`, so a batch
/// split between workers (each passing its share's offset) gets the same
/// masks as the whole batch in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutRng {
    pub seed: u64,
    pub first_sample: u64,
}

pub(crate) enum Extra {
    None,
    /// Index within the sample's input of each max-pooled output element.
    Argmax(Vec<u32>),
    /// Dropout multipliers (0 or 1/(1-rate)).
    Mask(Vec<f32>),
}

/// Everything the backward pass needs: each layer's output and extras.
pub(crate) struct Tape {
    pub outs: Vec<Vec<f32>>,
    extras: Vec<Extra>,
}

fn size(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Layer `li`'s parameter slices (kernel, optional bias).
fn layer_params<'a>(
    params: &'a [f32],
    specs: &[ParamSpec],
    first: usize,
    use_bias: bool,
) -> (&'a [f32], Option<&'a [f32]>) {
    let k = &specs[first];
    let w = &params[k.offset..k.offset + k.len];
    let b = use_bias.then(|| {
        let b = &specs[first + 1];
        &params[b.offset..b.offset + b.len]
    });
    (w, b)
}

pub(crate) struct Net<'a> {
    pub layers: &'a [Layer],
    pub specs: &'a [ParamSpec],
    /// Index in `specs` of each layer's first parameter.
    pub first_param: &'a [usize],
}

impl Net<'_> {
    pub fn forward(
        &self,
        params: &[f32],
        x: &[f32],
        n: usize,
        dropout: Option<DropoutRng>,
    ) -> Tape {
        let mut outs: Vec<Vec<f32>> = Vec::with_capacity(self.layers.len());
        let mut extras = Vec::with_capacity(self.layers.len());
        for (li, layer) in self.layers.iter().enumerate() {
            let input: &[f32] = if li == 0 { x } else { &outs[li - 1] };
            let (out, extra) = self.layer_forward(li, layer, params, input, n, dropout);
            outs.push(out);
            extras.push(extra);
        }
        Tape { outs, extras }
    }

    fn layer_forward(
        &self,
        li: usize,
        layer: &Layer,
        params: &[f32],
        input: &[f32],
        n: usize,
        dropout: Option<DropoutRng>,
    ) -> (Vec<f32>, Extra) {
        let out_len = n * size(&layer.output_shape);
        match &layer.kind {
            LayerKind::Dense {
                units,
                activation,
                use_bias,
            } => {
                let fin = size(&layer.input_shape);
                let (w, b) = layer_params(params, self.specs, self.first_param[li], *use_bias);
                let mut y = vec![0.0f32; out_len];
                gemm(
                    n,
                    fin,
                    *units,
                    Mat::rows(input, fin),
                    Mat::rows(w, *units),
                    &mut y,
                    false,
                );
                finish_linear(&mut y, b, *units, *activation);
                (y, Extra::None)
            }
            LayerKind::Conv2D {
                filters,
                activation,
                use_bias,
                ..
            } => {
                let g = ConvGeom::new(layer);
                let (w, b) = layer_params(params, self.specs, self.first_param[li], *use_bias);
                let mut y = vec![0.0f32; out_len];
                g.conv_forward(input, w, *filters, &mut y);
                finish_linear(&mut y, b, *filters, *activation);
                (y, Extra::None)
            }
            LayerKind::MaxPool2D { .. } => {
                let g = ConvGeom::new(layer);
                let (y, arg) = g.max_pool(input, n);
                (y, Extra::Argmax(arg))
            }
            LayerKind::AvgPool2D { .. } => {
                let g = ConvGeom::new(layer);
                (g.avg_pool(input, n), Extra::None)
            }
            LayerKind::Flatten => (input.to_vec(), Extra::None),
            LayerKind::Dropout { rate } => match dropout {
                Some(d) if *rate > 0.0 => {
                    let per = size(&layer.input_shape);
                    let keep = 1.0 / (1.0 - rate);
                    let mut mask = vec![0.0f32; out_len];
                    mask.par_chunks_mut(per.max(1))
                        .enumerate()
                        .for_each(|(i, m)| {
                            let mut rng =
                                SplitMix64::derive(d.seed, li as u64, d.first_sample + i as u64);
                            for v in m.iter_mut() {
                                *v = if rng.next_f32() >= *rate { keep } else { 0.0 };
                            }
                        });
                    let y = input.iter().zip(&mask).map(|(x, m)| x * m).collect();
                    (y, Extra::Mask(mask))
                }
                _ => (input.to_vec(), Extra::None),
            },
            LayerKind::Activation(a) => {
                let mut y = input.to_vec();
                let width = *layer.output_shape.last().unwrap_or(&1);
                activate(*a, &mut y, width);
                (y, Extra::None)
            }
        }
    }

    /// Backpropagates `dy` (gradient w.r.t. the last layer's output, or
    /// w.r.t. its pre-activation when `dy_is_preact`) and writes the
    /// parameter gradients into `grad` (same layout as the parameters).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        n: usize,
        tape: &Tape,
        mut dy: Vec<f32>,
        dy_is_preact: bool,
        grad: &mut [f32],
    ) {
        let last = self.layers.len() - 1;
        for li in (0..self.layers.len()).rev() {
            let layer = &self.layers[li];
            let input: &[f32] = if li == 0 { x } else { &tape.outs[li - 1] };
            let out = &tape.outs[li];
            let need_dx = li > 0;
            let skip_act = dy_is_preact && li == last;
            let dx = match &layer.kind {
                LayerKind::Dense {
                    units,
                    activation,
                    use_bias,
                } => {
                    let fin = size(&layer.input_shape);
                    if !skip_act {
                        activate_backward(*activation, out, &mut dy, *units);
                    }
                    let first = self.first_param[li];
                    let (w, _) = layer_params(params, self.specs, first, *use_bias);
                    let ks = &self.specs[first];
                    gemm(
                        fin,
                        n,
                        *units,
                        Mat::rows_t(input, fin),
                        Mat::rows(&dy, *units),
                        &mut grad[ks.offset..ks.offset + ks.len],
                        false,
                    );
                    if *use_bias {
                        let bs = &self.specs[first + 1];
                        column_sums(&dy, *units, &mut grad[bs.offset..bs.offset + bs.len]);
                    }
                    need_dx.then(|| {
                        let mut dx = vec![0.0f32; n * fin];
                        gemm(
                            n,
                            *units,
                            fin,
                            Mat::rows(&dy, *units),
                            Mat::rows_t(w, *units),
                            &mut dx,
                            false,
                        );
                        dx
                    })
                }
                LayerKind::Conv2D {
                    filters,
                    activation,
                    use_bias,
                    ..
                } => {
                    let g = ConvGeom::new(layer);
                    if !skip_act {
                        activate_backward(*activation, out, &mut dy, *filters);
                    }
                    let first = self.first_param[li];
                    let (w, _) = layer_params(params, self.specs, first, *use_bias);
                    let ks = &self.specs[first];
                    if *use_bias {
                        let bs = &self.specs[first + 1];
                        column_sums(&dy, *filters, &mut grad[bs.offset..bs.offset + bs.len]);
                    }
                    g.conv_backward(
                        input,
                        w,
                        *filters,
                        &dy,
                        &mut grad[ks.offset..ks.offset + ks.len],
                        need_dx,
                    )
                }
                LayerKind::MaxPool2D { .. } => need_dx.then(|| {
                    let Extra::Argmax(arg) = &tape.extras[li] else {
                        unreachable!("max pool forward always records argmax")
                    };
                    ConvGeom::new(layer).max_pool_backward(&dy, arg, n)
                }),
                LayerKind::AvgPool2D { .. } => {
                    need_dx.then(|| ConvGeom::new(layer).avg_pool_backward(&dy, n))
                }
                LayerKind::Flatten => need_dx.then(|| std::mem::take(&mut dy)),
                LayerKind::Dropout { .. } => need_dx.then(|| {
                    let mut dx = std::mem::take(&mut dy);
                    if let Extra::Mask(m) = &tape.extras[li] {
                        dx.iter_mut().zip(m).for_each(|(d, m)| *d *= m);
                    }
                    dx
                }),
                LayerKind::Activation(a) => need_dx.then(|| {
                    let mut dx = std::mem::take(&mut dy);
                    if !skip_act {
                        let width = *layer.output_shape.last().unwrap_or(&1);
                        activate_backward(*a, out, &mut dx, width);
                    }
                    dx
                }),
            };
            match dx {
                Some(dx) => dy = dx,
                None => break,
            }
        }
    }
}

/// Sums the rows of a row-major matrix, in row order.
fn column_sums(m: &[f32], cols: usize, out: &mut [f32]) {
    out.fill(0.0);
    for row in m.chunks_exact(cols) {
        out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
    }
}

fn finish_linear(y: &mut [f32], bias: Option<&[f32]>, width: usize, act: Activation) {
    if let Some(b) = bias {
        y.par_chunks_mut(width * 64).for_each(|block| {
            for row in block.chunks_exact_mut(width) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        });
    }
    activate(act, y, width);
}

/// Elements per parallel task in element-wise loops.
const ELEMENTWISE_BLOCK: usize = 1 << 15;

/// Applies an activation in place; softmax works on rows of `width`.
pub(crate) fn activate(act: Activation, y: &mut [f32], width: usize) {
    match act {
        Activation::Linear => {}
        Activation::Relu => y
            .par_chunks_mut(ELEMENTWISE_BLOCK)
            .for_each(|b| b.iter_mut().for_each(|v| *v = v.max(0.0))),
        Activation::Sigmoid => y
            .par_chunks_mut(ELEMENTWISE_BLOCK)
            .for_each(|b| b.iter_mut().for_each(|v| *v = sigmoid(*v))),
        Activation::Tanh => y
            .par_chunks_mut(ELEMENTWISE_BLOCK)
            .for_each(|b| b.iter_mut().for_each(|v| *v = v.tanh())),
        Activation::Softmax => {
            for row in y.chunks_exact_mut(width.max(1)) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Turns the gradient w.r.t. an activation's output into the gradient
/// w.r.t. its input, using only the output `y`.
pub(crate) fn activate_backward(act: Activation, y: &[f32], dy: &mut [f32], width: usize) {
    match act {
        Activation::Linear => {}
        Activation::Relu => dy
            .par_chunks_mut(ELEMENTWISE_BLOCK)
            .zip(y.par_chunks(ELEMENTWISE_BLOCK))
            .for_each(|(d, y)| {
                d.iter_mut()
                    .zip(y)
                    .for_each(|(d, y)| *d = if *y > 0.0 { *d } else { 0.0 })
            }),
        Activation::Sigmoid => dy.iter_mut().zip(y).for_each(|(d, y)| *d *= y * (1.0 - y)),
        Activation::Tanh => dy.iter_mut().zip(y).for_each(|(d, y)| *d *= 1.0 - y * y),
        Activation::Softmax => {
            let w = width.max(1);
            for (d, y) in dy.chunks_exact_mut(w).zip(y.chunks_exact(w)) {
                let dot: f32 = d.iter().zip(y).map(|(d, y)| d * y).sum();
                d.iter_mut().zip(y).for_each(|(d, y)| *d = y * (*d - dot));
            }
        }
    }
}

/// Geometry shared by convolution and pooling (NHWC).
struct ConvGeom {
    h: usize,
    w: usize,
    c: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    oh: usize,
    ow: usize,
    pt: usize,
    pl: usize,
}

impl ConvGeom {
    fn new(layer: &Layer) -> Self {
        let (kernel, strides, padding) = match &layer.kind {
            LayerKind::Conv2D {
                kernel,
                strides,
                padding,
                ..
            } => (*kernel, *strides, *padding),
            LayerKind::MaxPool2D {
                pool,
                strides,
                padding,
            }
            | LayerKind::AvgPool2D {
                pool,
                strides,
                padding,
            } => (*pool, *strides, *padding),
            _ => unreachable!("geometry of a non-spatial layer"),
        };
        let (h, w, c) = (
            layer.input_shape[0],
            layer.input_shape[1],
            layer.input_shape[2],
        );
        // Shapes were validated when the model was built.
        let (oh, pt) = padding
            .output_and_pad(h, kernel[0], strides[0])
            .unwrap_or((0, 0));
        let (ow, pl) = padding
            .output_and_pad(w, kernel[1], strides[1])
            .unwrap_or((0, 0));
        ConvGeom {
            h,
            w,
            c,
            kh: kernel[0],
            kw: kernel[1],
            sh: strides[0],
            sw: strides[1],
            oh,
            ow,
            pt,
            pl,
        }
    }

    fn kdim(&self) -> usize {
        self.kh * self.kw * self.c
    }

    /// Input row and column for output (oy, ox) and window offset (ky, kx),
    /// or None inside the padding.
    #[inline]
    fn src(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<usize> {
        let iy = (oy * self.sh + ky).checked_sub(self.pt)?;
        let ix = (ox * self.sw + kx).checked_sub(self.pl)?;
        (iy < self.h && ix < self.w).then_some(iy * self.w + ix)
    }

    /// One row per output position, columns in (ky, kx, c) order, matching
    /// an HWIO kernel viewed as a (kh*kw*cin, cout) matrix.
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let kd = self.kdim();
        let per_in = self.h * self.w * self.c;
        let per_col = self.oh * self.ow * kd;
        let c = self.c;
        for (dst, src) in col.chunks_mut(per_col.max(1)).zip(x.chunks(per_in.max(1))) {
            let mut r = 0;
            for oy in 0..self.oh {
                for ox in 0..self.ow {
                    let row = &mut dst[r..r + kd];
                    r += kd;
                    let mut o = 0;
                    for ky in 0..self.kh {
                        for kx in 0..self.kw {
                            match self.src(oy, ox, ky, kx) {
                                // A plain loop: memcpy calls cost more than
                                // these short copies themselves.
                                Some(p) => row[o..o + c]
                                    .iter_mut()
                                    .zip(&src[p * c..p * c + c])
                                    .for_each(|(d, s)| *d = *s),
                                None => row[o..o + c].fill(0.0),
                            }
                            o += c;
                        }
                    }
                }
            }
        }
    }

    /// Samples per im2col block: about 1 MiB of columns, so a block stays in
    /// cache between being written and being multiplied. Depends only on
    /// the layer's shape, which keeps the summation order fixed.
    fn chunk_samples(&self) -> usize {
        ((1usize << 18) / (self.oh * self.ow * self.kdim()).max(1)).max(1)
    }

    fn conv_forward(&self, x: &[f32], w: &[f32], filters: usize, y: &mut [f32]) {
        let kd = self.kdim();
        let per_in = self.h * self.w * self.c;
        let per_out = self.oh * self.ow * filters;
        let cs = self.chunk_samples();
        y.par_chunks_mut((cs * per_out).max(1))
            .zip(x.par_chunks((cs * per_in).max(1)))
            .for_each_init(Vec::new, |col, (yc, xc)| {
                let rows = yc.len() / filters.max(1);
                col.resize(rows * kd, 0.0);
                self.im2col(xc, col);
                gemm_serial(
                    rows,
                    kd,
                    filters,
                    Mat::rows(col, kd),
                    Mat::rows(w, filters),
                    yc,
                    false,
                );
            });
    }

    /// Kernel gradient into `dw` and, when `need_dx`, the input gradient.
    /// Blocks of samples run in parallel; each block sums its kernel
    /// gradient in sample order and blocks are added in block order.
    fn conv_backward(
        &self,
        x: &[f32],
        w: &[f32],
        filters: usize,
        dy: &[f32],
        dw: &mut [f32],
        need_dx: bool,
    ) -> Option<Vec<f32>> {
        let kd = self.kdim();
        let per_in = self.h * self.w * self.c;
        let per_out = self.oh * self.ow * filters;
        let n = x.len() / per_in.max(1);
        let cs = self.chunk_samples();
        let chunks = n.div_ceil(cs);
        let group = cs * chunks.div_ceil(8).max(1);
        let groups = n.div_ceil(group);
        let work = |gi: usize, dxg: Option<&mut [f32]>| -> Vec<f32> {
            let s0 = gi * group;
            let s1 = (s0 + group).min(n);
            let mut part = vec![0.0f32; kd * filters];
            let mut col = Vec::new();
            let mut dcol = Vec::new();
            let mut dxg = dxg;
            let mut s = s0;
            while s < s1 {
                let e = (s + cs).min(s1);
                let rows = (e - s) * self.oh * self.ow;
                col.resize(rows * kd, 0.0);
                self.im2col(&x[s * per_in..e * per_in], &mut col);
                let dyc = &dy[s * per_out..e * per_out];
                gemm_serial(
                    kd,
                    rows,
                    filters,
                    Mat::rows_t(&col, kd),
                    Mat::rows(dyc, filters),
                    &mut part,
                    true,
                );
                if let Some(dxg) = dxg.as_deref_mut() {
                    dcol.resize(rows * kd, 0.0);
                    gemm_serial(
                        rows,
                        filters,
                        kd,
                        Mat::rows(dyc, filters),
                        Mat::rows_t(w, filters),
                        &mut dcol,
                        false,
                    );
                    let off = (s - s0) * per_in;
                    self.col2im(&dcol, &mut dxg[off..off + (e - s) * per_in]);
                }
                s = e;
            }
            part
        };
        let mut dx = need_dx.then(|| vec![0.0f32; n * per_in]);
        let parts: Vec<Vec<f32>> = match dx.as_mut() {
            Some(dx) => dx
                .par_chunks_mut((group * per_in).max(1))
                .enumerate()
                .map(|(gi, dxg)| work(gi, Some(dxg)))
                .collect(),
            None => (0..groups)
                .into_par_iter()
                .map(|gi| work(gi, None))
                .collect(),
        };
        dw.fill(0.0);
        for p in &parts {
            dw.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
        dx
    }

    /// Scatter-adds im2col-shaped gradients back to the input layout
    /// (`dx` is zero on entry).
    fn col2im(&self, dcol: &[f32], dx: &mut [f32]) {
        let kd = self.kdim();
        let per_in = self.h * self.w * self.c;
        let per_col = self.oh * self.ow * kd;
        let c = self.c;
        for (dst, src) in dx
            .chunks_mut(per_in.max(1))
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
                                dst[p * c..p * c + c]
                                    .iter_mut()
                                    .zip(&row[o..o + c])
                                    .for_each(|(d, s)| *d += s);
                            }
                            o += c;
                        }
                    }
                }
            }
        }
    }

    fn max_pool(&self, x: &[f32], n: usize) -> (Vec<f32>, Vec<u32>) {
        let per_in = self.h * self.w * self.c;
        let per_out = self.oh * self.ow * self.c;
        let mut y = vec![f32::NEG_INFINITY; n * per_out];
        let mut arg = vec![0u32; n * per_out];
        let c = self.c;
        y.par_chunks_mut(per_out.max(1))
            .zip(arg.par_chunks_mut(per_out.max(1)))
            .zip(x.par_chunks(per_in.max(1)))
            .for_each(|((ys, args), src)| {
                for oy in 0..self.oh {
                    for ox in 0..self.ow {
                        let o = (oy * self.ow + ox) * c;
                        let (yrow, arow) = (&mut ys[o..o + c], &mut args[o..o + c]);
                        for ky in 0..self.kh {
                            for kx in 0..self.kw {
                                if let Some(p) = self.src(oy, ox, ky, kx) {
                                    let srow = &src[p * c..p * c + c];
                                    let base = (p * c) as u32;
                                    for (ch, ((y, a), v)) in
                                        yrow.iter_mut().zip(arow.iter_mut()).zip(srow).enumerate()
                                    {
                                        // Strict '>' keeps the first maximum, as TensorFlow does.
                                        let better = *v > *y;
                                        *y = if better { *v } else { *y };
                                        *a = if better { base + ch as u32 } else { *a };
                                    }
                                }
                            }
                        }
                    }
                }
            });
        (y, arg)
    }

    fn max_pool_backward(&self, dy: &[f32], arg: &[u32], n: usize) -> Vec<f32> {
        let per_in = self.h * self.w * self.c;
        let per_out = self.oh * self.ow * self.c;
        let mut dx = vec![0.0f32; n * per_in];
        dx.par_chunks_mut(per_in.max(1))
            .zip(
                dy.par_chunks(per_out.max(1))
                    .zip(arg.par_chunks(per_out.max(1))),
            )
            .for_each(|(dst, (d, a))| {
                for (d, a) in d.iter().zip(a) {
                    dst[*a as usize] += d;
                }
            });
        dx
    }

    /// Number of input cells under each output window (padding excluded,
    /// as TensorFlow's average pooling does).
    fn window_count(&self, oy: usize, ox: usize) -> usize {
        let mut count = 0;
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                count += self.src(oy, ox, ky, kx).is_some() as usize;
            }
        }
        count.max(1)
    }

    fn avg_pool(&self, x: &[f32], n: usize) -> Vec<f32> {
        let per_in = self.h * self.w * self.c;
        let per_out = self.oh * self.ow * self.c;
        let mut y = vec![0.0f32; n * per_out];
        let c = self.c;
        y.par_chunks_mut(per_out.max(1))
            .zip(x.par_chunks(per_in.max(1)))
            .for_each(|(ys, src)| {
                for oy in 0..self.oh {
                    for ox in 0..self.ow {
                        let o = (oy * self.ow + ox) * c;
                        let yrow = &mut ys[o..o + c];
                        for ky in 0..self.kh {
                            for kx in 0..self.kw {
                                if let Some(p) = self.src(oy, ox, ky, kx) {
                                    yrow.iter_mut()
                                        .zip(&src[p * c..p * c + c])
                                        .for_each(|(y, s)| *y += s);
                                }
                            }
                        }
                        let inv = 1.0 / self.window_count(oy, ox) as f32;
                        yrow.iter_mut().for_each(|v| *v *= inv);
                    }
                }
            });
        y
    }

    fn avg_pool_backward(&self, dy: &[f32], n: usize) -> Vec<f32> {
        let per_in = self.h * self.w * self.c;
        let per_out = self.oh * self.ow * self.c;
        let mut dx = vec![0.0f32; n * per_in];
        let c = self.c;
        dx.par_chunks_mut(per_in.max(1))
            .zip(dy.par_chunks(per_out.max(1)))
            .for_each(|(dst, d)| {
                for oy in 0..self.oh {
                    for ox in 0..self.ow {
                        let o = (oy * self.ow + ox) * c;
                        let inv = 1.0 / self.window_count(oy, ox) as f32;
                        for ky in 0..self.kh {
                            for kx in 0..self.kw {
                                if let Some(p) = self.src(oy, ox, ky, kx) {
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
        dx
    }
}
