//! Soft state: live datanodes, where each chunk's replicas are, placement.
//!
//! Nothing here is persisted. After a restart datanodes register again with
//! full chunk reports and this map is rebuilt from them, as in HDFS.
//!
//! Nothing here scans every chunk. Each node keeps the set of chunks it
//! holds, so a full report or a node's death costs that node's chunks; the
//! health counts (safe mode's share, the web UI's and `/metrics`'
//! under-replicated and missing chunks) are kept up to date as replicas
//! come and go; and a chunk that needs copies or has extras is put on the
//! replication queue when that happens, not found by a periodic sweep.

use crate::chunkmap::{ChunkInfo, ChunkMap, Reported, Slot, Tally};
use crate::replication::ReplicationQueue;
use quern_proto::msg::{
    DatanodeCommand, DatanodeReport, Heartbeat, NodeAddr, NodeState, ReplicaInfo, ReplicaState,
    ScrubStatus, StoredChunk,
};
use quern_proto::report::ReportedChunk;
use quern_proto::{ChunkId, Digest, NodeId};
use rand::seq::SliceRandom;
use roaring::RoaringTreemap;
use rustc_hash::FxHashMap as HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct NodeEntry {
    pub id: NodeId,
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
    /// The node's measured sgemm rate, GFLOP/s (0 until it reports one).
    pub gflops: f64,
    pub last_heartbeat: Instant,
    /// Bytes placed on the node since its last heartbeat, so a burst of
    /// allocations spreads out before usage figures catch up.
    pub placed_since_heartbeat: u64,
    pub commands: Vec<DatanodeCommand>,
    /// Live as of the last transition noted; replica counts follow this,
    /// not the clock, so they change only when a transition is noted.
    pub live: bool,
    /// Chunks this node holds a replica of (compressed: chunk ids are
    /// mostly consecutive, a few bytes each).
    pub held: RoaringTreemap,
    /// Registered without its chunk list, which follows in its turn.
    pub owes_report: bool,
}

/// Chunks handled per hold of the cluster lock by long jobs (a report, the
/// replication queue's first build): under a millisecond at 10M chunks,
/// where most look-ups miss the cache, after which the lock is handed
/// fairly to any heartbeat or read waiting for it. (2,048 held it for
/// 2-10 ms, and with a heartbeat or a turn request waiting on it a few
/// hundred times a second the async workers spent much of a storm
/// blocked.)
pub(crate) const LOCK_BATCH: usize = 512;

/// A committed chunk's health, as counted for safe mode and the overview.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    Gone,
    Uncommitted,
    /// No live good replica.
    Missing,
    Under,
    Ok,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHealth {
    pub chunks: u64,
    pub under_replicated: u64,
    pub missing: u64,
    pub corrupt_replicas: u64,
}

impl ChunkHealth {
    fn shift(&mut self, from: Health, to: Health) {
        if from == to {
            return;
        }
        for (h, up) in [(from, false), (to, true)] {
            let counters: &mut [&mut u64] = match h {
                Health::Gone | Health::Uncommitted => &mut [],
                Health::Missing => &mut [&mut self.chunks, &mut self.missing],
                Health::Under => &mut [&mut self.chunks, &mut self.under_replicated],
                Health::Ok => &mut [&mut self.chunks],
            };
            for c in counters.iter_mut() {
                if up {
                    **c += 1;
                } else {
                    **c = c.saturating_sub(1);
                }
            }
        }
    }
}

/// Safe mode's two counts, published as they change so that deciding safe
/// mode (in every reply to a datanode) never waits for the map's lock,
/// which reports hold for most of a cold start.
#[derive(Debug, Default)]
pub struct Census {
    chunks: AtomicU64,
    missing: AtomicU64,
}

impl Census {
    /// Committed chunks with no live good replica, and all committed
    /// chunks, as of the map's last change.
    pub fn unreported(&self) -> (usize, usize) {
        let total = self.chunks.load(Ordering::Relaxed) as usize;
        // Read apart from `chunks`, so it may lead it by a change.
        let missing = self.missing.load(Ordering::Relaxed) as usize;
        (missing.min(total), total)
    }

