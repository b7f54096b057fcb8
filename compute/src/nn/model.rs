//! A model: import, parameters, inference, loss and gradients.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};

use super::activation::Activation;
use super::error::{NnError, Result};
use super::exec::{DropoutRng, Exec, Train};
use super::graph::{self, Graph};
use super::h5;
use super::init::Init;
use super::layers::{shape_str, StatSums};
use super::loss::{Loss, Target};
use super::npy;
use super::summary;
use super::sync::BatchSync;

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

/// A Keras model (Sequential or any functional graph) ready to run.
#[derive(Debug, Clone)]
pub struct Model {
    graph: Arc<Graph>,
    specs: Arc<[ParamSpec]>,
    param_count: usize,
    keras_json: String,
}

/// One weight tensor in Keras `get_weights()` order.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// `layer/kernel`, `layer/moving_mean`.
    pub name: String,
    pub shape: Vec<usize>,
    /// Where it starts in the flat parameter vector.
    pub offset: usize,
    pub len: usize,
    pub init: Init,
    /// False for statistics (moving mean and variance) and for the weights
    /// of frozen layers: they get no gradient and no optimizer update.
    pub trainable: bool,
    /// Keras keeps it as an integer (Normalization's sample count).
    pub integer: bool,
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
    /// Sum of the per-example sparse categorical cross-entropy, plus the
    /// weights' regularization penalty once per example.
    pub loss_sum: f64,
    /// Examples whose arg-max prediction equals the label.
    pub correct: u64,
    pub count: u64,
    /// Sum of the per-example gradients, laid out like [`Params`].
    pub grad: Vec<f32>,
    /// Per-channel input sums of each BatchNormalization call in training
    /// mode, in call order: added over workers, they give the global
    /// batch's statistics for the moving averages
    /// ([`Model::update_moving_stats`]).
    pub stats: Vec<StatSums>,
}

impl GradSum {
    /// Hands the gradient back for the next step's, instead of freeing
    /// memory the next step would take again from the system.
    pub fn recycle(self) {
        super::buffers::recycle(self.grad);
    }
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
        let graph = graph::parse(text)?;
        Ok(Model::build(graph, text.to_string()))
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

    /// Lays the layers' weights out in Keras `weights` order: layers in
    /// config order (a nested model's in place), each layer's weights in
    /// the order it creates them.
    fn build(mut graph: Graph, keras_json: String) -> Model {
        let mut specs = Vec::new();
        let mut offset = 0usize;
        for layer in &mut graph.layers {
            layer.params.clear();
            for d in &layer.decls {
                let len = d.shape.iter().product();
                layer.params.push(specs.len());
                specs.push(ParamSpec {
                    name: format!("{}/{}", layer.name, d.name),
                    shape: d.shape.clone(),
                    offset,
                    len,
                    init: d.init,
                    trainable: d.trainable && layer.trainable,
                    integer: d.integer,
                });
                offset += len;
            }
        }
        Model {
            graph: Arc::new(graph),
            specs: specs.into(),
            param_count: offset,
            keras_json,
        }
    }

    pub fn name(&self) -> &str {
        &self.graph.name
    }

    /// Per-sample input shape (without the batch dimension).
    pub fn input_shape(&self) -> &[usize] {
        &self.graph.shapes[self.graph.input]
    }

    /// Per-sample output shape.
    pub fn output_shape(&self) -> &[usize] {
        &self.graph.shapes[self.graph.output]
    }

    /// The layers' names and classes, in config order (nested models'
    /// layers in place).
    pub fn layer_names(&self) -> Vec<(&str, &str)> {
        self.graph
            .layers
            .iter()
            .map(|l| (l.name.as_str(), l.class.as_str()))
            .collect()
    }

    /// Each layer with weights: the path of its variables in
    /// `model.weights.h5`, and its weights in Keras order.
    pub(crate) fn layer_params(&self) -> Vec<(&str, Vec<&ParamSpec>)> {
        self.graph
            .layers
            .iter()
            .filter(|l| !l.params.is_empty())
            .map(|l| {
                (
                    l.h5_path.as_str(),
                    l.params.iter().map(|&i| &self.specs[i]).collect(),
                )
            })
            .collect()
    }

