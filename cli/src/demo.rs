//! `quern demo`: the whole path on one machine. A local 3-datanode
//! cluster, Fashion-MNIST imported as datasets, the seed CNN of the classic
//! Keras-on-Spark recipe trained with gradient tasks on the datanodes,
//! scored on the test set by map tasks, and the cluster stopped.

use crate::cluster::{self, UpArgs};
use crate::dataset::print_summary;
use crate::train::{print_scores, run_training, TrainArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use quern_client::{Client, ImportOptions, JobOptions};
use quern_compute::import::parse_idx;
use quern_compute::nn::{Model, OptimizerConfig, Sgd};
use quern_compute::train::ScaleKind;
use quern_proto::config::ClientConfig;
use std::path::{Path, PathBuf};

pub const SEED_CNN: &str = include_str!("../../tests/fixtures/keras/seed_cnn.json");
const FASHION_CLASSES: &str =
    "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot";

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// Stop each run after this many iterations (for a quick look).
    #[arg(long)]
    max_iter: Option<u64>,
    #[arg(long, default_value_t = 100)]
    batch_size: u64,
    /// Local steps per worker between model averages (1: exact SGD).
    #[arg(long, default_value_t = 1)]
    sync: u64,
    /// auto, local or distributed: see `quern train --help`.
    #[arg(long, default_value = "auto")]
    plan: quern_client::Plan,
    /// Workers of the distributed plan: see `quern train --help`.
    #[arg(long)]
    workers: Option<usize>,
    /// Where Debian's dataset-fashion-mnist puts the files.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    fashion: PathBuf,
    /// Keep the cluster in this directory instead of a temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Leave the cluster running at the end (with --dir).
    #[arg(long, requires = "dir")]
    keep: bool,
    /// A Keras model to train instead of the seed CNN.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Write the training curves here.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn idx_pair(dir: &Path, prefix: &str) -> Result<quern_compute::records::Encoded> {
    let images = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    if !images.exists() {
        bail!(
            "{} is missing: install Fashion-MNIST with `apt-get install dataset-fashion-mnist` or pass --fashion DIR",
            images.display()
        );
    }
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("{}", p.display()));
    Ok(parse_idx(
        &images.display().to_string(),
        &read(&images)?,
        &labels.display().to_string(),
        &read(&labels)?,
    )?)
}

pub async fn run(a: DemoArgs) -> Result<i32> {
    let train_data = idx_pair(&a.fashion, "train")?;
    let test_data = idx_pair(&a.fashion, "t10k")?;
    let model = match &a.model {
        Some(p) => Model::load(p)?,
        None => Model::from_keras_json(SEED_CNN)?,
    };
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().context("making a temporary directory")?;
            tmp.path().join("cluster")
        }
    };
    println!(
        "== a local cluster: 1 namenode, 3 datanodes in {}",
        dir.display()
    );
    let c = cluster::up(UpArgs::local(&dir, 3)).await?;
    let result = demo(&c.dir, &a, &model, train_data, test_data).await;
    if !a.keep {
        cluster::down(&c.dir)?;
    }
    result.map(|_| 0)
}

async fn demo(
    dir: &Path,
    a: &DemoArgs,
    model: &Model,
    train_data: quern_compute::records::Encoded,
    test_data: quern_compute::records::Encoded,
) -> Result<()> {
    let client = Client::from_config(&ClientConfig::load(&dir.join("client.toml"))?)?;
    let names: Vec<String> = FASHION_CLASSES.split(',').map(String::from).collect();
    println!(
        "== importing Fashion-MNIST ({} train, {} test images)",
        train_data.records, test_data.records
    );
    for (path, data) in [
        ("/fashion/train", &train_data),
        ("/fashion/test", &test_data),
    ] {
        if client.try_stat(path).await?.is_none() {
            let opts = ImportOptions {
                class_names: Some(names.clone()),
                source: "Debian dataset-fashion-mnist".into(),
                ..ImportOptions::default()
            };
            client.import_dataset(path, data, &opts).await?;
        }
    }
    let mut train = client.open_dataset("/fashion/train").await?;
    let test = client.open_dataset("/fashion/test").await?;
    println!("== dataset statistics by map tasks on the datanodes");
    let (stats, job) = client
        .dataset_stats(&mut train, &JobOptions::default())
        .await?;
    println!(
        "{} records, pixel range {}..{}, labels {:?}",
        stats.count,
        stats.min.iter().copied().fold(f32::INFINITY, f32::min),
        stats.max.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        stats.label_counts
    );
    print_summary("stats job", &job);
    println!(
        "== training {} ({} parameters): {} epoch(s), batch {}, SGD lr 0.01 momentum 0.9 Nesterov, pixels / 255",
        model.name(),
        model.param_count(),
        a.epochs,
        a.batch_size
    );
    let args = TrainArgs {
        model: PathBuf::new(),
        weights: None,
        data: "/fashion/train".into(),
        validation: Some("/fashion/test".into()),
        epochs: a.epochs,
        batch_size: a.batch_size,
        max_iter: a.max_iter,
        optimizer: Some("sgd".into()),
        lr: Some(0.01),
        momentum: Some(0.9),
        loss: None,
        target: Default::default(),
        nesterov: true,
        seed: 42,
        no_shuffle: false,
        scale: ScaleKind::Divide(255),
        display: 50,
        sync: a.sync,
        plan: a.plan,
        workers: a.workers,
        out: "/models/seed_cnn".into(),
        force: true,
        plot: a.plot.clone(),
        json: false,
    };
    let opt = OptimizerConfig::from(Sgd {
        lr: 0.01,
        momentum: 0.9,
        nesterov: true,
    });
    let params = model.init_params(args.seed);
    let outcome = run_training(
        &client,
        model,
        params,
        crate::train::Recipe {
            optimizer: opt,
            objective: Default::default(),
        },
        &args,
        &mut train,
        Some(&test),
    )
    .await?;
    if let Some(p) = &a.plot {
        crate::plot::write_svg(p, &outcome.events)?;
        println!("plot written to {}", p.display());
    }
    println!("== scoring on the test set by map tasks");
    let (scores, job) = client
        .score(
            &test,
            model.keras_json(),
            &outcome.params,
            &outcome.scaler,
            Default::default(),
        )
        .await?;
    print_scores(&scores, Some(&names));
    print_summary("score job", &job);
    Ok(())
}
