use std::path::Path;

/// Everything that can go wrong importing, loading or running a model.
///
/// Messages name the thing at fault (layer, option, array, file) so that a
/// user reading one line knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error("malformed model JSON: {0}")]
    Json(String),
    #[error("layer `{layer}` ({class}): {message}")]
    Layer {
        layer: String,
        class: String,
        message: String,
    },
    #[error("model: {0}")]
    Model(String),
    /// Every layer or option of a model that cannot be imported, at once.
    #[error("{}", unsupported_message(.0))]
    Unsupported(Vec<super::config::Problem>),
    #[error("{name}: {message}")]
    Array { name: String, message: String },
    #[error("weights: {0}")]
    Weights(String),
    #[error("input: {0}")]
    Input(String),
    /// A worker could not exchange batch statistics with the others of its
    /// step.
    #[error("exchanging BatchNormalization statistics with the other workers: {0}")]
    Exchange(String),
    // The io error is in the message, not a `source`, so that `{:#}`
    // chains do not print it twice.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{what}: not a readable zip archive: {message}")]
    Zip { what: String, message: String },
    #[error("optimizer: {0}")]
    Optimizer(String),
    /// An archive entry bigger than anything of its kind needs: refused
    /// before it is inflated whole, since a few MiB of deflate can expand
    /// to gigabytes. `size` says what was seen (declared or inflated).
    #[error("{what}: {entry} {size}, more than the {limit} bytes allowed for it ({why})")]
    TooLarge {
        what: String,
        entry: String,
        size: String,
        limit: u64,
        why: String,
    },
}

fn unsupported_message(problems: &[super::config::Problem]) -> String {
    let mut s = match problems.len() {
        1 => "the model cannot be imported:".to_string(),
        n => format!("the model cannot be imported ({n} problems):"),
    };
    for p in problems {
        s.push_str("\n  - ");
        s.push_str(&p.to_string());
    }
    s
}

pub type Result<T, E = NnError> = std::result::Result<T, E>;

impl NnError {
    pub(crate) fn io(path: &Path, error: std::io::Error) -> Self {
        NnError::Io {
            path: path.display().to_string(),
            error,
        }
    }

    pub(crate) fn array(name: &str, message: impl Into<String>) -> Self {
        NnError::Array {
            name: name.to_string(),
            message: message.into(),
        }
    }
}
