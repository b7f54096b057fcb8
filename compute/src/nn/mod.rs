//! Neural networks: layers, Keras import, forward/backward, optimizers.
//!
//! A [`Model`] is a sequential chain imported from Keras JSON or a `.keras`
//! archive. Its parameters are one flat f32 vector ([`Params`]) in Keras
//! `get_weights()` order, which is also how they travel over the network and
//! how they are saved (`.npz`, loadable with Keras `set_weights`).

mod bench;
mod error;
mod exec;
mod gemm;
mod h5;
mod keras;
mod layers;
mod model;
pub mod npy;
mod optim;
mod rng;

pub use bench::{bench_train_step, BenchReport};
pub use error::{NnError, Result};
pub use exec::DropoutRng;
pub use layers::{Activation, FanMode, Init, Layer, LayerKind, Padding, ParamSpec};
pub use model::{Evaluation, GradSum, KerasArchive, Model, Params};
pub use optim::{Adam, Optimizer, OptimizerConfig, Sgd};
pub use rng::SplitMix64;
