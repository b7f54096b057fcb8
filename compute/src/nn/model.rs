//! The sequential model: import, parameters, summary, inference, loss and
//! gradients.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};

use super::error::{NnError, Result};
use super::exec::{DropoutRng, Net};
use super::h5;
use super::keras;
use super::layers::{Activation, FanMode, Init, Layer, LayerKind, ParamSpec};
use super::npy;
use super::rng::SplitMix64;

/// A parameter a layer declares: name suffix, shape, initialiser, fans.
type NewSpec = (&'static str, Vec<usize>, Init, (usize, usize));

/// Keras clips probabilities to [EPS, 1 - EPS] before taking the log.
const CCE_EPSILON: f32 = 1e-7;
/// Samples per forward pass in `predict` and `evaluate`, to bound memory.
const PREDICT_BATCH: usize = 256;

/// Most bytes a `.keras` archive's JSON entry (`config.json`) may inflate
/// to. Keras writes a model's config in a few KiB (one small object per
/// layer); 16 MiB is thousands of times that, yet stops a crafted archive
/// from inflating gigabytes before the JSON parser sees a byte.
const KERAS_JSON_LIMIT: u64 = 16 << 20;
/// Bytes a weights file may spend per parameter: 4 for a float32 value,
/// times 4 because Keras saves the optimizer's slots beside the weights in
/// `model.weights.h5` (Adam's two moments, AMSGrad's third), times 2 for
/// float64 dtype policies or `.npz` files of float64 arrays. Generous on
/// purpose: the bound is there to stop gigabytes from a small archive, not
/// to refuse a real file that is a little larger than expected.
const WEIGHTS_BYTES_PER_PARAM: u64 = 4 * 4 * 2;
/// Room in a weights file beyond the values: the HDF5 superblock, object
/// headers, B-trees, heaps and the optimizer's scalars, or the `.npy`
/// headers and zip records of an `.npz`. Tens of KiB in practice.
const WEIGHTS_OVERHEAD: u64 = 16 << 20;

/// A sequential chain of layers imported from Keras.
#[derive(Debug, Clone)]
pub struct Model {
    name: String,
    input_shape: Vec<usize>,
    layers: Vec<Layer>,
    specs: Arc<[ParamSpec]>,
    first_param: Vec<usize>,
    param_count: usize,
    keras_json: String,
}

/// A `.keras` archive: the model and, when the archive carries them, its
/// weights (from an `.npz` inside it, else from `model.weights.h5`).
#[derive(Debug, Clone)]
pub struct KerasArchive {
    pub model: Model,
    pub weights: Option<Params>,
    /// The archive holds an `.h5` weights file (`model.weights.h5`).
    pub has_h5_weights: bool,
}

/// All parameters of a model as one flat f32 vector, in Keras
/// `get_weights()` order, each tensor in C order with Keras's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    values: Vec<f32>,
    specs: Arc<[ParamSpec]>,
}

/// The result of [`Model::loss_and_grad_sum`]: sums over the examples, so
/// partial results from several workers add up.
#[derive(Debug, Clone, PartialEq)]
pub struct GradSum {
    /// Sum of the per-example sparse categorical cross-entropy.
    pub loss_sum: f64,
    /// Examples whose arg-max prediction equals the label.
    pub correct: u64,
    pub count: u64,
    /// Sum of the per-example gradients, laid out like [`Params`].
    pub grad: Vec<f32>,
}

/// Scoring counts for a labelled set; partial results [`merge`](Self::merge).
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub classes: usize,
    pub count: u64,
    pub correct: u64,
    pub loss_sum: f64,
    /// `confusion[label * classes + predicted]`.
    pub confusion: Vec<u64>,
}

impl Evaluation {
    pub fn new(classes: usize) -> Self {
        Evaluation {
            classes,
            count: 0,
            correct: 0,
            loss_sum: 0.0,
            confusion: vec![0; classes * classes],
        }
    }