    fn publish(&self, counts: &ChunkHealth) {
        self.missing.store(counts.missing, Ordering::Relaxed);
        self.chunks.store(counts.chunks, Ordering::Relaxed);
    }
}

/// A full report taken in batches.
#[derive(Default)]
pub struct ReportProgress {
    reported: RoaringTreemap,
    orphans: Vec<ChunkId>,
    false_claims: usize,
}

pub struct Cluster {
    pub(crate) nodes: Vec<NodeEntry>,
    slots: HashMap<NodeId, Slot>,
    pub(crate) chunks: ChunkMap,
    counts: ChunkHealth,
    census: Arc<Census>,
    pub(crate) queue: ReplicationQueue,
    /// Whether changes queue chunks for replication. Off while the map is
    /// rebuilt from reports after a start: a chunk seen with one replica
    /// before its other holders reported needs nothing. When safe mode
    /// ends the queue is built once from every node's chunks, as HDFS
    /// initialises its replication queues.
    pub(crate) queueing: bool,
    pub dead_timeout: Duration,
    /// When the last full report was taken: reports still coming in say
    /// the map is not whole yet.
    pub(crate) last_report: Instant,
}

impl Cluster {
    pub fn new(dead_timeout: Duration) -> Cluster {
        Cluster {
            nodes: Vec::new(),
            slots: HashMap::default(),
            chunks: ChunkMap::default(),
            counts: ChunkHealth::default(),
            census: Arc::default(),
            queue: ReplicationQueue::default(),
            queueing: true,
            dead_timeout,
            last_report: Instant::now(),
        }
    }

    /// Safe mode's counts, readable without the map's lock.
    pub fn census(&self) -> Arc<Census> {
        self.census.clone()
    }

    pub(crate) fn slot(&self, node: NodeId) -> Option<Slot> {
        self.slots.get(&node).copied()
    }

    pub(crate) fn node(&self, slot: Slot) -> Option<&NodeEntry> {
        self.nodes.get(slot as usize)
    }

    fn node_mut(&mut self, node: NodeId) -> Option<&mut NodeEntry> {
        let slot = self.slot(node)?;
        self.nodes.get_mut(slot as usize)
    }

    fn slot_live(&self, slot: Slot) -> bool {
        self.node(slot).is_some_and(|n| n.live)
    }

