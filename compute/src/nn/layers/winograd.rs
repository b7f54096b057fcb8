//! Winograd's minimal filtering, F(2x2, r x r), for stride-1 square
//! convolutions over enough channels to feed a GEMM (5x5 kernels; see
//! [`applies`]).
//!
//! Each 2x2 block of output pixels is computed from an (r+1)x(r+1) tile of
//! input: the tile and the kernel are transformed (`B'dB`, `GgG'`), multiplied
//! element by element (summed over channels: one GEMM per tile position),
//! and transformed back (`A'MA`). A 5x5 kernel then takes 36 products per
//! 2x2 outputs instead of 100, a 3x3 one 16 instead of 36; the transforms
//! cost a few additions per element. The backward pass runs the forward
//! one in reverse: the output gradient's 2x2 blocks are transformed once
//! (`A dY A'`), and from them the kernel gradient sums, per tile position,
//! transformed inputs times transformed output gradients, while the input
//! gradient takes, per position, the transformed gradients times the
//! transformed kernel, transformed back to tiles (`B dV B'`) and added into
//! the pixels each tile was read from. (Running the forward pass on the
//! output gradient with the flipped kernel instead transformed 6x6 tiles
//! of all its channels: the seed CNN's second layer took 9.2-9.7 ms for
//! its backward pass that way, 7.5-7.8 ms this way.)
//!
//! The transforms come from the Toom-Cook construction over the points
//! 0, 1, -1, 2, -2 and infinity (Lavin and Gray, 2016), built in f64 when a
//! layer runs and rounded once. With m = 2 outputs per tile the entries stay
//! small and the error stays close to a direct sum's (checked against the
//! im2col path below and by the Keras parity tests).
//!
//! Every output depends on its own tile only, and the kernel gradient is
//! summed in fixed groups of samples, so results do not depend on the
//! number of threads.

use super::conv::Geom;
use crate::nn::buffers::with_scratch;
use crate::nn::gemm::{gemm_serial, Mat};
use rayon::prelude::*;

/// Outputs per tile side.
const M: usize = 2;

/// Whether the Winograd path runs for this layer: 5x5 kernels only.
///
/// For 3x3 kernels the transforms are as accurate as im2col (largest error
/// against an f64 sum 3.6e-7 of the largest output, im2col 4.8e-7), but
/// their different rounding flips ReLUs near zero in the deep 3x3 networks
/// of the parity tests (VGG16, DenseNet121), whose first-layer gradients
/// then move past Keras's tolerance. For 5x5 the error is larger (3e-6
/// forward, 7e-6 for the kernel gradient, against 5e-7 through im2col)
/// and every parity test holds.
pub(crate) fn applies(g: &Geom, filters: usize, groups: usize) -> bool {
    groups == 1
        && g.kh == g.kw
        && g.kh == 5
        && (g.sh, g.sw, g.dh, g.dw) == (1, 1, 1, 1)
        && g.c >= 16
        && filters >= 16
        && g.oh >= M
        && g.ow >= M
        && g.pt < g.kh
        && g.pl < g.kw
}

/// The transforms of F(2x2, r x r), row-major.
struct Transforms {
    r: usize,
    /// Tile side, r + 1.
    a: usize,
    /// A' (M x a): tile position to output.
    at: Vec<f32>,
    /// A (a x M), for the output gradient.
    a_cols: Vec<f32>,
    /// G (a x r): kernel to tile position.
    g: Vec<f32>,
    /// G' (r x a), for the kernel gradient.
    gt: Vec<f32>,
    /// B' (a x a): input tile to tile position.
    bt: Vec<f32>,
    /// B (a x a), for the input gradient.
    b: Vec<f32>,
}

