//! `quern bench train`: distributed training throughput against the same
//! model trained in one process, on the same machine in the same run, with
//! `--sync 1` (exact minibatch SGD) on all three workers and on two,
//! `--sync K` (local steps + model averaging), `--plan local` and
//! `--plan auto`: samples/s, bytes per step per worker, time not
//! computing, and test accuracy after the same number of iterations.

use crate::cluster::{self, UpArgs};
use anyhow::{Context, Result};
use quern_client::{Client, ImportOptions, TrainOptions};
use quern_compute::import::parse_idx;
use quern_compute::nn::{bench_train_step, Model, OptimizerConfig, Sgd};
use quern_compute::train::ScaleKind;
use quern_proto::config::ClientConfig;
use quern_proto::size::format_size;
use std::path::Path;

pub struct BenchTrain<'a> {
    pub dir: &'a Path,
    pub fashion: &'a Path,
    pub model: Option<&'a Path>,
    pub iters: u64,
    pub batch: u64,
    pub sync: u64,
}

pub async fn run(b: BenchTrain<'_>) -> Result<()> {
    let model = match b.model {
        Some(p) => Model::load(p)?,
        None => Model::from_keras_json(crate::demo::SEED_CNN)?,
    };
    let read = |name: &str| {
        let p = b.fashion.join(name);
        std::fs::read(&p).with_context(|| format!("{}", p.display()))
    };
    let train = parse_idx(
        "train images",
        &read("train-images-idx3-ubyte.gz")?,
        "train labels",
        &read("train-labels-idx1-ubyte.gz")?,
    )?;
    let test = parse_idx(
        "test images",
        &read("t10k-images-idx3-ubyte.gz")?,
        "test labels",
        &read("t10k-labels-idx1-ubyte.gz")?,
    )?;
    println!(
        "quern bench train: {} ({} parameters), batch {}, {} iterations per run, Fashion-MNIST",
        model.name(),
        model.param_count(),
        b.batch,
        b.iters
    );
    let single = tokio::task::spawn_blocking({
        let model = model.clone();
        let batch = b.batch as usize;
        move || bench_train_step(&model, batch, 30, None)
    })
    .await??;
    println!(
        "one process (forward+backward+update, all cores): {:>7.0} samples/s",
        single.samples_per_sec
    );
    eprintln!("starting a 3-datanode cluster in {}", b.dir.display());
    let c = cluster::up(UpArgs::local(b.dir, 3)).await?;
    let result = measure(&c.dir, &b, &model, &train, &test, single.samples_per_sec).await;
    cluster::down(&c.dir)?;
    result
}

async fn measure(
    dir: &Path,
    b: &BenchTrain<'_>,
    model: &Model,
    train: &quern_compute::records::Encoded,
    test: &quern_compute::records::Encoded,
    single: f64,
) -> Result<()> {
    let client = Client::from_config(&ClientConfig::load(&dir.join("client.toml"))?)?;
    for (path, data) in [("/bench/train", train), ("/bench/test", test)] {
        if client.try_stat(path).await?.is_none() {
            client
                .import_dataset(path, data, &ImportOptions::default())
                .await?;
        }
    }
    let mut ds = client.open_dataset("/bench/train").await?;
    let test = client.open_dataset("/bench/test").await?;
    use quern_client::Plan;
    // Two of the three as well: on a host with fewer cores than
    // datanodes a third worker adds ring traffic and no compute.
    let runs = [
        (Plan::Distributed, 1, None),
        (Plan::Distributed, 1, Some(2)),
        (Plan::Distributed, b.sync, None),
        (Plan::Local, 1, None),
        (Plan::Auto, 1, None),
    ];
    for (plan, sync, workers) in runs {
        let opts = TrainOptions {
            objective: Default::default(),
            shuffle: true,
            model_json: model.keras_json().to_string(),
            init: model.init_params(42).into_vec(),
            optimizer: OptimizerConfig::from(Sgd {
                lr: 0.01,
                momentum: 0.9,
                nesterov: true,
            }),
            epochs: 1000,
            batch: b.batch,
            max_iter: Some(b.iters),
            seed: 42,
            scale: ScaleKind::Divide(255),
            display: 0,
            sync,
            plan,
            workers,
        };
        let mut why = String::new();
        let run = client
            .train(&mut ds, None, &opts, |e| {
                if let quern_client::TrainEvent::Planned(d) = e {
                    why = format!(" -> {}: {}", d.plan, d.reason);
                }
            })
            .await?;
        let (scores, _) = client
            .score(
                &test,
                model.keras_json(),
                &run.params,
                &run.scaler,
                Default::default(),
            )
            .await?;
        let s = &run.summary;
        let label = format!(
            "--plan {plan} --sync {sync}{}",
            workers.map_or(String::new(), |n| format!(" --workers {n}"))
        );
        println!(
            "3 datanodes, {label:<38}: {:>7.0} samples/s ({:.2} x one process; after the first round {:.0}, {:.2} x) on {} worker{}, {} per step per worker{}, {:.0}% of round time not computing, dataset bytes over the network {}, test accuracy after {} iterations {:.4}{why}",
            s.samples_per_sec,
            s.samples_per_sec / single,
            s.settled_samples_per_sec,
            s.settled_samples_per_sec / single,
            s.workers,
            if s.workers == 1 { "" } else { "s" },
            format_size(s.step_bytes_per_iteration / s.workers.max(1) as u64),
            crate::train::through_memory(s),
            s.wait_share * 100.0,
            s.dataset_bytes_over_network,
            s.iterations,
            scores.accuracy()
        );
    }
    Ok(())
}