    /// The optimizer, loss and metrics the model was compiled with, when
    /// its config records them (a compiled `.keras` file).
    pub fn compile_settings(&self) -> Result<Option<super::compile::CompileSettings>> {
        let v: serde_json::Value =
            serde_json::from_str(&self.keras_json).map_err(|e| NnError::Json(e.to_string()))?;
        super::compile::parse(&v)
    }

    /// The loss the model was compiled with, when its config records one.
    pub fn compile_loss(&self) -> Result<Option<Loss>> {
        let v: serde_json::Value =
            serde_json::from_str(&self.keras_json).map_err(|e| NnError::Json(e.to_string()))?;
        match v.get("compile_config").and_then(|c| c.get("loss")) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(l) => Loss::from_keras(l).map(Some).map_err(|m| {
                NnError::Model(format!(
                    "the model's compile_config uses {m}; give --loss to train with another"
                ))
            }),
        }
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

    /// The trainable weights as (offset, length) in the flat vector: what an
    /// optimizer updates.
    pub fn trainable_variables(&self) -> Vec<(usize, usize)> {
        self.specs
            .iter()
            .filter(|s| s.trainable)
            .map(|s| (s.offset, s.len))
            .collect()
    }

    /// Scalar parameters that train (the rest are statistics or frozen).
    pub fn trainable_count(&self) -> usize {
        self.specs
            .iter()
            .filter(|s| s.trainable)
            .map(|s| s.len)
            .sum()
    }

