//! Matrix multiply on top of the `gemm` crate's single-threaded kernels
//! (chosen at run time for the CPU: AVX-512, AVX2+FMA, NEON, or scalar),
//! split into blocks of output rows or columns that rayon runs in parallel. docs/performance.md has the measurements that chose it
//! over matrixmultiply and OpenBLAS.
//!
//! Why not the library's own threading: the split here depends only on the
//! matrix shapes, never on the number of threads, and each block's dot
//! products run inside one kernel call, so results are bit-identical for any
//! thread count. That is what lets "same seed + same data => same model"
//! hold on machines with different core counts.

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

/// Work below which splitting costs more than it gains (multiply-adds).
const MIN_TASK_WORK: usize = 1 << 24;
/// Fewest output rows (or columns) per task: each task packs the other
/// operand again, which a thinner block would not repay.
const MIN_BLOCK: usize = 128;

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
        // As many tasks as the work repays, so a machine with many cores
        // uses them all; the split still follows the shapes alone.
        (m * n * k / MIN_TASK_WORK).min(m.max(n) / MIN_BLOCK).max(1)
    } else {
        1
    };
    if transposed_output_is_cheaper(m, n, a, b) {
        // Column j of C is row j of `t`, every value of which the first
        // block of the product writes (there is none when k is 0).
        let mut t = match k {
            0 => super::buffers::zeroed(m * n),
            _ => super::buffers::overwritten(m * n),
        };
        let out = Out {
            ptr: t.as_mut_ptr(),
            rs: 1,
            cs: m,
        };
        // SAFETY: the views were bounds-checked above; `out` covers `t`.
        unsafe { split(m, k, n, a, b, 0.0, tasks, out) };
        c.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            let col = t[i..].iter().step_by(m);
            if accumulate {
                row.iter_mut().zip(col).for_each(|(c, t)| *c += t);
            } else {
                row.iter_mut().zip(col).for_each(|(c, t)| *c = *t);
            }
        });
        super::buffers::hand_back(t);
        return;
    }
    // SAFETY: the views were bounds-checked above; `out` covers `c`.
    unsafe { split(m, k, n, a, b, beta, tasks, Out::rows(c.as_mut_ptr(), n)) };
}

/// Where a kernel call writes: element (i, j) at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    rs: usize,
    cs: usize,
}

// SAFETY: the tasks sharing an `Out` write disjoint blocks of it.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn rows(ptr: *mut f32, ld: usize) -> Out {
        Out { ptr, rs: ld, cs: 1 }
    }

    /// The block from element (i, j) on.
    unsafe fn at(self, i: usize, j: usize) -> Out {
        Out {
            ptr: self.ptr.add(i * self.rs + j * self.cs),
            ..self
        }
    }
}

/// `tasks` kernel calls on blocks of C's rows (when C is tall) or columns,
/// in parallel; one call on the calling thread when `tasks` is 1.
///
/// # Safety
/// The views must hold `m x k` and `k x n` elements and `out` must address
/// `m x n` writable ones, apart from both.
#[allow(clippy::too_many_arguments)]
unsafe fn split(
    m: usize,
    k: usize,
    n: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
    tasks: usize,
    out: Out,
) {
    if tasks == 1 {
        return call(m, k, n, a.data.as_ptr(), a, b.data.as_ptr(), b, beta, out);
    }
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let block = len.div_ceil(tasks).next_multiple_of(16);
    (0..len.div_ceil(block)).into_par_iter().for_each(|bi| {
        let first = bi * block;
        let size = block.min(len - first);
        // SAFETY: each block is a disjoint part of the caller's views.
        unsafe {
            if by_rows {
                let ap = a.data[first * a.rs..].as_ptr();
                call(
                    size,
                    k,
                    n,
                    ap,
                    a,
                    b.data.as_ptr(),
                    b,
                    beta,
                    out.at(first, 0),
                );
            } else {
                let bp = b.data[first * b.cs..].as_ptr();
                call(
                    m,
                    k,
                    size,
                    a.data.as_ptr(),
                    a,
                    bp,
                    b,
                    beta,
                    out.at(0, first),
                );
            }
        }
    });
}

/// The kernels read their left operand fastest when it is stored by
/// columns, and turn a row-major product around (C' = B'A') to get there.
/// When B is stored by columns (a weight matrix used transposed, as in a
/// dense layer's input gradient) and A is stored by rows, one of the two
/// must be gathered across its stride while it is packed. Gathering the
/// smaller one pays: when A has far fewer rows than B has columns, write
/// C by columns into a scratch matrix, so that A is the one gathered, and
/// transpose C into place after. For a dense layer's input gradient at
/// batch 100 (100 x 512 x 3136) that halves the time.
fn transposed_output_is_cheaper(m: usize, n: usize, a: Mat<'_>, b: Mat<'_>) -> bool {
    b.rs == 1 && b.cs != 1 && a.cs == 1 && m * 4 <= n && m * n >= 1 << 16
}

