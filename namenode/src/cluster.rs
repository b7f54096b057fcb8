//! Soft state: live datanodes, where each chunk's replicas are, placement.
//!
//! Nothing here is persisted. After a restart datanodes register again with
//! full chunk reports and this map is rebuilt from them, as in HDFS.

use quern_proto::msg::{
    DatanodeCommand, DatanodeReport, Heartbeat, NodeAddr, NodeState, ReplicaInfo, ReplicaState,
    ScrubStatus, StoredChunk,
};
use quern_proto::{ChunkId, Digest, NodeId};
use rand::seq::SliceRandom;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub struct NodeEntry {
    pub addr: SocketAddr,
    pub capacity: u64,
    pub available: u64,
    pub used: u64,
    pub chunks: u64,
    pub trash_bytes: u64,
    pub scrub: ScrubStatus,
    pub full: bool,
    /// Training jobs the node holds in memory, as of its last heartbeat.
    pub jobs: u64,
    pub job_bytes: u64,
    pub last_heartbeat: Instant,
    /// Bytes placed on the node since its last heartbeat, so a burst of
    /// allocations spreads out before usage figures catch up.
    pub placed_since_heartbeat: u64,
    pub commands: Vec<DatanodeCommand>,
    pub was_live: bool,
}

pub struct ChunkEntry {
    /// `None` while the chunk is allocated but not yet committed.
    pub size: Option<u64>,
    pub digest: Option<Digest>,
    pub target: u8,
    pub replicas: BTreeSet<NodeId>,
    pub corrupt: BTreeMap<NodeId, String>,
}

impl ChunkEntry {
    pub fn allocated(target: u8) -> ChunkEntry {
        ChunkEntry {
            size: None,
            digest: None,
            target,
            replicas: BTreeSet::new(),
            corrupt: BTreeMap::new(),
        }
    }