    /// Fresh parameters drawn from each weight's Keras initializer
    /// (glorot_uniform kernels and zero biases unless the config says
    /// otherwise), from `seed`.
    pub fn init_params(&self, seed: u64) -> Params {
        let mut values = vec![0.0f32; self.param_count];
        for (i, s) in self.specs.iter().enumerate() {
            s.init.fill(
                &mut values[s.offset..s.offset + s.len],
                &s.shape,
                seed,
                i as u64,
            );
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
    /// `.keras` archive): each layer's `layers/<name>/vars/<i>` (nested
    /// models' layers under `layers/<model>/layers/<name>/vars`).
    pub fn params_from_keras_h5_bytes(&self, bytes: &[u8], what: &str) -> Result<Params> {
        let layers: Vec<(&str, &str, usize)> = self
            .graph
            .layers
            .iter()
            .map(|l| (l.name.as_str(), l.h5_path.as_str(), l.params.len()))
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

    fn exec(&self) -> Exec<'_> {
        Exec {
            graph: &self.graph,
            specs: &self.specs,
        }
    }

    fn check(&self, params: &Params, x: &ArrayViewD<'_, f32>) -> Result<usize> {
        if params.values.len() != self.param_count || *params.specs != *self.specs {
            return Err(NnError::Weights(
                "the parameters belong to a different model".into(),
            ));
        }
        let want = self.input_shape();
        if x.ndim() != want.len() + 1 || x.shape()[1..] != want[..] {
            return Err(NnError::Input(format!(
                "expected a batch of shape {}, got {}",
                batch_shape_str(want),
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
    /// set, the model runs in training mode (dropout and noise on,
    /// BatchNormalization on the batch's statistics).
    pub fn forward(
        &self,
        params: &Params,
        x: ArrayViewD<'_, f32>,
        dropout: Option<DropoutRng>,
    ) -> Result<ArrayD<f32>> {
        let n = self.check(params, &x)?;
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout is contiguous");
        let train = dropout.map(|d| Train {
            dropout: Some(d),
            sync: None,
        });
        let mut tape = self.exec().forward(&params.values, xs, n, train, false);
        let out = tape.take(self.graph.output).unwrap_or_else(|| xs.to_vec());
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

    /// Every layer call's output (inference mode), labelled by layer name,
    /// for inspection and tests.
    pub fn layer_outputs(
        &self,
        params: &Params,
        x: ArrayViewD<'_, f32>,
    ) -> Result<Vec<(String, ArrayD<f32>)>> {
        let n = self.check(params, &x)?;
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout is contiguous");
        let mut tape = self.exec().forward(&params.values, xs, n, None, true);
        Ok(self
            .graph
            .calls
            .iter()
            .map(|c| {
                let v = tape.take(c.output).unwrap_or_default();
                (
                    self.graph.layers[c.layer].name.clone(),
                    self.batch_array(n, &self.graph.shapes[c.output], v),
                )
            })
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

    /// The activation the last layer applies, if it is fused into it.
    fn final_activation(&self) -> Option<Activation> {
        let g = &self.graph;
        g.calls
            .iter()
            .rfind(|c| c.output == g.output)
            .and_then(|c| g.layers[c.layer].op.activation())
    }

    /// As [`loss_and_grad_sum`](Self::loss_and_grad_sum) with every layer
    /// in inference mode (BatchNormalization on its moving statistics,
    /// dropout and noise off), as Keras computes gradients of
    /// `model(x, training=False)`.
    pub fn inference_loss_and_grad_sum(
        &self,
        params: &Params,
        x: ArrayViewD<'_, f32>,
        labels: &[u32],
    ) -> Result<GradSum> {
        self.grad_sum(params, x, labels, None)
    }

    /// Training-mode sparse categorical cross-entropy summed over the
    /// batch, the number of correct predictions, the gradient summed over
    /// the batch (not averaged: divide by the global batch size after
    /// adding the shares of all workers), and BatchNormalization's batch
    /// sums. `dropout: None` runs with dropout and noise off (batch
    /// statistics stay on).
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
        self.grad_sum(
            params,
            x,
            labels,
            Some(Train {
                dropout,
                sync: None,
            }),
        )
    }

    /// `train`: None for inference mode, else training mode with optional
    /// dropout randomness.
    fn grad_sum(
        &self,
        params: &Params,
        x: ArrayViewD<'_, f32>,
        labels: &[u32],
        train: Option<Train<'_>>,
    ) -> Result<GradSum> {
        self.classes()?;
        self.grad_sum_streamed(
            &Loss::default(),
            params,
            x,
            Target::Classes(labels),
            train,
            &mut |_, _| {},
        )
    }

    /// Training-mode loss and gradient sums for any [`Loss`] and target
    /// (class labels, or values such as the input itself).
    pub fn loss_and_grad_sum_with(
        &self,
        loss: &Loss,
        params: &Params,
        x: ArrayViewD<'_, f32>,
        target: Target<'_>,
        dropout: Option<DropoutRng>,
    ) -> Result<GradSum> {
        self.loss_and_grad_sum_streamed(loss, params, x, target, dropout, None, &mut |_, _| {})
    }

    /// [`loss_and_grad_sum_with`](Self::loss_and_grad_sum_with) on one
    /// worker's share of a batch split between workers: with `sync`,
    /// BatchNormalization normalizes with the statistics of the whole
    /// batch, exchanged with the other workers, so the workers' summed
    /// gradients are those of the whole batch; a failed exchange is an
    /// error. `ready` is handed each parameter's gradient as soon as it is
    /// final (its range in the flat vector and the whole gradient so far),
    /// while the backward pass goes on: a worker starts summing the last
    /// layers' gradients with the other workers' before the first layers'
    /// exist. Every parameter is handed over exactly once.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grad_sum_streamed(
        &self,
        loss: &Loss,
        params: &Params,
        x: ArrayViewD<'_, f32>,
        target: Target<'_>,
        dropout: Option<DropoutRng>,
        sync: Option<&dyn BatchSync>,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<GradSum> {
        let g = self.grad_sum_streamed(
            loss,
            params,
            x,
            target,
            Some(Train { dropout, sync }),
            ready,
        )?;
        match sync.and_then(|s| s.failure()) {
            Some(why) => Err(NnError::Exchange(why)),
            None => Ok(g),
        }
    }

    fn grad_sum_streamed(
        &self,
        loss: &Loss,
        params: &Params,
        x: ArrayViewD<'_, f32>,
        target: Target<'_>,
        train: Option<Train<'_>>,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<GradSum> {
        let n = self.check(params, &x)?;
        let per: usize = self.output_shape().iter().product();
        if target.len(per) != n {
            return Err(NnError::Input(format!(
                "{n} examples but {} targets",
                target.len(per)
            )));
        }
        // Kept from an earlier step when its owner recycled it.
        let mut grad = super::buffers::zeroed(self.param_count);
        if n == 0 {
            ready(0..self.param_count, &grad);
            return Ok(GradSum {
                loss_sum: 0.0,
                correct: 0,
                count: 0,
                grad,
                stats: Vec::new(),
            });
        }
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout is contiguous");
        let exec = self.exec();
        let tape = exec.forward(&params.values, xs, n, train, true);
        let stats = exec.stats(&tape).into_iter().map(|(_, s)| s).collect();
        let out = tape.get(self.graph.output).unwrap_or(&[]);
        let e = loss
            .evaluate(out, per, target, self.final_activation())
            .map_err(NnError::Input)?;
        let sync = train.and_then(|t| t.sync);
        let done = vec![std::cell::Cell::new(false); self.graph.layers.len()];
        let mut finished = |li: usize, grad: &mut [f32]| {
            done[li].set(true);
            self.add_regularizer_grad(li, params, n, grad);
            for &pi in &self.graph.layers[li].params {
                let s = &self.specs[pi];
                ready(s.offset..s.offset + s.len, grad);
            }
        };
        exec.backward(
            &params.values,
            xs,
            n,
            tape,
            e.dy,
            e.preact,
            &mut grad,
            sync,
            &mut finished,
        );
        // Layers no call reaches (their gradients stay zero).
        let unreached: Vec<usize> = (0..done.len()).filter(|&li| !done[li].get()).collect();
        for li in unreached {
            finished(li, &mut grad);
        }
        let loss_sum = e.loss_sum + self.penalty(params) * n as f64;
        Ok(GradSum {
            loss_sum,
            correct: e.correct,
            count: n as u64,
            grad,
            stats,
        })
    }

    /// Loss (and, for classification losses, correct predictions) over a
    /// set, at inference, in bounded-memory batches.
    pub fn evaluate_with(
        &self,
        loss: &Loss,
        params: &Params,
        x: ArrayViewD<'_, f32>,
        target: Target<'_>,
    ) -> Result<Evaluation> {
        if let (Loss::SparseCategoricalCrossentropy { from_logits: false }, Target::Classes(l)) =
            (loss, target)
        {
            return self.evaluate(params, x, l);
        }
        let n = self.check(params, &x)?;
        let per: usize = self.output_shape().iter().product();
        if target.len(per) != n {
            return Err(NnError::Input(format!(
                "{n} examples but {} targets",
                target.len(per)
            )));
        }
        let mut eval = Evaluation::new(0);
        for (i, chunk) in x.axis_chunks_iter(Axis(0), PREDICT_BATCH).enumerate() {
            let rows = chunk.shape()[0];
            let out = self.forward(params, chunk, None)?;
            let start = i * PREDICT_BATCH;
            let t = match target {
                Target::Classes(c) => Target::Classes(&c[start..start + rows]),
                Target::Values(v) => Target::Values(&v[start * per..(start + rows) * per]),
            };
            let out = out.as_standard_layout();
            let e = loss
                .evaluate(
                    out.as_slice().unwrap_or(&[]),
                    per,
                    t,
                    self.final_activation(),
                )
                .map_err(NnError::Input)?;
            eval.loss_sum += e.loss_sum;
            eval.correct += e.correct;
            eval.count += rows as u64;
        }
        Ok(eval)
    }

    /// The weights' regularization penalty. Multiplied by each worker's
    /// examples, summed over workers and divided by the global batch, it is
    /// the penalty once per batch, as Keras adds it.
    fn penalty(&self, params: &Params) -> f64 {
        let mut penalty = 0.0;
        for layer in &self.graph.layers {
            for (d, &pi) in layer.decls.iter().zip(&layer.params) {
                let s = &self.specs[pi];
                if let (Some(r), true) = (d.regularizer, s.trainable) {
                    penalty += r.penalty(&params.values[s.offset..s.offset + s.len]);
                }
            }
        }
        penalty
    }

    /// Adds `n` times the gradient of layer `li`'s regularization penalty
    /// to `grad`, once its backward pass is complete.
    fn add_regularizer_grad(&self, li: usize, params: &Params, n: usize, grad: &mut [f32]) {
        let layer = &self.graph.layers[li];
        for (d, &pi) in layer.decls.iter().zip(&layer.params) {
            let s = &self.specs[pi];
            if let (Some(r), true) = (d.regularizer, s.trainable) {
                let w = &params.values[s.offset..s.offset + s.len];
                r.add_grad(w, &mut grad[s.offset..s.offset + s.len], n as f32);
            }
        }
    }

    /// Folds a training step's batch statistics (summed over every worker,
    /// in the order [`loss_and_grad_sum`](Self::loss_and_grad_sum) gives
    /// them) into the BatchNormalization moving averages, as Keras does
    /// after each step.
    pub fn update_moving_stats(&self, params: &mut [f32], stats: &[StatSums]) -> Result<()> {
        if params.len() != self.param_count {
            return Err(NnError::Weights(
                "the parameters belong to a different model".into(),
            ));
        }
        let g = &self.graph;
        let stateful: Vec<usize> = g
            .calls
            .iter()
            .filter(|c| {
                let l = &g.layers[c.layer];
                l.op.keeps_moving_stats() && l.trainable
            })
            .map(|c| c.layer)
            .collect();
        if stateful.len() != stats.len() {
            return Err(NnError::Input(format!(
                "{} batch statistics for {} BatchNormalization calls",
                stats.len(),
                stateful.len()
            )));
        }
        for (&li, st) in stateful.iter().zip(stats) {
            let layer = &g.layers[li];
            let mut slices: Vec<&mut [f32]> = Vec::new();
            let mut rest: &mut [f32] = params;
            let mut base = 0;
            for &pi in &layer.params {
                let s = &self.specs[pi];
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(s.offset - base);
                let (mine, tail) = tail.split_at_mut(s.len);
                slices.push(mine);
                rest = tail;
                base = s.offset + s.len;
            }
            layer.op.apply_stats(&mut slices, st);
        }
        Ok(())
    }

    /// Multiply-adds x2 per sample: (forward, forward + backward).
    pub fn flops_per_sample(&self) -> (f64, f64) {
        let g = &self.graph;
        let mut fwd = 0.0;
        let mut train = 0.0;
        for (i, c) in g.calls.iter().enumerate() {
            let ins: Vec<Vec<usize>> = c.inputs.iter().map(|&t| g.shapes[t].clone()).collect();
            let f = g.layers[c.layer].op.flops(&ins, &g.shapes[c.output]);
            fwd += f;
            // Backward: the weight gradient, plus the input gradient except
            // where the input is the model's.
            let first = c.inputs.iter().all(|&t| t == g.input);
            train += f + f + if i > 0 && !first { f } else { 0.0 };
        }
        (fwd, train)
    }

    /// The table `model.summary()` prints in Keras 3 (for functional models
    /// with the "Connected to" column), and the parameter counts.
    pub fn summary(&self) -> String {
        let g = &self.graph;
        let count = |layers: &[usize], trainable: Option<bool>| -> usize {
            layers
                .iter()
                .flat_map(|&li| g.layers[li].params.iter())
                .map(|&pi| &self.specs[pi])
                .filter(|s| trainable.is_none_or(|t| s.trainable == t))
                .map(|s| s.len)
                .sum()
        };
        let rows: Vec<summary::Row> = g
            .rows
            .iter()
            .filter(|r| !(g.sequential && r.class == "InputLayer"))
            .map(|r| summary::Row {
                name: format!("{} ({})", r.name, r.class),
                shape: r
                    .output_shape
                    .as_deref()
                    .map(batch_shape_str)
                    .unwrap_or_else(|| "?".into()),
                params: thousands(count(&r.layers, None)),
                connected: if r.connected.is_empty() {
                    "-".into()
                } else {
                    r.connected.join(", ")
                },
            })
            .collect();
        let total = self.param_count;
        let trainable = self.trainable_count();
        summary::table(
            self.name(),
            &rows,
            !g.sequential,
            [
                (thousands(total), memory_size(total * 4)),
                (thousands(trainable), memory_size(trainable * 4)),
                (
                    thousands(total - trainable),
                    memory_size((total - trainable) * 4),
                ),
            ],
        )
    }
}

/// `(None, 28, 28, 1)`.
pub(crate) fn batch_shape_str(shape: &[usize]) -> String {
    shape_str(shape)
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
