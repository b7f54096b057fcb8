//! Layers: each family in its own file, with the Keras config parsing, the
//! shape rules, the forward and the backward pass side by side.
//!
//! Tensors are flat f32 buffers, batch first, channels last (NHWC), each
//! layer seeing per-sample shapes without the batch axis. Work is split by
//! sample or by fixed blocks, never by thread, and every reduction runs in a
//! fixed order, so results do not depend on the number of threads.

use std::any::Any;
use std::fmt::Debug;

use super::activation::Activation;
use super::config::{Cfg, Parsed};
use super::init::Init;

pub(crate) mod conv;
pub(crate) mod core;
mod direct;
pub(crate) mod merge;
pub(crate) mod norm;
pub(crate) mod pool;
pub(crate) mod preprocess;
pub(crate) mod reshape;
mod winograd;
#[cfg(target_arch = "x86_64")]
mod winograd_lanes;

/// Keras padding modes for convolution and pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Valid,
    Same,
}

impl Padding {
    /// Output length and padding before, as TensorFlow computes them, for
    /// a window of `kernel` (already dilated) moving by `stride`.
    pub fn output_and_pad(
        self,
        input: usize,
        kernel: usize,
        stride: usize,
    ) -> Option<(usize, usize)> {
        match self {
            Padding::Valid => {
                if input < kernel {
                    None
                } else {
                    Some(((input - kernel) / stride + 1, 0))
                }
            }
            Padding::Same => {
                let out = input.div_ceil(stride);
                let total = ((out - 1) * stride + kernel).saturating_sub(input);
                Some((out, total / 2))
            }
        }
    }
}

/// L1 and L2 penalties on a weight, added to the loss once per batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Regularizer {
    pub l1: f32,
    pub l2: f32,
}

impl Regularizer {
    pub fn penalty(&self, w: &[f32]) -> f64 {
        let (mut a, mut s) = (0.0f64, 0.0f64);
        for &v in w {
            a += v.abs() as f64;
            s += (v as f64) * (v as f64);
        }
        self.l1 as f64 * a + self.l2 as f64 * s
    }

    /// Adds `scale` times the penalty's gradient to `g`.
    pub fn add_grad(&self, w: &[f32], g: &mut [f32], scale: f32) {
        for (g, &v) in g.iter_mut().zip(w) {
            let sign = if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                0.0
            };
            *g += scale * (self.l1 * sign + 2.0 * self.l2 * v);
        }
    }
}

/// A kernel and an optional bias, as every layer with weights configures
/// them: `use_bias` and the initializers and regularizers of both.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelBias {
    pub use_bias: bool,
    pub kernel_init: Init,
    pub bias_init: Init,
    pub kernel_reg: Option<Regularizer>,
    pub bias_reg: Option<Regularizer>,
}

impl KernelBias {
    /// `prefix` names the kernel's options: `kernel` reads
    /// `kernel_initializer` and `kernel_regularizer`, `depthwise` reads
    /// `depthwise_initializer` and so on.
    pub fn parse(cfg: &Cfg<'_>, prefix: &str) -> Parsed<KernelBias> {
        Ok(KernelBias {
            use_bias: cfg.bool("use_bias", true)?,
            kernel_init: cfg.initializer(
                &format!("{prefix}_initializer"),
                super::init::GLOROT_UNIFORM,
            )?,
            bias_init: cfg.initializer("bias_initializer", Init::Constant(0.0))?,
            kernel_reg: cfg.regularizer(&format!("{prefix}_regularizer"))?,
            bias_reg: cfg.regularizer("bias_regularizer")?,
        })
    }

    pub fn kernel(&self, name: &'static str, shape: Vec<usize>) -> ParamDecl {
        ParamDecl::new(name, shape, self.kernel_init).regularized(self.kernel_reg)
    }

    pub fn bias(&self, len: usize) -> Option<ParamDecl> {
        self.use_bias
            .then(|| ParamDecl::new("bias", vec![len], self.bias_init).regularized(self.bias_reg))
    }

    /// The kernel, then the bias when the layer has one.
    pub fn decls(&self, kernel: &'static str, shape: Vec<usize>, bias: usize) -> Vec<ParamDecl> {
        let mut p = vec![self.kernel(kernel, shape)];
        p.extend(self.bias(bias));
        p
    }
}

/// Splits a backward pass's weight gradients into the kernel's buffer and
/// the bias's, which gets the column sums of `dy` (rows of `width`). None
/// when the layer does not train.
pub(crate) fn kernel_grad<'a>(
    dw: &'a mut [&mut [f32]],
    dy: &[f32],
    width: usize,
) -> Option<&'a mut [f32]> {
    match dw {
        [] => None,
        [k] => Some(k),
        [k, bias, ..] => {
            column_sums(dy, width, bias);
            Some(k)
        }
    }
}