    /// Adds another partial result (same number of classes).
    pub fn merge(&mut self, other: &Evaluation) -> Result<()> {
        if other.classes != self.classes {
            return Err(NnError::Input(format!(
                "cannot merge evaluations over {} and {} classes",
                self.classes, other.classes
            )));
        }
        self.count += other.count;
        self.correct += other.correct;
        self.loss_sum += other.loss_sum;
        self.confusion
            .iter_mut()
            .zip(&other.confusion)
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    pub fn accuracy(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.correct as f64 / self.count as f64
        }
    }

    pub fn mean_loss(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.loss_sum / self.count as f64
        }
    }

    /// Adds a batch of predicted probabilities (`[n, classes]`).
    pub fn add_batch(&mut self, probs: ArrayViewD<'_, f32>, labels: &[u32]) -> Result<()> {
        let (loss, correct, preds) = score(probs, labels, self.classes)?;
        self.loss_sum += loss;
        self.correct += correct;
        self.count += labels.len() as u64;
        for (l, p) in labels.iter().zip(preds) {
            self.confusion[*l as usize * self.classes + p] += 1;
        }
        Ok(())
    }
}

/// Loss sum, correct count and arg-max per row of a probability batch.
fn score(
    probs: ArrayViewD<'_, f32>,
    labels: &[u32],
    classes: usize,
) -> Result<(f64, u64, Vec<usize>)> {
    if probs.ndim() != 2 || probs.shape()[1] != classes || probs.shape()[0] != labels.len() {
        return Err(NnError::Input(format!(
            "expected probabilities of shape ({}, {classes}), got {}",
            labels.len(),
            npy::shape_str(probs.shape())
        )));
    }
    let mut loss = 0.0f64;
    let mut correct = 0u64;
    let mut preds = Vec::with_capacity(labels.len());
    for (row, &label) in probs.axis_iter(Axis(0)).zip(labels) {
        let l = label as usize;
        if l >= classes {
            return Err(NnError::Input(format!(
                "label {label} is out of range for {classes} classes"
            )));
        }
        let p = row[l].clamp(CCE_EPSILON, 1.0 - CCE_EPSILON);
        loss -= (p as f64).ln();
        let mut best = 0;
        for (j, v) in row.iter().enumerate() {
            if *v > row[best] {
                best = j;
            }
        }
        correct += (best == l) as u64;
        preds.push(best);
    }
    Ok((loss, correct, preds))
}

impl Params {
    pub fn as_slice(&self) -> &[f32] {
        &self.values
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.values
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.values
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Tensor `i` in `get_weights()` order, with its Keras shape.
    pub fn tensor(&self, i: usize) -> ArrayViewD<'_, f32> {
        let s = &self.specs[i];
        ArrayViewD::from_shape(IxDyn(&s.shape), &self.values[s.offset..s.offset + s.len])
            .expect("a spec's shape matches its length")
    }

    /// The tensors as `model.get_weights()` returns them.
    pub fn to_arrays(&self) -> Vec<ArrayD<f32>> {
        (0..self.specs.len())
            .map(|i| self.tensor(i).to_owned())
            .collect()
    }

    /// `.npz` bytes as `np.savez(f, *model.get_weights())` writes them
    /// (`arr_0`, `arr_1`, ...), so `model.set_weights(list(np.load(f).values()))`
    /// loads them into Keras.
    pub fn to_npz_bytes(&self) -> Result<Vec<u8>> {
        let arrays: Vec<(String, ArrayViewD<'_, f32>)> = (0..self.specs.len())
            .map(|i| (format!("arr_{i}"), self.tensor(i)))
            .collect();
        npy::arrays_to_npz(&arrays)
    }

    pub fn save_npz(&self, path: &Path) -> Result<()> {
        let bytes = self.to_npz_bytes()?;
        std::fs::write(path, bytes).map_err(|e| NnError::io(path, e))
    }
}

impl Model {
    /// Imports `model.to_json()` text (Keras 3, or Keras 2 style).
    pub fn from_keras_json(text: &str) -> Result<Model> {
        let raw = keras::parse(text)?;
        Model::build(raw, text.to_string())
    }

