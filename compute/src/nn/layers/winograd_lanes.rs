//! Winograd's transforms on x86 vectors: the whole `P x P` grid of a run of
//! lanes (one vector wide) is computed in registers, so each input vector
//! is read once per output row and each output written once. The plain
//! loop in `winograd::sandwich_any` streams its intermediate rows through
//! L1 at every term instead, and that made the transforms a sixth of the
//! seed CNN's step.
//!
//! The arithmetic is the plain loop's, lane by lane: a product, then sums
//! in index order, zero entries of the matrix skipped, multiply and add
//! apart (never fused), so both give the same bits. (Skipping the
//! multiply where an entry is 1 or -1 would keep the bits too, but the
//! tests it takes per vector cost more than the multiplies.)

use std::arch::x86_64::*;

/// Defines `$name`: the matrix `l` (`p x q`, row-major) applied as
/// `Y = L X L'` to the first lanes of a grid of vectors (see
/// `winograd::sandwich`), a whole number of `$w`-lane vectors of them;
/// it returns how many lanes it did (none for a shape it does not know).
macro_rules! lanes {
    ($name:ident, $grids:ident, $feature:literal, $w:literal, $v:ty,
     $zero:ident, $set1:ident, $load:ident, $store:ident, $add:ident, $mul:ident) => {
        /// # Safety
        #[doc = concat!("The CPU must have ", $feature, ".")]
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn $name(
            (l, p, q): (&[f32], usize, usize),
            x: (&[f32], usize),
            y: (&mut [f32], usize),
            len: usize,
            add: bool,
        ) -> usize {
            let whole = len - len % $w;
            match (p, q) {
                (6, 6) => $grids::<6, 6>(l, x, y, whole, add),
                (6, 5) => $grids::<6, 5>(l, x, y, whole, add),
                (5, 6) => $grids::<5, 6>(l, x, y, whole, add),
                (6, 2) => $grids::<6, 2>(l, x, y, whole, add),
                (2, 6) => $grids::<2, 6>(l, x, y, whole, add),
                (4, 4) => $grids::<4, 4>(l, x, y, whole, add),
                (4, 3) => $grids::<4, 3>(l, x, y, whole, add),
                (3, 4) => $grids::<3, 4>(l, x, y, whole, add),
                (4, 2) => $grids::<4, 2>(l, x, y, whole, add),
                (2, 4) => $grids::<2, 4>(l, x, y, whole, add),
                _ => return 0,
            }
            whole
        }

        #[inline]
        #[target_feature(enable = $feature)]
        fn $grids<const P: usize, const Q: usize>(
            l: &[f32],
            (x, xs): (&[f32], usize),
            (y, ys): (&mut [f32], usize),
            whole: usize,
            add: bool,
        ) {
            let l = &l[..P * Q];
            for lo in (0..whole).step_by($w) {
                for i in 0..P {
                    let mut t = [$zero(); Q];
                    let mut started = false;
                    for k in 0..Q {
                        let b = l[i * Q + k];
                        if b == 0.0 {
                            continue;
                        }
                        for (j, tj) in t.iter_mut().enumerate() {
                            let src = &x[(k * Q + j) * xs + lo..][..$w];
                            // SAFETY: `src` holds a vector's floats;
                            // unaligned loads are allowed.
                            let v = unsafe { $load(src.as_ptr()) };
                            let v = $mul($set1(b), v);
                            *tj = if started { $add(*tj, v) } else { v };
                        }
                        started = true;
                    }
                    // The outputs of the row side by side, each summing in
                    // index order, so their additions do not wait on one
                    // another.
                    let mut acc = [$zero(); P];
                    let mut started = [add; P];
                    if add {
                        for (jj, a) in acc.iter_mut().enumerate() {
                            let dst = &y[(i * P + jj) * ys + lo..][..$w];
                            // SAFETY: `dst` holds a vector's floats.
                            *a = unsafe { $load(dst.as_ptr()) };
                        }
                    }
                    for (j, tj) in t.iter().enumerate() {
                        for jj in 0..P {
                            let b = l[jj * Q + j];
                            if b == 0.0 {
                                continue;
                            }
                            let v = $mul($set1(b), *tj);
                            acc[jj] = if started[jj] { $add(acc[jj], v) } else { v };
                            started[jj] = true;
                        }
                    }
                    for (jj, a) in acc.iter().enumerate() {
                        let dst = &mut y[(i * P + jj) * ys + lo..][..$w];
                        // SAFETY: `dst` holds a vector's floats.
                        unsafe { $store(dst.as_mut_ptr(), *a) };
                    }
                }
            }
        }
    };
}

lanes!(
    sandwich_512,
    grids_512,
    "avx512f",
    16,
    __m512,
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_add_ps,
    _mm512_mul_ps
);
lanes!(
    sandwich_256,
    grids_256,
    "avx",
    8,
    __m256,
    _mm256_setzero_ps,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_add_ps,
    _mm256_mul_ps
);