    pub fn committed(size: u64, digest: Digest, target: u8) -> ChunkEntry {
        ChunkEntry {
            size: Some(size),
            digest: Some(digest),
            ..ChunkEntry::allocated(target)
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHealth {
    pub chunks: u64,
    pub under_replicated: u64,
    pub missing: u64,
    pub corrupt_replicas: u64,
}

pub struct Cluster {
    pub nodes: HashMap<NodeId, NodeEntry>,
    pub chunks: HashMap<ChunkId, ChunkEntry>,
    pub dead_timeout: Duration,
}

impl Cluster {
    pub fn new(dead_timeout: Duration) -> Cluster {
        Cluster {
            nodes: HashMap::new(),
            chunks: HashMap::new(),
            dead_timeout,
        }
    }

    pub fn is_live(&self, node: NodeId) -> bool {
        self.nodes
            .get(&node)
            .is_some_and(|n| n.last_heartbeat.elapsed() <= self.dead_timeout)
    }

    pub fn live_count(&self) -> usize {
        self.nodes.keys().filter(|n| self.is_live(**n)).count()
    }

    pub fn addr(&self, node: NodeId) -> Option<NodeAddr> {
        self.nodes.get(&node).map(|n| NodeAddr {
            id: node,
            addr: n.addr,
        })
    }

    /// Up to `n` distinct live nodes with room for `size` bytes, least used
    /// first (ties broken at random so equal nodes share the load).
    pub fn choose_targets(&mut self, n: usize, exclude: &[NodeId], size: u64) -> Vec<NodeAddr> {
        let mut candidates: Vec<(NodeId, u64)> = self
            .nodes
            .iter()
            .filter(|(id, e)| {
                !exclude.contains(id)
                    && !e.full
                    && e.last_heartbeat.elapsed() <= self.dead_timeout
                    && e.available.saturating_sub(e.placed_since_heartbeat) >= size
            })
            .map(|(id, e)| (*id, e.used + e.placed_since_heartbeat))
            .collect();
        candidates.shuffle(&mut rand::rng());
        candidates.sort_by_key(|(_, used)| *used);
        candidates.truncate(n);
        candidates
            .into_iter()
            .filter_map(|(id, _)| {
                let e = self.nodes.get_mut(&id)?;
                e.placed_since_heartbeat += size;
                Some(NodeAddr { id, addr: e.addr })
            })
            .collect()
    }

    /// Where `node` was live last, if it still counts as live.
    pub fn live_elsewhere(&self, node: NodeAddr) -> Option<SocketAddr> {
        self.nodes
            .get(&node.id)
            .filter(|e| e.last_heartbeat.elapsed() <= self.dead_timeout)
            .map(|e| e.addr)
    }

    /// A datanode (re)joins with its full chunk report.
    pub fn register(
        &mut self,
        node: NodeAddr,
        capacity: u64,
        available: u64,
        chunks: &[StoredChunk],
        safe_mode: bool,
    ) -> Vec<DatanodeCommand> {
        self.join(node, capacity, available, chunks);
        self.full_report(node.id, chunks, safe_mode)
    }

    /// Records a node as live with what it holds, without reconciling its
    /// replicas (a paged report reconciles when its last page arrives).
    pub fn join(&mut self, node: NodeAddr, capacity: u64, available: u64, chunks: &[StoredChunk]) {
        let used = chunks.iter().map(|c| c.size).sum();
        let entry = self.nodes.entry(node.id).or_insert_with(|| NodeEntry {
            addr: node.addr,
            capacity,
            available,
            used,
            chunks: 0,
            trash_bytes: 0,
            scrub: ScrubStatus::default(),
            full: false,
            jobs: 0,
            job_bytes: 0,
            last_heartbeat: Instant::now(),
            placed_since_heartbeat: 0,
            commands: Vec::new(),
            was_live: true,
        });
        entry.addr = node.addr;
        entry.capacity = capacity;
        entry.available = available;
        entry.used = used;
        entry.chunks = chunks.len() as u64;
        entry.last_heartbeat = Instant::now();
        entry.placed_since_heartbeat = 0;
        entry.was_live = true;
    }

    /// Reconciles what a node holds with what the namenode believes: known
    /// chunks gain this replica, unknown ones are orphans for the node's
    /// trash (never deleted outright, and not at all in safe mode), and
    /// replicas it no longer reports are dropped. A reported digest that
    /// differs from the committed one adds no replica: the node never
    /// received that chunk.
    pub fn full_report(
        &mut self,
        node: NodeId,
        chunks: &[StoredChunk],
        safe_mode: bool,
    ) -> Vec<DatanodeCommand> {
        let mut reported: BTreeSet<ChunkId> = BTreeSet::new();
        let mut orphans = Vec::new();
        let mut false_claims = 0usize;
        for c in chunks {
            match self.chunks.get_mut(&c.id) {
                Some(entry) if entry.digest.is_some_and(|d| d != c.digest) => {
                    false_claims += 1;
                }
                Some(entry) => {
                    reported.insert(c.id);
                    entry.replicas.insert(node);
                    if entry.size.is_some_and(|s| s != c.size) {
                        entry.corrupt.insert(
                            node,
                            format!(
                                "holds {} bytes, expected {}",
                                c.size,
                                entry.size.unwrap_or(0)
                            ),
                        );
                    }
                }
                None => orphans.push(c.id),
            }
        }
        for (id, entry) in self.chunks.iter_mut() {
            if entry.replicas.contains(&node) && !reported.contains(id) {
                entry.replicas.remove(&node);
                entry.corrupt.remove(&node);
            }
        }
        if false_claims > 0 {
            tracing::warn!(%node, count = false_claims, "report names chunks with digests that were never committed; ignoring them");
        }
        if orphans.is_empty() || safe_mode {
            Vec::new()
        } else {
            tracing::info!(%node, count = orphans.len(), "unknown chunks go to the datanode's trash");
            vec![DatanodeCommand::Trash(orphans)]
        }
    }

    pub fn chunk_received(&mut self, node: NodeId, chunk: StoredChunk) -> bool {
        match self.chunks.get_mut(&chunk.id) {
            // Not the chunk that was committed: the node never received it.
            Some(entry) if entry.digest.is_some_and(|d| d != chunk.digest) => {
                tracing::warn!(%node, chunk = %chunk.id, "announced a chunk with another digest; ignored");
                false
            }
            Some(entry) => {
                entry.replicas.insert(node);
                entry.corrupt.remove(&node);
                true
            }
            None => {
                // Unknown here, perhaps known to a namespace this namenode
                // lost: kept aside, as at registration.
                self.queue(node, DatanodeCommand::Trash(vec![chunk.id]));
                false
            }
        }
    }

    pub fn queue(&mut self, node: NodeId, cmd: DatanodeCommand) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.commands.push(cmd);
        }
    }

    /// Forgets chunks no file owns any more and tells their holders to
    /// delete them.
    pub fn forget_chunks(&mut self, ids: impl IntoIterator<Item = ChunkId>) {
        let mut per_node: HashMap<NodeId, Vec<ChunkId>> = HashMap::new();
        for id in ids {
            if let Some(entry) = self.chunks.remove(&id) {
                for node in entry.replicas {
                    per_node.entry(node).or_default().push(id);
                }
            }
        }
        for (node, ids) in per_node {
            self.queue(node, DatanodeCommand::Delete(ids));
        }
    }

    pub fn mark_corrupt(&mut self, chunk: ChunkId, node: NodeId, reason: String) -> bool {
        match self.chunks.get_mut(&chunk) {
            Some(e) if e.replicas.contains(&node) => {
                e.corrupt.insert(node, reason);
                true
            }
            _ => false,
        }
    }

    /// Replicas of a chunk: live good ones first, then dead, then corrupt.
    pub fn replicas(&self, chunk: ChunkId, rotate: usize) -> Vec<ReplicaInfo> {
        let Some(entry) = self.chunks.get(&chunk) else {
            return Vec::new();
        };
        let mut live = Vec::new();
        let mut rest = Vec::new();
        for node in &entry.replicas {
            let Some(addr) = self.addr(*node) else {
                continue;
            };
            let state = if entry.corrupt.contains_key(node) {
                ReplicaState::Corrupt
            } else if self.is_live(*node) {
                ReplicaState::Live
            } else {
                ReplicaState::Dead
            };
            let info = ReplicaInfo { node: addr, state };
            if state == ReplicaState::Live {
                live.push(info);
            } else {
                rest.push(info);
            }
        }
        if !live.is_empty() {
            // Spread reads of consecutive chunks over the holders.
            let k = rotate % live.len();
            live.rotate_left(k);
        }
        rest.sort_by_key(|r| r.state == ReplicaState::Corrupt);
        live.extend(rest);
        live
    }

    /// Takes a node's figures; `None` when the node is unknown (it must
    /// register again).
    pub fn heartbeat(&mut self, hb: Heartbeat) -> Option<Vec<DatanodeCommand>> {
        let n = self.nodes.get_mut(&hb.node)?;
        n.trash_bytes = hb.trash_bytes;
        n.scrub = hb.scrub;
        n.full = hb.full;
        n.jobs = hb.jobs;
        n.job_bytes = hb.job_bytes;
        n.capacity = hb.capacity;
        n.available = hb.available;
        n.used = hb.used;
        n.chunks = hb.chunks;
        n.last_heartbeat = Instant::now();
        n.placed_since_heartbeat = 0;
        Some(std::mem::take(&mut n.commands))
    }

    pub fn report(&self) -> Vec<DatanodeReport> {
        let mut out: Vec<DatanodeReport> = self
            .nodes
            .iter()
            .map(|(id, n)| DatanodeReport {
                node: NodeAddr {
                    id: *id,
                    addr: n.addr,
                },
                state: if self.is_live(*id) {
                    NodeState::Live
                } else {
                    NodeState::Dead
                },
                capacity: n.capacity,
                used: n.used,
                available: n.available,
                chunks: n.chunks,
                trash_bytes: n.trash_bytes,
                scrub: n.scrub.clone(),
                full: n.full,
                jobs: n.jobs,
                job_bytes: n.job_bytes,
                since_heartbeat_secs: n.last_heartbeat.elapsed().as_secs_f64(),
            })
            .collect();
        out.sort_by_key(|r| r.node.addr);
        out
    }

    /// Committed chunks by health. A scan of the whole chunk map, as fsck
    /// does; it serves the web UI's overview and a metrics scrape.
    pub fn health(&self) -> ChunkHealth {
        let mut h = ChunkHealth::default();
        for c in self.chunks.values().filter(|c| c.size.is_some()) {
            h.chunks += 1;
            h.corrupt_replicas += c.corrupt.len() as u64;
            let live = c
                .replicas
                .iter()
                .filter(|n| !c.corrupt.contains_key(n) && self.is_live(**n))
                .count();
            if live == 0 {
                h.missing += 1;
            } else if live < c.target as usize {
                h.under_replicated += 1;
            }
        }
        h
    }

    /// Commands queued for the datanodes' next heartbeats.
    pub fn queued_commands(&self) -> usize {
        self.nodes.values().map(|n| n.commands.len()).sum()
    }

    /// Chunks of completed files that no live node reports yet.
    pub fn unreported(&self) -> (usize, usize) {
        let committed = self.chunks.values().filter(|c| c.size.is_some());
        let mut total = 0;
        let mut missing = 0;
        for c in committed {
            total += 1;
            if !c.replicas.iter().any(|n| self.is_live(*n)) {
                missing += 1;
            }
        }
        (missing, total)
    }

    /// Logs nodes that went silent or came back; returns nodes newly dead.
    pub fn note_transitions(&mut self) -> Vec<NodeId> {
        let timeout = self.dead_timeout;
        let mut newly_dead = Vec::new();
        for (id, n) in self.nodes.iter_mut() {
            let live = n.last_heartbeat.elapsed() <= timeout;
            if n.was_live && !live {
                tracing::warn!(node = %id, addr = %n.addr, "datanode is dead: no heartbeat for {:?}", timeout);
                newly_dead.push(*id);
            } else if !n.was_live && live {
                tracing::info!(node = %id, addr = %n.addr, "datanode is live again");
            }
            n.was_live = live;
        }
        newly_dead
    }
}