    /// Reads a `.keras` archive held in memory.
    pub fn from_keras_bytes(bytes: &[u8], what: &str) -> Result<KerasArchive> {
        let zerr = |e: zip::result::ZipError| NnError::Zip {
            what: what.to_string(),
            message: e.to_string(),
        };
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(zerr)?;
        let names: Vec<String> = zip.file_names().map(str::to_string).collect();
        // Every entry is read with a limit: an archive of a few MiB can
        // otherwise inflate to gigabytes.
        let mut read = |name: &str, limit: u64, why: &str| -> Result<Vec<u8>> {
            let f = zip.by_name(name).map_err(zerr)?;
            npy::read_entry_bounded(f, what, limit, why, |entry, e| NnError::Zip {
                what: what.to_string(),
                message: format!("{entry}: {e}"),
            })
        };
        if !names.iter().any(|n| n == "config.json") {
            return Err(NnError::Model(format!(
                "{what}: no config.json in the archive (is it a Keras 3 .keras file?)"
            )));
        }
        let config = read(
            "config.json",
            KERAS_JSON_LIMIT,
            "a Keras model config is a few KiB of JSON",
        )?;
        let text = String::from_utf8(config)
            .map_err(|_| NnError::Json(format!("{what}: config.json is not UTF-8")))?;
        // The config comes first: the weights' limit follows from the
        // number of parameters it declares.
        let model = Model::from_keras_json(&text)?;
        let (limit, why) = model.weights_limit();
        let npz = names.iter().find(|n| n.ends_with(".npz"));
        let h5 = names
            .iter()
            .find(|n| n.as_str() == "model.weights.h5")
            .or_else(|| names.iter().find(|n| n.ends_with(".h5")));
        let weights = match (npz, h5) {
            (Some(n), _) => {
                let bytes = read(n, limit, &why)?;
                Some(model.params_from_npz_bytes(&bytes, &format!("{what}: {n}"))?)
            }
            (None, Some(n)) => {
                let bytes = read(n, limit, &why)?;
                Some(model.params_from_keras_h5_bytes(&bytes, &format!("{what}: {n}"))?)
            }
            (None, None) => None,
        };
        Ok(KerasArchive {
            model,
            weights,
            has_h5_weights: names.iter().any(|n| n.ends_with(".h5")),
        })
    }

    /// Reads a `.keras` archive.
    pub fn open_keras(path: &Path) -> Result<KerasArchive> {
        let bytes = npy::read_file(path)?;
        Model::from_keras_bytes(&bytes, &path.display().to_string())
    }

