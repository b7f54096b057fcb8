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
        for (xs, ys) in x.chunks_exact(per_in).zip(y.chunks_exact_mut(per_out)) {
            // SAFETY: applies() checked AVX2 and FMA on this CPU, and the
            // sizes above bound every index the kernel computes.
            unsafe { sample_avx2(g, xs, w, filters, ys) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (g, x, w, filters, y);
        unreachable!("applies() is false off x86-64");
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sample_avx2(g: &Geom, x: &[f32], w: &[f32], filters: usize, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let vecs = filters / 8;
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let mut acc = [_mm256_setzero_ps(); MAX_FILTERS / 8];
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let Some(p) = g.src(oy, ox, ky, kx) else {
                        continue;
                    };
                    for ci in 0..g.c {
                        let xv = _mm256_set1_ps(x[p * g.c + ci]);
                        let row = &w[((ky * g.kw + kx) * g.c + ci) * filters..][..filters];
                        for (j, a) in acc.iter_mut().enumerate().take(vecs) {
                            let wv = _mm256_loadu_ps(row.as_ptr().add(j * 8));
                            *a = _mm256_fmadd_ps(xv, wv, *a);
                        }
                    }
                }
            }
            let out = &mut y[(oy * g.ow + ox) * filters..][..filters];
            for (j, a) in acc.iter().enumerate().take(vecs) {
                _mm256_storeu_ps(out.as_mut_ptr().add(j * 8), *a);
            }
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

    #[test]
    fn matches_the_definition_with_strides_dilation_and_padding() {
        if !cpu_has_avx2_fma() {
            return;
        }
        let mut seed = 1u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
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
