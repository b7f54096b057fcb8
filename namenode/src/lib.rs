//! The quern namenode: the namespace (in sled), the chunk map, the datanode
//! registry, placement, leases, safe mode, the replication monitor, the job
//! history, and the web UI with `/metrics`.

mod chunkmap;
mod cluster;
mod jobs;
mod keys;
mod lifeline;
mod metrics;
mod monitor;
mod namespace;
mod perm;
mod replication;
mod report_turns;
mod service;
mod state;
pub mod synthetic;
mod ui;

pub use service::{Namenode, NamenodeConfig};