    /// Reads a model from a `model.to_json()` file or a `.keras` archive.
    pub fn load(path: &Path) -> Result<Model> {
        let bytes = npy::read_file(path)?;
        if bytes.starts_with(b"PK") {
            return Ok(Model::from_keras_bytes(&bytes, &path.display().to_string())?.model);
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| NnError::Json(format!("{}: not UTF-8 text", path.display())))?;
        Model::from_keras_json(&text).map_err(|e| match e {
            NnError::Json(m) => NnError::Json(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Reads a model and its weights: from `weights` (a `.npz`) when given,
    /// else from the `.keras` archive (an `.npz` in it, or
    /// `model.weights.h5`).
    pub fn load_with_weights(path: &Path, weights: Option<&Path>) -> Result<(Model, Params)> {
        let bytes = npy::read_file(path)?;
        let (model, inner) = if bytes.starts_with(b"PK") {
            let a = Model::from_keras_bytes(&bytes, &path.display().to_string())?;
            (a.model, a.weights)
        } else {
            (Model::load(path)?, None)
        };
        let params = match (weights, inner) {
            (Some(w), _) => model.load_params(w)?,
            (None, Some(p)) => p,
            (None, None) => {
                return Err(NnError::Weights(format!(
                    "{}: the model file has no weights; give a .npz of model.get_weights()",
                    path.display()
                )))
            }
        };
        Ok((model, params))
    }

    fn build(raw: keras::RawModel, keras_json: String) -> Result<Model> {
        let mut shape = raw.input_shape.clone();
        let mut layers = Vec::with_capacity(raw.layers.len());
        let mut specs: Vec<ParamSpec> = Vec::new();
        let mut first_param = Vec::with_capacity(raw.layers.len());
        let mut offset = 0usize;
        for rl in raw.layers {
            let err = |m: String| NnError::Layer {
                layer: rl.name.clone(),
                class: rl.class.clone(),
                message: m,
            };
            let spatial = |shape: &[usize]| -> Result<()> {
                if shape.len() == 3 {
                    Ok(())
                } else {
                    Err(err(format!(
                        "needs a (height, width, channels) input, got {}",
                        batch_shape_str(shape)
                    )))
                }
            };
            let mut new_specs: Vec<NewSpec> = Vec::new();
            let out_shape = match &rl.kind {
                LayerKind::Dense {
                    units, use_bias, ..
                } => {
                    if shape.len() != 1 {
                        return Err(err(format!(
                            "Dense on an input of shape {} is not supported; add a Flatten first",
                            batch_shape_str(&shape)
                        )));
                    }
                    new_specs.push((
                        "kernel",
                        vec![shape[0], *units],
                        rl.kernel_init,
                        (shape[0], *units),
                    ));
                    if *use_bias {
                        new_specs.push(("bias", vec![*units], rl.bias_init, (0, 0)));
                    }
                    vec![*units]
                }
                LayerKind::Conv2D {
                    filters,
                    kernel,
                    strides,
                    padding,
                    use_bias,
                    ..
                } => {
                    spatial(&shape)?;
                    let (oh, ow) =
                        window_output(*padding, &shape, *kernel, *strides).ok_or_else(|| {
                            err(format!(
                                "kernel {kernel:?} is larger than the input {}",
                                batch_shape_str(&shape)
                            ))
                        })?;
                    let area = kernel[0] * kernel[1];
                    new_specs.push((
                        "kernel",
                        vec![kernel[0], kernel[1], shape[2], *filters],
                        rl.kernel_init,
                        (area * shape[2], area * filters),
                    ));
                    if *use_bias {
                        new_specs.push(("bias", vec![*filters], rl.bias_init, (0, 0)));
                    }
                    vec![oh, ow, *filters]
                }
                LayerKind::MaxPool2D {
                    pool,
                    strides,
                    padding,
                }
                | LayerKind::AvgPool2D {
                    pool,
                    strides,
                    padding,
                } => {
                    spatial(&shape)?;
                    let (oh, ow) =
                        window_output(*padding, &shape, *pool, *strides).ok_or_else(|| {
                            err(format!(
                                "pool {pool:?} is larger than the input {}",
                                batch_shape_str(&shape)
                            ))
                        })?;
                    vec![oh, ow, shape[2]]
                }
                LayerKind::Flatten => vec![shape.iter().product()],
                LayerKind::Dropout { .. } | LayerKind::Activation(_) => shape.clone(),
            };
            if shape.iter().product::<usize>() > u32::MAX as usize {
                return Err(err("the input of this layer is too large".into()));
            }
            first_param.push(specs.len());
            for (suffix, pshape, init, fans) in new_specs {
                let len = pshape.iter().product();
                specs.push(ParamSpec {
                    name: format!("{}/{suffix}", rl.name),
                    shape: pshape,
                    offset,
                    len,
                    init,
                    fans,
                });
                offset += len;
            }
            layers.push(Layer {
                name: rl.name,
                class: rl.class,
                kind: rl.kind,
                input_shape: shape.clone(),
                output_shape: out_shape.clone(),
                kernel_init: rl.kernel_init,
                bias_init: rl.bias_init,
            });
            shape = out_shape;
        }
        Ok(Model {
            name: raw.name,
            input_shape: raw.input_shape,
            layers,
            specs: specs.into(),
            first_param,
            param_count: offset,
            keras_json,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Per-sample input shape (without the batch dimension).
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// Per-sample output shape.
    pub fn output_shape(&self) -> &[usize] {
        self.layers
            .last()
            .map(|l| l.output_shape.as_slice())
            .unwrap_or(&self.input_shape)
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The JSON this model was imported from, to ship it to other nodes.
    pub fn keras_json(&self) -> &str {
        &self.keras_json
    }

    /// Parameter tensors in Keras `get_weights()` order.
    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Total number of scalar parameters (the length of the flat vector).
    pub fn param_count(&self) -> usize {
        self.param_count
    }

    /// Fresh parameters as Keras initialises them (glorot_uniform kernels,
    /// zero biases unless the config says otherwise), from `seed`.
    pub fn init_params(&self, seed: u64) -> Params {
        let mut values = vec![0.0f32; self.param_count];
        for (i, s) in self.specs.iter().enumerate() {
            let dst = &mut values[s.offset..s.offset + s.len];
            match s.init {
                Init::Constant(c) => dst.fill(c),
                Init::VarianceUniform { scale, mode } => {
                    let fan = match mode {
                        FanMode::In => s.fans.0 as f64,
                        FanMode::Avg => (s.fans.0 + s.fans.1) as f64 / 2.0,
                    };
                    let limit = (scale / fan.max(1.0)).sqrt() as f32;
                    let mut rng = SplitMix64::derive(seed, 0x1417, i as u64);
                    for v in dst {
                        *v = (rng.next_f32() * 2.0 - 1.0) * limit;
                    }
                }
            }
        }
        Params {
            values,
            specs: self.specs.clone(),
        }
    }

    /// Wraps a flat vector (e.g. received over the network) as parameters.
    pub fn params_from_flat(&self, values: Vec<f32>) -> Result<Params> {
        if values.len() != self.param_count {
            return Err(NnError::Weights(format!(
                "flat parameter vector has {} values, the model has {}",
                values.len(),
                self.param_count
            )));
        }
        Ok(Params {
            values,
            specs: self.specs.clone(),
        })
    }

    /// Builds parameters from tensors in `get_weights()` order; `names` label
    /// them in errors.
    pub fn params_from_arrays(&self, arrays: &[(String, ArrayD<f32>)]) -> Result<Params> {
        if arrays.len() != self.specs.len() {
            let expected: Vec<String> = self
                .specs
                .iter()
                .map(|s| format!("{} {}", s.name, npy::shape_str(&s.shape)))
                .collect();
            return Err(NnError::Weights(format!(
                "{} arrays given, the model needs {}: {}",
                arrays.len(),
                self.specs.len(),
                expected.join(", ")
            )));
        }
        let mut values = Vec::with_capacity(self.param_count);
        for ((name, arr), spec) in arrays.iter().zip(self.specs.iter()) {
            if arr.shape() != spec.shape.as_slice() {
                return Err(NnError::Weights(format!(
                    "array {name} ({}): expected shape {}, found {}",
                    spec.name,
                    npy::shape_str(&spec.shape),
                    npy::shape_str(arr.shape())
                )));
            }
            values.extend(arr.iter().copied());
        }
        self.params_from_flat(values)
    }

    /// Reads `.npz` bytes holding `get_weights()` (`arr_0`, `arr_1`, ... as
    /// `np.savez` names them; other names are taken in archive order).
    pub fn params_from_npz_bytes(&self, bytes: &[u8], what: &str) -> Result<Params> {
        // The arrays inflate within what this model's weights can need, so
        // a small `.npz` cannot expand to gigabytes.
        let (limit, why) = self.weights_limit();
        let mut arrays = npy::npz_to_arrays_bounded(bytes, what, limit, &why)?;
        let index = |name: &str| {
            name.strip_prefix("arr_")
                .and_then(|i| i.parse::<usize>().ok())
        };
        if arrays.iter().all(|(n, _)| index(n).is_some()) {
            arrays.sort_by_key(|(n, _)| index(n));
        }
        self.params_from_arrays(&arrays).map_err(|e| match e {
            NnError::Weights(m) => NnError::Weights(format!("{what}: {m}")),
            e => e,
        })
    }

    /// Reads the bytes of a Keras 3 `model.weights.h5` (as saved inside a
    /// `.keras` archive): each layer's `layers/<name>/vars/<i>`.
    pub fn params_from_keras_h5_bytes(&self, bytes: &[u8], what: &str) -> Result<Params> {
        let layers: Vec<(&str, usize)> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let end = self
                    .first_param
                    .get(i + 1)
                    .copied()
                    .unwrap_or(self.specs.len());
                (l.name.as_str(), end - self.first_param[i])
            })
            .collect();
        let (limit, why) = self.weights_limit();
        let arrays = h5::keras_weights(bytes, &layers, what, limit, &why)?;
        self.params_from_arrays(&arrays).map_err(|e| match e {
            NnError::Weights(m) => NnError::Weights(format!("{what}: {m}")),
            e => e,
        })
    }

    /// Most bytes a weights file for this model may hold (or its arrays
    /// decode to), and why, for errors.
    fn weights_limit(&self) -> (u64, String) {
        let params = self.param_count as u64;
        let values = params.saturating_mul(WEIGHTS_BYTES_PER_PARAM);
        (
            values.saturating_add(WEIGHTS_OVERHEAD),
            format!(
                "the model's {params} parameters need at most {values} bytes \
                 plus {WEIGHTS_OVERHEAD} of file structure"
            ),
        )
    }

    pub fn load_params(&self, path: &Path) -> Result<Params> {
        let bytes = npy::read_file(path)?;
        self.params_from_npz_bytes(&bytes, &path.display().to_string())
    }

    fn net(&self) -> Net<'_> {
        Net {
            layers: &self.layers,
            specs: &self.specs,
            first_param: &self.first_param,
        }
    }

    fn check(&self, params: &Params, x: &ArrayViewD<'_, f32>) -> Result<usize> {
        if params.values.len() != self.param_count || *params.specs != *self.specs {
            return Err(NnError::Weights(
                "the parameters belong to a different model".into(),
            ));
        }
        if x.ndim() != self.input_shape.len() + 1 || x.shape()[1..] != self.input_shape[..] {
            return Err(NnError::Input(format!(
                "expected a batch of shape {}, got {}",
                batch_shape_str(&self.input_shape),
                npy::shape_str(x.shape())
            )));
        }
        Ok(x.shape()[0])
    }

    fn batch_array(&self, n: usize, shape: &[usize], data: Vec<f32>) -> ArrayD<f32> {
        let mut dims = vec![n];
        dims.extend_from_slice(shape);
        ArrayD::from_shape_vec(IxDyn(&dims), data).expect("layer output sizes are consistent")
    }

    /// Runs the model on a batch `[n, ...input_shape]`. With `dropout`
    /// set, dropout layers are active (training mode).
    pub fn forward(
        &self,
        params: &Params,
        x: ArrayViewD<'_, f32>,
        dropout: Option<DropoutRng>,
    ) -> Result<ArrayD<f32>> {
        let n = self.check(params, &x)?;
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout is contiguous");
        let mut tape = self.net().forward(&params.values, xs, n, dropout);
        let out = tape.outs.pop().unwrap_or_else(|| xs.to_vec());
        Ok(self.batch_array(n, self.output_shape(), out))
    }

    /// Inference in bounded-memory batches.
    pub fn predict(&self, params: &Params, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        let n = self.check(params, &x)?;
        let per: usize = self.output_shape().iter().product();
        let mut out = Vec::with_capacity(n * per);
        for chunk in x.axis_chunks_iter(Axis(0), PREDICT_BATCH) {
            out.extend(self.forward(params, chunk, None)?);
        }
        Ok(self.batch_array(n, self.output_shape(), out))
    }

    /// Every layer's output (inference mode), for inspection and tests.
    pub fn layer_outputs(
        &self,
        params: &Params,
        x: ArrayViewD<'_, f32>,
    ) -> Result<Vec<ArrayD<f32>>> {
        let n = self.check(params, &x)?;
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout is contiguous");
        let tape = self.net().forward(&params.values, xs, n, None);
        Ok(tape
            .outs
            .into_iter()
            .zip(&self.layers)
            .map(|(o, l)| self.batch_array(n, &l.output_shape, o))
            .collect())
    }

    fn classes(&self) -> Result<usize> {
        match self.output_shape() {
            [c] if *c >= 1 => Ok(*c),
            s => Err(NnError::Model(format!(
                "sparse categorical cross-entropy needs a (None, classes) output, the model gives {}",
                batch_shape_str(s)
            ))),
        }
    }

    /// Loss, accuracy and confusion matrix over a labelled set.
    pub fn evaluate(
        &self,
        params: &Params,
        x: ArrayViewD<'_, f32>,
        labels: &[u32],
    ) -> Result<Evaluation> {
        let classes = self.classes()?;
        let n = self.check(params, &x)?;
        if labels.len() != n {
            return Err(NnError::Input(format!(
                "{n} examples but {} labels",
                labels.len()
            )));
        }
        let mut eval = Evaluation::new(classes);
        for (i, chunk) in x.axis_chunks_iter(Axis(0), PREDICT_BATCH).enumerate() {
            let rows = chunk.shape()[0];
            let probs = self.forward(params, chunk, None)?;
            let start = i * PREDICT_BATCH;
            eval.add_batch(probs.view(), &labels[start..start + rows])?;
        }
        Ok(eval)
    }

    /// Sparse categorical cross-entropy summed over the batch, the number
    /// of correct predictions, and the gradient summed over the batch
    /// (not averaged: divide by the global batch size after adding the
    /// shares of all workers). `dropout: None` disables dropout.
    ///
    /// Deterministic: the same inputs give bit-identical results for any
    /// number of threads.
    pub fn loss_and_grad_sum(
        &self,
        params: &Params,
        x: ArrayViewD<'_, f32>,
        labels: &[u32],
        dropout: Option<DropoutRng>,
    ) -> Result<GradSum> {
        let classes = self.classes()?;
        let n = self.check(params, &x)?;
        if labels.len() != n {
            return Err(NnError::Input(format!(
                "{n} examples but {} labels",
                labels.len()
            )));
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes) {
            return Err(NnError::Input(format!(
                "label {bad} is out of range for {classes} classes"
            )));
        }
        let mut grad = vec![0.0f32; self.param_count];
        if n == 0 {
            return Ok(GradSum {
                loss_sum: 0.0,
                correct: 0,
                count: 0,
                grad,
            });
        }
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout is contiguous");
        let net = self.net();
        let tape = net.forward(&params.values, xs, n, dropout);
        let probs = tape.outs.last().expect("a model has layers");
        let pv = ArrayViewD::from_shape(IxDyn(&[n, classes]), probs.as_slice())
            .expect("output size matches");
        let (loss_sum, correct, _) = score(pv, labels, classes)?;

        let softmax_last =
            self.layers.last().and_then(Layer::activation) == Some(Activation::Softmax);
        let mut dy = probs.clone();
        for (row, &l) in dy.chunks_exact_mut(classes).zip(labels) {
            let l = l as usize;
            if softmax_last {
                // d(-log softmax_l)/d logits = p - onehot; exact and stable.
                row[l] -= 1.0;
            } else {
                let p = row[l];
                row.fill(0.0);
                if p > CCE_EPSILON && p < 1.0 - CCE_EPSILON {
                    row[l] = -1.0 / p;
                }
            }
        }
        net.backward(&params.values, xs, n, &tape, dy, softmax_last, &mut grad);
        Ok(GradSum {
            loss_sum,
            correct,
            count: n as u64,
            grad,
        })
    }

    /// Multiply-adds x2 per sample: (forward, forward + backward).
    pub fn flops_per_sample(&self) -> (f64, f64) {
        let mut fwd = 0.0;
        let mut train = 0.0;
        for (i, l) in self.layers.iter().enumerate() {
            let f = match &l.kind {
                LayerKind::Dense { units, .. } => 2.0 * l.input_shape[0] as f64 * *units as f64,
                LayerKind::Conv2D {
                    kernel, filters, ..
                } => {
                    2.0 * (l.output_shape[0] * l.output_shape[1]) as f64
                        * (kernel[0] * kernel[1] * l.input_shape[2]) as f64
                        * *filters as f64
                }
                _ => 0.0,
            };
            fwd += f;
            // Backward: the kernel gradient, plus the input gradient except
            // for the first layer.
            train += f + f + if i > 0 { f } else { 0.0 };
        }
        (fwd, train)
    }

    /// The table `model.summary()` prints in Keras 3.
    pub fn summary(&self) -> String {
        const W: [usize; 3] = [33, 24, 15];
        let line = |l: char, m: char, r: char, fill: char| -> String {
            let mut s = String::new();
            s.push(l);
            for (i, w) in W.iter().enumerate() {
                s.extend(std::iter::repeat_n(fill, *w));
                s.push(if i + 1 < W.len() { m } else { r });
            }
            s
        };
        let row = |sep: char, a: &str, b: &str, c: &str| -> String {
            format!(
                "{sep} {a:<w0$} {sep} {b:<w1$} {sep} {c:>w2$} {sep}",
                w0 = W[0] - 2,
                w1 = W[1] - 2,
                w2 = W[2] - 2
            )
        };
        let mut out = vec![
            format!("Model: \"{}\"", self.name),
            line('┏', '┳', '┓', '━'),
            row('┃', "Layer (type)", "Output Shape", "Param #"),
            line('┡', '╇', '┩', '━'),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let first = self.first_param[i];
            let end = self
                .first_param
                .get(i + 1)
                .copied()
                .unwrap_or(self.specs.len());
            let count: usize = self.specs[first..end].iter().map(|s| s.len).sum();
            out.push(row(
                '│',
                &format!("{} ({})", l.name, l.class),
                &batch_shape_str(&l.output_shape),
                &thousands(count),
            ));
            out.push(if i + 1 < self.layers.len() {
                line('├', '┼', '┤', '─')
            } else {
                line('└', '┴', '┘', '─')
            });
        }
        let total = self.param_count;
        out.push(format!(
            " Total params: {} ({})",
            thousands(total),
            memory_size(total * 4)
        ));
        out.push(format!(
            " Trainable params: {} ({})",
            thousands(total),
            memory_size(total * 4)
        ));
        out.push(" Non-trainable params: 0 (0.00 B)".to_string());
        let mut s = out.join("\n");
        s.push('\n');
        s
    }
}

/// `(None, 28, 28, 1)`.
pub(crate) fn batch_shape_str(shape: &[usize]) -> String {
    let mut s = String::from("(None");
    for d in shape {
        s.push_str(&format!(", {d}"));
    }
    s.push(')');
    s
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let head = match digits.len() % 3 {
        0 => 3,
        r => r,
    };
    let mut out = digits[..head].to_string();
    for group in digits.as_bytes()[head..].chunks(3) {
        out.push(',');
        out.push_str(std::str::from_utf8(group).unwrap_or_default());
    }
    out
}

/// Keras's `readable_memory_size`.
fn memory_size(bytes: usize) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KB", "MB", "GB", "TB"] {
        if v / 1024.0 < 1.0 {
            return format!("{v:.2} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.2} PB")
}

/// Output height and width of a sliding window (convolution or pooling)
/// over an HWC input; None when the window does not fit.
fn window_output(
    padding: crate::nn::Padding,
    shape: &[usize],
    window: [usize; 2],
    strides: [usize; 2],
) -> Option<(usize, usize)> {
    let (oh, _) = padding.output_and_pad(shape[0], window[0], strides[0])?;
    let (ow, _) = padding.output_and_pad(shape[1], window[1], strides[1])?;
    Some((oh, ow))
}
