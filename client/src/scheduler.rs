//! Locality scheduling: every task goes to a live datanode that holds its
//! chunk, spreading the load; a node without a replica gets a task only
//! when no holder is alive.

use quern_proto::msg::NodeAddr;
use quern_proto::NodeId;
use std::collections::{HashMap, HashSet};

/// Where one task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub node: NodeAddr,
    /// The node holds no replica and must fetch the chunk.
    pub remote: bool,
}

/// Tracks how many tasks each live node has been given.
#[derive(Debug, Clone)]
pub struct Scheduler {
    live: Vec<NodeAddr>,
    load: HashMap<NodeId, usize>,
}

impl Scheduler {
    pub fn new(live: Vec<NodeAddr>) -> Scheduler {
        let load = live.iter().map(|n| (n.id, 0)).collect();
        Scheduler { live, load }
    }

    pub fn live(&self) -> &[NodeAddr] {
        &self.live
    }

    pub fn load(&self, node: NodeId) -> usize {
        self.load.get(&node).copied().unwrap_or(0)
    }

    fn least_loaded<'a>(&self, candidates: impl Iterator<Item = &'a NodeAddr>) -> Option<NodeAddr> {
        // Ties go to the earlier candidate, so the plan is deterministic.
        candidates
            .filter(|n| self.load.contains_key(&n.id))
            .min_by_key(|n| self.load(n.id))
            .copied()
    }

    /// Plans every task at once. `holders[i]` lists the nodes holding task
    /// i's chunk. Tasks with the fewest live holders are placed first, then
    /// overloaded nodes hand tasks to less loaded holders.
    pub fn assign_all(&mut self, holders: &[Vec<NodeAddr>]) -> Vec<Option<Assignment>> {
        let mut order: Vec<usize> = (0..holders.len()).collect();
        order.sort_by_key(|&i| {
            holders[i]
                .iter()
                .filter(|n| self.load.contains_key(&n.id))
                .count()
        });
        let mut plan: Vec<Option<Assignment>> = vec![None; holders.len()];
        for i in order {
            plan[i] = self.assign(&holders[i], &HashSet::new());
        }
        self.rebalance(holders, &mut plan);
        plan
    }

    /// Moves node-local tasks off nodes above the fair share while a less
    /// loaded holder exists; each move strictly lowers the maximum.
    fn rebalance(&mut self, holders: &[Vec<NodeAddr>], plan: &mut [Option<Assignment>]) {
        if self.live.is_empty() {
            return;
        }
        loop {
            let mut moved = false;
            for (i, slot) in plan.iter_mut().enumerate() {
                let Some(a) = slot else { continue };
                if a.remote {
                    continue;
                }
                let from = self.load(a.node.id);
                let better = holders[i]
                    .iter()
                    .filter(|n| self.load.contains_key(&n.id) && self.load(n.id) + 1 < from)
                    .min_by_key(|n| self.load(n.id))
                    .copied();
                if let Some(to) = better {
                    *self.load.entry(a.node.id).or_default() -= 1;
                    *self.load.entry(to.id).or_default() += 1;
                    a.node = to;
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Picks a node for one task: the least loaded live holder not in
    /// `exclude`, else (remote) the least loaded live node not in `exclude`.
    pub fn assign(
        &mut self,
        holders: &[NodeAddr],
        exclude: &HashSet<NodeId>,
    ) -> Option<Assignment> {
        let local = self.least_loaded(holders.iter().filter(|n| !exclude.contains(&n.id)));
        let choice = match local {
            Some(node) => Assignment {
                node,
                remote: false,
            },
            None => Assignment {
                node: self.least_loaded(self.live.iter().filter(|n| !exclude.contains(&n.id)))?,
                remote: true,
            },
        };
        *self.load.entry(choice.node.id).or_default() += 1;
        Some(choice)
    }

    /// A node that failed is given no more tasks.
    pub fn forget(&mut self, node: NodeId) {
        self.load.remove(&node);
        self.live.retain(|n| n.id != node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

    fn nodes(n: u64) -> Vec<NodeAddr> {
        (1..=n)
            .map(|i| NodeAddr {
                id: NodeId(i),
                addr: format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
            })
            .collect()
    }

    #[test]
    fn local_and_balanced_with_replication_two_or_more() {
        let mut rng = StdRng::seed_from_u64(7);
        for trial in 0..200 {
            let n = 2 + trial % 5;
            let r = 2 + trial % 2;
            let all = nodes(n as u64);
            let chunks = 1 + trial * 7 % 60;
            let holders: Vec<Vec<NodeAddr>> = (0..chunks)
                .map(|_| {
                    let mut h = all.clone();
                    h.shuffle(&mut rng);
                    h.truncate(r.min(n));
                    h
                })
                .collect();
            let mut s = Scheduler::new(all.clone());
            let plan = s.assign_all(&holders);
            let cap = chunks.div_ceil(n) + 1;
            for (i, a) in plan.iter().enumerate() {
                let a = a.expect("assigned");
                assert!(!a.remote);
                assert!(holders[i].contains(&a.node));
            }
            for node in &all {
                let count = plan.iter().filter(|a| a.unwrap().node == *node).count();
                assert!(count <= cap, "trial {trial}: {count} tasks > {cap}");
            }
        }
    }

    #[test]
    fn remote_only_when_no_holder_is_alive() {
        let all = nodes(3);
        let mut s = Scheduler::new(all[..2].to_vec());
        let plan = s.assign_all(&[vec![all[2]], vec![all[1], all[2]]]);
        assert!(plan[0].unwrap().remote);
        assert_eq!(
            plan[1].unwrap(),
            Assignment {
                node: all[1],
                remote: false
            }
        );
        let mut ex = HashSet::new();
        ex.insert(all[1].id);
        let again = s.assign(&[all[1]], &ex).unwrap();
        assert_eq!(
            again,
            Assignment {
                node: all[0],
                remote: true
            }
        );
        s.forget(all[0].id);
        assert!(s.assign(&[all[1]], &ex).is_none());
    }
}
