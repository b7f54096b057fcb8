//! The replication queue: chunks that need copies, most urgent first (the
//! fewest good replicas left), and chunks with extra or corrupt replicas to
//! drop. It is fed as replicas change (a node dies, a report or a reader
//! finds a replica missing or corrupt, `setrep`), never by sweeping every
//! chunk, and worked a bounded number of copies per datanode per pass, as
//! HDFS's replication monitor does, so a lost node's chunks come back at a
//! steady rate instead of as one storm.

use crate::chunkmap::Slot;
use crate::cluster::Cluster;
use quern_proto::msg::DatanodeCommand;
use quern_proto::{ChunkId, ChunkToken, NodeId};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Queue levels: 0 for a chunk down to one good replica, 1 for two or
/// more missing, 2 for one missing, and the cleanup of extras last.
const LEVELS: usize = 4;
pub const CLEANUP: u8 = 3;

pub fn urgency(good: usize, target: u8) -> u8 {
    let target = target as usize;
    if good <= 1 {
        0
    } else if good + 1 < target {
        1
    } else {
        2
    }
}

#[derive(Default)]
pub struct ReplicationQueue {
    levels: [VecDeque<ChunkId>; LEVELS],
    queued: HashSet<ChunkId>,
    /// Copies asked for and not all arrived: since when, copies awaited.
    inflight: HashMap<ChunkId, (Instant, usize)>,
}

impl ReplicationQueue {
    /// Queues a chunk unless it is queued or has copies under way.
    pub fn offer(&mut self, id: ChunkId, level: u8) {
        if self.inflight.contains_key(&id) || !self.queued.insert(id) {
            return;
        }
        self.levels[(level as usize).min(LEVELS - 1)].push_back(id);
    }

    /// A copy arrived.
    pub fn landed(&mut self, id: ChunkId) {
        if let Some((_, awaited)) = self.inflight.get_mut(&id) {
            *awaited = awaited.saturating_sub(1);
            if *awaited == 0 {
                self.inflight.remove(&id);
            }
        }
    }

    pub fn forget(&mut self, id: ChunkId) {
        self.queued.remove(&id);
        self.inflight.remove(&id);
    }

    fn pop(&mut self) -> Option<(ChunkId, u8)> {
        for (level, q) in self.levels.iter_mut().enumerate() {
            while let Some(id) = q.pop_front() {
                // Entries of forgotten chunks are left behind and skipped.
                if self.queued.remove(&id) {
                    return Some((id, level as u8));
                }
            }
        }
        None
    }

    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub copies: usize,
    pub dropped: usize,
    /// Chunks left for a later pass because their nodes had done their
    /// share of this one.
    pub deferred: usize,
}

/// Works the queue: at most `per_node` copies per datanode (as source or
/// target) in this pass. A copy not acknowledged within `patience` is
/// asked for again.
pub(crate) fn work(
    c: &mut Cluster,
    per_node: usize,
    patience: Duration,
    sign: &dyn Fn(ChunkId) -> ChunkToken,
) -> Pass {
    let expired: Vec<ChunkId> = c
        .queue
        .inflight
        .iter()
        .filter(|(_, (since, _))| since.elapsed() >= patience)
        .map(|(id, _)| *id)
        .collect();
    for id in expired {
        c.queue.inflight.remove(&id);
        let now = c.health(id);
        c.settle(id, now);
    }
    let per_node = per_node.max(1);
    let live = c.live_count().max(1);
    let max_pops = 4 * per_node * live + 64;
    let mut load: HashMap<NodeId, usize> = HashMap::default();
    let mut deferred = Vec::new();
    let mut pass = Pass::default();
    for _ in 0..max_pops {
        let Some((id, level)) = c.queue.pop() else {
            break;
        };
        let Some(info) = c.chunk(id) else {
            continue;
        };
        let (Some(size), Some(check)) = (info.size, info.check) else {
            continue;
        };
        let good = c.good_replicas(id);
        // No good copy left to copy from: queued again if one comes back.
        if good.is_empty() {
            continue;
        }
        let target = info.target as usize;
        if good.len() < target {
            match copy(c, id, &good, target, size, per_node, &mut load) {
                Some((source, awaited)) => {
                    c.queue(
                        source,
                        DatanodeCommand::Replicate {
                            chunk: id,
                            size,
                            check,
                            targets: awaited,
                            token: sign(id),
                        },
                    );
                    pass.copies += 1;
                }
                None => deferred.push((id, level)),
            }
        } else {
            pass.dropped += drop_extras(c, id, good, target);
        }
    }
    pass.deferred = deferred.len();
    for (id, level) in deferred {
        c.queue.offer(id, level);
    }
    if pass.copies > 0 || pass.dropped > 0 {
        tracing::info!(
            copies = pass.copies,
            dropped = pass.dropped,
            deferred = pass.deferred,
            queued = c.queue.queued(),
            "replication pass"
        );
    }
    pass
}

