//! Importers: turn files people already have into quern records.
//! Each one checks its whole input before anything is stored.

mod csv;
mod idx;

pub use self::csv::{parse_csv, LabelColumn};
pub use idx::parse_idx;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("{file}: line {line}: {reason}")]
    Row {
        file: String,
        line: u64,
        reason: String,
    },
    #[error("{0}")]
    Mismatch(String),
}

pub(crate) fn invalid(file: &str, reason: impl Into<String>) -> ImportError {
    ImportError::Invalid {
        file: file.into(),
        reason: reason.into(),
    }
}
