//! A model's own `compile()` settings, as a `.keras` file (or `to_json()` of
//! a compiled model) records them in `compile_config`: the optimizer (with
//! its learning-rate schedule, clipping and weight decay) quern trains with
//! unless the command line says otherwise.

use serde_json::Value;

use super::error::{NnError, Result};
use super::loss::Loss;
use super::optim::{Adagrad, Adam, Algorithm, OptimizerConfig, RmsProp, Schedule, Sgd};

/// What quern takes from a `compile_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompileSettings {
    pub optimizer: OptimizerConfig,
    pub loss: Loss,
    pub metrics: Vec<String>,
}

const SUPPORTED_OPTIMIZERS: &str = "SGD, Adam, AdamW, RMSprop, Adagrad, Nadam (with \
     weight_decay, clipnorm, global_clipnorm, clipvalue, and an ExponentialDecay, \
     PiecewiseConstantDecay or CosineDecay schedule)";

/// Reads `compile_config`; None when the model was saved uncompiled.
pub fn parse(config: &Value) -> Result<Option<CompileSettings>> {
    let Some(cc) = config.get("compile_config").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let mut problems = Vec::new();
    let optimizer = match parse_optimizer(cc.get("optimizer").unwrap_or(&Value::Null)) {
        Ok(o) => Some(o),
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    let loss = match cc.get("loss").filter(|v| !v.is_null()) {
        None => Some(Loss::default()),
        Some(v) => match Loss::from_keras(v) {
            Ok(l) => Some(l),
            Err(p) => {
                problems.push(p);
                None
            }
        },
    };
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
    match (optimizer, loss, problems.is_empty()) {
        (Some(optimizer), Some(loss), true) => Ok(Some(CompileSettings {
            optimizer,
            loss,
            metrics,
        })),
        _ => Err(NnError::Model(format!(
            "the model's compile_config uses {}; give --optimizer, --lr and --loss to train \
             with other settings",
            problems.join(", ")
        ))),
    }
}

/// An optimizer as `keras.optimizers.serialize` writes it (or its name).
pub fn parse_optimizer(v: &Value) -> std::result::Result<OptimizerConfig, Vec<String>> {
    let mut problems = Vec::new();
    let (class, cfg) = match v {
        Value::String(s) => (s.clone(), Value::Object(Default::default())),
        v => (
            v.get("class_name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            v.get("config").cloned().unwrap_or(Value::Null),
        ),
    };
    let num = |key: &str| -> Option<f32> { cfg.get(key).and_then(Value::as_f64).map(|f| f as f32) };
    let flag = |key: &str| cfg.get(key).and_then(Value::as_bool).unwrap_or(false);
    for key in ["loss_scale_factor", "gradient_accumulation_steps"] {
        if let Some(v) = cfg.get(key).filter(|v| !v.is_null()) {
            problems.push(format!("optimizer option {key} = {v}"));
        }
    }
    if flag("use_ema") {
        problems.push("optimizer option use_ema = true".into());
    }
    let (lr, schedule) = match cfg.get("learning_rate") {
        None | Some(Value::Null) => (None, None),
        Some(Value::Number(n)) => (n.as_f64().map(|f| f as f32), None),
        Some(s) => match parse_schedule(s) {
            Ok(s) => (None, Some(s)),
            Err(p) => {
                problems.push(p);
                (None, None)
            }
        },
    };
    let adam = |d: Adam| Adam {
        lr: lr.unwrap_or(d.lr),
        beta1: num("beta_1").unwrap_or(d.beta1),
        beta2: num("beta_2").unwrap_or(d.beta2),
        epsilon: num("epsilon").unwrap_or(d.epsilon),
    };
    let algorithm = match class.to_ascii_lowercase().as_str() {
        "sgd" => Some(Algorithm::Sgd(Sgd {
            lr: lr.unwrap_or(Sgd::default().lr),
            momentum: num("momentum").unwrap_or(0.0),
            nesterov: flag("nesterov"),
        })),
        "adam" | "adamw" => {
            if flag("amsgrad") {
                problems.push("optimizer option amsgrad = true".into());
            }
            let a = adam(Adam::default());
            Some(if class.eq_ignore_ascii_case("adamw") {
                Algorithm::AdamW(a)
            } else {
                Algorithm::Adam(a)
            })
        }
        "nadam" => Some(Algorithm::Nadam(adam(Adam {
            lr: 0.001,
            ..Adam::default()
        }))),
        "rmsprop" => {
            let d = RmsProp::default();
            Some(Algorithm::RmsProp(RmsProp {
                lr: lr.unwrap_or(d.lr),
                rho: num("rho").unwrap_or(d.rho),
                momentum: num("momentum").unwrap_or(d.momentum),
                epsilon: num("epsilon").unwrap_or(d.epsilon),
                centered: flag("centered"),
            }))
        }
        "adagrad" => {
            let d = Adagrad::default();
            Some(Algorithm::Adagrad(Adagrad {
                lr: lr.unwrap_or(d.lr),
                initial_accumulator: num("initial_accumulator_value")
                    .unwrap_or(d.initial_accumulator),
                epsilon: num("epsilon").unwrap_or(d.epsilon),
            }))
        }
        other => {
            problems.push(format!(
                "optimizer {other:?} (supported: {SUPPORTED_OPTIMIZERS})"
            ));
            None
        }
    };
    match (algorithm, problems.is_empty()) {
        (Some(algorithm), true) => {
            let mut c = OptimizerConfig::from(algorithm);
            c.schedule = schedule;
            // AdamW's default decay applies unless the config says otherwise.
            if let Some(wd) = cfg.get("weight_decay") {
                c.weight_decay = wd.as_f64().map(|f| f as f32);
            }
            c.clipnorm = num("clipnorm");
            c.global_clipnorm = num("global_clipnorm");
            c.clipvalue = num("clipvalue");
            Ok(c)
        }
        _ => Err(problems),
    }
}

fn parse_schedule(v: &Value) -> std::result::Result<Schedule, String> {
    let class = v.get("class_name").and_then(Value::as_str).unwrap_or("?");
    let cfg = v.get("config").cloned().unwrap_or(Value::Null);
    let num = |key: &str| -> std::result::Result<f32, String> {
        cfg.get(key)
            .and_then(Value::as_f64)
            .map(|f| f as f32)
            .ok_or_else(|| format!("learning-rate schedule {class} without a numeric {key}"))
    };
    let list = |key: &str| -> std::result::Result<Vec<f32>, String> {
        cfg.get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
            .ok_or_else(|| format!("learning-rate schedule {class} without a list {key}"))
    };
    Ok(match class {
        "ExponentialDecay" => Schedule::Exponential {
            initial: num("initial_learning_rate")?,
            decay_steps: num("decay_steps")?,
            decay_rate: num("decay_rate")?,
            staircase: cfg
                .get("staircase")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        },
        "PiecewiseConstantDecay" => {
            let boundaries = list("boundaries")?;
            let values = list("values")?;
            if values.len() != boundaries.len() + 1 {
                return Err(format!(
                    "PiecewiseConstantDecay with {} boundaries needs {} values, has {}",
                    boundaries.len(),
                    boundaries.len() + 1,
                    values.len()
                ));
            }
            Schedule::PiecewiseConstant { boundaries, values }
        }
        "CosineDecay" => Schedule::Cosine {
            initial: num("initial_learning_rate")?,
            decay_steps: num("decay_steps")?,
            alpha: num("alpha").unwrap_or(0.0),
            warmup_target: cfg
                .get("warmup_target")
                .and_then(Value::as_f64)
                .map(|f| f as f32),
            warmup_steps: num("warmup_steps").unwrap_or(0.0),
        },
        other => {
            return Err(format!(
                "learning-rate schedule {other} (supported: ExponentialDecay, \
                 PiecewiseConstantDecay, CosineDecay)"
            ))
        }
    })
}
