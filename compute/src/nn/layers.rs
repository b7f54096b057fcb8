//! The native description of layers: what the Keras importer produces and
//! what the kernels execute.

use serde::{Deserialize, Serialize};

/// Element-wise (or, for softmax, per-row) activation functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    Linear,
    Relu,
    Sigmoid,
    Tanh,
    Softmax,
}

impl Activation {
    pub fn keras_name(self) -> &'static str {
        match self {
            Activation::Linear => "linear",
            Activation::Relu => "relu",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
            Activation::Softmax => "softmax",
        }
    }

    pub fn from_keras(name: &str) -> Option<Activation> {
        Some(match name {
            "linear" => Activation::Linear,
            "relu" => Activation::Relu,
            "sigmoid" => Activation::Sigmoid,
            "tanh" => Activation::Tanh,
            "softmax" => Activation::Softmax,
            _ => return None,
        })
    }
}

/// Keras padding modes for convolution and pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Padding {
    Valid,
    Same,
}

impl Padding {
    /// Output length and padding before, as TensorFlow computes them.
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

/// Weight initialisers used when a model comes without weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Init {
    /// Uniform in +-sqrt(scale / fan), fan chosen by `mode`.
    VarianceUniform {
        scale: f64,
        mode: FanMode,
    },
    Constant(f32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FanMode {
    In,
    Avg,
}

/// What a layer does; shapes live on [`Layer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LayerKind {
    Dense {
        units: usize,
        activation: Activation,
        use_bias: bool,
    },
    Conv2D {
        filters: usize,
        kernel: [usize; 2],
        strides: [usize; 2],
        padding: Padding,
        activation: Activation,
        use_bias: bool,
    },
    MaxPool2D {
        pool: [usize; 2],
        strides: [usize; 2],
        padding: Padding,
    },
    AvgPool2D {
        pool: [usize; 2],
        strides: [usize; 2],
        padding: Padding,
    },
    Flatten,
    Dropout {
        rate: f32,
    },
    Activation(Activation),
}

/// One layer of a sequential chain, with its resolved shapes (per sample,
/// without the batch dimension).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    /// The Keras layer name (`conv2d_1`).
    pub name: String,
    /// The Keras class name (`Conv2D`).
    pub class: String,
    pub kind: LayerKind,
    pub input_shape: Vec<usize>,
    pub output_shape: Vec<usize>,
    /// Initialisers for kernel and bias, when the layer has them.
    pub kernel_init: Init,
    pub bias_init: Init,
}

impl Layer {
    /// The activation applied at the end of this layer, if any.
    pub fn activation(&self) -> Option<Activation> {
        match &self.kind {
            LayerKind::Dense { activation, .. } | LayerKind::Conv2D { activation, .. } => {
                Some(*activation)
            }
            LayerKind::Activation(a) => Some(*a),
            _ => None,
        }
    }
}

/// One parameter tensor in Keras `get_weights()` order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// `layer/kernel` or `layer/bias`.
    pub name: String,
    pub shape: Vec<usize>,
    /// Where it starts in the flat parameter vector.
    pub offset: usize,
    pub len: usize,
    pub init: Init,
    /// Fan-in and fan-out for variance-scaling initialisers.
    pub fans: (usize, usize),
}