/// Picks a source with capacity left this pass and targets for the
/// missing copies; records them as under way.
fn copy(
    c: &mut Cluster,
    id: ChunkId,
    good: &[Slot],
    target: usize,
    size: u64,
    per_node: usize,
    load: &mut HashMap<NodeId, usize>,
) -> Option<(NodeId, Vec<quern_proto::msg::NodeAddr>)> {
    let start = id.0 as usize % good.len();
    let source = (0..good.len())
        .map(|i| good[(start + i) % good.len()])
        .filter_map(|s| c.node(s).map(|n| n.id))
        .find(|n| load.get(n).copied().unwrap_or(0) < per_node)?;
    // A corrupt holder may take the fresh copy; good holders may not.
    let holders: Vec<NodeId> = c
        .chunks
        .replicas(id)
        .into_iter()
        .filter(|s| !c.chunks.is_corrupt(id, *s))
        .filter_map(|s| c.node(s).map(|n| n.id))
        .collect();
    let targets = c.choose_targets_where(target - good.len(), size, |e| {
        !holders.contains(&e.id) && load.get(&e.id).copied().unwrap_or(0) < per_node
    });
    if targets.is_empty() {
        return None;
    }
    *load.entry(source).or_default() += 1;
    for t in &targets {
        *load.entry(t.id).or_default() += 1;
    }
    tracing::debug!(chunk = %id, %source, targets = targets.len(), "re-replicating");
    c.queue.inflight.insert(id, (Instant::now(), targets.len()));
    Some((source, targets))
}