    pub fn live_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.live).count()
    }

    pub(crate) fn slot_addr(&self, slot: Slot) -> Option<NodeAddr> {
        self.node(slot).map(|n| NodeAddr {
            id: n.id,
            addr: n.addr,
        })
    }

    pub fn chunk(&self, id: ChunkId) -> Option<ChunkInfo> {
        self.chunks.info(id)
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Memory of the chunk map and of every node's chunk set (as
    /// serialized, which is close to what a bitmap holds in memory).
    pub fn memory_bytes(&self) -> usize {
        self.chunks.memory_bytes()
            + self
                .nodes
                .iter()
                .map(|n| n.held.serialized_size())
                .sum::<usize>()
    }

    /// Up to `n` distinct live nodes with room for `size` bytes, least used
    /// first (ties broken at random so equal nodes share the load).
    pub fn choose_targets(&mut self, n: usize, exclude: &[NodeId], size: u64) -> Vec<NodeAddr> {
        let mut candidates: Vec<(usize, u64)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                e.live
                    && !e.full
                    && e.available.saturating_sub(e.placed_since_heartbeat) >= size
                    && !exclude.contains(&e.id)
            })
            .map(|(i, e)| (i, e.used + e.placed_since_heartbeat))
            .collect();
        candidates.shuffle(&mut rand::rng());
        candidates.sort_by_key(|(_, used)| *used);
        candidates.truncate(n);
        candidates
            .into_iter()
            .filter_map(|(i, _)| {
                let e = self.nodes.get_mut(i)?;
                e.placed_since_heartbeat += size;
                Some(NodeAddr {
                    id: e.id,
                    addr: e.addr,
                })
            })
            .collect()
    }

    /// Where `node` was live last, if it still counts as live.
    pub fn live_elsewhere(&self, node: NodeAddr) -> Option<SocketAddr> {
        self.slot(node.id)
            .and_then(|s| self.node(s))
            .filter(|e| e.live && e.last_heartbeat.elapsed() <= self.dead_timeout)
            .map(|e| e.addr)
    }

    /// Records a node as live with what it holds, without reconciling its
    /// replicas (a paged report reconciles when its last page arrives).
    pub fn join(
        &mut self,
        node: NodeAddr,
        capacity: u64,
        available: u64,
        chunks: &[ReportedChunk],
        report_follows: bool,
    ) {
        let used = chunks.iter().map(|c| c.size).sum();
        let slot = match self.slot(node.id) {
            Some(s) => s,
            None => {
                let s = self.nodes.len() as Slot;
                self.nodes.push(NodeEntry {
                    id: node.id,
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
                    gflops: 0.0,
                    last_heartbeat: Instant::now(),
                    placed_since_heartbeat: 0,
                    commands: Vec::new(),
                    live: false,
                    held: RoaringTreemap::new(),
                    owes_report: false,
                });
                self.slots.insert(node.id, s);
                s
            }
        };
        if let Some(entry) = self.nodes.get_mut(slot as usize) {
            entry.addr = node.addr;
            entry.capacity = capacity;
            entry.available = available;
            entry.used = used;
            entry.chunks = chunks.len() as u64;
            entry.last_heartbeat = Instant::now();
            entry.placed_since_heartbeat = 0;
            entry.owes_report = report_follows;
        }
        self.set_live(slot, true);
    }

    /// Live nodes that registered and have not sent their full report yet:
    /// until they do, a chunk may look short of replicas it has.
    pub fn reports_owed(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.live && n.owes_report)
            .count()
    }

    /// Reconciles what a node holds with what the namenode believes:
    /// known chunks gain this replica, unknown ones are orphans for the
    /// node's trash (never deleted outright, and not at all in safe mode),
    /// and replicas it no longer reports are dropped. A reported digest that
    /// differs from the committed one adds no replica: the node never
    /// received that chunk. The cost is this node's chunks, old and new.
    #[cfg(test)]
    pub fn full_report(
        &mut self,
        node: NodeId,
        chunks: &[StoredChunk],
        safe_mode: bool,
    ) -> Vec<DatanodeCommand> {
        let chunks: Vec<ReportedChunk> = chunks.iter().map(ReportedChunk::from).collect();
        let mut progress = ReportProgress::default();
        if !self.report_batch(node, &chunks, &mut progress) {
            return vec![DatanodeCommand::Reregister];
        }
        self.finish_report(node, progress, safe_mode)
    }

    /// Takes one batch of a node's full report; false when the node is
    /// unknown (it must register again). Callers take the lock per batch,
    /// so a long report never holds heartbeats up for long.
    pub fn report_batch(
        &mut self,
        node: NodeId,
        chunks: &[ReportedChunk],
        progress: &mut ReportProgress,
    ) -> bool {
        let Some(slot) = self.slot(node) else {
            return false;
        };
        for c in chunks {
            let nodes = &self.nodes;
            let live = |s: Slot| nodes.get(s as usize).is_some_and(|n| n.live);
            match self.chunks.add_reported(c.id, slot, c.size, c.check, live) {
                Reported::Unknown => progress.orphans.push(c.id),
                Reported::OtherDigest => progress.false_claims += 1,
                Reported::Held => {
                    progress.reported.insert(c.id.0);
                }
                Reported::Added { good_before, after } => {
                    progress.reported.insert(c.id.0);
                    if let Some(n) = self.nodes.get_mut(slot as usize) {
                        n.held.insert(c.id.0);
                    }
                    let before =
                        health_from(after.info.size.is_some(), after.info.target, good_before);
                    self.settle_with(c.id, before, Some(after));
                }
                Reported::Other => {
                    progress.reported.insert(c.id.0);
                    self.take_replica(c, slot);
                }
            }
        }
        true
    }

    /// A reported replica the one-look-up path left alone (another size,
    /// a fourth holder, corrupt marks): a size other than the committed
    /// one marks it corrupt.
    fn take_replica(&mut self, c: &ReportedChunk, slot: Slot) {
        let Some(info) = self.chunks.info(c.id) else {
            return;
        };
        let before = self.health(c.id);
        self.add_replica(c.id, slot);
        if let Some(expected) = info.size.filter(|s| *s != c.size) {
            self.chunks.mark_corrupt(
                c.id,
                slot,
                format!("holds {} bytes, expected {expected}", c.size),
            );
        }
        self.settle(c.id, before);
    }

    /// Ends a full report: replicas the node did not report are dropped.
    pub fn finish_report(
        &mut self,
        node: NodeId,
        progress: ReportProgress,
        safe_mode: bool,
    ) -> Vec<DatanodeCommand> {
        let Some(slot) = self.slot(node) else {
            return vec![DatanodeCommand::Reregister];
        };
        let gone = match self.node(slot) {
            Some(n) => &n.held - &progress.reported,
            None => RoaringTreemap::new(),
        };
        if let Some(n) = self.nodes.get_mut(slot as usize) {
            n.owes_report = false;
        }
        self.last_report = Instant::now();
        for id in gone.iter().map(ChunkId) {
            let before = self.health(id);
            self.remove_replica(id, slot);
            self.settle(id, before);
        }
        if progress.false_claims > 0 {
            tracing::warn!(%node, count = progress.false_claims, "report names chunks with digests that were never committed; ignoring them");
        }
        if progress.orphans.is_empty() || safe_mode {
            Vec::new()
        } else {
            tracing::info!(%node, count = progress.orphans.len(), "unknown chunks go to the datanode's trash");
            vec![DatanodeCommand::Trash(progress.orphans)]
        }
    }

    pub fn chunk_received(&mut self, node: NodeId, chunk: StoredChunk) -> bool {
        let Some(slot) = self.slot(node) else {
            return false;
        };
        match self.chunks.info(chunk.id) {
            // Not the chunk that was committed: the node never received it.
            Some(info) if info.check.is_some_and(|k| k != chunk.digest.check()) => {
                tracing::warn!(%node, chunk = %chunk.id, "announced a chunk with another digest; ignored");
                false
            }
            Some(_) => {
                let before = self.health(chunk.id);
                self.add_replica(chunk.id, slot);
                self.chunks.clear_corrupt(chunk.id, slot);
                self.queue.landed(chunk.id);
                self.settle(chunk.id, before);
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
        if let Some(n) = self.node_mut(node) {
            n.commands.push(cmd);
        }
    }

    /// A chunk handed out for writing.
    pub fn allocate(&mut self, id: ChunkId, target: u8) {
        self.chunks.allocate(id, target);
    }

    /// A chunk's size and digest as written, with the nodes that stored it.
    pub fn commit(
        &mut self,
        id: ChunkId,
        size: u64,
        digest: Digest,
        target: u8,
        stored_on: &[NodeId],
    ) {
        let before = self.health(id);
        self.chunks.commit(id, size, digest, target);
        for node in stored_on {
            if let Some(slot) = self.slot(*node) {
                self.add_replica(id, slot);
            }
        }
        self.settle(id, before);
    }

    /// A file's new replication target for one of its chunks.
    pub fn set_target(&mut self, id: ChunkId, target: u8) {
        let before = self.health(id);
        if self.chunks.set_target(id, target) {
            self.settle(id, before);
        }
    }

    /// Forgets chunks no file owns any more and tells their holders to
    /// delete them.
    pub fn forget_chunks(&mut self, ids: impl IntoIterator<Item = ChunkId>) {
        let mut per_node: HashMap<Slot, Vec<ChunkId>> = HashMap::default();
        for id in ids {
            let before = self.health(id);
            if let Some(holders) = self.chunks.remove(id) {
                for slot in holders {
                    if let Some(n) = self.nodes.get_mut(slot as usize) {
                        n.held.remove(id.0);
                    }
                    per_node.entry(slot).or_default().push(id);
                }
            }
            self.queue.forget(id);
            self.count(before, Health::Gone);
        }
        for (slot, ids) in per_node {
            if let Some(n) = self.nodes.get_mut(slot as usize) {
                n.commands.push(DatanodeCommand::Delete(ids));
            }
        }
    }

    pub fn mark_corrupt(&mut self, chunk: ChunkId, node: NodeId, reason: String) -> bool {
        let Some(slot) = self.slot(node) else {
            return false;
        };
        let before = self.health(chunk);
        let marked = self.chunks.mark_corrupt(chunk, slot, reason);
        self.settle(chunk, before);
        marked
    }

    /// Why a node's replica of a chunk is corrupt, if it is.
    pub fn corrupt_reason(&self, chunk: ChunkId, node: NodeId) -> Option<&str> {
        self.chunks.corrupt_reason(chunk, self.slot(node)?)
    }

    /// Replicas of a chunk: live good ones first, then dead, then corrupt.
    pub fn replicas(&self, chunk: ChunkId, rotate: usize) -> Vec<ReplicaInfo> {
        let mut live = Vec::new();
        let mut rest = Vec::new();
        let mut holders = self.chunks.replicas(chunk);
        // Stable order whatever the slots, so reads rotate predictably.
        holders.sort_by_key(|s| self.node(*s).map(|n| n.id));
        for slot in holders {
            let Some(addr) = self.slot_addr(slot) else {
                continue;
            };
            let state = if self.chunks.is_corrupt(chunk, slot) {
                ReplicaState::Corrupt
            } else if self.slot_live(slot) {
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
        self.beat(hb, Instant::now(), true)
    }

    /// A heartbeat answered while the map was busy, applied now with the
    /// time it came. Its reply carried no commands, so they stay queued
    /// for the next one.
    pub fn late_heartbeat(&mut self, hb: Heartbeat, came: Instant) {
        self.beat(hb, came, false);
    }

    fn beat(
        &mut self,
        hb: Heartbeat,
        came: Instant,
        take_commands: bool,
    ) -> Option<Vec<DatanodeCommand>> {
        let slot = self.slot(hb.node)?;
        let n = self.nodes.get_mut(slot as usize)?;
        n.trash_bytes = hb.trash_bytes;
        n.scrub = hb.scrub;
        n.full = hb.full;
        n.jobs = hb.jobs;
        n.job_bytes = hb.job_bytes;
        n.gflops = f64::from(hb.gflops);
        n.capacity = hb.capacity;
        n.available = hb.available;
        n.used = hb.used;
        n.chunks = hb.chunks;
        n.last_heartbeat = n.last_heartbeat.max(came);
        n.placed_since_heartbeat = 0;
        let cmds = if take_commands {
            std::mem::take(&mut n.commands)
        } else {
            Vec::new()
        };
        if !n.live {
            tracing::info!(node = %hb.node, "datanode is live again");
            self.set_live(slot, true);
        }
        Some(cmds)
    }

    pub fn report(&self) -> Vec<DatanodeReport> {
        let mut out: Vec<DatanodeReport> = self
            .nodes
            .iter()
            .map(|n| DatanodeReport {
                node: NodeAddr {
                    id: n.id,
                    addr: n.addr,
                },
                state: if n.live {
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
                gflops: n.gflops,
                since_heartbeat_secs: n.last_heartbeat.elapsed().as_secs_f64(),
            })
            .collect();
        out.sort_by_key(|r| r.node.addr);
        out
    }

    /// Committed chunks by health, as kept up to date: no scan.
    pub fn health_counts(&self) -> ChunkHealth {
        ChunkHealth {
            corrupt_replicas: self.chunks.corrupt_total() as u64,
            ..self.counts
        }
    }

    /// Commands queued for the datanodes' next heartbeats.
    pub fn queued_commands(&self) -> usize {
        self.nodes.iter().map(|n| n.commands.len()).sum()
    }

    /// Live nodes silent past the dead timeout.
    pub fn silent_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.live && n.last_heartbeat.elapsed() > self.dead_timeout)
            .map(|n| n.id)
            .collect()
    }

    /// The chunks a node holds a replica of.
    pub(crate) fn held(&self, slot: Slot) -> Vec<ChunkId> {
        self.node(slot)
            .map(|n| n.held.iter().map(ChunkId).collect())
            .unwrap_or_default()
    }

    /// Queues whichever of these chunks need copies or have extras.
    pub(crate) fn queue_chunks(&mut self, ids: &[ChunkId]) {
        for id in ids {
            let now = self.health(*id);
            self.settle(*id, now);
        }
    }

    /// A node silent past the dead timeout is dead: its replicas stop
    /// counting and chunks left short are queued for copies.
    pub fn declare_dead(&mut self, node: NodeId) {
        let Some(slot) = self.slot(node) else {
            return;
        };
        let Some(n) = self.node(slot) else {
            return;
        };
        // A heartbeat may have come in since it was found silent.
        if !n.live || n.last_heartbeat.elapsed() <= self.dead_timeout {
            return;
        }
        tracing::warn!(%node, addr = %n.addr, chunks = n.held.len(), "datanode is dead: no heartbeat for {:?}", self.dead_timeout);
        self.set_live(slot, false);
    }

    /// Flips a node's liveness and recounts the chunks it holds.
    fn set_live(&mut self, slot: Slot, live: bool) {
        let Some(n) = self.nodes.get(slot as usize) else {
            return;
        };
        if n.live == live {
            return;
        }
        let held: Vec<ChunkId> = n.held.iter().map(ChunkId).collect();
        let before: Vec<Health> = held.iter().map(|id| self.health(*id)).collect();
        if let Some(n) = self.nodes.get_mut(slot as usize) {
            n.live = live;
        }
        for (id, b) in held.into_iter().zip(before) {
            self.settle(id, b);
        }
    }

    fn add_replica(&mut self, id: ChunkId, slot: Slot) {
        if self.chunks.add_replica(id, slot) {
            if let Some(n) = self.nodes.get_mut(slot as usize) {
                n.held.insert(id.0);
            }
        }
    }

    pub(crate) fn remove_replica(&mut self, id: ChunkId, slot: Slot) {
        self.chunks.remove_replica(id, slot);
        if let Some(n) = self.nodes.get_mut(slot as usize) {
            n.held.remove(id.0);
        }
    }

    /// Good replicas on live nodes, and every holder.
    pub(crate) fn good_replicas(&self, id: ChunkId) -> Vec<Slot> {
        let mut good = Vec::new();
        self.chunks.each_replica(id, |s| {
            if self.slot_live(s) && !self.chunks.is_corrupt(id, s) {
                good.push(s);
            }
        });
        good
    }

    fn tally(&self, id: ChunkId) -> Option<Tally> {
        let nodes = &self.nodes;
        self.chunks
            .tally(id, |s| nodes.get(s as usize).is_some_and(|n| n.live))
    }

    pub(crate) fn health(&self, id: ChunkId) -> Health {
        health_of(self.tally(id))
    }

    /// After a change to a chunk: moves it between the health counts and
    /// queues it when it now needs copies, has extras or corrupt replicas.
    pub(crate) fn settle(&mut self, id: ChunkId, before: Health) {
        let tally = self.tally(id);
        self.settle_with(id, before, tally);
    }

    /// Moves a chunk between the health counts, and publishes them for
    /// safe mode.
    fn count(&mut self, before: Health, after: Health) {
        self.counts.shift(before, after);
        self.census.publish(&self.counts);
    }

    fn settle_with(&mut self, id: ChunkId, before: Health, tally: Option<Tally>) {
        let after = health_of(tally);
        self.count(before, after);
        let Some(t) = tally.filter(|_| self.queueing) else {
            return;
        };
        if after == Health::Under {
            self.queue
                .offer(id, crate::replication::urgency(t.good, t.info.target));
        } else if after == Health::Ok && (t.good > t.info.target as usize || t.corrupt) {
            self.queue.offer(id, crate::replication::CLEANUP);
        }
    }
}

fn health_of(tally: Option<Tally>) -> Health {
    match tally {
        None => Health::Gone,
        Some(t) => health_from(t.info.size.is_some(), t.info.target, t.good),
    }
}

fn health_from(committed: bool, target: u8, good: usize) -> Health {
    if !committed {
        Health::Uncommitted
    } else if good == 0 {
        Health::Missing
    } else if good < target as usize {
        Health::Under
    } else {
        Health::Ok
    }
}
