//! `quern train` and `quern score`: distributed training and scoring of
//! Keras-defined models on datasets stored in quern.

use crate::dataset::print_summary;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use quern_client::{Client, Plan, TrainEvent, TrainOptions, TrainOutcome};
use quern_compute::nn::{Adagrad, Adam, Algorithm, Model, OptimizerConfig, Params, RmsProp, Sgd};
use quern_compute::train::{Objective, ScaleKind, Scaler, Scores, TargetKind};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Args, Clone)]
pub struct TrainArgs {
    /// Keras model: `model.to_json()` output or a `.keras` file.
    #[arg(long)]
    pub model: PathBuf,
    /// Initial weights (`.npz` of `model.get_weights()`); else the
    /// `.keras` file's, else Keras's initialisers with --seed.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Training dataset directory in quern.
    #[arg(long)]
    pub data: String,
    /// Dataset scored after every epoch.
    #[arg(long)]
    pub validation: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub epochs: u64,
    #[arg(long, default_value_t = 100)]
    pub batch_size: u64,
    /// Stop after this many iterations.
    #[arg(long)]
    pub max_iter: Option<u64>,
    /// The optimizer (Keras's defaults but for --lr); by default the model's
    /// own compile settings (from a compiled `.keras` file), else sgd.
    #[arg(long, value_parser = ["sgd", "adam", "adamw", "rmsprop", "adagrad", "nadam"])]
    pub optimizer: Option<String>,
    /// Learning rate (default: the model's compile settings, else 0.01).
    #[arg(long)]
    pub lr: Option<f32>,
    /// SGD momentum (default 0).
    #[arg(long)]
    pub momentum: Option<f32>,
    /// The loss, as Keras names it (sparse_categorical_crossentropy,
    /// categorical_crossentropy, binary_crossentropy, mse, mae, huber);
    /// by default the model's compile settings, else
    /// sparse_categorical_crossentropy.
    #[arg(long)]
    pub loss: Option<String>,
    /// What the outputs are compared with: the records' labels, or the
    /// input itself (an autoencoder).
    #[arg(long, default_value = "labels")]
    pub target: TargetKind,
    /// Nesterov momentum (SGD).
    #[arg(long)]
    pub nesterov: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Take each worker's records in stored order every epoch instead of
    /// a fresh random order (Keras's `fit(shuffle=False)`).
    #[arg(long)]
    pub no_shuffle: bool,
    /// Feature scaling: minmax or standard (fitted on the training set's
    /// statistics), none, or 1/N (every feature divided by N: 1/255 is
    /// Keras's recipe for 8-bit pixels).
    #[arg(long, default_value = "minmax")]
    pub scale: ScaleKind,
    /// Print progress every N iterations.
    #[arg(long, default_value_t = 50)]
    pub display: u64,
    /// Local steps each worker takes before the coordinator averages the
    /// models; 1 is exact synchronous minibatch SGD.
    #[arg(long, default_value_t = 1)]
    pub sync: u64,
    /// Where the job runs: `local` (one worker holding or fetching all the
    /// data keeps the parameters between rounds), `distributed` (every
    /// holder of the data a worker) or `auto` (whichever is estimated
    /// faster; the estimate and the reason are printed at the start).
    #[arg(long, default_value = "auto")]
    pub plan: Plan,
    /// Workers of the distributed plan (2 up to the live datanodes; by
    /// default every holder of the data under `distributed`, the
    /// estimate's choice under `auto`). Datanodes sharing a host's cores
    /// add ring traffic and no compute.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Checkpoint directory in quern (model.json, weights.npz, log.jsonl, train.json).
    #[arg(long)]
    pub out: String,
    /// Replace an existing checkpoint directory.
    #[arg(short, long)]
    pub force: bool,
    /// Write an SVG of loss and accuracy per iteration and epoch.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print the job summary as JSON on stdout at the end.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ScoreArgs {
    /// A checkpoint directory written by `quern train --out`.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub data: String,
    #[arg(long)]
    pub json: bool,
}

