//! The replication queue: chunks that need copies, most urgent first (the
//! fewest good replicas left), and chunks with extra or corrupt replicas to
//! drop. It is fed as replicas change (a node dies, a report or a reader
//! finds a replica missing or corrupt, `setrep`), never by sweeping every
//! chunk, and worked a bounded number of copies per datanode per pass, as
//! HDFS's replication monitor does, so a lost node's chunks come back at a
//! steady rate instead of as one storm.

use crate::chunkmap::Slot;
use crate::cluster::Cluster;
use quern_proto::msg::{DatanodeCommand, NodeAddr};
use quern_proto::{ChunkId, ChunkToken};
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

/// Chunks looked at per hold of the cluster lock; between slices the lock
/// goes to whoever waits (heartbeats, reports, clients).
const SLICE: usize = 256;

/// Works the queue: at most `per_node` copies per datanode (as source or
/// target) in this pass, every queued chunk looked at once. A copy not
/// acknowledged within `patience` is asked for again.
pub(crate) fn work(
    cluster: &parking_lot::Mutex<Cluster>,
    per_node: usize,
    patience: Duration,
    sign: &dyn Fn(ChunkId) -> ChunkToken,
) -> Pass {
    let mut c = cluster.lock();
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
    let mut pass = Pass::default();
    let mut targets = Targets::new(&c, per_node);
    let mut deferred = Vec::new();
    let mut left = c.queue.queued();
    while left > 0 {
        for _ in 0..SLICE.min(left) {
            left -= 1;
            let Some((id, level)) = c.queue.pop() else {
                left = 0;
                break;
            };
            match one(&mut c, id, &mut targets, sign) {
                Some(Step::Copied) => pass.copies += 1,
                Some(Step::Dropped(n)) => pass.dropped += n,
                Some(Step::Busy) => deferred.push((id, level)),
                None => {}
            }
        }
        parking_lot::MutexGuard::unlock_fair(c);
        c = cluster.lock();
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

enum Step {
    Copied,
    Dropped(usize),
    /// Every node that could take part has done its share of this pass.
    Busy,
}

/// What one queued chunk needs, done; `None` when it needs nothing now.
fn one(
    c: &mut Cluster,
    id: ChunkId,
    targets: &mut Targets,
    sign: &dyn Fn(ChunkId) -> ChunkToken,
) -> Option<Step> {
    let info = c.chunk(id)?;
    let (Some(size), Some(check)) = (info.size, info.check) else {
        return None;
    };
    let good = c.good_replicas(id);
    // No good copy left to copy from: queued again if one comes back.
    if good.is_empty() {
        return None;
    }
    let target = info.target as usize;
    if good.len() >= target {
        let n = drop_extras(c, id, good, target);
        return (n > 0).then_some(Step::Dropped(n));
    }
    let start = id.0 as usize % good.len();
    let Some(source) = (0..good.len())
        .map(|i| good[(start + i) % good.len()])
        .find(|s| targets.has_room(*s))
    else {
        return Some(Step::Busy);
    };
    // A corrupt holder may take the fresh copy; good holders may not.
    let holders: Vec<Slot> = c
        .chunks
        .replicas(id)
        .into_iter()
        .filter(|s| !c.chunks.is_corrupt(id, *s))
        .collect();
    let chosen = targets.pick(c, target - good.len(), size, &holders);
    if chosen.is_empty() {
        return Some(Step::Busy);
    }
    targets.take(source);
    let addrs: Vec<NodeAddr> = chosen.iter().filter_map(|s| c.slot_addr(*s)).collect();
    let source_id = c.node(source)?.id;
    tracing::debug!(chunk = %id, source = %source_id, targets = addrs.len(), "re-replicating");
    c.queue.inflight.insert(id, (Instant::now(), addrs.len()));
    c.queue(
        source_id,
        DatanodeCommand::Replicate {
            chunk: id,
            size,
            check,
            targets: addrs,
            token: sign(id),
        },
    );
    Some(Step::Copied)
}

/// The nodes a pass may copy to, least used first, and how many copies
/// each has taken part in; built once per pass so choosing targets does
/// not sort every node for every chunk.
struct Targets {
    order: Vec<Slot>,
    load: HashMap<Slot, usize>,
    per_node: usize,
    next: usize,
}

impl Targets {
    fn new(c: &Cluster, per_node: usize) -> Targets {
        let mut order: Vec<(Slot, u64)> = c
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.live && !n.full)
            .map(|(i, n)| (i as Slot, n.used + n.placed_since_heartbeat))
            .collect();
        order.sort_by_key(|(_, used)| *used);
        Targets {
            order: order.into_iter().map(|(s, _)| s).collect(),
            load: HashMap::default(),
            per_node,
            next: 0,
        }
    }

    fn has_room(&self, slot: Slot) -> bool {
        self.load.get(&slot).copied().unwrap_or(0) < self.per_node
    }

    fn take(&mut self, slot: Slot) {
        *self.load.entry(slot).or_default() += 1;
    }

    /// Up to `n` nodes with room for `size` bytes and for one more copy
    /// this pass, not among `exclude`; taken round the list so copies
    /// spread over every node rather than piling on the emptiest.
    fn pick(&mut self, c: &mut Cluster, n: usize, size: u64, exclude: &[Slot]) -> Vec<Slot> {
        let mut out = Vec::with_capacity(n);
        let len = self.order.len();
        for k in 0..len {
            if out.len() == n {
                break;
            }
            let slot = self.order[(self.next + k) % len];
            if exclude.contains(&slot) || !self.has_room(slot) {
                continue;
            }
            let Some(node) = c.nodes.get_mut(slot as usize) else {
                continue;
            };
            if node.available.saturating_sub(node.placed_since_heartbeat) < size {
                continue;
            }
            node.placed_since_heartbeat += size;
            out.push(slot);
        }
        if len > 0 {
            self.next = (self.next + 1) % len;
        }
        for s in &out {
            self.take(*s);
        }
        out
    }
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
pub(crate) mod tests {
    use super::*;
    use quern_proto::msg::{NodeAddr, ReplicaState, StoredChunk};
    use quern_proto::{ChunkToken, Digest, NodeId};

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
            c.join(addr(i), 1 << 40, 1 << 40, &[], false);
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

    fn run(
        c: &mut Cluster,
        per_node: usize,
        patience: Duration,
        sign: &dyn Fn(ChunkId) -> ChunkToken,
    ) -> Pass {
        let m = parking_lot::Mutex::new(std::mem::replace(c, Cluster::new(c.dead_timeout)));
        let pass = work(&m, per_node, patience, sign);
        *c = m.into_inner();
        pass
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
        let pass = run(&mut c, 5, Duration::from_secs(60), &token);
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
        c.join(addr(1), 1 << 40, 1 << 40, &[], false);
        assert_eq!(c.queue.queued(), 3);
        let pass = run(&mut c, 1, Duration::from_secs(60), &token);
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
        let pass = run(&mut c, 8, Duration::from_secs(60), &token);
        assert_eq!(pass.copies, 1);
        c.chunk_received(NodeId(3), stored(0));
        assert_eq!(counts(&c), (1, 0, 0));
        let pass = run(&mut c, 8, Duration::from_secs(60), &token);
        assert_eq!(pass.dropped, 1);
        assert!(c.nodes[0]
            .commands
            .iter()
            .any(|cmd| matches!(cmd, DatanodeCommand::Delete(ids) if ids == &[ChunkId(0)])));
        assert_eq!(c.health_counts().corrupt_replicas, 0);
    }

    #[test]
    fn nothing_is_queued_while_the_map_is_rebuilt_and_the_queue_is_built_once_after() {
        let mut c = Cluster::new(Duration::from_secs(30));
        c.queueing = false;
        for i in 1..=3 {
            c.join(addr(i), 1 << 40, 1 << 40, &[], false);
        }
        // As loaded at a start: committed, no holder known yet.
        for id in 0..10 {
            let s = stored(id);
            c.commit(s.id, s.size, s.digest, 2, &[]);
        }
        assert_eq!(counts(&c), (10, 10, 0));
        let all: Vec<StoredChunk> = (0..10).map(stored).collect();
        c.full_report(NodeId(1), &all, true);
        assert_eq!(counts(&c), (10, 0, 10));
        assert_eq!(
            c.queue.queued(),
            0,
            "the other holders have not reported yet"
        );
        c.full_report(NodeId(2), &all[..5], true);
        assert_eq!(counts(&c), (10, 0, 5));
        assert_eq!(c.queue.queued(), 0);
        c.queueing = true;
        for slot in 0..3 {
            let held = c.held(slot);
            c.queue_chunks(&held);
        }
        assert_eq!(c.queue.queued(), 5, "only the chunks node 2 lacks");
    }

    #[test]
    fn a_node_registered_without_its_list_owes_it_until_its_full_report() {
        let mut c = Cluster::new(Duration::from_millis(1));
        c.join(addr(1), 1 << 40, 1 << 40, &[], true);
        c.join(addr(2), 1 << 40, 1 << 40, &[], true);
        c.join(addr(3), 1 << 40, 1 << 40, &[], false);
        assert_eq!(c.reports_owed(), 2);
        let reported = c.last_report;
        c.full_report(NodeId(1), &[stored(0)], true);
        assert_eq!(c.reports_owed(), 1);
        assert!(c.last_report > reported);
        // A node that dies owing its report holds nothing up.
        std::thread::sleep(Duration::from_millis(5));
        c.declare_dead(NodeId(2));
        assert_eq!(c.reports_owed(), 0);
        // Registering again without the list owes it again.
        c.join(addr(1), 1 << 40, 1 << 40, &[], true);
        assert_eq!(c.reports_owed(), 1);
    }

    /// A heartbeat of an empty node.
    pub(crate) fn beat(node: u64) -> quern_proto::msg::Heartbeat {
        quern_proto::msg::Heartbeat {
            node: NodeId(node),
            capacity: 1 << 40,
            available: 1 << 40,
            used: 0,
            chunks: 0,
            trash_bytes: 0,
            scrub: Default::default(),
            full: false,
            jobs: 0,
            job_bytes: 0,
            gflops: 0.0,
        }
    }

    #[test]
    fn a_late_heartbeat_counts_from_when_it_came_and_leaves_the_commands_queued() {
        let mut c = cluster(3, 10);
        c.queue(NodeId(1), DatanodeCommand::Trash(vec![ChunkId(99)]));
        let came = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        c.late_heartbeat(beat(1), came);
        let r = c.report();
        let n1 = r.iter().find(|d| d.node.id == NodeId(1)).unwrap();
        assert!(
            n1.since_heartbeat_secs >= 0.02,
            "{}",
            n1.since_heartbeat_secs
        );
        // The reply it had carried no commands: the next heartbeat's does.
        assert_eq!(
            c.heartbeat(beat(1)).unwrap(),
            vec![DatanodeCommand::Trash(vec![ChunkId(99)])]
        );
        // A late heartbeat of a node declared dead meanwhile brings it back.
        c.dead_timeout = Duration::ZERO;
        std::thread::sleep(Duration::from_millis(5));
        c.declare_dead(NodeId(2));
        assert_eq!(recount(&c, 10), (10, 0, 10));
        c.late_heartbeat(beat(2), Instant::now());
        assert_eq!(recount(&c, 10), (10, 0, 0));
    }
}