/// Drops corrupt replicas, then good ones beyond the target from the
/// fullest nodes; returns how many.
fn drop_extras(c: &mut Cluster, id: ChunkId, mut good: Vec<Slot>, target: usize) -> usize {
    let mut drop = c.chunks.corrupt_slots(id);
    if good.len() > target {
        good.sort_by_key(|s| std::cmp::Reverse(c.node(*s).map(|n| n.used).unwrap_or(0)));
        let extra = good.len() - target;
        drop.extend(good.into_iter().take(extra));
    }
    let before = c.health(id);
    for slot in &drop {
        c.remove_replica(id, *slot);
        if let Some(node) = c.node(*slot).map(|n| n.id) {
            c.queue(node, DatanodeCommand::Delete(vec![id]));
        }
    }
    c.settle(id, before);
    drop.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quern_proto::msg::{NodeAddr, ReplicaState, StoredChunk};
    use quern_proto::{ChunkToken, Digest};

    fn addr(i: u64) -> NodeAddr {
        NodeAddr {
            id: NodeId(i),
            addr: format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
        }
    }

    fn stored(id: u64) -> StoredChunk {
        StoredChunk {
            id: ChunkId(id),
            size: 10,
            digest: Digest([id as u8; 32]),
        }
    }

    /// `chunks` committed chunks of replication 2, all on nodes 1 and 2, in
    /// a cluster of `nodes`.
    fn cluster(nodes: u64, chunks: u64) -> Cluster {
        let mut c = Cluster::new(Duration::from_secs(30));
        for i in 1..=nodes {
            c.join(addr(i), 1 << 40, 1 << 40, &[]);
        }
        for id in 0..chunks {
            let s = stored(id);
            c.commit(s.id, s.size, s.digest, 2, &[NodeId(1), NodeId(2)]);
        }
        c
    }

    fn token(chunk: ChunkId) -> ChunkToken {
        ChunkToken {
            chunk,
            access: quern_proto::Access::REPLICATE,
            user: "namenode".into(),
            expires_ms: 0,
            key_id: 0,
            mac: [0; 32],
        }
    }

    /// Every count recomputed from the replicas, as the old full scan did.
    fn recount(c: &Cluster, chunks: u64) -> (u64, u64, u64) {
        let (mut missing, mut under, mut committed) = (0, 0, 0);
        for id in 0..chunks {
            let Some(info) = c.chunk(ChunkId(id)) else {
                continue;
            };
            committed += 1;
            let live = c
                .replicas(ChunkId(id), 0)
                .iter()
                .filter(|r| r.state == ReplicaState::Live)
                .count();
            if live == 0 {
                missing += 1;
            } else if live < info.target as usize {
                under += 1;
            }
        }
        (committed, missing, under)
    }

    fn counts(c: &Cluster) -> (u64, u64, u64) {
        let h = c.health_counts();
        (h.chunks, h.missing, h.under_replicated)
    }

    #[test]
    fn a_dead_node_queues_its_chunks_and_copies_go_out_at_the_set_rate() {
        let mut c = cluster(5, 100);
        assert_eq!(counts(&c), (100, 0, 0));
        assert_eq!(c.queue.queued(), 0, "healthy chunks are not queued");
        c.nodes[0].last_heartbeat = Instant::now() - Duration::from_secs(60);
        assert_eq!(c.silent_nodes(), vec![NodeId(1)]);
        c.declare_dead(NodeId(1));
        assert_eq!(counts(&c), (100, 0, 100));
        assert_eq!(counts(&c), recount(&c, 100));
        assert_eq!(c.queue.queued(), 100);
        // Node 2 is the only source: five copies a pass, no more.
        let pass = work(&mut c, 5, Duration::from_secs(60), &token);
        assert_eq!(pass.copies, 5);
        assert_eq!(c.queue.queued(), 95);
        assert_eq!(c.queue.inflight(), 5);
        let cmds = std::mem::take(&mut c.nodes[1].commands);
        assert_eq!(cmds.len(), 5);
        // The copies land; those chunks are whole again and leave the queue.
        for cmd in cmds {
            let DatanodeCommand::Replicate {
                chunk,
                size,
                targets,
                ..
            } = cmd
            else {
                panic!("{cmd:?}");
            };
            assert_eq!(targets.len(), 1);
            assert!(![NodeId(1), NodeId(2)].contains(&targets[0].id));
            c.chunk_received(
                targets[0].id,
                StoredChunk {
                    size,
                    ..stored(chunk.0)
                },
            );
        }
        assert_eq!(c.queue.inflight(), 0);
        assert_eq!(counts(&c), (100, 0, 95));
        assert_eq!(counts(&c), recount(&c, 100));
    }

    #[test]
    fn a_node_back_from_the_dead_has_its_extra_replicas_dropped() {
        let mut c = cluster(4, 3);
        c.nodes[0].last_heartbeat = Instant::now() - Duration::from_secs(60);
        c.declare_dead(NodeId(1));
        for id in 0..3 {
            c.chunk_received(NodeId(3), stored(id));
        }
        assert_eq!(counts(&c), (3, 0, 0));
        // Node 1 comes back holding its old replicas: one too many each.
        c.join(addr(1), 1 << 40, 1 << 40, &[]);
        assert_eq!(c.queue.queued(), 3);
        let pass = work(&mut c, 1, Duration::from_secs(60), &token);
        assert_eq!(pass.dropped, 3, "deletes are not rate-bound");
        for id in 0..3 {
            assert_eq!(c.replicas(ChunkId(id), 0).len(), 2);
        }
        assert_eq!(counts(&c), recount(&c, 3));
    }

    #[test]
    fn a_full_report_drops_only_the_reporting_nodes_lost_replicas() {
        let mut c = cluster(3, 10);
        let keep: Vec<StoredChunk> = (0..10).filter(|i| i % 2 == 0).map(stored).collect();
        c.full_report(NodeId(1), &keep, false);
        for id in 0..10u64 {
            let holders: Vec<NodeId> = c
                .replicas(ChunkId(id), 0)
                .iter()
                .map(|r| r.node.id)
                .collect();
            assert_eq!(holders.contains(&NodeId(1)), id % 2 == 0, "chunk {id}");
            assert!(holders.contains(&NodeId(2)));
        }
        assert_eq!(counts(&c), (10, 0, 5));
        assert_eq!(counts(&c), recount(&c, 10));
        // A chunk nobody committed is an orphan for the trash; a claim with
        // another digest adds nothing.
        let mut bad = stored(4);
        bad.digest = Digest([9; 32]);
        let cmds = c.full_report(NodeId(3), &[stored(99), bad], false);
        assert!(matches!(&cmds[..], [DatanodeCommand::Trash(ids)] if ids == &[ChunkId(99)]));
        assert!(!c
            .replicas(ChunkId(4), 0)
            .iter()
            .any(|r| r.node.id == NodeId(3)));
        // Forgetting chunks leaves nothing counted.
        c.forget_chunks((0..10).map(ChunkId));
        assert_eq!(counts(&c), (0, 0, 0));
        assert_eq!(c.queue.queued(), 0);
    }

    #[test]
    fn a_corrupt_replica_is_replaced_and_then_dropped() {
        let mut c = cluster(3, 1);
        assert!(c.mark_corrupt(ChunkId(0), NodeId(1), "digest".into()));
        assert_eq!(counts(&c), (1, 0, 1));
        let pass = work(&mut c, 8, Duration::from_secs(60), &token);
        assert_eq!(pass.copies, 1);
        c.chunk_received(NodeId(3), stored(0));
        assert_eq!(counts(&c), (1, 0, 0));
        let pass = work(&mut c, 8, Duration::from_secs(60), &token);
        assert_eq!(pass.dropped, 1);
        assert!(c.nodes[0]
            .commands
            .iter()
            .any(|cmd| matches!(cmd, DatanodeCommand::Delete(ids) if ids == &[ChunkId(0)])));
        assert_eq!(c.health_counts().corrupt_replicas, 0);
    }
}
