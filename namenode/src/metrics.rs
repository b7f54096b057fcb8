//! The namenode's figures for Prometheus, read from its state at each
//! scrape (gauges of what is, not counters kept beside the state).

use crate::jobs::JobState;
use crate::state::{lock, State};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, GaugeVec, IntGauge, IntGaugeVec, Opts};
use quern_proto::metrics::built;
use std::sync::{Arc, Weak};

/// Registers the namenode's gauges; they hold the state weakly, so a
/// stopped namenode is not kept alive by its registry.
pub(crate) fn register(state: &Arc<State>, registry: &prometheus::Registry) {
    let c = NamenodeCollector::new(Arc::downgrade(state));
    if let Err(e) = registry.register(Box::new(c)) {
        tracing::error!("namenode metrics not registered: {e}");
    }
}

struct NamenodeCollector {
    state: Weak<State>,
    datanodes: IntGaugeVec,
    capacity: IntGauge,
    used: IntGauge,
    available: IntGauge,
    chunks: IntGauge,
    under_replicated: IntGauge,
    missing: IntGauge,
    corrupt: IntGauge,
    replication_queue: IntGauge,
    chunk_map_bytes: IntGauge,
    heartbeat_age: GaugeVec,
    safe_mode: IntGauge,
    jobs: IntGaugeVec,
    files_pending: IntGauge,
    up: Gauge,
}

fn gauge(name: &str, help: &str) -> IntGauge {
    built(IntGauge::new(name, help))
}

impl NamenodeCollector {
    fn new(state: Weak<State>) -> NamenodeCollector {
        NamenodeCollector {
            state,
            datanodes: built(IntGaugeVec::new(
                Opts::new(
                    "quern_datanodes",
                    "Datanodes known to the namenode, by state.",
                ),
                &["state"],
            )),
            capacity: gauge(
                "quern_capacity_bytes",
                "Disk capacity of the live datanodes.",
            ),
            used: gauge("quern_used_bytes", "Bytes of chunks on the live datanodes."),
            available: gauge(
                "quern_available_bytes",
                "Bytes the live datanodes can still store.",
            ),
            chunks: gauge("quern_chunks", "Chunks of completed and open files."),
            under_replicated: gauge(
                "quern_under_replicated_chunks",
                "Chunks with fewer good live replicas than their file's replication.",
            ),
            missing: gauge("quern_missing_chunks", "Chunks with no good live replica."),
            corrupt: gauge(
                "quern_corrupt_replicas",
                "Replicas whose checksum failed, not yet replaced.",
            ),
            replication_queue: gauge(
                "quern_replication_queue_length",
                "Re-replications under way plus commands waiting for a datanode's heartbeat.",
            ),
            chunk_map_bytes: gauge(
                "quern_chunk_map_bytes",
                "Memory the chunk map's tables and the datanodes' chunk sets hold.",
            ),
            heartbeat_age: built(GaugeVec::new(
                Opts::new(
                    "quern_heartbeat_age_seconds",
                    "Time since each datanode's last heartbeat.",
                ),
                &["node", "addr"],
            )),
            safe_mode: gauge("quern_safe_mode", "1 while the namenode is in safe mode."),
            jobs: built(IntGaugeVec::new(
                Opts::new("quern_jobs", "Jobs in the namenode's history, by state."),
                &["state"],
            )),
            files_pending: gauge(
                "quern_files_being_written",
                "Files created and not yet completed.",
            ),
            up: built(Gauge::new(
                "quern_namenode_up",
                "1 while the namenode serves.",
            )),
        }
    }

    fn parts(&self) -> [&dyn Collector; 15] {
        [
            &self.datanodes,
            &self.capacity,
            &self.used,
            &self.available,
            &self.chunks,
            &self.under_replicated,
            &self.missing,
            &self.corrupt,
            &self.replication_queue,
            &self.chunk_map_bytes,
            &self.heartbeat_age,
            &self.safe_mode,
            &self.jobs,
            &self.files_pending,
            &self.up,
        ]
    }

    fn refresh(&self, s: &State) {
        let safe = s.safe_mode().is_some();
        self.safe_mode.set(i64::from(safe));
        let (nodes, health, queued, map_bytes) = {
            let c = s.cluster();
            let queued = c.queued_commands() + c.queue.queued() + c.queue.inflight();
            (c.report(), c.health_counts(), queued, c.memory_bytes())
        };
        self.chunk_map_bytes.set(map_bytes as i64);
        let live: Vec<_> = nodes
            .iter()
            .filter(|n| n.state == quern_proto::msg::NodeState::Live)
            .collect();
        self.datanodes
            .with_label_values(&["live"])
            .set(live.len() as i64);
        self.datanodes
            .with_label_values(&["dead"])
            .set((nodes.len() - live.len()) as i64);
        self.capacity
            .set(live.iter().map(|n| n.capacity).sum::<u64>() as i64);
        self.used
            .set(live.iter().map(|n| n.used).sum::<u64>() as i64);
        self.available
            .set(live.iter().map(|n| n.available).sum::<u64>() as i64);
        self.chunks.set(health.chunks as i64);
        self.under_replicated.set(health.under_replicated as i64);
        self.missing.set(health.missing as i64);
        self.corrupt.set(health.corrupt_replicas as i64);
        self.replication_queue.set(queued as i64);
        self.heartbeat_age.reset();
        for n in &nodes {
            self.heartbeat_age
                .with_label_values(&[&n.node.id.to_string(), &n.node.addr.to_string()])
                .set(n.since_heartbeat_secs);
        }
        let (mut running, mut finished, mut failed) = (0, 0, 0);
        match s.jobs.all() {
            Ok(all) => {
                for j in all {
                    match j.state {
                        JobState::Running => running += 1,
                        JobState::Finished => finished += 1,
                        JobState::Failed => failed += 1,
                    }
                }
            }
            Err(e) => tracing::warn!("jobs not counted for /metrics: {e}"),
        }
        self.jobs.with_label_values(&["running"]).set(running);
        self.jobs.with_label_values(&["finished"]).set(finished);
        self.jobs.with_label_values(&["failed"]).set(failed);
        self.files_pending.set(lock(&s.leases).len() as i64);
        self.up.set(1.0);
    }
}

impl Collector for NamenodeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.parts().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(state) = self.state.upgrade() else {
            return Vec::new();
        };
        self.refresh(&state);
        self.parts().into_iter().flat_map(|c| c.collect()).collect()
    }
}
