//! Registration, heartbeats, chunk reports, and the commands the namenode
//! sends back.
//!
//! The node talks only to a server that proves to be the namenode, keeps
//! the cluster id it first joined, and obeys nobody else: a namenode of
//! another cluster (a mistyped `--dir`, a restored backup of another
//! cluster) is logged and ignored while the node keeps every chunk and
//! keeps retrying. Deletions from a namenode in safe mode are ignored too.

use crate::node::{write_cluster_id, Node};
use crate::transfer::push_chunk;
use quern_proto::msg::{
    ChunkReport, DatanodeCommand, Heartbeat, NodeReply, Register, ReportTurn, INLINE_REPORT,
};
use quern_proto::report::PackedChunks;
use quern_proto::transport::Peer;
use quern_proto::{ErrorCode, KeyRing};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the trash is checked for chunks past their time.
const TRASH_SWEEP: Duration = Duration::from_secs(60);

pub(crate) async fn run(node: Arc<Node>) {
    let mut registered = false;
    // Set at registration, which carries the first full report or asks
    // for a turn to send it.
    let mut next_report = Instant::now();
    // A full report waiting for its turn or being sent, beside heartbeats.
    let mut reporting: Option<tokio::task::JoinHandle<()>> = None;
    let mut last_sweep: Option<Instant> = None;
    // The last failure logged, so a lasting one is logged once, and a
    // namenode of another cluster is always named when it appears.
    let mut warned: Option<Option<ErrorCode>> = None;
    let mut lifeline = Lifeline::default();
    loop {
        let was_registered = registered;
        if last_sweep.is_none_or(|t| t.elapsed() >= TRASH_SWEEP) {
            last_sweep = Some(Instant::now());
            let store = node.store.clone();
            let ttl = node.cfg.trash_ttl;
            let purged = tokio::task::spawn_blocking(move || store.purge_trash(ttl))
                .await
                .unwrap_or(0);
            if purged > 0 {
                tracing::info!(chunks = purged, "purged chunks older than the trash time");
            }
        }
        let (capacity, available) = node.store.capacity();
        if node.is_full() && available >= crate::node::room_again(capacity) {
            node.set_full(false);
        }
        let idle = reporting.as_ref().is_none_or(|t| t.is_finished());
        if registered && idle && Instant::now() >= next_report {
            next_report = Instant::now() + node.cfg.report_interval;
            reporting = Some(tokio::spawn(report_in_turn(node.clone())));
        }
        let mut paged = false;
        let result = if !registered {
            // A namenode that forgot this node takes no report before it
            // registers again.
            if let Some(t) = reporting.take() {
                t.abort();
            }
            register(&node, capacity, available)
                .await
                .map(|(reply, p)| {
                    paged = p;
                    reply
                })
        } else {
            let (used, chunks) = node.store.used();
            let store = node.store.clone();
            let trash_bytes = tokio::task::spawn_blocking(move || store.trash_bytes())
                .await
                .unwrap_or(0);
            let (jobs, job_bytes) = node.jobs.usage();
            let beat = Heartbeat {
                node: node.id,
                capacity,
                available,
                used,
                chunks,
                trash_bytes,
                scrub: node.scrub.status(),
                full: node.is_full(),
                jobs,
                job_bytes,
                gflops: node.gflops.get().copied().unwrap_or(0.0) as f32,
            };
            lifeline.send(&node, beat).await
        };
        match result.map_err(|e| (e.code(), e.to_string())).and_then(|r| {
            lifeline.offered(&node, r.lifeline);
            accept(&node, r)
        }) {
            Ok(commands) => {
                node.metrics.heard_from_namenode();
                if !registered {
                    tracing::info!(namenode = %node.cfg.namenode, "registered with the namenode");
                    // Full reports are rare (ChunkReceived keeps the
                    // namenode current in between), and nodes that
                    // registered together spread their next ones out.
                    next_report = Instant::now()
                        + node
                            .cfg
                            .report_interval
                            .mul_f64(rand::random_range(0.5..1.5));
                    if paged {
                        reporting = Some(tokio::spawn(report_in_turn(node.clone())));
                    }
                }
                registered = true;
                warned = None;
                for cmd in commands {
                    if cmd == DatanodeCommand::Reregister {
                        registered = false;
                    }
                    execute(&node, cmd);
                }
                if !registered {
                    continue;
                }
            }
            Err((code, e)) => {
                if warned != Some(code) {
                    if code == Some(ErrorCode::WrongCluster) {
                        tracing::error!(namenode = %node.cfg.namenode, "{e}; obeying none of its commands and keeping every chunk (start the right namenode, or fix --namenode)");
                    } else {
                        tracing::warn!(namenode = %node.cfg.namenode, "heartbeat failed: {e}");
                    }
                    warned = Some(code);
                }
                // After a namenode restart it must hear the full report again.
                registered = false;
            }
        }
        let wait = if registered && !was_registered {
            quern_proto::msg::first_heartbeat_after(node.cfg.heartbeat)
        } else {
            node.cfg.heartbeat
        };
        tokio::time::sleep(wait).await;
    }
}

