//! Neural networks: Keras import, layers, forward/backward, optimizers.
//!
//! A [`Model`] is any Keras 3 model (Sequential, or a functional graph with
//! branches, merges, shared layers and nested models) imported from its
//! JSON or a `.keras` archive. Its parameters are one flat f32 vector
//! ([`Params`]) in Keras `get_weights()` order, which is also how they
//! travel over the network and how they are saved (`.npz`, loadable with
//! Keras `set_weights`).
//!
//! Layers live in [`layers`], one file per family, each layer's config
//! parsing, shape rule, forward and backward side by side.

mod activation;
mod bench;
mod buffers;
mod compile;
mod config;
mod error;
mod exec;
mod export;
mod gemm;
mod graph;
mod h5;
mod init;
mod layers;
mod loss;
mod model;
pub mod npy;
mod optim;
mod rng;
mod summary;
mod sync;

pub use activation::Activation;
pub use bench::{bench_train_step, BenchReport};
pub use buffers::{copied, recycle};
pub use compile::{parse_optimizer, CompileSettings};
pub use config::Problem;
pub use error::{NnError, Result};
pub use exec::DropoutRng;
pub use gemm::{quick_sgemm_gflops, sgemm_ceiling_gflops, simd_level};
pub use init::{Distribution, FanMode, Init};
pub use layers::{Padding, StatSums, SUPPORTED_LAYERS};
pub use loss::{Loss, Target};
pub use model::{Evaluation, GradSum, KerasArchive, Model, ParamSpec, Params};
pub use optim::{Adagrad, Adam, Algorithm, Optimizer, OptimizerConfig, RmsProp, Schedule, Sgd};
pub use rng::SplitMix64;
pub use sync::{BatchSync, LocalGroup, Member};