impl Transforms {
    fn new(r: usize) -> Transforms {
        let a = M + r - 1;
        // Enough points for r <= 5.
        let points: Vec<f64> = [0.0, 1.0, -1.0, 2.0, -2.0][..a - 1].to_vec();
        let mut at = vec![0.0f64; M * a];
        let mut g = vec![0.0f64; a * r];
        let mut bt = vec![0.0f64; a * a];
        for (j, &p) in points.iter().enumerate() {
            let others: Vec<f64> = points
                .iter()
                .enumerate()
                .filter(|&(l, _)| l != j)
                .map(|(_, &q)| q)
                .collect();
            let f: f64 = others.iter().map(|q| p - q).product();
            for i in 0..M {
                at[i * a + j] = p.powi(i as i32);
            }
            for k in 0..r {
                g[j * r + k] = p.powi(k as i32) / f;
            }
            for (i, c) in poly(&others).into_iter().enumerate() {
                bt[j * a + i] = c;
            }
        }
        // The point at infinity: the leading coefficients.
        at[(M - 1) * a + a - 1] = 1.0;
        g[(a - 1) * r + r - 1] = 1.0;
        for (i, c) in poly(&points).into_iter().enumerate() {
            bt[(a - 1) * a + i] = c;
        }
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
        let transpose = |v: &[f64], rows: usize, cols: usize| -> Vec<f32> {
            (0..cols * rows)
                .map(|i| v[(i % rows) * cols + i / rows] as f32)
                .collect()
        };
        Transforms {
            r,
            a,
            at: f32s(&at),
            a_cols: transpose(&at, M, a),
            g: f32s(&g),
            gt: transpose(&g, a, r),
            bt: f32s(&bt),
            b: transpose(&bt, a, a),
        }
    }

    /// U[e][c][f] = (G k[.., .., c, f] G')[e] for an HWIO kernel `k` with
    /// `ci` inputs and `co` outputs; e = row * a + column of the tile.
    fn kernel(&self, k: &[f32], ci: usize, co: usize) -> Vec<f32> {
        let per = ci * co;
        // Every value is written (the sandwich sets, it does not add).
        let mut u = crate::nn::buffers::overwritten(self.a * self.a * per);
        let mut tmp = vec![0.0f32; self.r * per];
        let g = Side::new(&self.g, self.a, self.r);
        sandwich(g, (k, per), (&mut u, per), per, false, &mut tmp);
        u
    }

    /// Adds the kernel gradient from the tile-position sums dU:
    /// dk[.., .., c, f] += G' dU[.., c, f] G.
    fn kernel_grad(&self, du: &[f32], per: usize, dk: &mut [f32]) {
        let mut tmp = vec![0.0f32; self.a * per];
        let gt = Side::new(&self.gt, self.r, self.a);
        sandwich(gt, (du, per), (dk, per), per, true, &mut tmp);
    }

    /// B'dB for a run of input tiles: `d` holds, for each of the a x a
    /// positions, `c` values (the run's tiles' channels, zeros outside the
    /// input); position e of the result goes to `v[e * stride ..][..c]`.
    /// Transforming a run of tiles at once keeps the inner loops long.
    fn input_tile(&self, d: (&[f32], usize), c: usize, tmp: &mut [f32], v: (&mut [f32], usize)) {
        let bt = Side::new(&self.bt, self.a, self.a);
        sandwich(bt, d, v, c, false, tmp);
    }

    /// B dV B' for a run of tiles: the gradient of a run's input tiles
    /// from that of their transforms, laid out as [`Self::input_tile`]'s
    /// input (`len` values for each position, `v.1` apart).
    fn input_grad_tile(
        &self,
        dv: (&[f32], usize),
        len: usize,
        tmp: &mut [f32],
        d: (&mut [f32], usize),
    ) {
        let b = Side::new(&self.b, self.a, self.a);
        sandwich(b, dv, d, len, false, tmp);
    }

    /// A dY A' for a run of 2x2 blocks of output gradients (`f` values for
    /// each of the M x M positions: the run's blocks' filters, zeros past
    /// the output's edge); position e goes to `z[e * stride ..][..f]`.
    fn grad_tile(&self, dy: &[f32], f: usize, tmp: &mut [f32], z: &mut [f32], stride: usize) {
        let a = Side::new(&self.a_cols, self.a, M);
        sandwich(a, (dy, f), (z, stride), f, false, tmp);
    }

    /// A'MA for a run of tiles: `m` holds the run's products for position e
    /// at `m[e * stride ..][..f]`; the 2x2 outputs go to `out`, `f` values
    /// for each of the M x M positions.
    fn output_tile(&self, m: &[f32], f: usize, stride: usize, tmp: &mut [f32], out: &mut [f32]) {
        let at = Side::new(&self.at, M, self.a);
        sandwich(at, (m, stride), (out, f), f, false, tmp);
    }
}

