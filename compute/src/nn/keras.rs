//! Keras JSON (`model.to_json()`, the `config.json` of a `.keras` file) to
//! native layers. Everything that would change the computation and is not
//! implemented is refused, naming the layer and the option.

use serde_json::{Map, Value};

use super::error::{NnError, Result};
use super::layers::{Activation, FanMode, Init, LayerKind, Padding};

/// A parsed layer before shapes are resolved.
pub(crate) struct RawLayer {
    pub name: String,
    pub class: String,
    pub kind: LayerKind,
    pub kernel_init: Init,
    pub bias_init: Init,
}

pub(crate) struct RawModel {
    pub name: String,
    pub input_shape: Vec<usize>,
    pub layers: Vec<RawLayer>,
}

pub(crate) fn parse(text: &str) -> Result<RawModel> {
    let root: Value = serde_json::from_str(text).map_err(|e| NnError::Json(e.to_string()))?;
    let root = root
        .as_object()
        .ok_or_else(|| NnError::Json("the top level is not an object".into()))?;
    let class = root
        .get("class_name")
        .and_then(Value::as_str)
        .ok_or_else(|| NnError::Json("no \"class_name\" at the top level".into()))?;
    let functional = match class {
        "Sequential" => false,
        "Functional" | "Model" => true,
        other => {
            return Err(NnError::Model(format!(
            "model class {other} is not supported (only Sequential and simple functional chains)"
        )))
        }
    };
    let config = root
        .get("config")
        .and_then(Value::as_object)
        .ok_or_else(|| NnError::Json("no \"config\" object at the top level".into()))?;
    let name = config
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("model")
        .to_string();
    let layers = config
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| NnError::Json("no \"config.layers\" list".into()))?;

    let mut input_shape: Option<Vec<usize>> = None;
    let mut out = Vec::new();
    let mut previous: Option<String> = None;
    for (i, lv) in layers.iter().enumerate() {
        let lo = lv
            .as_object()
            .ok_or_else(|| NnError::Json(format!("layer {i} is not an object")))?;
        let lclass = lo
            .get("class_name")
            .and_then(Value::as_str)
            .ok_or_else(|| NnError::Json(format!("layer {i} has no \"class_name\"")))?;
        let lcfg = lo
            .get("config")
            .and_then(Value::as_object)
            .ok_or_else(|| NnError::Json(format!("layer {i} ({lclass}) has no \"config\"")))?;
        let lname = lcfg
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("layer_{i}"));
        let cfg = Cfg {
            layer: &lname,
            class: lclass,
            map: lcfg,
        };
        if functional {
            check_chain(&cfg, lo, previous.as_deref())?;
        }
        previous = Some(lname.clone());

        // Keras 2 puts the input shape on the first layer; Keras 3 on an InputLayer.
        for key in ["batch_shape", "batch_input_shape"] {
            if input_shape.is_none() {
                if let Some(v) = lcfg.get(key).filter(|v| !v.is_null()) {
                    input_shape = Some(cfg.batch_shape(key, v)?);
                }
            }
        }
        if lclass == "InputLayer" {
            if out.is_empty() {
                continue;
            }
            return Err(cfg.err("an InputLayer is only allowed first"));
        }
        if input_shape.is_none() && out.is_empty() {
            input_shape = build_input_shape(lo);
        }
        out.push(cfg.layer()?);
    }
    let input_shape = match input_shape {
        Some(s) => s,
        None => config
            .get("build_input_shape")
            .or_else(|| root.get("build_config").and_then(|b| b.get("input_shape")))
            .and_then(|v| shape_of(v).ok())
            .ok_or_else(|| {
                NnError::Model(
                    "the model has no input shape (no InputLayer, batch_shape or build_input_shape)"
                        .into(),
                )
            })?,
    };
    if out.is_empty() {
        return Err(NnError::Model("the model has no layers".into()));
    }
    Ok(RawModel {
        name,
        input_shape,
        layers: out,
    })
}

fn build_input_shape(layer: &Map<String, Value>) -> Option<Vec<usize>> {
    layer
        .get("build_config")
        .and_then(|b| b.get("input_shape"))
        .and_then(|v| shape_of(v).ok())
}

/// `[null, 28, 28, 1]` -> `[28, 28, 1]`.
fn shape_of(v: &Value) -> std::result::Result<Vec<usize>, String> {
    let arr = v.as_array().ok_or("not a list")?;
    if arr.is_empty() {
        return Err("empty shape".into());
    }
    if !arr[0].is_null() {
        return Err("the batch dimension must be None".into());
    }
    arr[1..]
        .iter()
        .map(|d| {
            d.as_u64()
                .filter(|&d| d > 0)
                .map(|d| d as usize)
                .ok_or_else(|| format!("dimension {d} is not a positive integer"))
        })
        .collect()
}

