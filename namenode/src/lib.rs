//! The quern namenode: the namespace (in sled), the chunk map, the datanode
//! registry, placement, leases, safe mode and the replication monitor.

mod cluster;
mod keys;
mod monitor;
mod namespace;
mod perm;
mod service;
mod state;

pub use service::{Namenode, NamenodeConfig};
