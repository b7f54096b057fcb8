//! `quern model`: inspect, run and benchmark Keras-defined models locally,
//! without a cluster.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use quern_compute::nn::{self, Model};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Print layers, output shapes and parameter counts as Keras does.
    Summary {
        /// `model.to_json()` file or `.keras` archive.
        model: PathBuf,
    },
    /// Run inference on a float32 .npy batch and write the outputs as .npy.
    Predict {
        /// `model.to_json()` file or `.keras` archive.
        #[arg(long)]
        model: PathBuf,
        /// Weights as saved by `np.savez(f, *model.get_weights())`; optional
        /// when the .keras archive carries an .npz.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Input batch, shape (n, ...input shape).
        #[arg(long)]
        input: PathBuf,
        /// Where to write the outputs.
        #[arg(long)]
        output: PathBuf,
    },
    /// Write a checkpoint of `quern train --out` as a `.keras` file that
    /// Keras's `keras.saving.load_model` opens (compiled with the job's
    /// optimizer, ready for `fit`).
    Export {
        /// The checkpoint directory in quern (what `quern train --out` wrote).
        checkpoint: String,
        /// The `.keras` file to write on the local disk.
        out: PathBuf,
        /// Replace `out` if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Time training steps (forward + backward + update) on random data.
    Bench {
        /// `model.to_json()` file or `.keras` archive.
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 100)]
        batch_size: usize,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: ModelCommand, config: Option<&Path>) -> Result<()> {
    match cmd {
        ModelCommand::Export {
            checkpoint,
            out,
            force,
        } => export(&checkpoint, &out, force, config).await,
        ModelCommand::Summary { model } => {
            print!("{}", load(&model)?.summary());
            Ok(())
        }
        ModelCommand::Predict {
            model,
            weights,
            input,
            output,
        } => predict(&model, weights.as_deref(), &input, &output),
        ModelCommand::Bench {
            model,
            batch_size,
            iters,
            threads,
            json,
        } => {
            let m = load(&model)?;
            let r = nn::bench_train_step(&m, batch_size, iters, threads)
                .with_context(|| format!("benchmarking {}", model.display()))?;
            if json {
                let doc = serde_json::json!({
                    "model": m.name(),
                    "batch_size": r.batch_size,
                    "threads": r.threads,
                    "iters": r.iters,
                    "ms_per_step": r.seconds_per_step * 1e3,
                    "samples_per_s": r.samples_per_sec,
                    "gflops": r.gflops,
                    "sgemm_ceiling_gflops": r.sgemm_ceiling_gflops,
                    "share_of_ceiling": r.gflops / r.sgemm_ceiling_gflops,
                    "simd": r.simd,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(());
            }
            println!(
                "{}: batch {} on {} threads, {} steps: {:.1} ms/step, {:.0} samples/s, {:.1} GFLOP/s",
                m.name(),
                r.batch_size,
                r.threads,
                r.iters,
                r.seconds_per_step * 1e3,
                r.samples_per_sec,
                r.gflops
            );
            println!(
                "kernels {}; sgemm ceiling on these threads {:.1} GFLOP/s: the step runs at {:.0}% of it",
                r.simd,
                r.sgemm_ceiling_gflops,
                100.0 * r.gflops / r.sgemm_ceiling_gflops
            );
            Ok(())
        }
    }
}

fn load(path: &Path) -> Result<Model> {
    Ok(Model::load(path)?)
}

fn predict(model: &Path, weights: Option<&Path>, input: &Path, output: &Path) -> Result<()> {
    let (m, params) = Model::load_with_weights(model, weights)?;
    let x = nn::npy::load_npy(input)?;
    let y = m
        .predict(&params, x.view())
        .with_context(|| format!("running {} on {}", model.display(), input.display()))?;
    nn::npy::save_npy(output, &y.view())?;
    eprintln!(
        "wrote {} predictions of shape {:?} to {}",
        y.shape()[0],
        &y.shape()[1..],
        output.display()
    );
    Ok(())
}

async fn export(checkpoint: &str, out: &Path, force: bool, config: Option<&Path>) -> Result<()> {
    if out.exists() && !force {
        anyhow::bail!("{} exists; give --force to replace it", out.display());
    }
    let cfg = crate::client_config(config)?;
    let client = quern_client::Client::from_config(&cfg)?;
    let ck = crate::train::load_checkpoint(&client, checkpoint).await?;
    let train = crate::train::read_checkpoint_file(&client, checkpoint, "train.json").await?;
    let train: serde_json::Value =
        serde_json::from_slice(&train).with_context(|| format!("{checkpoint}/train.json"))?;
    let compile = crate::train::compile_config_of(&train);
    ck.model
        .save_keras(out, &ck.params, compile.as_ref())
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "wrote {} ({} parameters); open it with keras.saving.load_model",
        out.display(),
        ck.model.param_count()
    );
    Ok(())
}