/// One side of a transform: a `rows x cols` matrix, row-major.
#[derive(Clone, Copy)]
struct Side<'a> {
    m: &'a [f32],
    rows: usize,
    cols: usize,
}

impl<'a> Side<'a> {
    fn new(m: &'a [f32], rows: usize, cols: usize) -> Side<'a> {
        debug_assert_eq!(m.len(), rows * cols);
        Side { m, rows, cols }
    }
}

/// Every transform here: Y = L X L' over a grid of vectors. `x` is a
/// `cols x cols` grid of `len`-long vectors, vector (i, j) starting at
/// `x.0[(i * cols + j) * x.1]`; Y is the `rows x rows` grid written (or,
/// with `add`, added) with vector (i, j) at `y.0[(i * rows + j) * y.1]`.
/// Zero entries of L are skipped; each output sums its terms in index
/// order, whichever path runs, so every path gives the same bits.
fn sandwich(
    l: Side<'_>,
    x: (&[f32], usize),
    y: (&mut [f32], usize),
    len: usize,
    add: bool,
    tmp: &mut [f32],
) {
    let (yv, ys) = y;
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        let m = (l.m, l.rows, l.cols);
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was just detected on this CPU.
            done = unsafe { super::winograd_lanes::sandwich_512(m, x, (&mut *yv, ys), len, add) };
        } else if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: AVX was just detected on this CPU.
            done = unsafe { super::winograd_lanes::sandwich_256(m, x, (&mut *yv, ys), len, add) };
        }
    }
    if done < len {
        sandwich_any(
            l,
            (&x.0[done..], x.1),
            (&mut yv[done..], ys),
            len - done,
            add,
            tmp,
        );
    }
}

/// The transform on whole `len`-long rows, one row of LX at a time in
/// `tmp` (`cols * len` long): any shape, any length.
fn sandwich_any(
    l: Side<'_>,
    (x, xs): (&[f32], usize),
    (y, ys): (&mut [f32], usize),
    len: usize,
    add: bool,
    tmp: &mut [f32],
) {
    let (p, q) = (l.rows, l.cols);
    for i in 0..p {
        let mut first = true;
        for k in 0..q {
            let b = l.m[i * q + k];
            if b == 0.0 {
                continue;
            }
            for j in 0..q {
                mix(
                    &mut tmp[j * len..][..len],
                    first,
                    b,
                    &x[(k * q + j) * xs..][..len],
                );
            }
            first = false;
        }
        for jj in 0..p {
            let dst = &mut y[(i * p + jj) * ys..][..len];
            let mut first = !add;
            for j in 0..q {
                let b = l.m[jj * q + j];
                if b == 0.0 {
                    continue;
                }
                mix(dst, first, b, &tmp[j * len..][..len]);
                first = false;
            }
        }
    }
}

/// `dst = b * src` for a transform's first term, `dst += b * src` after.
/// (Every row of every transform has a nonzero entry.)
#[inline(always)]
fn mix(dst: &mut [f32], first: bool, b: f32, src: &[f32]) {
    if first {
        dst.iter_mut().zip(src).for_each(|(t, s)| *t = b * s);
    } else {
        dst.iter_mut().zip(src).for_each(|(t, s)| *t += b * s);
    }
}

/// The coefficients, lowest first, of the product of (x - root).
fn poly(roots: &[f64]) -> Vec<f64> {
    let mut c = vec![0.0f64; roots.len() + 1];
    c[0] = 1.0;
    for (deg, &q) in roots.iter().enumerate() {
        for i in (0..=deg + 1).rev() {
            let lower = if i > 0 { c[i - 1] } else { 0.0 };
            c[i] = lower - q * c[i];
        }
    }
    c
}

/// Tiles transformed together.
const RUN: usize = 16;

/// Tiles per block of work: enough rows for the per-position GEMMs to run
/// at speed, few enough for the block's transforms to stay in cache. The
/// products of a block are 36 x tiles x filters floats, read back by the
/// output transform: at 512 tiles and 64 filters that is 4.7 MB, past a
/// core's L2, and the seed CNN's step ran 10-15% slower than at 256.
const BLOCK_TILES: usize = 256;

/// Samples per block of work, out of a batch of `n`.
fn sample_blocks(n: usize, tiles_per_sample: usize) -> usize {
    (BLOCK_TILES / tiles_per_sample.max(1)).clamp(1, n.max(1))
}