/// Functional models are accepted when each layer takes the previous one.
fn check_chain(cfg: &Cfg<'_>, layer: &Map<String, Value>, previous: Option<&str>) -> Result<()> {
    let nodes = layer.get("inbound_nodes").and_then(Value::as_array);
    let mut sources = Vec::new();
    if let Some(nodes) = nodes {
        if nodes.len() > 1 {
            return Err(
                cfg.err("is shared between several calls; only simple chains are supported")
            );
        }
        collect_sources(&Value::Array(nodes.clone()), &mut sources);
    }
    match (previous, sources.as_slice()) {
        (None, []) => Ok(()),
        (Some(p), [s]) if s == p => Ok(()),
        (p, s) => Err(cfg.err(format!(
            "takes input from {:?} but the previous layer is {:?}; only simple chains are supported",
            s,
            p.unwrap_or("(none)")
        ))),
    }
}

fn collect_sources(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            // Keras 3: {"config": {"keras_history": ["name", 0, 0]}}
            if let Some(h) = m.get("keras_history").and_then(Value::as_array) {
                if let Some(n) = h.first().and_then(Value::as_str) {
                    out.push(n.to_string());
                }
                return;
            }
            for v in m.values() {
                collect_sources(v, out);
            }
        }
        Value::Array(a) => {
            // Keras 2: [[["name", 0, 0, {}]]]
            if let (Some(Value::String(n)), Some(Value::Number(_))) = (a.first(), a.get(1)) {
                out.push(n.clone());
                return;
            }
            for v in a {
                collect_sources(v, out);
            }
        }
        _ => {}
    }
}

struct Cfg<'a> {
    layer: &'a str,
    class: &'a str,
    map: &'a Map<String, Value>,
}

