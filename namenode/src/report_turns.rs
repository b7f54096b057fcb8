//! Turns to send a long full report (HDFS's block report leases). A
//! thousand datanodes registering together would otherwise send every
//! chunk list at once, and every decoded list would wait in memory for its
//! turn to be reconciled. A node asks for a turn and its request waits
//! here, in the order asked, until one is free; so a turn passes to the
//! next node the moment a report ends instead of at that node's next
//! heartbeat.

use quern_proto::NodeId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub(crate) struct ReportTurns {
    free: Arc<Semaphore>,
    /// Nodes holding a turn, since when.
    held: Mutex<HashMap<NodeId, (Instant, OwnedSemaphorePermit)>>,
    /// A turn not ended by a report within this is taken back (the node
    /// died or restarted mid-report).
    lapse: Duration,
}

impl ReportTurns {
    pub fn new(turns: usize, lapse: Duration) -> ReportTurns {
        ReportTurns {
            free: Arc::new(Semaphore::new(turns.max(1))),
            held: Mutex::new(HashMap::new()),
            lapse,
        }
    }

    /// A turn for `node` if it holds one or one is free now.
    pub fn try_take(&self, node: NodeId) -> bool {
        let mut held = crate::state::lock(&self.held);
        let lapse = self.lapse;
        held.retain(|_, (since, _)| since.elapsed() < lapse);
        if held.contains_key(&node) {
            return true;
        }
        match self.free.clone().try_acquire_owned() {
            Ok(permit) => {
                held.insert(node, (Instant::now(), permit));
                true
            }
            Err(_) => false,
        }
    }

    /// Waits up to `within` for a turn, behind the nodes that asked
    /// before; false if none came.
    pub async fn take(&self, node: NodeId, within: Duration) -> bool {
        if self.try_take(node) {
            return true;
        }
        match tokio::time::timeout(within, self.free.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                crate::state::lock(&self.held).insert(node, (Instant::now(), permit));
                true
            }
            // Timed out, or the semaphore closed (it never is).
            _ => false,
        }
    }

    /// The node's report ended (or it is gone): its turn passes on.
    pub fn done(&self, node: NodeId) {
        crate::state::lock(&self.held).remove(&node);
    }

    #[cfg(test)]
    fn holders(&self) -> usize {
        crate::state::lock(&self.held).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_node_gets_the_turn_the_moment_a_report_ends() {
        let turns = Arc::new(ReportTurns::new(2, Duration::from_secs(120)));
        assert!(turns.try_take(NodeId(1)));
        assert!(turns.try_take(NodeId(2)));
        assert!(turns.try_take(NodeId(1)), "a holder keeps its turn");
        assert!(!turns.try_take(NodeId(3)), "both turns are taken");

        let waiting = {
            let turns = turns.clone();
            tokio::spawn(async move { turns.take(NodeId(3), Duration::from_secs(60)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "node 3 waits while both turns are held"
        );
        let asked = Instant::now();
        turns.done(NodeId(1));
        assert!(waiting.await.expect("joins"), "node 3 got node 1's turn");
        assert!(asked.elapsed() < Duration::from_secs(5));
        assert_eq!(turns.holders(), 2);
    }

    #[tokio::test]
    async fn no_turn_within_the_wait_is_a_plain_no() {
        let turns = ReportTurns::new(1, Duration::from_secs(120));
        assert!(turns.try_take(NodeId(1)));
        assert!(!turns.take(NodeId(2), Duration::from_millis(30)).await);
        assert_eq!(turns.holders(), 1);
    }

    #[tokio::test]
    async fn a_turn_never_used_lapses_and_passes_on() {
        let turns = ReportTurns::new(1, Duration::from_millis(40));
        assert!(turns.try_take(NodeId(1)));
        assert!(!turns.try_take(NodeId(2)));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(turns.take(NodeId(2), Duration::from_millis(10)).await);
        assert_eq!(turns.holders(), 1);
    }
}
