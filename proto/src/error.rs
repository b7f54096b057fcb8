use serde::{Deserialize, Serialize};
use std::fmt;

/// Stable, machine-readable category of an error sent over the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    NotFound,
    AlreadyExists,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    InvalidPath,
    InvalidArgument,
    SafeMode,
    NoDatanodes,
    ChecksumMismatch,
    LeaseExpired,
    Protocol,
    NoSpace,
    /// The caller's certificate, token or permissions do not allow it.
    PermissionDenied,
    /// The peer belongs to another cluster.
    WrongCluster,
    Io,
    Internal,
    /// Another node this one was working with failed (the next or previous
    /// worker of a training ring); the message names it.
    Peer,
}

/// An error as it crosses the network: a stable code plus a message that
/// names the thing that failed and, where there is one, what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WireError {}

/// Everything that can go wrong talking to a quern peer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer handled the request and answered with an error.
    #[error(transparent)]
    Remote(#[from] WireError),
    #[error("cannot reach {peer}: {reason}")]
    Connect { peer: String, reason: String },
    #[error("{peer} did not answer within {secs} s ({what}); check that it is running (`quern cluster status`)")]
    Timeout {
        peer: String,
        what: String,
        secs: u64,
    },
    #[error("connection to {peer} failed: {reason}")]
    Stream { peer: String, reason: String },
    #[error("{peer} stopped sending or taking data ({what}) for {ms} ms while the connection stayed up; the peer is stuck")]
    Stalled { peer: String, what: String, ms: u64 },
    #[error(
        "{peer} is not {expected}: it presented the certificate of {found}; check the address"
    )]
    WrongPeer {
        peer: String,
        expected: String,
        found: String,
    },
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u64 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("protocol version mismatch: {0}")]
    Version(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("configuration: {0}")]
    Config(String),
    // The cause is part of the message, not a `source`, so that error
    // chains print it once.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            cause: source,
        }
    }

    /// The wire code when the peer answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Remote(w) => Some(w.code),
            _ => None,
        }
    }

    /// True when the error says nothing about the request itself, only that
    /// this peer could not serve it: another replica may.
    pub fn is_peer_failure(&self) -> bool {
        !matches!(self, Error::Remote(_) | Error::Config(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
