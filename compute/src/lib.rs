//! quern compute: record formats, map operators, layers and training.
//! Nothing here touches the network; datanodes and the coordinator call in.

pub mod import;
pub mod nn;
pub mod ops;
pub mod records;
pub mod ring;
pub mod train;
