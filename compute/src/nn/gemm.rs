//! Matrix multiply on top of matrixmultiply's single-threaded kernels, split
//! into blocks of output rows or columns that rayon runs in parallel.
//!
//! Why not matrixmultiply's own threading: the split here depends only on the
//! matrix shapes, and each output element is still one sequential dot product
//! inside the kernel, so results are bit-identical for any thread count. That
//! is what lets "same seed + same data => same model" hold across machines
//! with different core counts.

use rayon::prelude::*;

/// A read-only matrix with arbitrary strides: element (i, j) is at
/// `data[i * rs + j * cs]`. Transposing is swapping the strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn rows_t(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }

    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: every task writes a disjoint set of C's elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Work below which splitting costs more than it gains (multiply-adds).
const MIN_TASK_WORK: usize = 1 << 24;
const MAX_TASKS: usize = 8;

/// `C = A * B` (or `C += A * B` when `accumulate`), with `C` row-major
/// `m x n` and contiguous.
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    c: &mut [f32],
    accumulate: bool,
) {
    gemm_impl(m, k, n, a, b, c, accumulate, true)
}

/// [`gemm`] on the calling thread only, for callers that are already
/// running in parallel.
pub(crate) fn gemm_serial(
    m: usize,
    k: usize,
    n: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    c: &mut [f32],
    accumulate: bool,
) {
    gemm_impl(m, k, n, a, b, c, accumulate, false)
}

#[allow(clippy::too_many_arguments)]
fn gemm_impl(
    m: usize,
    k: usize,
    n: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    assert_eq!(c.len(), m * n, "output size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    a.check(m, k);
    b.check(k, n);
    let beta = if accumulate { 1.0 } else { 0.0 };
    let tasks = if parallel {
        (m * n * k / MIN_TASK_WORK).clamp(1, MAX_TASKS)
    } else {
        1
    };
    // SAFETY (all calls below): the views were bounds-checked above and each
    // call covers a sub-block of them; C blocks are disjoint.
    if tasks == 1 {
        unsafe {
            call(
                m,
                k,
                n,
                a.data.as_ptr(),
                a,
                b.data.as_ptr(),
                b,
                beta,
                c.as_mut_ptr(),
                n,
            )
        };
        return;
    }
    if m >= n {
        let block = m.div_ceil(tasks).next_multiple_of(16);
        c.par_chunks_mut(block * n)
            .enumerate()
            .for_each(|(bi, cb)| {
                let rows = cb.len() / n;
                let ap = a.data[bi * block * a.rs..].as_ptr();
                unsafe {
                    call(
                        rows,
                        k,
                        n,
                        ap,
                        a,
                        b.data.as_ptr(),
                        b,
                        beta,
                        cb.as_mut_ptr(),
                        n,
                    )
                };
            });
    } else {
        let block = n.div_ceil(tasks).next_multiple_of(16);
        let blocks = n.div_ceil(block);
        let cp = SendPtr(c.as_mut_ptr());
        let cp = &cp;
        (0..blocks).into_par_iter().for_each(|bj| {
            let j0 = bj * block;
            let cols = block.min(n - j0);
            let bp = b.data[j0 * b.cs..].as_ptr();
            unsafe { call(m, k, cols, a.data.as_ptr(), a, bp, b, beta, cp.0.add(j0), n) };
        });
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn call(
    m: usize,
    k: usize,
    n: usize,
    ap: *const f32,
    a: Mat<'_>,
    bp: *const f32,
    b: Mat<'_>,
    beta: f32,
    cp: *mut f32,
    ldc: usize,
) {
    matrixmultiply::sgemm(
        m,
        k,
        n,
        1.0,
        ap,
        a.rs as isize,
        a.cs as isize,
        bp,
        b.rs as isize,
        b.cs as isize,
        beta,
        cp,
        ldc as isize,
        1,
    );
}