/// The optimizer: from the flags when any is given, else the model's own
/// `compile_config`, else SGD at 0.01. Also says where it came from.
fn optimizer(a: &TrainArgs, model: &Model) -> Result<(OptimizerConfig, &'static str)> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.sync == 0 {
        bail!("--sync must be at least 1 (1 is exact minibatch SGD)");
    }
    let flags = a.optimizer.is_some() || a.lr.is_some() || a.momentum.is_some() || a.nesterov;
    if !flags {
        if let Some(c) = model.compile_settings()? {
            return Ok((c.optimizer, "the model's compile settings"));
        }
    }
    let lr = a.lr.unwrap_or(0.01);
    if !(lr > 0.0 && lr.is_finite()) {
        bail!("--lr {lr} must be a positive number");
    }
    let momentum = a.momentum.unwrap_or(0.0);
    let name = a.optimizer.as_deref().unwrap_or("sgd");
    if name != "sgd" && (momentum != 0.0 || a.nesterov) {
        bail!("--momentum and --nesterov apply to sgd, not {name}");
    }
    let adam = Adam {
        lr,
        ..Adam::default()
    };
    let opt: OptimizerConfig = match name {
        "adam" => Algorithm::Adam(adam).into(),
        "adamw" => Algorithm::AdamW(adam).into(),
        "nadam" => Algorithm::Nadam(adam).into(),
        "rmsprop" => Algorithm::RmsProp(RmsProp {
            lr,
            ..RmsProp::default()
        })
        .into(),
        "adagrad" => Algorithm::Adagrad(Adagrad {
            lr,
            ..Adagrad::default()
        })
        .into(),
        _ => {
            if !(0.0..1.0).contains(&momentum) {
                bail!("--momentum {momentum} must be in [0, 1)");
            }
            if a.nesterov && momentum == 0.0 {
                bail!("--nesterov needs a --momentum above 0");
            }
            OptimizerConfig::from(Sgd {
                lr,
                momentum,
                nesterov: a.nesterov,
            })
        }
    };
    Ok((
        opt,
        if flags {
            "the command line"
        } else {
            "the default"
        },
    ))
}

/// The loss from --loss, else the model's compile settings, else sparse
/// categorical cross-entropy; and the target.
fn objective(a: &TrainArgs, model: &Model) -> Result<Objective> {
    let loss = match &a.loss {
        Some(name) => quern_compute::nn::Loss::from_keras(&serde_json::Value::String(name.clone()))
            .map_err(|e| anyhow::anyhow!("--loss: {e}"))?,
        None => model.compile_loss()?.unwrap_or_default(),
    };
    let o = Objective {
        loss,
        target: a.target,
    };
    o.check(model)?;
    Ok(o)
}

/// The model and its starting parameters.
pub fn load_model(path: &Path, weights: Option<&Path>, seed: u64) -> Result<(Model, Params)> {
    let model = Model::load(path)?;
    let params = match weights {
        Some(w) => model.load_params(w)?,
        None => match Model::load_with_weights(path, None) {
            Ok((_, p)) => p,
            Err(_) => model.init_params(seed),
        },
    };
    Ok((model, params))
}

pub async fn train(a: TrainArgs, config: Option<&Path>) -> Result<i32> {
    let (model, params) = load_model(&a.model, a.weights.as_deref(), a.seed)?;
    let (opt, from) = optimizer(&a, &model)?;
    let objective = objective(&a, &model)?;
    eprintln!(
        "optimizer {} (from {from}), loss {}, target {:?}",
        opt.to_keras()["config"],
        objective.loss.to_keras()["class_name"],
        objective.target
    );
    quern_proto::RemotePath::parse(&a.out).map_err(|e| anyhow::anyhow!("--out: {e}"))?;
    let cfg = crate::client_config(config)?;
    let client = Client::from_config(&cfg)?;
    if client.try_stat(&a.out).await?.is_some() && !a.force {
        bail!(
            "{}: exists; pass --force to replace the checkpoint or pick another --out",
            a.out
        );
    }
    let mut ds = client.open_dataset(&a.data).await?;
    let val = match &a.validation {
        Some(v) => Some(client.open_dataset(v).await?),
        None => None,
    };
    let outcome = run_training(
        &client,
        &model,
        params,
        Recipe {
            optimizer: opt.clone(),
            objective,
        },
        &a,
        &mut ds,
        val.as_ref(),
    )
    .await?;
    save_checkpoint(&client, &a, &model, &opt, objective, &outcome).await?;
    if let Some(p) = &a.plot {
        crate::plot::write_svg(p, &outcome.events)?;
        eprintln!("plot written to {}", p.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&outcome.summary)?);
    }
    Ok(0)
}

/// How a job trains: the optimizer and the loss with its targets.
pub struct Recipe {
    pub optimizer: OptimizerConfig,
    pub objective: Objective,
}