/// The distance between the planes of a block's tile positions (one per
/// position, `n` values each): one cache line more than `n`, so the
/// transforms' 36 streams, a plane apart, do not land in the same L1 set
/// (block sizes are multiples of 4 KiB, and a plane distance of one
/// missed L1 at every read).
fn plane(n: usize) -> usize {
    n + 16
}

struct Tiling<'g> {
    g: &'g Geom,
    th: usize,
    tw: usize,
}

impl Tiling<'_> {
    fn new(g: &Geom) -> Tiling<'_> {
        Tiling {
            g,
            th: g.oh.div_ceil(M),
            tw: g.ow.div_ceil(M),
        }
    }

    fn per_sample(&self) -> usize {
        self.th * self.tw
    }

    /// The a x a x c input tile of tile `t` of one sample, zeros outside,
    /// into `d` with `len` values per position.
    fn gather(&self, x: &[f32], t: usize, a: usize, d: &mut [f32], len: usize) {
        let g = self.g;
        let c = g.c;
        let (ty, tx) = (t / self.tw, t % self.tw);
        for row in 0..a {
            let iy = (ty * M + row) as isize - g.pt as isize;
            for col in 0..a {
                let ix = (tx * M + col) as isize - g.pl as isize;
                let dst = &mut d[(row * a + col) * len..][..c];
                if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                    let p = iy as usize * g.w + ix as usize;
                    dst.copy_from_slice(&x[p * c..][..c]);
                } else {
                    dst.fill(0.0);
                }
            }
        }
    }

    /// Adds an a x a x c tile's values (`len` apart per position, as
    /// [`Tiling::gather`] lays them out) into the input pixels tile `t` of
    /// one sample was read from; positions outside the input are dropped.
    fn scatter_add(&self, d: &[f32], len: usize, t: usize, a: usize, dx: &mut [f32]) {
        let g = self.g;
        let c = g.c;
        let (ty, tx) = (t / self.tw, t % self.tw);
        for row in 0..a {
            let iy = (ty * M + row) as isize - g.pt as isize;
            if iy < 0 || iy as usize >= g.h {
                continue;
            }
            for col in 0..a {
                let ix = (tx * M + col) as isize - g.pl as isize;
                if ix < 0 || ix as usize >= g.w {
                    continue;
                }
                let p = iy as usize * g.w + ix as usize;
                dx[p * c..][..c]
                    .iter_mut()
                    .zip(&d[(row * a + col) * len..][..c])
                    .for_each(|(o, v)| *o += v);
            }
        }
    }

    /// Transforms of every tile of `xs` (whole samples): v[e][tile][c].
    fn input(&self, tr: &Transforms, xs: &[f32], v: &mut Vec<f32>) -> usize {
        let tiles = xs.len() / self.g.per_in().max(1) * self.per_sample();
        v.resize(tr.a * tr.a * plane(tiles * self.g.c), 0.0);
        self.input_into(tr, xs, v)
    }

    /// [`Tiling::input`] into `v`, at least as long as the transforms.
    fn input_into(&self, tr: &Transforms, xs: &[f32], v: &mut [f32]) -> usize {
        let g = self.g;
        let (a, c) = (tr.a, g.c);
        let samples = xs.len() / g.per_in().max(1);
        let tiles = samples * self.per_sample();
        let ds = plane(RUN * c);
        let mut d = vec![0.0f32; a * a * ds];
        let mut tmp = vec![0.0f32; a * RUN * c];
        let mut t0 = 0;
        while t0 < tiles {
            let run = RUN.min(tiles - t0);
            let len = run * c;
            for k in 0..run {
                let t = t0 + k;
                let (s, tt) = (t / self.per_sample(), t % self.per_sample());
                let x = &xs[s * g.per_in()..][..g.per_in()];
                self.gather(x, tt, a, &mut d[k * c..], ds);
            }
            let v = (&mut v[t0 * c..], plane(tiles * c));
            tr.input_tile((&d, ds), len, &mut tmp, v);
            t0 += run;
        }
        tiles
    }
}

/// A training step's input transforms, kept from the forward pass for the
/// kernel gradient, which would otherwise make them again; handed back to
/// the step's buffers when dropped.
pub(crate) struct InputTransforms(Vec<f32>);