impl Cfg<'_> {
    fn err(&self, message: impl Into<String>) -> NnError {
        NnError::Layer {
            layer: self.layer.to_string(),
            class: self.class.to_string(),
            message: message.into(),
        }
    }

    fn unsupported(&self, key: &str, v: &Value, supported: &str) -> NnError {
        self.err(format!(
            "unsupported option {key} = {v} (supported: {supported})"
        ))
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.get(key)
            .and_then(Value::as_u64)
            .filter(|&v| v > 0)
            .map(|v| v as usize)
            .ok_or_else(|| self.err(format!("option {key} is missing or not a positive integer")))
    }

    /// An int or a pair of ints (kernel_size, strides, pool_size).
    fn pair(&self, key: &str) -> Result<Option<[usize; 2]>> {
        let bad = || {
            self.err(format!(
                "option {key} is not a positive integer or a pair of them"
            ))
        };
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => {
                let v = n.as_u64().filter(|&v| v > 0).ok_or_else(bad)? as usize;
                Ok(Some([v, v]))
            }
            Some(Value::Array(a)) if a.len() == 2 => {
                let a0 = a[0].as_u64().filter(|&v| v > 0).ok_or_else(bad)? as usize;
                let a1 = a[1].as_u64().filter(|&v| v > 0).ok_or_else(bad)? as usize;
                Ok(Some([a0, a1]))
            }
            Some(_) => Err(bad()),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(format!("option {key} = {v} is not a boolean"))),
        }
    }

    /// Options that must be absent or null (regularizers, constraints...).
    fn require_null(&self, keys: &[&str]) -> Result<()> {
        for key in keys {
            if let Some(v) = self.get(key).filter(|v| !v.is_null()) {
                return Err(self.unsupported(key, v, "null"));
            }
        }
        Ok(())
    }

    fn channels_last(&self) -> Result<()> {
        match self.get("data_format") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(s)) if s == "channels_last" => Ok(()),
            Some(v) => Err(self.unsupported("data_format", v, "\"channels_last\"")),
        }
    }

    fn padding(&self) -> Result<Padding> {
        match self.get("padding") {
            None => Ok(Padding::Valid),
            Some(Value::String(s)) if s == "valid" => Ok(Padding::Valid),
            Some(Value::String(s)) if s == "same" => Ok(Padding::Same),
            Some(v) => Err(self.unsupported("padding", v, "\"valid\", \"same\"")),
        }
    }

    fn activation(&self, key: &str) -> Result<Activation> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(Activation::Linear),
            Some(v) => {
                // Keras 3 may also serialise an activation as {"class_name": ..., "config": {"name": ...}}.
                let name = v.as_str().or_else(|| {
                    v.get("config")
                        .and_then(|c| c.get("name"))
                        .and_then(Value::as_str)
                });
                name.and_then(Activation::from_keras)
                    .ok_or_else(|| self.unsupported(key, v, "relu, sigmoid, tanh, softmax, linear"))
            }
        }
    }

    fn dtype(&self) -> Result<()> {
        let Some(v) = self.get("dtype").filter(|v| !v.is_null()) else {
            return Ok(());
        };
        let name = v.as_str().or_else(|| {
            v.get("config")
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
        });
        match name {
            Some("float32") => Ok(()),
            _ => Err(self.unsupported("dtype", v, "float32")),
        }
    }

    fn batch_shape(&self, key: &str, v: &Value) -> Result<Vec<usize>> {
        shape_of(v).map_err(|m| self.err(format!("option {key} = {v}: {m}")))
    }

    fn initializer(&self, key: &str, default: Init) -> Result<Init> {
        let Some(v) = self.get(key).filter(|v| !v.is_null()) else {
            return Ok(default);
        };
        let class = v
            .as_str()
            .or_else(|| v.get("class_name").and_then(Value::as_str))
            .unwrap_or("");
        let uniform = |scale, mode| Init::VarianceUniform { scale, mode };
        Ok(match class {
            "GlorotUniform" | "glorot_uniform" => uniform(3.0, FanMode::Avg),
            "HeUniform" | "he_uniform" => uniform(6.0, FanMode::In),
            "LecunUniform" | "lecun_uniform" => uniform(3.0, FanMode::In),
            "Zeros" | "zeros" => Init::Constant(0.0),
            "Ones" | "ones" => Init::Constant(1.0),
            _ => {
                return Err(self.unsupported(
                    key,
                    v,
                    "GlorotUniform, HeUniform, LecunUniform, Zeros, Ones",
                ))
            }
        })
    }

    fn layer(&self) -> Result<RawLayer> {
        self.dtype()?;
        if !self.bool("trainable", true)? {
            return Err(self.err("unsupported option trainable = false"));
        }
        let glorot = Init::VarianceUniform {
            scale: 3.0,
            mode: FanMode::Avg,
        };
        let mut kernel_init = glorot;
        let mut bias_init = Init::Constant(0.0);
        let common_null = [
            "kernel_regularizer",
            "bias_regularizer",
            "activity_regularizer",
            "kernel_constraint",
            "bias_constraint",
            "quantization_config",
        ];
        let kind = match self.class {
            "Dense" => {
                self.require_null(&common_null)?;
                if let Some(v) = self.get("lora_rank").filter(|v| !v.is_null()) {
                    return Err(self.unsupported("lora_rank", v, "null"));
                }
                kernel_init = self.initializer("kernel_initializer", glorot)?;
                bias_init = self.initializer("bias_initializer", bias_init)?;
                LayerKind::Dense {
                    units: self.usize("units")?,
                    activation: self.activation("activation")?,
                    use_bias: self.bool("use_bias", true)?,
                }
            }
            "Conv2D" | "Convolution2D" => {
                self.require_null(&common_null)?;
                self.channels_last()?;
                if let Some(d) = self.pair("dilation_rate")? {
                    if d != [1, 1] {
                        let v = self.get("dilation_rate").cloned().unwrap_or(Value::Null);
                        return Err(self.unsupported("dilation_rate", &v, "1"));
                    }
                }
                if let Some(v) = self.get("groups").filter(|v| !v.is_null()) {
                    if v.as_u64() != Some(1) {
                        return Err(self.unsupported("groups", v, "1"));
                    }
                }
                kernel_init = self.initializer("kernel_initializer", glorot)?;
                bias_init = self.initializer("bias_initializer", bias_init)?;
                LayerKind::Conv2D {
                    filters: self.usize("filters")?,
                    kernel: self
                        .pair("kernel_size")?
                        .ok_or_else(|| self.err("option kernel_size is missing"))?,
                    strides: self.pair("strides")?.unwrap_or([1, 1]),
                    padding: self.padding()?,
                    activation: self.activation("activation")?,
                    use_bias: self.bool("use_bias", true)?,
                }
            }
            "MaxPooling2D" | "MaxPool2D" | "AveragePooling2D" | "AvgPool2D" => {
                self.channels_last()?;
                let pool = self.pair("pool_size")?.unwrap_or([2, 2]);
                let strides = self.pair("strides")?.unwrap_or(pool);
                let padding = self.padding()?;
                if self.class.starts_with("Max") {
                    LayerKind::MaxPool2D {
                        pool,
                        strides,
                        padding,
                    }
                } else {
                    LayerKind::AvgPool2D {
                        pool,
                        strides,
                        padding,
                    }
                }
            }
            "Flatten" => {
                self.channels_last()?;
                LayerKind::Flatten
            }
            "Dropout" => {
                self.require_null(&["noise_shape"])?;
                let rate = self
                    .get("rate")
                    .and_then(Value::as_f64)
                    .filter(|r| (0.0..1.0).contains(r))
                    .ok_or_else(|| self.err("option rate is missing or not in [0, 1)"))?;
                LayerKind::Dropout { rate: rate as f32 }
            }
            "Activation" => LayerKind::Activation(self.activation("activation")?),
            other => {
                return Err(self.err(format!(
                    "unsupported layer type {other} (supported: Dense, Conv2D, MaxPooling2D, \
                     AveragePooling2D, Flatten, Dropout, Activation)"
                )))
            }
        };
        Ok(RawLayer {
            name: self.layer.to_string(),
            class: self.class.to_string(),
            kind,
            kernel_init,
            bias_init,
        })
    }
}
