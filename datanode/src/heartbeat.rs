//! Registration, heartbeats, chunk reports, and the commands the namenode
//! sends back.

use crate::service::Node;
use crate::transfer::push_chunk;
use quern_proto::msg::{ChunkReport, DatanodeCommand, Heartbeat, Register};
use std::sync::Arc;
use std::time::Instant;

pub(crate) async fn run(node: Arc<Node>) {
    let mut registered = false;
    let mut last_report = Instant::now();
    let mut warned = false;
    loop {
        let (capacity, available) = node.store.capacity();
        let result = if !registered {
            node.endpoint
                .call(
                    node.cfg.namenode,
                    Register {
                        node: quern_proto::msg::NodeAddr {
                            id: node.id,
                            addr: node.addr,
                        },
                        capacity,
                        available,
                        chunks: node.store.list(),
                    },
                )
                .await
        } else if last_report.elapsed() >= node.cfg.report_interval {
            last_report = Instant::now();
            node.endpoint
                .call(
                    node.cfg.namenode,
                    ChunkReport {
                        node: node.id,
                        chunks: node.store.list(),
                    },
                )
                .await
        } else {
            let (used, chunks) = node.store.used();
            node.endpoint
                .call(
                    node.cfg.namenode,
                    Heartbeat {
                        node: node.id,
                        capacity,
                        available,
                        used,
                        chunks,
                    },
                )
                .await
        };
        match result {
            Ok(commands) => {
                if !registered {
                    tracing::info!(namenode = %node.cfg.namenode, "registered with the namenode");
                    last_report = Instant::now();
                }
                registered = true;
                warned = false;
                for cmd in commands {
                    if matches!(cmd, DatanodeCommand::Reregister) {
                        registered = false;
                    }
                    execute(&node, cmd);
                }
                if !registered {
                    continue;
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(namenode = %node.cfg.namenode, "heartbeat failed: {e}");
                    warned = true;
                }
                // After a namenode restart it must hear the full report again.
                registered = false;
            }
        }
        tokio::time::sleep(node.cfg.heartbeat).await;
    }
}

fn execute(node: &Arc<Node>, cmd: DatanodeCommand) {
    match cmd {
        DatanodeCommand::Delete(ids) => {
            tracing::info!(count = ids.len(), "deleting chunks on the namenode's word");
            node.store.delete(&ids);
        }
        DatanodeCommand::Replicate { chunk, targets } => {
            let node = node.clone();
            tokio::spawn(async move {
                match push_chunk(&node.endpoint, node.store.clone(), chunk, &targets).await {
                    Ok(ack) => {
                        tracing::info!(chunk = %chunk.id, copies = ack.stored_on.len(), "replicated")
                    }
                    Err(e) => tracing::warn!(chunk = %chunk.id, "replication failed: {e}"),
                }
            });
        }
        DatanodeCommand::Reregister => {}
    }
}