/// Longest stretch of the inner dimension one kernel call sums. The `gemm`
/// crate cuts longer ones into blocks sized from the CPU's L1 cache (512 on
/// a 32 KiB 8-way L1, 1,024 on a 48 KiB 12-way one), so the order of the
/// additions, and the low bits of every result, would follow the machine.
/// Cutting them here, the way it cuts for 512, gives the same bits on any
/// CPU with the same kernels: same seed, same data, same model anywhere.
const K_BLOCK: usize = 512;

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
    out: Out,
) {
    let blocks = k.div_ceil(K_BLOCK);
    let kc = k.div_ceil(blocks);
    let mut k0 = 0;
    while k0 < k {
        let len = kc.min(k - k0);
        // dst = alpha * dst + beta * lhs * rhs, reading dst to accumulate
        // (asked for, or a block after the first).
        gemm::gemm(
            m,
            n,
            len,
            out.ptr,
            out.cs as isize,
            out.rs as isize,
            beta != 0.0 || k0 > 0,
            ap.add(k0 * a.cs),
            a.cs as isize,
            a.rs as isize,
            bp.add(k0 * b.rs),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
        k0 += len;
    }
}

/// The SIMD instructions the GEMM kernels use on this CPU.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
        if std::arch::is_x86_feature_detected!("avx") {
            return "avx";
        }
        "sse2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// The machine's single-precision GEMM rate in GFLOP/s, as this module runs
/// it on every core: the best of several 1024-cubed products (about half a
/// second in all). The ceiling a training step's GFLOP/s is judged against.
pub fn sgemm_ceiling_gflops() -> f64 {
    product_gflops(1024, true, 4, 0.5)
}

/// A quick estimate of [`sgemm_ceiling_gflops`] that leaves the machine
/// to others: one core's rate on a 384-cubed product (the best of a few,
/// some 20 ms of one core in all) times the cores this process may use.
/// Datanodes measure it when they start and report it in their heartbeats,
/// for the planner to weigh each node's speed.
pub fn quick_sgemm_gflops() -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    product_gflops(384, false, 8, 0.0) * cores as f64
}

/// GFLOP/s of the fastest of at least `runs` n-cubed products taking at
/// least `secs` in all, on every core (`parallel`) or on this thread.
fn product_gflops(n: usize, parallel: bool, runs: usize, secs: f64) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.01).collect();
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::INFINITY;
    let start = std::time::Instant::now();
    for i in 1.. {
        let t = std::time::Instant::now();
        gemm_impl(
            n,
            n,
            n,
            Mat::rows(&a, n),
            Mat::rows(&b, n),
            &mut c,
            false,
            parallel,
        );
        best = best.min(t.elapsed().as_secs_f64());
        if i >= runs && start.elapsed().as_secs_f64() >= secs {
            break;
        }
    }
    2.0 * (n * n * n) as f64 / best.max(1e-9) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: Mat<'_>, b: Mat<'_>) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| {
                        f64::from(a.data[i * a.rs + p * a.cs])
                            * f64::from(b.data[p * b.rs + j * b.cs])
                    })
                    .sum();
            }
        }
        c
    }

    /// Every path (one call, split by rows, split by columns, written by
    /// columns and transposed) against the definition, storing and adding.
    #[test]
    fn every_layout_and_split_matches_the_definition() {
        let mut rnd = crate::nn::rng::test_values(7);
        // (m, k, n): small; tall (row split); wide with B by columns (the
        // transposed-output path); long inner dimension (K blocks).
        for (m, k, n) in [(3, 5, 4), (700, 90, 300), (48, 600, 1500), (20, 1300, 30)] {
            let av: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let bv: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let init: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            for (a, b) in [
                (Mat::rows(&av, k), Mat::rows(&bv, n)),
                (Mat::rows(&av, k), Mat::rows_t(&bv, k)),
                (Mat::rows_t(&av, m), Mat::rows(&bv, n)),
                (Mat::rows_t(&av, m), Mat::rows_t(&bv, k)),
            ] {
                let want = naive(m, k, n, a, b);
                for accumulate in [false, true] {
                    let mut c = init.clone();
                    gemm(m, k, n, a, b, &mut c, accumulate);
                    for (i, (got, want)) in c.iter().zip(&want).enumerate() {
                        let want = want + if accumulate { f64::from(init[i]) } else { 0.0 };
                        let tol = 1e-5 * (k as f64).sqrt() * 4.0;
                        assert!(
                            (f64::from(*got) - want).abs() <= tol,
                            "{m}x{k}x{n} a({},{}) b({},{}) acc {accumulate} at {i}: {got} vs {want}",
                            a.rs, a.cs, b.rs, b.cs
                        );
                    }
                }
            }
        }
    }
}
