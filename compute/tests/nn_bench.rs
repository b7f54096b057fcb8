//! Training-step throughput of the seed CNN. Ignored by default (it is a
//! measurement, not a check); run with
//! `cargo test --release -p quern-compute --test nn_bench -- --ignored --nocapture`.

use std::path::PathBuf;

use quern_compute::nn::{bench_train_step, Model};

#[test]
#[ignore]
fn seed_cnn_train_step_throughput() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/keras/seed_cnn.json");
    let model = Model::load(&path).unwrap();
    for threads in [1, 2] {
        let r = bench_train_step(&model, 100, 10, Some(threads)).unwrap();
        eprintln!(
            "seed_cnn batch 100, {threads} thread(s): {:.1} ms/step, {:.0} samples/s, {:.1} GFLOP/s",
            r.seconds_per_step * 1e3,
            r.samples_per_sec,
            r.gflops
        );
    }
}
