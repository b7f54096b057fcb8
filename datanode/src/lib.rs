//! The quern datanode: stores chunks with blake3 digests, takes pipelined
//! writes, serves reads and follows the namenode's commands.

mod heartbeat;
mod jobs;
mod metrics;
mod node;
mod scrub;
mod service;
mod shared_ring;
mod store;
mod tasks;
mod train;
mod transfer;

pub use jobs::default_job_memory;
pub use node::ScrubConfig;
pub use service::{Datanode, DatanodeConfig};
pub use store::{ChunkStore, StoreError};