impl Drop for InputTransforms {
    fn drop(&mut self) {
        crate::nn::buffers::hand_back(std::mem::take(&mut self.0));
    }
}

/// `buf` in parts of `len` for the tasks of a pass, or `count` Nones
/// without one.
fn parts_of(buf: Option<&mut Vec<f32>>, len: usize, count: usize) -> Vec<Option<&mut [f32]>> {
    match buf {
        Some(b) => b.chunks_mut(len.max(1)).map(Some).collect(),
        None => (0..count).map(|_| None).collect(),
    }
}

/// Floats one block of `sb` samples' transforms take when kept: every
/// block is given the room of a whole one, so block `b` starts at `b`
/// times this.
fn kept_block(g: &Geom, tr: &Transforms, sb: usize) -> usize {
    tr.a * tr.a * plane(sb * Tiling::new(g).per_sample() * g.c)
}

/// `y = conv(x, w)`, calling `then` on each finished block of samples;
/// with `keep`, the input's transforms are kept for the backward pass.
pub(crate) fn forward(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    filters: usize,
    y: &mut [f32],
    then: &(dyn Fn(&mut [f32]) + Sync),
    keep: bool,
) -> Option<InputTransforms> {
    let tr = &Transforms::new(g.kh);
    let u = tr.kernel(w, g.c, filters);
    let tiling = Tiling::new(g);
    let per_out = g.oh * g.ow * filters;
    let n = y.len() / per_out.max(1);
    let sb = sample_blocks(n, tiling.per_sample());
    let (a, c, f) = (tr.a, g.c, filters);
    let block = kept_block(g, tr, sb);
    // Every value a backward pass reads is written below.
    let mut kept = keep.then(|| crate::nn::buffers::overwritten(n.div_ceil(sb) * block));
    let blocks = parts_of(kept.as_mut(), block, n.div_ceil(sb));
    y.par_chunks_mut((sb * per_out).max(1))
        .zip(x.par_chunks((sb * g.per_in()).max(1)))
        .zip(blocks.into_par_iter())
        .for_each(|((yc, xc), kb)| {
            with_scratch(|scratch, m| {
                let tiles;
                let v: &[f32] = match kb {
                    Some(k) => {
                        tiles = tiling.input_into(tr, xc, k);
                        k
                    }
                    None => {
                        tiles = tiling.input(tr, xc, scratch);
                        scratch
                    }
                };
                m.resize(a * a * plane(tiles * f), 0.0);
                for e in 0..a * a {
                    gemm_serial(
                        tiles,
                        c,
                        f,
                        Mat::rows(&v[e * plane(tiles * c)..][..tiles * c], c),
                        Mat::rows(&u[e * c * f..][..c * f], f),
                        &mut m[e * plane(tiles * f)..][..tiles * f],
                        false,
                    );
                }
                let mut tmp = vec![0.0f32; a * RUN * f];
                let mut out = vec![0.0f32; M * M * RUN * f];
                let mut t0 = 0;
                while t0 < tiles {
                    let run = RUN.min(tiles - t0);
                    let len = run * f;
                    tr.output_tile(&m[t0 * f..], len, plane(tiles * f), &mut tmp, &mut out);
                    for k in 0..run {
                        let t = t0 + k;
                        let (s, tt) = (t / tiling.per_sample(), t % tiling.per_sample());
                        let (ty, tx) = (tt / tiling.tw, tt % tiling.tw);
                        for i in 0..M {
                            let oy = ty * M + i;
                            if oy >= g.oh {
                                break;
                            }
                            for j in 0..M {
                                let ox = tx * M + j;
                                if ox >= g.ow {
                                    break;
                                }
                                let at = s * per_out + (oy * g.ow + ox) * f;
                                yc[at..at + f]
                                    .copy_from_slice(&out[(i * M + j) * len + k * f..][..f]);
                            }
                        }
                    }
                    t0 += run;
                }
                then(yc);
            })
        });
    crate::nn::buffers::hand_back(u);
    kept.map(InputTransforms)
}

