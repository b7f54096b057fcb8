//! The quern wire protocol and the pieces every node shares: ids, remote
//! paths, errors, framing over QUIC streams, TLS material and client
//! configuration.

pub mod background;
pub mod chunk;
pub mod config;
pub mod error;
pub mod fault;
pub mod frame;
pub mod identity;
pub mod ids;
pub mod metrics;
pub mod msg;
pub mod path;
pub mod report;
pub mod size;
pub mod tls;
pub mod token;
pub mod transport;

pub use error::{Error, ErrorCode, Result, WireError};
pub use identity::{Expect, Principal, Role};
pub use ids::{ChunkId, Digest, FileId, NodeId};
pub use path::RemotePath;
pub use token::{Access, ChunkToken, KeyRing, TokenKey};

/// Protocol number every request stream starts with; a peer speaking
/// another number is refused with a message naming both.
pub const PROTOCOL_VERSION: u32 = 9;

/// ALPN token negotiated by every quern QUIC connection.
pub const ALPN: &[u8] = b"quern";

/// TLS server name every node certificate carries: peers are identified by
/// the cluster CA, not by DNS.
pub const SERVER_NAME: &str = "quern-node";
