//! A model's own `compile()` settings, as a `.keras` file (or `to_json()` of
//! a compiled model) records them in `compile_config`: the optimizer quern
//! trains with unless the command line says otherwise.

use serde_json::Value;

use super::error::{NnError, Result};
use super::optim::{Adam, OptimizerConfig, Sgd};

/// What quern takes from a `compile_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompileSettings {
    pub optimizer: OptimizerConfig,
    /// The loss as Keras names it (only sparse categorical cross-entropy on
    /// probabilities is trained today).
    pub loss: String,
    pub metrics: Vec<String>,
}

const SUPPORTED: &str = "SGD (learning_rate, momentum, nesterov) and Adam (learning_rate, \
     beta_1, beta_2, epsilon) with a constant learning rate, no clipping, no weight decay, \
     no EMA; loss sparse_categorical_crossentropy on probabilities";

/// Reads `compile_config`; None when the model was saved uncompiled.
pub fn parse(config: &Value) -> Result<Option<CompileSettings>> {
    let Some(cc) = config.get("compile_config").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let mut problems = Vec::new();
    let opt = cc.get("optimizer").unwrap_or(&Value::Null);
    let (class, ocfg) = match opt {
        Value::String(s) => (s.clone(), Value::Object(Default::default())),
        v => (
            v.get("class_name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            v.get("config").cloned().unwrap_or(Value::Null),
        ),
    };
    let num = |key: &str| -> Option<f64> { ocfg.get(key).and_then(Value::as_f64) };
    for key in [
        "weight_decay",
        "clipnorm",
        "global_clipnorm",
        "clipvalue",
        "loss_scale_factor",
        "gradient_accumulation_steps",
    ] {
        if let Some(v) = ocfg.get(key).filter(|v| !v.is_null()) {
            problems.push(format!("optimizer option {key} = {v}"));
        }
    }
    if ocfg.get("use_ema").and_then(Value::as_bool) == Some(true) {
        problems.push("optimizer option use_ema = true".into());
    }
    let lr = match ocfg.get("learning_rate") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(v) => {
            let schedule = v.get("class_name").and_then(Value::as_str).unwrap_or("?");
            problems.push(format!(
                "learning-rate schedule {schedule} (give a constant --lr instead)"
            ));
            None
        }
    };
    let optimizer = match class.to_ascii_lowercase().as_str() {
        "sgd" => {
            let d = Sgd::default();
            Some(OptimizerConfig::Sgd(Sgd {
                lr: lr.map_or(d.lr, |v| v as f32),
                momentum: num("momentum").map_or(d.momentum, |v| v as f32),
                nesterov: ocfg
                    .get("nesterov")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            }))
        }
        "adam" => {
            let d = Adam::default();
            if ocfg.get("amsgrad").and_then(Value::as_bool) == Some(true) {
                problems.push("optimizer option amsgrad = true".into());
            }
            Some(OptimizerConfig::Adam(Adam {
                lr: lr.map_or(d.lr, |v| v as f32),
                beta1: num("beta_1").map_or(d.beta1, |v| v as f32),
                beta2: num("beta_2").map_or(d.beta2, |v| v as f32),
                epsilon: num("epsilon").map_or(d.epsilon, |v| v as f32),
            }))
        }
        other => {
            problems.push(format!("optimizer {other:?}"));
            None
        }
    };
    let loss = match cc.get("loss") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            let name = v
                .get("class_name")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            let cfg = v.get("config");
            if cfg
                .and_then(|c| c.get("from_logits"))
                .and_then(Value::as_bool)
                == Some(true)
            {
                problems.push(format!(
                    "loss {name} with from_logits = true (end the model with a softmax activation)"
                ));
            }
            name
        }
        None => "sparse_categorical_crossentropy".into(),
    };
    if !matches!(
        loss.as_str(),
        "sparse_categorical_crossentropy" | "SparseCategoricalCrossentropy"
    ) {
        problems.push(format!("loss {loss}"));
    }
    let metrics = cc
        .get("metrics")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|m| {
                    m.as_str()
                        .map(str::to_string)
                        .or_else(|| {
                            m.get("class_name")
                                .and_then(Value::as_str)
                                .map(str::to_string)
                        })
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    match (optimizer, problems.is_empty()) {
        (Some(optimizer), true) => Ok(Some(CompileSettings {
            optimizer,
            loss: "sparse_categorical_crossentropy".into(),
            metrics,
        })),
        _ => Err(NnError::Model(format!(
            "the model's compile_config uses {}; quern trains with {SUPPORTED}. \
             Give --optimizer and --lr to train with other settings",
            problems.join(", ")
        ))),
    }
}
