//! A direct convolution for thin inputs (a first layer's one or three
//! channels): each output pixel's filters accumulate in AVX2 registers,
//! one fused multiply-add per window tap and eight filters, with no
//! column matrix at all. A reduction of 25 (5x5 over one channel) is too
//! short for a GEMM to run at speed.
//!
//! Chosen at run time: only on CPUs with AVX2 and FMA, for one group and
//! at most 64 filters in multiples of eight; everything else goes through
//! im2col and the GEMM. Each output pixel is computed alone, in a fixed
//! tap order, so results do not depend on the number of threads.
//!
//! The kernel gradient of such a layer runs directly too (sixteen filters
//! a vector and up to sixteen taps' sums in registers on AVX-512; eight
//! filters a vector and up to twelve taps' sums on AVX2): the im2col path
//! wrote 25 floats per pixel of a 28x28 first layer only to reduce over
//! them once (the seed CNN's first backward pass: 1.6 -> 0.9 ms on a Zen 5
//! EPYC, 2.7 -> 1.4 ms on an AVX2 Zen 3). Both sum every element in the
//! same order, so they give the same bits.

use super::conv::Geom;

/// Most filters the kernel keeps in registers (8 x 8 lanes).
const MAX_FILTERS: usize = 64;

/// Whether [`conv`] runs for this layer on this CPU.
pub(crate) fn applies(g: &Geom, filters: usize, groups: usize) -> bool {
    groups == 1
        && g.c < 8
        && filters.is_multiple_of(8)
        && filters <= MAX_FILTERS
        && cpu_has_avx2_fma()
}

fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y = conv(x, w)` for the samples of `x` (HWC each) with an HWIO kernel;
/// callers check [`applies`] first.
pub(crate) fn conv(g: &Geom, x: &[f32], w: &[f32], filters: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            applies(g, filters, 1),
            "direct convolution on an unfit layer"
        );
        let per_in = g.h * g.w * g.c;
        let per_out = g.oh * g.ow * filters;
        assert_eq!(x.len() / per_in.max(1) * per_out, y.len(), "output size");
        assert_eq!(w.len(), g.kh * g.kw * g.c * filters, "kernel size");
        let pad = Padded::new(g);
        let mut buf = vec![0.0f32; pad.h * pad.w * g.c];
        for (xs, ys) in x.chunks_exact(per_in).zip(y.chunks_exact_mut(per_out)) {
            pad.fill(g, xs, &mut buf);
            // SAFETY: applies() checked AVX2 and FMA on this CPU; the padded
            // sample holds every window of every output pixel and the sizes
            // above bound the kernel and the output.
            unsafe { sample_avx2(g, &pad, &buf, w, filters, ys) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (g, x, w, filters, y);
        unreachable!("applies() is false off x86-64");
    }
}

/// A sample copied inside its zero padding, so that every window lies
/// wholly inside it: the kernel then runs without a bounds test per tap,
/// and taps in the padding add exact zeros, as they do through im2col.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Padded {
    h: usize,
    w: usize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Padded {
    fn new(g: &Geom) -> Padded {
        Padded {
            h: (g.oh - 1) * g.sh + (g.kh - 1) * g.dh + 1,
            w: (g.ow - 1) * g.sw + (g.kw - 1) * g.dw + 1,
        }
    }

    /// Copies one sample into `buf`; what lies outside it stays zero.
    fn fill(&self, g: &Geom, x: &[f32], buf: &mut [f32]) {
        let rows = g.h.min(self.h.saturating_sub(g.pt));
        let cols = g.w.min(self.w.saturating_sub(g.pl));
        for iy in 0..rows {
            let dst = ((iy + g.pt) * self.w + g.pl) * g.c;
            buf[dst..dst + cols * g.c].copy_from_slice(&x[iy * g.w * g.c..][..cols * g.c]);
        }
    }
}

/// Output pixels of one row computed together: each weight vector loaded
/// serves all of them, and there are enough independent sums to keep both
/// FMA units busy. `V` vectors of eight filters; the sums (`P * V`), one
/// tap's weights (`V`) and the broadcast input fit the 16 AVX2 registers,
/// so nothing spills to the stack.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sample_avx2(g: &Geom, pad: &Padded, x: &[f32], w: &[f32], filters: usize, y: &mut [f32]) {
    match filters / 8 {
        1 => row_tiles::<1, 6>(g, pad, x, w, y),
        2 => row_tiles::<2, 6>(g, pad, x, w, y),
        3 => row_tiles::<3, 3>(g, pad, x, w, y),
        4 => row_tiles::<4, 2>(g, pad, x, w, y),
        5 => row_tiles::<5, 2>(g, pad, x, w, y),
        6 => row_tiles::<6, 1>(g, pad, x, w, y),
        7 => row_tiles::<7, 1>(g, pad, x, w, y),
        _ => row_tiles::<8, 1>(g, pad, x, w, y),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_tiles<const V: usize, const P: usize>(
    g: &Geom,
    pad: &Padded,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
) {
    let filters = V * 8;
    for oy in 0..g.oh {
        let mut ox = 0;
        while ox + P <= g.ow {
            tile::<V, P>(g, pad, x, w, y, oy, ox);
            ox += P;
        }
        while ox < g.ow {
            tile::<V, 1>(g, pad, x, w, y, oy, ox);
            ox += 1;
        }
    }
    debug_assert_eq!(y.len(), g.oh * g.ow * filters);
}

/// `P` neighbouring output pixels of row `oy` from `ox` on. Each pixel's
/// sums take the taps in (ky, kx, channel) order whatever `P` is, so the
/// tiling never changes a result.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const V: usize, const P: usize>(
    g: &Geom,
    pad: &Padded,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    oy: usize,
    ox: usize,
) {
    use std::arch::x86_64::*;
    let filters = V * 8;
    let c = g.c;
    let xp = x.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); V]; P];
    for ky in 0..g.kh {
        let row = (oy * g.sh + ky * g.dh) * pad.w;
        for kx in 0..g.kw {
            let first = (row + ox * g.sw + kx * g.dw) * c;
            for ci in 0..c {
                let wr = w.as_ptr().add(((ky * g.kw + kx) * c + ci) * filters);
                for (p, sums) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xp.add(first + p * g.sw * c + ci));
                    for (j, a) in sums.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wr.add(j * 8)), *a);
                    }
                }
            }
        }
    }
    let out = y.as_mut_ptr().add((oy * g.ow + ox) * filters);
    for (p, sums) in acc.iter().enumerate() {
        for (j, a) in sums.iter().enumerate() {
            _mm256_storeu_ps(out.add(p * filters + j * 8), *a);
        }
    }
}

/// Samples whose kernel gradient one task sums before it is added to the
/// others, in order; fixed, so the sum does not depend on the threads.
const GRAD_SAMPLES: usize = 4;

/// The vector width a kernel gradient runs at. Every element of the
/// gradient is summed in the same order at either width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GradKernel {
    Avx512,
    Avx2,
}

/// The kernel for this layer on this CPU, if [`kernel_grad`] runs for it.
fn grad_kernel(g: &Geom, filters: usize, groups: usize) -> Option<GradKernel> {
    if groups != 1 || g.c >= 8 || filters > MAX_FILTERS || !filters.is_multiple_of(8) {
        return None;
    }
    if filters.is_multiple_of(16) && cpu_has_avx512() {
        Some(GradKernel::Avx512)
    } else if cpu_has_avx2_fma() {
        Some(GradKernel::Avx2)
    } else {
        None
    }
}

/// Whether [`kernel_grad`] runs for this layer on this CPU: the kernel
/// gradient of a thin input directly, with no column matrix (im2col wrote
/// 25 floats per pixel of the first layer to reduce over them once).
pub(crate) fn grad_applies(g: &Geom, filters: usize, groups: usize) -> bool {
    grad_kernel(g, filters, groups).is_some()
}

fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Adds the kernel gradient, `dw[tap][f] += x[pixel + tap] * dy[pixel][f]`
/// summed over every output pixel of every sample; callers check
/// [`grad_applies`] first. Each task sums [`GRAD_SAMPLES`] samples, pixel
/// by pixel in order, and the tasks' sums are added in sample order.
pub(crate) fn kernel_grad(g: &Geom, x: &[f32], dy: &[f32], filters: usize, dw: &mut [f32]) {
    let kernel = grad_kernel(g, filters, 1).expect("direct kernel gradient on an unfit layer");
    kernel_grad_with(kernel, g, x, dy, filters, dw);
}

fn kernel_grad_with(
    kernel: GradKernel,
    g: &Geom,
    x: &[f32],
    dy: &[f32],
    filters: usize,
    dw: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        use rayon::prelude::*;
        let per_in = g.h * g.w * g.c;
        let per_out = g.oh * g.ow * filters;
        let n = dy.len() / per_out.max(1);
        assert_eq!(x.len(), n * per_in, "input size");
        let kd = g.kh * g.kw * g.c;
        assert_eq!(dw.len(), kd * filters, "kernel size");
        let pad = Padded::new(g);
        let mut taps = Vec::with_capacity(kd);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                for ci in 0..g.c {
                    taps.push((ky * g.dh * pad.w + kx * g.dw) * g.c + ci);
                }
            }
        }
        let parts: Vec<Vec<f32>> = x
            .par_chunks(GRAD_SAMPLES * per_in)
            .zip(dy.par_chunks(GRAD_SAMPLES * per_out))
            .map(|(xg, dyg)| {
                let mut part = vec![0.0f32; kd * filters];
                // Only the interior is written: the padding stays zero.
                let mut buf = vec![0.0f32; pad.h * pad.w * g.c];
                for (xs, dys) in xg.chunks_exact(per_in).zip(dyg.chunks_exact(per_out)) {
                    pad.fill(g, xs, &mut buf);
                    // SAFETY: grad_kernel() checked the CPU's features for
                    // this kernel (tests call only what the CPU has); every
                    // window of every output pixel lies inside the padded
                    // sample, and the sizes above bound the rest.
                    unsafe {
                        match kernel {
                            GradKernel::Avx512 => {
                                sample_grad_512(g, &pad, &buf, &taps, dys, filters, &mut part)
                            }
                            GradKernel::Avx2 => {
                                sample_grad_256(g, &pad, &buf, &taps, dys, filters, &mut part)
                            }
                        }
                    };
                }
                part
            })
            .collect();
        for p in &parts {
            dw.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernel, g, x, dy, filters, dw);
        unreachable!("grad_kernel() is None off x86-64");
    }
}

/// One sample's kernel gradient added into `part` on AVX2: two vectors of
/// eight filters by six taps a pass (twelve sums, two gradient vectors and
/// the broadcast input in the 16 registers), one vector by twelve taps
/// where one vector of filters is left.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sample_grad_256(
    g: &Geom,
    pad: &Padded,
    x: &[f32],
    taps: &[usize],
    dy: &[f32],
    filters: usize,
    part: &mut [f32],
) {
    use std::arch::x86_64::__m256;
    let mut f0 = 0;
    while f0 < filters {
        if f0 + 16 <= filters {
            grad_passes::<__m256, 2, 6>(g, pad, x, taps, dy, filters, f0, part);
            f0 += 16;
        } else {
            grad_passes::<__m256, 1, 12>(g, pad, x, taps, dy, filters, f0, part);
            f0 += 8;
        }
    }
}

/// One sample's kernel gradient added into `part` on AVX-512: `T` taps by
/// `V` vectors of sixteen filters a pass over the pixels, all sums in
/// registers (at most 16 of the 32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sample_grad_512(
    g: &Geom,
    pad: &Padded,
    x: &[f32],
    taps: &[usize],
    dy: &[f32],
    filters: usize,
    part: &mut [f32],
) {
    use std::arch::x86_64::__m512;
    match filters / 16 {
        1 => grad_passes::<__m512, 1, 16>(g, pad, x, taps, dy, filters, 0, part),
        2 => grad_passes::<__m512, 2, 8>(g, pad, x, taps, dy, filters, 0, part),
        3 => grad_passes::<__m512, 3, 5>(g, pad, x, taps, dy, filters, 0, part),
        _ => grad_passes::<__m512, 4, 4>(g, pad, x, taps, dy, filters, 0, part),
    }
}

/// A vector of [`Lanes::N`] floats as the kernel gradient uses it. Every
/// method is inlined into the `target_feature` function that calls the
/// passes, so each width compiles to its own instructions.
#[cfg(target_arch = "x86_64")]
trait Lanes: Copy {
    const N: usize;
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn splat(v: f32) -> Self;
    /// `a * b + c`, rounded once.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    /// Adds the lanes into the `N` floats at `p`.
    unsafe fn add_to(self, p: *mut f32);
}

#[cfg(target_arch = "x86_64")]
impl Lanes for std::arch::x86_64::__m256 {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        std::arch::x86_64::_mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        std::arch::x86_64::_mm256_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        std::arch::x86_64::_mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add_to(self, p: *mut f32) {
        use std::arch::x86_64::*;
        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), self));
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for std::arch::x86_64::__m512 {
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        std::arch::x86_64::_mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        std::arch::x86_64::_mm512_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        std::arch::x86_64::_mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add_to(self, p: *mut f32) {
        use std::arch::x86_64::*;
        _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), self));
    }
}

/// The taps `T` at a time, then the leftover taps one a pass, for the `V`
/// vectors of filters from `f0`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn grad_passes<L: Lanes, const V: usize, const T: usize>(
    g: &Geom,
    pad: &Padded,
    x: &[f32],
    taps: &[usize],
    dy: &[f32],
    filters: usize,
    f0: usize,
    part: &mut [f32],
) {
    let mut t0 = 0;
    while t0 + T <= taps.len() {
        let (t, p) = (&taps[t0..t0 + T], &mut part[t0 * filters..]);
        grad_pass::<L, V, T>(g, pad, x, t, dy, filters, f0, p);
        t0 += T;
    }
    while t0 < taps.len() {
        let (t, p) = (&taps[t0..t0 + 1], &mut part[t0 * filters..]);
        grad_pass::<L, V, 1>(g, pad, x, t, dy, filters, f0, p);
        t0 += 1;
    }
}

/// `T` taps' sums for the `V` vectors of filters from `f0`, over every
/// output pixel in order, added into `part` (rows of `filters` per tap).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn grad_pass<L: Lanes, const V: usize, const T: usize>(
    g: &Geom,
    pad: &Padded,
    x: &[f32],
    taps: &[usize],
    dy: &[f32],
    filters: usize,
    f0: usize,
    part: &mut [f32],
) {
    debug_assert!(taps.len() == T && part.len() >= (T - 1) * filters + f0 + V * L::N);
    let (xp, dp) = (x.as_ptr(), dy.as_ptr());
    let mut acc = [[L::zero(); V]; T];
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let base = (oy * g.sh * pad.w + ox * g.sw) * g.c;
            let d = dp.add((oy * g.ow + ox) * filters + f0);
            let mut dv = [L::zero(); V];
            for (j, v) in dv.iter_mut().enumerate() {
                *v = L::load(d.add(j * L::N));
            }
            for (t, sums) in acc.iter_mut().enumerate() {
                let xv = L::splat(*xp.add(base + taps[t]));
                for (a, v) in sums.iter_mut().zip(&dv) {
                    *a = L::fma(xv, *v, *a);
                }
            }
        }
    }
    for (t, sums) in acc.iter().enumerate() {
        for (j, a) in sums.iter().enumerate() {
            a.add_to(part.as_mut_ptr().add(t * filters + f0 + j * L::N));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::conv::{Geom, Pad};
    use super::super::Padding;
    use super::*;

    /// The definition, one multiply-add at a time.
    fn naive(g: &Geom, x: &[f32], w: &[f32], filters: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; g.oh * g.ow * filters];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                for f in 0..filters {
                    let mut acc = 0.0f64;
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            if let Some(p) = g.src(oy, ox, ky, kx) {
                                for ci in 0..g.c {
                                    let wi = ((ky * g.kw + kx) * g.c + ci) * filters + f;
                                    acc += f64::from(x[p * g.c + ci]) * f64::from(w[wi]);
                                }
                            }
                        }
                    }
                    y[(oy * g.ow + ox) * filters + f] = acc as f32;
                }
            }
        }
        y
    }

    /// The kernel gradient against the im2col path's, for the first
    /// layers' shapes with strides, dilation and padding.
    #[test]
    fn kernel_gradient_matches_the_im2col_path() {
        let mut rnd = crate::nn::rng::test_values(2);
        for (hwc, k, s, d, pad, filters, n) in [
            ([28, 28, 1], [5, 5], [1, 1], [1, 1], Padding::Same, 32, 9),
            ([32, 32, 3], [3, 3], [2, 2], [1, 1], Padding::Same, 16, 2),
            ([9, 11, 3], [3, 2], [1, 2], [2, 1], Padding::Valid, 48, 5),
            ([7, 7, 2], [7, 7], [1, 1], [1, 1], Padding::Same, 64, 3),
            ([12, 10, 1], [5, 5], [1, 1], [1, 1], Padding::Same, 24, 6),
        ] {
            let g = Geom::new(hwc, k, s, d, Pad::Keras(pad)).unwrap();
            if !grad_applies(&g, filters, 1) {
                assert!(!cpu_has_avx2_fma(), "{hwc:?} {k:?} should run directly");
                continue;
            }
            let x: Vec<f32> = (0..n * g.per_in()).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..g.kh * g.kw * g.c * filters).map(|_| rnd()).collect();
            let dy: Vec<f32> = (0..n * g.oh * g.ow * filters).map(|_| rnd()).collect();
            let mut dw = vec![0.5f32; w.len()];
            kernel_grad(&g, &x, &dy, filters, &mut dw);
            let mut want = vec![0.5f32; w.len()];
            g.conv_backward_im2col(&x, &w, filters, 1, &dy, Some(&mut want), false);
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in dw.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{hwc:?} {k:?} at {i}: {a} vs {b}"
                );
            }
        }
    }

    /// Each element is summed in the same order at either vector width, so
    /// an AVX-512 machine and an AVX2 one train to the same bits.
    #[test]
    fn both_vector_widths_give_the_same_bits() {
        if !cpu_has_avx512() || !cpu_has_avx2_fma() {
            return;
        }
        let mut rnd = crate::nn::rng::test_values(3);
        for (hwc, k, filters, n) in [([28, 28, 1], [5, 5], 32, 7), ([9, 11, 3], [3, 2], 48, 5)] {
            let g = Geom::new(hwc, k, [1, 1], [1, 1], Pad::Keras(Padding::Same)).unwrap();
            let x: Vec<f32> = (0..n * g.per_in()).map(|_| rnd()).collect();
            let dy: Vec<f32> = (0..n * g.oh * g.ow * filters).map(|_| rnd()).collect();
            let kd = g.kh * g.kw * g.c;
            let mut wide = vec![0.25f32; kd * filters];
            let mut narrow = wide.clone();
            kernel_grad_with(GradKernel::Avx512, &g, &x, &dy, filters, &mut wide);
            kernel_grad_with(GradKernel::Avx2, &g, &x, &dy, filters, &mut narrow);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&wide), bits(&narrow), "{hwc:?} {k:?}");
        }
    }

    #[test]
    fn matches_the_definition_with_strides_dilation_and_padding() {
        if !cpu_has_avx2_fma() {
            return;
        }
        let mut rnd = crate::nn::rng::test_values(1);
        for (hwc, k, s, d, pad, filters) in [
            ([28, 28, 1], [5, 5], [1, 1], [1, 1], Padding::Same, 32),
            ([32, 32, 3], [3, 3], [2, 2], [1, 1], Padding::Same, 16),
            ([9, 11, 3], [3, 2], [1, 2], [2, 1], Padding::Valid, 8),
            ([7, 7, 2], [7, 7], [1, 1], [1, 1], Padding::Same, 64),
        ] {
            let g = Geom::new(hwc, k, s, d, Pad::Keras(pad)).unwrap();
            assert!(applies(&g, filters, 1));
            let x: Vec<f32> = (0..2 * g.h * g.w * g.c).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..g.kh * g.kw * g.c * filters).map(|_| rnd()).collect();
            let mut y = vec![0.0f32; 2 * g.oh * g.ow * filters];
            conv(&g, &x, &w, filters, &mut y);
            let per_in = g.h * g.w * g.c;
            let mut want = naive(&g, &x[..per_in], &w, filters);
            want.extend(naive(&g, &x[per_in..], &w, filters));
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5, "{hwc:?} {k:?}: {a} vs {b}");
            }
        }
        let thick = Geom::new(
            [8, 8, 16],
            [3, 3],
            [1, 1],
            [1, 1],
            Pad::Keras(Padding::Same),
        );
        assert!(
            !applies(&thick.unwrap(), 32, 1),
            "16 channels go to the GEMM"
        );
    }
}