/// The single input of a layer that takes one.
pub(crate) fn one_input(ins: &[Vec<usize>]) -> Result<&Vec<usize>, String> {
    match ins {
        [s] => Ok(s),
        _ => Err(format!("takes one input, got {}", ins.len())),
    }
}

/// One weight a layer creates, in the layer's `weights` order.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamDecl {
    /// Keras's variable name (`kernel`, `gamma`, `moving_mean`).
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub init: Init,
    /// False for statistics such as BatchNormalization's moving mean.
    pub trainable: bool,
    pub regularizer: Option<Regularizer>,
    /// Keras keeps it as an integer (Normalization's sample count).
    pub integer: bool,
}

impl ParamDecl {
    pub fn new(name: &'static str, shape: Vec<usize>, init: Init) -> Self {
        ParamDecl {
            name,
            shape,
            init,
            trainable: true,
            regularizer: None,
            integer: false,
        }
    }

    pub fn integer(mut self) -> Self {
        self.integer = true;
        self
    }

    pub fn frozen(mut self) -> Self {
        self.trainable = false;
        self
    }

    pub fn regularized(mut self, r: Option<Regularizer>) -> Self {
        self.regularizer = r;
        self
    }
}

/// Randomness for dropout and noise: sample `i` of the batch draws from a
/// stream keyed by `(seed, call, first_sample + i)`, so a batch split
/// between workers gets the same masks as the whole batch in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Noise {
    pub seed: u64,
    pub stream: u64,
    pub first_sample: u64,
}

/// What one call of a layer sees.
pub(crate) struct Ctx<'a> {
    /// Samples in the batch.
    pub n: usize,
    /// Per-sample input shapes.
    pub ins: &'a [Vec<usize>],
    /// Per-sample output shape.
    pub out: &'a [usize],
    /// The layer's weights, in declaration order.
    pub w: &'a [&'a [f32]],
    /// Training mode (dropout on).
    pub train: bool,
    /// The layer trains; a frozen BatchNormalization uses its moving
    /// statistics even in training mode, as Keras 3 does.
    pub trainable: bool,
    /// Present in training mode.
    pub noise: Option<Noise>,
    /// Present when the batch is split between workers: BatchNormalization
    /// adds its sums over all of them.
    pub sync: Option<&'a dyn crate::nn::sync::BatchSync>,
}

/// What a forward pass keeps for its backward pass.
pub(crate) type Saved = Option<Box<dyn Any + Send + Sync>>;

pub(crate) fn saved<T: Any + Send + Sync>(v: T) -> Saved {
    Some(Box::new(v))
}

pub(crate) fn get_saved<T: Any>(s: &Saved) -> Option<&T> {
    s.as_ref().and_then(|b| b.downcast_ref::<T>())
}

/// The backward pass's inputs and outputs for one call.
pub(crate) struct Back<'a> {
    pub xs: &'a [&'a [f32]],
    pub y: &'a [f32],
    pub saved: &'a Saved,
    /// Gradient w.r.t. the output (w.r.t. the pre-activation when
    /// `skip_act`).
    pub dy: Vec<f32>,
    /// Which inputs need a gradient.
    pub need: &'a [bool],
    /// One buffer per weight when the layer trains, else empty: zeroed,
    /// so a layer may add its gradient or write it (the layer's part of
    /// the step's gradient itself, where nothing else adds to it).
    pub dw: &'a mut [&'a mut [f32]],
    /// The fused final activation was already differentiated (softmax
    /// with cross-entropy).
    pub skip_act: bool,
}

/// A moving-statistics update one call asks for after a training step:
/// the per-channel sums of its input over the batch.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatSums {
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
    /// Values per channel that went into the sums.
    pub count: u64,
}

impl StatSums {
    /// Adds another worker's sums for the same call.
    pub fn add(&mut self, other: &StatSums) -> Result<(), String> {
        if other.sum.len() != self.sum.len() || other.sum_sq.len() != self.sum_sq.len() {
            return Err(format!(
                "batch statistics over {} and {} channels",
                self.sum.len(),
                other.sum.len()
            ));
        }
        self.sum
            .iter_mut()
            .zip(&other.sum)
            .for_each(|(a, b)| *a += b);
        self.sum_sq
            .iter_mut()
            .zip(&other.sum_sq)
            .for_each(|(a, b)| *a += b);
        self.count += other.count;
        Ok(())
    }
}

pub(crate) trait Op: Debug + Send + Sync {
    /// The per-sample output shape for these per-sample input shapes.
    fn out_shape(&self, ins: &[Vec<usize>]) -> Result<Vec<usize>, String>;

    /// The weights the layer creates when first called on `ins`.
    fn params(&self, _ins: &[Vec<usize>]) -> Vec<ParamDecl> {
        Vec::new()
    }

    /// Whether the layer takes a list of tensors (merging layers).
    fn merges(&self) -> bool {
        false
    }

