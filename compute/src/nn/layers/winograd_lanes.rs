//! Winograd's transforms on x86 vectors: the whole `P x P` grid of a run of
//! lanes (one vector wide) is computed in registers, so each input vector
//! is read once per output row and each output written once. The plain
//! loop in `winograd::sandwich_any` streams its intermediate rows through
//! L1 at every term instead, and that made the transforms a sixth of the
//! seed CNN's step.
//!
//! The arithmetic is the plain loop's, lane by lane: a product, then sums
//! in index order, zero entries of the matrix skipped, multiply and add
//! apart (never fused), so both give the same bits.

use std::arch::x86_64::*;

/// The matrix `l` (`p x q`, row-major) applied as `Y = L X L'` to the first
/// lanes of a grid of vectors (see `winograd::sandwich`), a whole number
/// of AVX-512 vectors of them; returns how many lanes it did (none for a
/// shape it does not know).
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn sandwich_512(
    (l, p, q): (&[f32], usize, usize),
    x: (&[f32], usize),
    y: (&mut [f32], usize),
    len: usize,
    add: bool,
) -> usize {
    let whole = len - len % 16;
    match (p, q) {
        (6, 6) => grids_512::<6, 6>(l, x, y, whole, add),
        (6, 5) => grids_512::<6, 5>(l, x, y, whole, add),
        (5, 6) => grids_512::<5, 6>(l, x, y, whole, add),
        (6, 2) => grids_512::<6, 2>(l, x, y, whole, add),
        (2, 6) => grids_512::<2, 6>(l, x, y, whole, add),
        (4, 4) => grids_512::<4, 4>(l, x, y, whole, add),
        (4, 3) => grids_512::<4, 3>(l, x, y, whole, add),
        (3, 4) => grids_512::<3, 4>(l, x, y, whole, add),
        (4, 2) => grids_512::<4, 2>(l, x, y, whole, add),
        (2, 4) => grids_512::<2, 4>(l, x, y, whole, add),
        _ => return 0,
    }
    whole
}

/// [`sandwich_512`] with AVX vectors of 8 lanes.
///
/// # Safety
/// The CPU must have AVX.
#[target_feature(enable = "avx")]
pub(super) unsafe fn sandwich_256(
    (l, p, q): (&[f32], usize, usize),
    x: (&[f32], usize),
    y: (&mut [f32], usize),
    len: usize,
    add: bool,
) -> usize {
    let whole = len - len % 8;
    match (p, q) {
        (6, 6) => grids_256::<6, 6>(l, x, y, whole, add),
        (6, 5) => grids_256::<6, 5>(l, x, y, whole, add),
        (5, 6) => grids_256::<5, 6>(l, x, y, whole, add),
        (6, 2) => grids_256::<6, 2>(l, x, y, whole, add),
        (2, 6) => grids_256::<2, 6>(l, x, y, whole, add),
        (4, 4) => grids_256::<4, 4>(l, x, y, whole, add),
        (4, 3) => grids_256::<4, 3>(l, x, y, whole, add),
        (3, 4) => grids_256::<3, 4>(l, x, y, whole, add),
        (4, 2) => grids_256::<4, 2>(l, x, y, whole, add),
        (2, 4) => grids_256::<2, 4>(l, x, y, whole, add),
        _ => return 0,
    }
    whole
}

#[inline]
#[target_feature(enable = "avx512f")]
fn grids_512<const P: usize, const Q: usize>(
    l: &[f32],
    (x, xs): (&[f32], usize),
    (y, ys): (&mut [f32], usize),
    whole: usize,
    add: bool,
) {
    let l = &l[..P * Q];
    for lo in (0..whole).step_by(16) {
        for i in 0..P {
            let mut t = [_mm512_setzero_ps(); Q];
            let mut first = true;
            for k in 0..Q {
                let b = l[i * Q + k];
                if b == 0.0 {
                    continue;
                }
                let b = _mm512_set1_ps(b);
                for (j, tj) in t.iter_mut().enumerate() {
                    let src = &x[(k * Q + j) * xs + lo..][..16];
                    // SAFETY: `src` holds 16 floats; unaligned loads are allowed.
                    let v = _mm512_mul_ps(b, unsafe { _mm512_loadu_ps(src.as_ptr()) });
                    *tj = if first { v } else { _mm512_add_ps(*tj, v) };
                }
                first = false;
            }
            // The outputs of the row side by side, each summing in index
            // order, so their additions do not wait on one another.
            let mut acc = [_mm512_setzero_ps(); P];
            let mut first = [!add; P];
            if add {
                for (jj, a) in acc.iter_mut().enumerate() {
                    let dst = &y[(i * P + jj) * ys + lo..][..16];
                    // SAFETY: `dst` holds 16 floats.
                    *a = unsafe { _mm512_loadu_ps(dst.as_ptr()) };
                }
            }
            for (j, tj) in t.iter().enumerate() {
                for jj in 0..P {
                    let b = l[jj * Q + j];
                    if b == 0.0 {
                        continue;
                    }
                    let v = _mm512_mul_ps(_mm512_set1_ps(b), *tj);
                    acc[jj] = if first[jj] {
                        v
                    } else {
                        _mm512_add_ps(acc[jj], v)
                    };
                    first[jj] = false;
                }
            }
            for (jj, a) in acc.iter().enumerate() {
                let dst = &mut y[(i * P + jj) * ys + lo..][..16];
                // SAFETY: `dst` holds 16 floats.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), *a) };
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx")]
fn grids_256<const P: usize, const Q: usize>(
    l: &[f32],
    (x, xs): (&[f32], usize),
    (y, ys): (&mut [f32], usize),
    whole: usize,
    add: bool,
) {
    let l = &l[..P * Q];
    for lo in (0..whole).step_by(8) {
        for i in 0..P {
            let mut t = [_mm256_setzero_ps(); Q];
            let mut first = true;
            for k in 0..Q {
                let b = l[i * Q + k];
                if b == 0.0 {
                    continue;
                }
                let b = _mm256_set1_ps(b);
                for (j, tj) in t.iter_mut().enumerate() {
                    let src = &x[(k * Q + j) * xs + lo..][..8];
                    // SAFETY: `src` holds 8 floats; unaligned loads are allowed.
                    let v = _mm256_mul_ps(b, unsafe { _mm256_loadu_ps(src.as_ptr()) });
                    *tj = if first { v } else { _mm256_add_ps(*tj, v) };
                }
                first = false;
            }
            // The outputs of the row side by side, each summing in index
            // order, so their additions do not wait on one another.
            let mut acc = [_mm256_setzero_ps(); P];
            let mut first = [!add; P];
            if add {
                for (jj, a) in acc.iter_mut().enumerate() {
                    let dst = &y[(i * P + jj) * ys + lo..][..8];
                    // SAFETY: `dst` holds 8 floats.
                    *a = unsafe { _mm256_loadu_ps(dst.as_ptr()) };
                }
            }
            for (j, tj) in t.iter().enumerate() {
                for jj in 0..P {
                    let b = l[jj * Q + j];
                    if b == 0.0 {
                        continue;
                    }
                    let v = _mm256_mul_ps(_mm256_set1_ps(b), *tj);
                    acc[jj] = if first[jj] {
                        v
                    } else {
                        _mm256_add_ps(acc[jj], v)
                    };
                    first[jj] = false;
                }
            }
            for (jj, a) in acc.iter().enumerate() {
                let dst = &mut y[(i * P + jj) * ys + lo..][..8];
                // SAFETY: `dst` holds 8 floats.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), *a) };
            }
        }
    }
}
