//! Timing of one training step (forward + backward + update) in-process.

use std::time::Instant;

use ndarray::{ArrayD, IxDyn};

use super::error::{NnError, Result};
use super::exec::DropoutRng;
use super::model::Model;
use super::optim::{Optimizer, Sgd};
use super::rng::SplitMix64;

/// What [`bench_train_step`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    pub batch_size: usize,
    pub iters: usize,
    pub threads: usize,
    pub seconds_per_step: f64,
    pub samples_per_sec: f64,
    /// Useful arithmetic rate of the multiplies (forward + backward), from
    /// the model's nominal FLOPs.
    pub gflops: f64,
    /// The SIMD instructions the kernels use.
    pub simd: &'static str,
    /// The machine's sgemm rate on the same threads, measured in the same
    /// run: what `gflops` is judged against.
    pub sgemm_ceiling_gflops: f64,
}

/// Times `iters` training steps at `batch_size` on random data after one
/// warm-up step, on `threads` threads (None: all cores).
pub fn bench_train_step(
    model: &Model,
    batch_size: usize,
    iters: usize,
    threads: Option<usize>,
) -> Result<BenchReport> {
    if batch_size == 0 || iters == 0 {
        return Err(NnError::Input(
            "batch size and iterations must be positive".into(),
        ));
    }
    let classes = match model.output_shape() {
        [c] => *c,
        s => {
            return Err(NnError::Model(format!(
                "benchmarking needs a (None, classes) output, the model gives {s:?}"
            )))
        }
    };
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        builder = builder.num_threads(t);
    }
    let pool = builder
        .build()
        .map_err(|e| NnError::Input(format!("cannot start {threads:?} threads: {e}")))?;
    let mut rng = SplitMix64::new(42);
    let mut dims = vec![batch_size];
    dims.extend_from_slice(model.input_shape());
    let n_in: usize = dims.iter().product();
    let x = ArrayD::from_shape_vec(IxDyn(&dims), (0..n_in).map(|_| rng.next_f32()).collect())
        .map_err(|e| NnError::Input(e.to_string()))?;
    let labels: Vec<u32> = (0..batch_size)
        .map(|_| (rng.next_u64() % classes as u64) as u32)
        .collect();
    let mut params = model.init_params(1);
    let mut opt = Optimizer::new(
        Sgd {
            lr: 0.01,
            momentum: 0.9,
            nesterov: true,
        },
        params.len(),
    );
    let inv = 1.0 / batch_size as f32;
    let mut step = |i: usize| -> Result<()> {
        let dropout = Some(DropoutRng {
            seed: i as u64,
            first_sample: 0,
        });
        let mut g = model.loss_and_grad_sum(&params, x.view(), &labels, dropout)?;
        g.grad.iter_mut().for_each(|v| *v *= inv);
        opt.step(params.as_mut_slice(), &g.grad)?;
        g.recycle();
        Ok(())
    };
    pool.install(|| -> Result<BenchReport> {
        step(0)?;
        let start = Instant::now();
        for i in 0..iters {
            step(i + 1)?;
        }
        let secs = start.elapsed().as_secs_f64() / iters as f64;
        let (_, train_flops) = model.flops_per_sample();
        let sgemm_ceiling_gflops = super::gemm::sgemm_ceiling_gflops();
        Ok(BenchReport {
            batch_size,
            iters,
            threads: rayon::current_num_threads(),
            seconds_per_step: secs,
            samples_per_sec: batch_size as f64 / secs,
            gflops: train_flops * batch_size as f64 / secs / 1e9,
            simd: super::gemm::simd_level(),
            sgemm_ceiling_gflops,
        })
    })
}
