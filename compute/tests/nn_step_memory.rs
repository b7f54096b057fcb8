//! A training step after the first allocates no large buffer: activations,
//! gradients and kernel scratch are kept from one step for the next, so
//! steady training neither zero-fills fresh memory nor faults it in from
//! the system (what the allocator's keep-freed-memory setting once hid).
//!
//! Its own test binary: the counting allocator sees every thread of the
//! process, so no other test may run beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ndarray::{ArrayD, IxDyn};
use quern_compute::nn::{DropoutRng, Model, Optimizer, Sgd, SplitMix64};

/// Allocations this large are what a step must not make: below it,
/// allocators serve requests from memory they keep.
const LARGE: usize = 256 << 10;
/// quern's buffers are vectors, aligned as their elements. The `gemm`
/// crate packs a product's right-hand side in a buffer it allocates per
/// call, cache-line aligned and sized from the CPU's caches (256 KiB on a
/// Zen 5 EPYC, less on a Zen 3): not the step's to keep, so not counted.
const VECTOR_ALIGN: usize = 16;
const SLOTS: usize = 64;

struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicUsize = AtomicUsize::new(0);
static SIZES: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

fn note(layout: Layout, size: usize) {
    if size >= LARGE && layout.align() <= VECTOR_ALIGN && ARMED.load(Ordering::Relaxed) {
        let i = COUNT.fetch_add(1, Ordering::Relaxed);
        if i < SLOTS {
            SIZES[i].store(size, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counting only touches atomics and allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout, layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout, layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            note(layout, new_size);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Large allocations made by three steady training steps of `model` at
/// `batch`, after three to warm up: their byte sizes.
fn steady_step_allocations(model: &str, batch: usize) -> Vec<usize> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/keras")
        .join(model);
    let model = Model::load(&path).unwrap();
    let mut rng = SplitMix64::new(7);
    let mut dims = vec![batch];
    dims.extend_from_slice(model.input_shape());
    let n_in: usize = dims.iter().product();
    let x =
        ArrayD::from_shape_vec(IxDyn(&dims), (0..n_in).map(|_| rng.next_f32()).collect()).unwrap();
    let labels: Vec<u32> = (0..batch).map(|_| (rng.next_u64() % 10) as u32).collect();
    let mut params = model.init_params(1);
    let sgd = Sgd {
        lr: 0.01,
        momentum: 0.9,
        nesterov: true,
    };
    let mut opt = Optimizer::new(sgd, params.len());
    let mut step = |i: u64| {
        let dropout = Some(DropoutRng {
            seed: i,
            first_sample: 0,
        });
        let g = model
            .loss_and_grad_sum(&params, x.view(), &labels, dropout)
            .unwrap();
        opt.step(params.as_mut_slice(), &g.grad).unwrap();
        g.recycle();
    };
    for i in 0..3 {
        step(i);
    }
    COUNT.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    for i in 3..6 {
        step(i);
    }
    ARMED.store(false, Ordering::SeqCst);
    let count = COUNT.load(Ordering::SeqCst);
    let mut sizes: Vec<usize> = SIZES[..count.min(SLOTS)]
        .iter()
        .map(|s| s.load(Ordering::SeqCst))
        .collect();
    sizes.resize(count, 0);
    sizes
}

// One test: the counting allocator sees every thread, so the models are
// measured one after the other.
#[test]
fn steady_training_steps_allocate_no_large_buffers() {
    // The seed CNN (convolutions, pooling, dropout, dense layers) and a
    // small ResNet (3x3 and 1x1 convolutions, BatchNormalization, Add,
    // Concatenate, a merge read by two layers).
    for (model, batch) in [("seed_cnn.json", 100), ("resnet_mini.json", 100)] {
        let sizes = steady_step_allocations(model, batch);
        assert!(
            sizes.is_empty(),
            "{model}: three steady steps allocated {} buffers of 256 KiB or more (bytes: {sizes:?})",
            sizes.len()
        );
    }
}