/// Registers with the full chunk list when it is short; a longer one is
/// owed (the second value) and sent in pages in the node's turn.
async fn register(
    node: &Node,
    capacity: u64,
    available: u64,
) -> Result<(NodeReply, bool), quern_proto::Error> {
    let cluster_id = node
        .cluster_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let chunks = node.store.list();
    let paged = chunks.len() > node.cfg.report_page.min(INLINE_REPORT);
    let reply = node
        .endpoint
        .call(
            node.namenode(),
            Register {
                cluster_id,
                node: quern_proto::msg::NodeAddr {
                    id: node.id,
                    addr: node.addr,
                },
                capacity,
                available,
                chunks: if paged {
                    PackedChunks::default()
                } else {
                    PackedChunks::pack(&chunks)
                },
                report_follows: paged,
            },
        )
        .await?;
    Ok((reply, paged))
}

/// Asks the namenode for a turn and sends the full report in it, asking
/// again until one is sent; heartbeats go on meanwhile, so a node waiting
/// behind a thousand others' reports is never taken for dead.
async fn report_in_turn(node: Arc<Node>) {
    loop {
        let asked = Instant::now();
        let turn = node
            .endpoint
            .call(node.namenode(), ReportTurn { node: node.id })
            .await
            .map_err(|e| (e.code(), e.to_string()))
            .and_then(|r| accept(&node, r));
        match turn {
            // Registering again starts a new report.
            Ok(cmds) if cmds.contains(&DatanodeCommand::Reregister) => return,
            Ok(cmds) if cmds.contains(&DatanodeCommand::SendReport) => {
                let chunks = node.store.list();
                let count = chunks.len();
                let sent = report(&node, chunks)
                    .await
                    .map_err(|e| (e.code(), e.to_string()))
                    .and_then(|r| accept(&node, r));
                match sent {
                    Ok(cmds) => {
                        tracing::info!(chunks = count, "full chunk report sent");
                        for cmd in cmds {
                            execute(&node, cmd);
                        }
                        return;
                    }
                    Err((_, e)) => {
                        tracing::warn!("full chunk report failed: {e}; asking for another turn")
                    }
                }
            }
            // No turn came while the namenode held the request: ask again.
            Ok(_) if asked.elapsed() >= Duration::from_secs(1) => continue,
            Ok(_) => {}
            Err((_, e)) => tracing::warn!("asking for a turn to report failed: {e}"),
        }
        tokio::time::sleep(node.cfg.heartbeat).await;
    }
}

/// Sends a full chunk report in pages of at most `report_page` chunks;
/// the commands of every reply are gathered into the last reply.
async fn report(
    node: &Node,
    chunks: Vec<quern_proto::msg::StoredChunk>,
) -> Result<NodeReply, quern_proto::Error> {
    let mut commands = Vec::new();
    let mut last = None;
    for page in ChunkReport::pages(node.id, &chunks, node.cfg.report_page) {
        let mut reply = node.endpoint.call(node.namenode(), page).await?;
        commands.append(&mut reply.commands);
        last = Some(reply);
    }
    let mut reply = last.ok_or_else(|| quern_proto::Error::Malformed("empty report".into()))?;
    reply.commands = commands;
    Ok(reply)
}

/// Where heartbeats go: the namenode's lifeline port once a reply has
/// named it, else (and after it failed) the namenode's own address.
#[derive(Default)]
struct Lifeline {
    at: Option<SocketAddr>,
    /// A lifeline that failed while the namenode's address answered (a
    /// firewall, say): not used again, unless a restarted namenode names
    /// another.
    failed: Option<SocketAddr>,
}