pub async fn run_training(
    client: &Client,
    model: &Model,
    params: Params,
    recipe: Recipe,
    a: &TrainArgs,
    ds: &mut quern_client::Dataset,
    val: Option<&quern_client::Dataset>,
) -> Result<TrainOutcome> {
    let Recipe {
        optimizer: opt,
        objective,
    } = recipe;
    let opts = TrainOptions {
        model_json: model.keras_json().to_string(),
        init: params.into_vec(),
        optimizer: opt,
        epochs: a.epochs,
        batch: a.batch_size,
        max_iter: a.max_iter,
        seed: a.seed,
        shuffle: !a.no_shuffle,
        scale: a.scale,
        display: a.display,
        sync: a.sync,
        objective,
        plan: a.plan,
        workers: a.workers,
    };
    let mut bar: Option<ProgressBar> = None;
    let tty = std::io::stderr().is_terminal();
    let outcome = client
        .train(ds, val, &opts, |e| {
            let line = describe(e);
            match e {
                TrainEvent::Started { iterations, .. } if tty => {
                    let b = ProgressBar::new(*iterations);
                    b.set_style(
                        ProgressStyle::with_template("{bar:30} {pos}/{len} it {elapsed} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar = Some(b);
                }
                TrainEvent::Step { iteration, .. } => {
                    if let Some(b) = &bar {
                        b.set_position(*iteration);
                    }
                }
                _ => {}
            }
            match &bar {
                Some(b) => b.println(line),
                None => eprintln!("{line}"),
            }
        })
        .await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let s = &outcome.summary;
    eprintln!(
        "trained {} iterations ({} samples) in {:.1} s: {:.0} samples/s on {} workers; {} moved per step, {} per worker{} ({:.0}% of step time not computing); dataset bytes over the network: {}{}",
        s.iterations,
        s.samples,
        s.wall_s,
        s.samples_per_sec,
        s.workers,
        quern_proto::size::format_size(s.step_bytes_per_iteration),
        quern_proto::size::format_size(s.step_bytes_per_iteration / s.workers.max(1) as u64),
        through_memory(s),
        s.wait_share * 100.0,
        s.dataset_bytes_over_network,
        if s.workers_lost > 0 {
            format!("; {} worker(s) lost and replaced", s.workers_lost)
        } else {
            String::new()
        }
    );
    Ok(outcome)
}

fn describe(e: &TrainEvent) -> String {
    match e {
        TrainEvent::Planned(d) => {
            let asked = if d.requested == Plan::Auto {
                " (--plan auto)"
            } else {
                ""
            };
            format!("plan: {}{asked}: {}", d.plan, d.reason)
        }
        TrainEvent::Started {
            workers,
            records,
            steps_per_epoch,
            iterations,
            ..
        } => format!(
            "training on {records} records over {} workers ({}); {steps_per_epoch} iterations per epoch, {iterations} in all",
            workers.len(),
            workers
                .iter()
                .map(|(a, n)| format!("{a}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        TrainEvent::Step {
            iteration,
            epoch,
            loss,
            accuracy,
            samples_per_sec,
            ..
        } => format!(
            "iter {iteration:>6}  epoch {epoch:>3}  loss {loss:.4}  acc {accuracy:.4}  {samples_per_sec:.0} samples/s"
        ),
        TrainEvent::Epoch {
            epoch,
            loss,
            accuracy,
            val_loss,
            val_accuracy,
            seconds,
            ..
        } => {
            let mut s = format!("epoch {epoch}: loss {loss:.4} acc {accuracy:.4} ({seconds:.1} s)");
            if let (Some(l), Some(a)) = (val_loss, val_accuracy) {
                s.push_str(&format!("  val_loss {l:.4} val_acc {a:.4}"));
            }
            s
        }
        TrainEvent::WorkerLost {
            iteration,
            worker,
            error,
            chunks_moved,
        } => format!(
            "worker {worker} lost at iteration {iteration} ({error}); its {chunks_moved} chunk(s) moved to other holders"
        ),
    }
}

async fn save_checkpoint(
    client: &Client,
    a: &TrainArgs,
    model: &Model,
    opt: &OptimizerConfig,
    objective: Objective,
    o: &TrainOutcome,
) -> Result<()> {
    let params = model.params_from_flat(o.params.clone())?;
    let log: String = o
        .events
        .iter()
        .filter_map(|e| serde_json::to_string(e).ok())
        .map(|l| l + "\n")
        .collect();
    let train_json = serde_json::json!({
        "data": a.data,
        "validation": a.validation,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "max_iter": a.max_iter,
        "optimizer": opt.to_keras(),
        "compile_config": opt.keras_compile_config_with(&objective.loss),
        "objective": objective,
        "seed": a.seed,
        "sync": a.sync,
        "scaler": o.scaler,
        "summary": o.summary,
    });
    client.mkdir(&a.out, true).await?;
    let compile = opt.keras_compile_config_with(&objective.loss);
    let files: [(&str, Vec<u8>); 5] = [
        ("model.json", model.keras_json().as_bytes().to_vec()),
        (
            "model.keras",
            model.to_keras_bytes(&params, Some(&compile))?,
        ),
        ("weights.npz", params.to_npz_bytes()?),
        ("log.jsonl", log.into_bytes()),
        ("train.json", serde_json::to_vec_pretty(&train_json)?),
    ];
    for (name, bytes) in files {
        let path = format!("{}/{name}", a.out.trim_end_matches('/'));
        client.write_small(&path, &bytes, 3, true).await?;
    }
    eprintln!(
        "checkpoint written to {} (model.keras, model.json, weights.npz, log.jsonl, train.json)",
        a.out
    );
    Ok(())
}

/// A checkpoint read back from the filesystem.
pub struct Checkpoint {
    pub model: Model,
    pub params: Params,
    pub scaler: Scaler,
    pub objective: Objective,
}

/// One file of a checkpoint directory.
pub async fn read_checkpoint_file(client: &Client, dir: &str, name: &str) -> Result<Vec<u8>> {
    let path = format!("{}/{name}", dir.trim_end_matches('/'));
    client
        .read_all(&path)
        .await
        .with_context(|| format!("{path}: not a checkpoint written by `quern train --out`"))
}

/// The Keras `compile_config` of the job a checkpoint's `train.json`
/// describes.
pub fn compile_config_of(train: &serde_json::Value) -> Option<serde_json::Value> {
    train
        .get("compile_config")
        .filter(|c| c.is_object())
        .cloned()
}

pub async fn load_checkpoint(client: &Client, dir: &str) -> Result<Checkpoint> {
    let dir = dir.trim_end_matches('/');
    let read = |name: &'static str| read_checkpoint_file(client, dir, name);
    let json = String::from_utf8(read("model.json").await?).context("model.json is not UTF-8")?;
    let model = Model::from_keras_json(&json)?;
    let params =
        model.params_from_npz_bytes(&read("weights.npz").await?, &format!("{dir}/weights.npz"))?;
    let train: serde_json::Value = serde_json::from_slice(&read("train.json").await?)
        .with_context(|| format!("{dir}/train.json"))?;
    let scaler: Scaler = serde_json::from_value(train["scaler"].clone())
        .with_context(|| format!("{dir}/train.json: scaler"))?;
    // Checkpoints from before losses were configurable hold none.
    let objective: Objective = match train.get("objective") {
        Some(o) => serde_json::from_value(o.clone())
            .with_context(|| format!("{dir}/train.json: objective"))?,
        None => Objective::default(),
    };
    Ok(Checkpoint {
        model,
        params,
        scaler,
        objective,
    })
}

pub async fn score(a: ScoreArgs, config: Option<&Path>) -> Result<i32> {
    let cfg = crate::client_config(config)?;
    let client = Client::from_config(&cfg)?;
    let ck = load_checkpoint(&client, &a.model).await?;
    let ds = client.open_dataset(&a.data).await?;
    let (s, job) = client
        .score(
            &ds,
            ck.model.keras_json(),
            ck.params.as_slice(),
            &ck.scaler,
            ck.objective,
        )
        .await?;
    let classification = ck.objective.loss.is_classification();
    if a.json {
        let doc = serde_json::json!({
            "accuracy": classification.then(|| s.accuracy()),
            "loss": s.loss(),
            "count": s.count,
            "confusion": s.confusion.chunks(s.classes.max(1)).collect::<Vec<_>>(),
            "job": job,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    if classification {
        print_scores(&s, ds.manifest.class_names.as_deref());
    } else {
        println!(
            "loss      {:.6} ({}, {} examples)",
            s.loss(),
            ck.objective.loss.to_keras()["class_name"]
                .as_str()
                .unwrap_or("?"),
            s.count
        );
    }
    print_summary("job", &job);
    Ok(0)
}

pub fn print_scores(s: &Scores, names: Option<&[String]>) {
    println!(
        "accuracy  {:.4} ({} of {})",
        s.accuracy(),
        s.correct,
        s.count
    );
    println!("loss      {:.4}", s.loss());
    println!("confusion (rows: label, columns: predicted)");
    let c = s.classes.max(1);
    let mut head = String::from("        ");
    for j in 0..c {
        head.push_str(&format!("{j:>6}"));
    }
    println!("{head}");
    for (i, row) in s.confusion.chunks(c).enumerate() {
        let name = names
            .and_then(|n| n.get(i))
            .map(String::as_str)
            .unwrap_or("");
        let mut line = format!("{i:>3} {:<4}", name.chars().take(4).collect::<String>());
        for v in row {
            line.push_str(&format!("{v:>6}"));
        }
        println!("{line}");
    }
}

/// How much of a run's step traffic went through shared memory between
/// workers on one host rather than over connections, when any did.
pub(crate) fn through_memory(s: &quern_client::TrainSummary) -> String {
    let moved = s.step_bytes.max(1) as f64;
    match s.ring_shared_bytes {
        0 => String::new(),
        shared => format!(
            ", {:.0}% through shared memory",
            shared as f64 / moved * 100.0
        ),
    }
}