/// The kernel gradient (added into `dw`) and, when asked, the input
/// gradient. Both start from the output gradient's transform, Z = A dY A'
/// per 2x2 block: the kernel gradient sums, per tile position, transformed
/// inputs times Z (dU = V'Z); the input gradient is the forward pass run
/// backwards, dV = Z U' per position, then B dV B' per tile, each tile's
/// 6x6 added into the input pixels it was read from, tiles in order.
/// `kept`: the input's transforms, if the forward pass kept them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    filters: usize,
    dy: &[f32],
    dw: Option<&mut [f32]>,
    need_dx: bool,
    kept: Option<&InputTransforms>,
) -> Option<Vec<f32>> {
    if dw.is_none() && !need_dx {
        return None;
    }
    let tr = Transforms::new(g.kh);
    let (a, c, f) = (tr.a, g.c, filters);
    let tiling = Tiling::new(g);
    let (per_in, per_out) = (g.per_in(), g.oh * g.ow * f);
    let n = dy.len() / per_out.max(1);
    let sb = sample_blocks(n, tiling.per_sample());
    let group = super::conv::group_samples(n, sb, a * a * c * f);
    let block = kept_block(g, &tr, sb);
    // Transforms kept by a forward pass over this same batch, or none.
    let kept = kept
        .map(|k| k.0.as_slice())
        .filter(|k| k.len() == n.div_ceil(sb) * block);
    let u = need_dx.then(|| tr.kernel(w, c, f));
    let want_dw = dw.is_some();
    // Every input pixel is written: each block's part is zeroed first.
    let mut dx = need_dx.then(|| crate::nn::buffers::overwritten(n * per_in));
    let dx_groups = parts_of(dx.as_mut(), group * per_in, n.div_ceil(group.max(1)));
    let parts: Vec<Option<Vec<f32>>> = dy
        .par_chunks((group * per_out).max(1))
        .zip(x.par_chunks((group * per_in).max(1)))
        .zip(dx_groups.into_par_iter())
        .enumerate()
        .map(|(gi, ((dyg, xg), mut dxg))| {
            with_scratch(|v, z| {
                let mut du = want_dw.then(|| crate::nn::buffers::zeroed(a * a * c * f));
                let mut d = vec![0.0f32; M * M * RUN * f];
                let mut tmp = vec![0.0f32; a * RUN * f.max(c)];
                let ds = plane(RUN * c);
                let mut dd = vec![0.0f32; a * a * ds];
                for (b, (dyc, xc)) in dyg
                    .chunks((sb * per_out).max(1))
                    .zip(xg.chunks((sb * per_in).max(1)))
                    .enumerate()
                {
                    let tiles = dyc.len() / per_out.max(1) * tiling.per_sample();
                    z.resize(a * a * plane(tiles * f), 0.0);
                    let mut t0 = 0;
                    while t0 < tiles {
                        let run = RUN.min(tiles - t0);
                        let len = run * f;
                        for k in 0..run {
                            let t = t0 + k;
                            let (s, tt) = (t / tiling.per_sample(), t % tiling.per_sample());
                            let (ty, tx) = (tt / tiling.tw, tt % tiling.tw);
                            for i in 0..M {
                                for j in 0..M {
                                    let (oy, ox) = (ty * M + i, tx * M + j);
                                    let dst = &mut d[(i * M + j) * len + k * f..][..f];
                                    if oy < g.oh && ox < g.ow {
                                        dst.copy_from_slice(
                                            &dyc[s * per_out + (oy * g.ow + ox) * f..][..f],
                                        );
                                    } else {
                                        dst.fill(0.0);
                                    }
                                }
                            }
                        }
                        tr.grad_tile(&d, len, &mut tmp, &mut z[t0 * f..], plane(tiles * f));
                        t0 += run;
                    }
                    if let Some(du) = du.as_mut() {
                        // Groups are whole blocks: this is block
                        // gi * group / sb + b of the batch.
                        let v: &[f32] = match kept {
                            Some(k) => &k[(gi * group / sb + b) * block..][..block],
                            None => {
                                tiling.input(&tr, xc, v);
                                v
                            }
                        };
                        for e in 0..a * a {
                            gemm_serial(
                                c,
                                tiles,
                                f,
                                Mat::rows_t(&v[e * plane(tiles * c)..][..tiles * c], c),
                                Mat::rows(&z[e * plane(tiles * f)..][..tiles * f], f),
                                &mut du[e * c * f..][..c * f],
                                true,
                            );
                        }
                    }
                    let (Some(dxg), Some(u)) = (dxg.as_deref_mut(), u.as_ref()) else {
                        continue;
                    };
                    // dV per position into `v`, free once dU has it.
                    v.resize(a * a * plane(tiles * c), 0.0);
                    for e in 0..a * a {
                        gemm_serial(
                            tiles,
                            f,
                            c,
                            Mat::rows(&z[e * plane(tiles * f)..][..tiles * f], f),
                            Mat::rows_t(&u[e * c * f..][..c * f], f),
                            &mut v[e * plane(tiles * c)..][..tiles * c],
                            false,
                        );
                    }
                    let dxc = &mut dxg[b * sb * per_in..][..xc.len()];
                    dxc.fill(0.0);
                    let mut t0 = 0;
                    while t0 < tiles {
                        let run = RUN.min(tiles - t0);
                        tr.input_grad_tile(
                            (&v[t0 * c..], plane(tiles * c)),
                            run * c,
                            &mut tmp,
                            (&mut dd, ds),
                        );
                        for k in 0..run {
                            let t = t0 + k;
                            let (s, tt) = (t / tiling.per_sample(), t % tiling.per_sample());
                            tiling.scatter_add(
                                &dd[k * c..],
                                ds,
                                tt,
                                a,
                                &mut dxc[s * per_in..][..per_in],
                            );
                        }
                        t0 += run;
                    }
                }
                du
            })
        })
        .collect();
    if let Some(dw) = dw {
        let mut du = crate::nn::buffers::zeroed(a * a * c * f);
        for p in parts.into_iter().flatten() {
            du.iter_mut().zip(&p).for_each(|(d, v)| *d += v);
            crate::nn::buffers::hand_back(p);
        }
        tr.kernel_grad(&du, c * f, dw);
        crate::nn::buffers::hand_back(du);
    }
    if let Some(u) = u {
        crate::nn::buffers::hand_back(u);
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::super::conv::{Geom, Pad};
    use super::super::Padding;
    use super::*;

    /// The transforms reproduce a direct 1-D correlation exactly in f64
    /// terms: A'[(Gg) . (B'd)] = correlation of d with g.
    #[test]
    fn transforms_compute_a_correlation() {
        for r in [3, 5] {
            let tr = Transforms::new(r);
            let a = tr.a;
            let gk: Vec<f32> = (0..r).map(|i| 0.3 + i as f32 * 0.7).collect();
            let d: Vec<f32> = (0..a).map(|i| 1.0 - i as f32 * 0.45).collect();
            let gg: Vec<f32> = (0..a)
                .map(|xi| (0..r).map(|k| tr.g[xi * r + k] * gk[k]).sum())
                .collect();
            let bd: Vec<f32> = (0..a)
                .map(|xi| (0..a).map(|k| tr.bt[xi * a + k] * d[k]).sum())
                .collect();
            for i in 0..M {
                let got: f32 = (0..a).map(|xi| tr.at[i * a + xi] * gg[xi] * bd[xi]).sum();
                let want: f32 = (0..r).map(|k| gk[k] * d[i + k]).sum();
                assert!(
                    (got - want).abs() < 1e-4,
                    "r {r} output {i}: {got} vs {want}"
                );
            }
        }
    }

    /// The lane-blocked transforms (the CPU's widest vectors) give the
    /// bits of the plain row-by-row loop, for every transform of both
    /// kernel sizes, odd lengths, zeros of both signs, written or added.
    #[test]
    fn blocked_transforms_give_the_same_bits() {
        let mut rnd = crate::nn::rng::test_values(5);
        for r in [3, 5] {
            let tr = Transforms::new(r);
            let (a, m) = (tr.a, M);
            let sides = [
                (&tr.g, a, r),
                (&tr.gt, r, a),
                (&tr.bt, a, a),
                (&tr.at, m, a),
                (&tr.a_cols, a, m),
            ];
            for (mat, rows, cols) in sides {
                let l = Side::new(mat, rows, cols);
                for len in [1, 15, 16, 17, 48, 77] {
                    for add in [false, true] {
                        let (xs, ys) = (len + 3, len + 5);
                        let x: Vec<f32> = (0..cols * cols * xs)
                            .map(|i| match i % 11 {
                                0 => 0.0,
                                1 => -0.0,
                                _ => rnd() * 1e3,
                            })
                            .collect();
                        let y0: Vec<f32> = (0..rows * rows * ys).map(|_| rnd()).collect();
                        let mut tmp = vec![0.0f32; cols * len];
                        let mut want = y0.clone();
                        sandwich_any(l, (&x, xs), (&mut want, ys), len, add, &mut tmp);
                        let same = |got: &[f32]| {
                            got.iter()
                                .zip(&want)
                                .all(|(g, w)| g.to_bits() == w.to_bits())
                        };
                        let mut got = y0.clone();
                        sandwich(l, (&x, xs), (&mut got, ys), len, add, &mut tmp);
                        assert!(same(&got), "r {r}, {rows}x{cols}, len {len}, add {add}");
                        // The AVX path too, on a CPU that would take AVX-512.
                        #[cfg(target_arch = "x86_64")]
                        if std::arch::is_x86_feature_detected!("avx") {
                            let mut got = y0.clone();
                            let m = (l.m, rows, cols);
                            // SAFETY: AVX was just detected on this CPU.
                            let done = unsafe {
                                super::super::winograd_lanes::sandwich_256(
                                    m,
                                    (&x, xs),
                                    (&mut got, ys),
                                    len,
                                    add,
                                )
                            };
                            let rest = (&mut got[done..], ys);
                            sandwich_any(l, (&x[done..], xs), rest, len - done, add, &mut tmp);
                            assert!(same(&got), "AVX: r {r}, {rows}x{cols}, len {len}");
                        }
                    }
                }
            }
        }
    }

    /// Forward, input gradient and kernel gradient against the im2col
    /// path, for both kernel sizes, both paddings and odd output sizes.
    #[test]
    fn matches_the_im2col_path() {
        let mut rnd = crate::nn::rng::test_values(11);
        for (hwc, k, pad, filters, n) in [
            ([14, 14, 32], 5, Padding::Same, 64, 3),
            ([9, 7, 16], 3, Padding::Same, 24, 2),
            ([11, 10, 16], 5, Padding::Valid, 16, 2),
            ([8, 9, 20], 3, Padding::Valid, 32, 13),
        ] {
            let g = Geom::new(hwc, [k, k], [1, 1], [1, 1], Pad::Keras(pad)).unwrap();
            assert_eq!(applies(&g, filters, 1), k == 5);
            let x: Vec<f32> = (0..n * g.per_in()).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..k * k * g.c * filters).map(|_| rnd()).collect();
            let per_out = g.oh * g.ow * filters;
            let dy: Vec<f32> = (0..n * per_out).map(|_| rnd()).collect();
            let close = |what: &str, got: &[f32], want: &[f32]| {
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (i, (a, b)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-5 * scale.max(1.0),
                        "{hwc:?} k{k} {what} at {i}: {a} vs {b}"
                    );
                }
            };

            let mut y = vec![0.0f32; n * per_out];
            assert!(forward(&g, &x, &w, filters, &mut y, &|_| {}, false).is_none());
            let mut want = vec![0.0f32; n * per_out];
            g.conv_then_im2col(&x, &w, filters, 1, &mut want, &|_| {});
            close("forward", &y, &want);

            let mut dw = vec![0.0f32; w.len()];
            let dx = backward(&g, &x, &w, filters, &dy, Some(&mut dw), true, None).unwrap();
            // The input transforms kept by a training forward pass give
            // the same output and the same gradients, bit for bit.
            let mut y_kept = vec![0.0f32; n * per_out];
            let kept = forward(&g, &x, &w, filters, &mut y_kept, &|_| {}, true);
            assert!(kept.is_some());
            assert_eq!(y_kept, y);
            let mut dw_kept = vec![0.0f32; w.len()];
            let dx_kept = backward(
                &g,
                &x,
                &w,
                filters,
                &dy,
                Some(&mut dw_kept),
                true,
                kept.as_ref(),
            );
            assert_eq!(dx_kept.as_ref(), Some(&dx));
            assert_eq!(dw_kept, dw);
            let mut want_dw = vec![0.0f32; w.len()];
            let want_dx = g
                .conv_backward_im2col(&x, &w, filters, 1, &dy, Some(&mut want_dw), true)
                .unwrap();
            close("input gradient", &dx, &want_dx);
            close("kernel gradient", &dw, &want_dw);
        }
    }
}