impl Lifeline {
    fn offered(&mut self, node: &Node, port: Option<u16>) {
        let offered = port.map(|p| SocketAddr::new(node.cfg.namenode.ip(), p));
        self.at = offered.filter(|a| Some(*a) != self.failed);
    }

    async fn send(&mut self, node: &Node, beat: Heartbeat) -> quern_proto::Result<NodeReply> {
        let Some(at) = self.at else {
            return node.endpoint.call(node.namenode(), beat).await;
        };
        // A slow answer is waited for: it means a slow namenode, which the
        // main port would not answer sooner. A failed one is tried again
        // there at once (a namenode gone, another in its place); one that
        // could not even connect while the main port answers is given up.
        match node.endpoint.call(Peer::namenode(at), beat.clone()).await {
            Err(e) if !matches!(e, quern_proto::Error::Remote(_)) => {
                let main = node.endpoint.call(node.namenode(), beat).await;
                if main.is_ok() && matches!(e, quern_proto::Error::Connect { .. }) {
                    tracing::warn!(
                        namenode = %node.cfg.namenode,
                        "the namenode's lifeline port {at} failed ({e}); heartbeats go to its \
                         address instead (let datanodes reach the namenode's UDP port {}, or set \
                         it with the namenode's --lifeline)",
                        at.port()
                    );
                    self.failed = Some(at);
                    self.at = None;
                }
                main
            }
            other => other,
        }
    }
}

/// Checks the reply comes from this node's cluster (adopting the cluster
/// at the first registration), takes its keys, and returns the commands
/// to obey.
fn accept(
    node: &Node,
    reply: NodeReply,
) -> Result<Vec<DatanodeCommand>, (Option<ErrorCode>, String)> {
    {
        let mut mine = node.cluster_id.lock().unwrap_or_else(|p| p.into_inner());
        match mine.as_deref() {
            Some(id) if id != reply.cluster_id => {
                return Err((
                    Some(ErrorCode::WrongCluster),
                    format!(
                        "the namenode belongs to another cluster ({}; this datanode is of {id})",
                        reply.cluster_id
                    ),
                ));
            }
            Some(_) => {}
            None => {
                if let Err(e) = write_cluster_id(&node.cfg.dir, &reply.cluster_id) {
                    let why = format!(
                        "cannot keep the cluster id in {}: {e}",
                        node.cfg.dir.display()
                    );
                    return Err((None, why));
                }
                tracing::info!(cluster = %reply.cluster_id, "joined the cluster");
                *mine = Some(reply.cluster_id.clone());
            }
        }
    }
    *node.keys.write().unwrap_or_else(|p| p.into_inner()) = KeyRing::new(&reply.keys);
    let mut commands = reply.commands;
    if reply.safe_mode {
        let before = commands.len();
        commands.retain(|c| !matches!(c, DatanodeCommand::Delete(_) | DatanodeCommand::Trash(_)));
        if commands.len() != before {
            tracing::warn!("ignoring deletions from a namenode in safe mode");
        }
    }
    Ok(commands)
}

fn execute(node: &Arc<Node>, cmd: DatanodeCommand) {
    match cmd {
        DatanodeCommand::Delete(ids) => {
            tracing::info!(count = ids.len(), "deleting chunks on the namenode's word");
            node.store.delete(&ids);
        }
        DatanodeCommand::Trash(ids) => {
            tracing::warn!(
                count = ids.len(),
                "moving chunks the namenode does not know to the trash"
            );
            if let Err(e) = node.store.trash(&ids) {
                tracing::warn!("could not move chunks to the trash: {e}");
            }
        }
        DatanodeCommand::Replicate {
            chunk,
            size,
            check,
            targets,
            token,
        } => {
            let node = node.clone();
            tokio::spawn(async move {
                match push_chunk(
                    &node.endpoint,
                    node.store.clone(),
                    (chunk, size, check),
                    &targets,
                    token,
                )
                .await
                {
                    Ok(ack) => {
                        tracing::info!(%chunk, copies = ack.stored_on.len(), "replicated")
                    }
                    Err(e) => tracing::warn!(%chunk, "replication failed: {e}"),
                }
            });
        }
        // The heartbeat loop and the report task act on these.
        DatanodeCommand::Reregister | DatanodeCommand::SendReport => {}
    }
}