    fn forward(&self, cx: &Ctx<'_>, xs: &[&[f32]]) -> (Vec<f32>, Saved);

    /// Input gradients (None where `need` is false), weight gradients into
    /// `b.dw`.
    fn backward(&self, cx: &Ctx<'_>, b: Back<'_>) -> Vec<Option<Vec<f32>>>;

    /// The activation applied last, fused into the layer.
    fn activation(&self) -> Option<Activation> {
        None
    }

    /// Multiply-adds x2 per sample of the forward pass.
    fn flops(&self, _ins: &[Vec<usize>], _out: &[usize]) -> f64 {
        0.0
    }

    /// Whether training-mode calls report batch statistics
    /// ([`stat_sums`](Self::stat_sums)) for moving averages.
    fn keeps_moving_stats(&self) -> bool {
        false
    }

    /// Batch statistics to fold into moving averages after a training step.
    fn stat_sums(&self, _saved: &Saved) -> Option<StatSums> {
        None
    }

    /// Applies summed statistics to the layer's weights (`w` mutable in
    /// declaration order).
    fn apply_stats(&self, _w: &mut [&mut [f32]], _stats: &StatSums) {}
}

/// Builds a layer's operation from its Keras class and config.
pub(crate) fn build(cfg: &Cfg<'_>) -> Parsed<Box<dyn Op>> {
    cfg.dtype()?;
    if let Some(op) = core::build(cfg)? {
        return Ok(op);
    }
    for build in [
        conv::build,
        pool::build,
        norm::build,
        merge::build,
        reshape::build,
        preprocess::build,
    ] {
        if let Some(op) = build(cfg)? {
            return Ok(op);
        }
    }
    Err(cfg.err(format!(
        "unsupported layer type {} (supported: {SUPPORTED_LAYERS}); \
         replace it with supported layers or a nested model of them",
        cfg.class
    )))
}

pub const SUPPORTED_LAYERS: &str = "Dense, Activation, ReLU, LeakyReLU, ELU, PReLU, Softmax, \
     Dropout, SpatialDropout1D/2D, GaussianNoise, GaussianDropout, Identity, \
     Conv1D, Conv2D, DepthwiseConv2D, SeparableConv2D, Conv2DTranspose, \
     MaxPooling1D/2D, AveragePooling1D/2D, GlobalAveragePooling1D/2D, GlobalMaxPooling1D/2D, \
     BatchNormalization, LayerNormalization, LayerScale, \
     Add, Subtract, Multiply, Average, Maximum, Minimum, Concatenate, \
     Flatten, Reshape, Permute, ZeroPadding2D, Cropping2D, UpSampling2D, \
     Rescaling, Normalization";

/// Product of a shape's dimensions.
pub(crate) fn size(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// `(None, 28, 28, 1)`.
pub(crate) fn shape_str(shape: &[usize]) -> String {
    let mut s = String::from("(None");
    for d in shape {
        s.push_str(&format!(", {d}"));
    }
    s.push(')');
    s
}

/// Sums the rows of a row-major matrix, in row order, into `out`.
///
/// A tall matrix (a first convolution's bias gradient sums 78,400 rows)
/// is split by columns, a cache line of them per task: every column is
/// still summed by one thread in row order, so the bits do not depend on
/// the number of threads, and no line is read twice.
pub(crate) fn column_sums(m: &[f32], cols: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    const LINE: usize = 16;
    let cols = cols.max(1);
    if m.len() < 1 << 18 || cols <= LINE {
        for row in m.chunks_exact(cols) {
            out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
        }
        return;
    }
    out.par_chunks_mut(LINE).enumerate().for_each(|(i, part)| {
        let lo = i * LINE;
        if part.len() == LINE && lo + LINE <= cols {
            // The sums stay in a register through the rows, not in `out`
            // (a load and a store per row).
            let mut acc = [0.0f32; LINE];
            acc.copy_from_slice(part);
            for row in m.chunks_exact(cols) {
                let row = &row[lo..lo + LINE];
                for v in 0..LINE {
                    acc[v] += row[v];
                }
            }
            part.copy_from_slice(&acc);
        } else {
            for row in m.chunks_exact(cols) {
                part.iter_mut().zip(&row[lo..]).for_each(|(o, v)| *o += v);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tall matrix summed by columns in parallel gives the bits of the
    /// plain row-by-row sum.
    #[test]
    fn column_sums_split_by_columns_keep_the_row_order() {
        for cols in [32, 40, 64] {
            let rows = 10_000;
            let m: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.37)
                .collect();
            let mut want = vec![0.5f32; cols];
            for row in m.chunks_exact(cols) {
                want.iter_mut().zip(row).for_each(|(o, v)| *o += v);
            }
            let mut got = vec![0.5f32; cols];
            column_sums(&m, cols, &mut got);
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{cols} columns");
        }
    }
}
