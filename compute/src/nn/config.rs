//! Reading one Keras layer's `config`: typed getters whose errors name the
//! layer, the option and what is supported.

use serde_json::{Map, Value};

use super::activation::{self, Activation};
use super::init::{self, Init};
use super::layers::Regularizer;

/// One problem with one layer: what the importer reports, all of them at
/// once.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub layer: String,
    pub class: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "layer `{}` ({}): {}",
            self.layer, self.class, self.message
        )
    }
}

pub(crate) type Parsed<T> = std::result::Result<T, Problem>;

pub(crate) struct Cfg<'a> {
    pub layer: &'a str,
    pub class: &'a str,
    pub map: &'a Map<String, Value>,
}

impl Cfg<'_> {
    pub fn err(&self, message: impl Into<String>) -> Problem {
        Problem {
            layer: self.layer.to_string(),
            class: self.class.to_string(),
            message: message.into(),
        }
    }

    pub fn unsupported(&self, key: &str, v: &Value, supported: &str) -> Problem {
        self.err(format!(
            "unsupported option {key} = {v} (supported: {supported})"
        ))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Parsed<usize> {
        self.get(key)
            .and_then(Value::as_u64)
            .filter(|&v| v > 0)
            .map(|v| v as usize)
            .ok_or_else(|| self.err(format!("option {key} is missing or not a positive integer")))
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Parsed<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    pub fn f32_or(&self, key: &str, default: f32) -> Parsed<f32> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| self.err(format!("option {key} = {v} is not a number"))),
        }
    }

    pub fn opt_f32(&self, key: &str) -> Parsed<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.f32_or(key, 0.0).map(Some),
        }
    }

    pub fn str_or<'b>(&'b self, key: &str, default: &'b str) -> Parsed<&'b str> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.err(format!("option {key} = {v} is not a string"))),
        }
    }

    /// An int or a tuple of `n` ints (kernel_size, strides, pool_size).
    pub fn tuple<const N: usize>(&self, key: &str) -> Parsed<Option<[usize; N]>> {
        let bad = || {
            self.err(format!(
                "option {key} is not a positive integer or a tuple of {N}"
            ))
        };
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let v = n.as_u64().filter(|&v| v > 0).ok_or_else(bad)? as usize;
                Ok(Some([v; N]))
            }
            Some(Value::Array(a)) if a.len() == N => {
                let mut out = [0usize; N];
                for (o, v) in out.iter_mut().zip(a) {
                    *o = v.as_u64().filter(|&v| v > 0).ok_or_else(bad)? as usize;
                }
                Ok(Some(out))
            }
            Some(_) => Err(bad()),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Parsed<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(format!("option {key} = {v} is not a boolean"))),
        }
    }

    /// Options that must be absent or null (constraints, ...).
    pub fn require_null(&self, keys: &[&str]) -> Parsed<()> {
        for key in keys {
            if let Some(v) = self.get(key) {
                return Err(self.unsupported(key, v, "null"));
            }
        }
        Ok(())
    }

    pub fn channels_last(&self) -> Parsed<()> {
        match self.get("data_format") {
            None => Ok(()),
            Some(Value::String(s)) if s == "channels_last" => Ok(()),
            Some(v) => Err(self.err(format!(
                "unsupported option data_format = {v} (supported: \"channels_last\"); \
                 rebuild the model with channels_last, Keras's default on CPU"
            ))),
        }
    }

    pub fn padding(&self) -> Parsed<super::layers::Padding> {
        use super::layers::Padding;
        match self.get("padding") {
            None => Ok(Padding::Valid),
            Some(Value::String(s)) if s == "valid" => Ok(Padding::Valid),
            Some(Value::String(s)) if s == "same" => Ok(Padding::Same),
            Some(v) => Err(self.unsupported("padding", v, "\"valid\", \"same\"")),
        }
    }

    pub fn activation(&self, key: &str) -> Parsed<Activation> {
        match self.get(key) {
            None => Ok(Activation::Linear),
            Some(v) => Activation::from_value(v)
                .ok_or_else(|| self.unsupported(key, v, activation::SUPPORTED)),
        }
    }

    pub fn dtype(&self) -> Parsed<()> {
        let Some(v) = self.get("dtype") else {
            return Ok(());
        };
        let name = v.as_str().or_else(|| {
            v.get("config")
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
        });
        match name {
            Some("float32") => Ok(()),
            _ => Err(self.err(format!(
                "unsupported option dtype = {v} (supported: float32); \
                 mixed precision policies are not supported, build the model in float32"
            ))),
        }
    }

    pub fn initializer(&self, key: &str, default: Init) -> Parsed<Init> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => Init::from_value(v).map_err(|m| {
                self.err(format!(
                    "option {key}: {m} (supported: {})",
                    init::SUPPORTED
                ))
            }),
        }
    }

    pub fn regularizer(&self, key: &str) -> Parsed<Option<Regularizer>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let class = v
            .as_str()
            .or_else(|| v.get("class_name").and_then(Value::as_str))
            .unwrap_or("");
        let cfg = v.get("config");
        let num = |k: &str, default: f64| -> Parsed<f32> {
            match cfg.and_then(|c| c.get(k)) {
                None | Some(Value::Null) => Ok(default as f32),
                Some(x) => x
                    .as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| self.err(format!("option {key}: {k} = {x} is not a number"))),
            }
        };
        Ok(Some(match class {
            "L1" | "l1" => Regularizer {
                l1: num("l1", 0.01)?,
                l2: 0.0,
            },
            "L2" | "l2" => Regularizer {
                l1: 0.0,
                l2: num("l2", 0.01)?,
            },
            "L1L2" | "l1_l2" => Regularizer {
                l1: num("l1", 0.0)?,
                l2: num("l2", 0.0)?,
            },
            _ => return Err(self.unsupported(key, v, "L1, L2, L1L2")),
        }))
    }
}
