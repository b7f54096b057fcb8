//! A datanode's figures for Prometheus: counters kept as work happens
//! (bytes, tasks, training steps), and gauges of the store and the
//! heartbeat read at each scrape.

use crate::node::Node;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use quern_proto::metrics::built;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

pub(crate) struct DatanodeMetrics {
    pub read_bytes: IntCounter,
    pub written_bytes: IntCounter,
    tasks: IntCounterVec,
    task_seconds: HistogramVec,
    step_seconds: HistogramVec,
    train_bytes: IntCounterVec,
    /// When the namenode last answered a heartbeat, report or registration.
    last_heartbeat: Mutex<Option<Instant>>,
}

impl DatanodeMetrics {
    pub fn new(registry: &Registry) -> DatanodeMetrics {
        let m = DatanodeMetrics {
            read_bytes: built(IntCounter::new(
                "quern_datanode_read_bytes_total",
                "Chunk bytes sent to readers and to other datanodes.",
            )),
            written_bytes: built(IntCounter::new(
                "quern_datanode_written_bytes_total",
                "Chunk bytes received, verified and stored.",
            )),
            tasks: built(IntCounterVec::new(
                Opts::new(
                    "quern_tasks_total",
                    "Map tasks run, by operator and outcome.",
                ),
                &["op", "outcome"],
            )),
            task_seconds: built(HistogramVec::new(
                HistogramOpts::new(
                    "quern_task_duration_seconds",
                    "Time a map task took, reading its chunk included, by operator.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 4.0, 9).unwrap_or_default()),
                &["op"],
            )),
            step_seconds: built(HistogramVec::new(
                HistogramOpts::new(
                    "quern_train_step_duration_seconds",
                    "Time a training round took on this worker, by job.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 16).unwrap_or_default()),
                &["job"],
            )),
            train_bytes: built(IntCounterVec::new(
                Opts::new(
                    "quern_train_bytes_total",
                    "Bytes a training job moved on this worker: from and to its coordinator, \
                     and to the next worker of the ring.",
                ),
                &["job", "direction"],
            )),
            last_heartbeat: Mutex::new(None),
        };
        use quern_proto::metrics::register;
        register(registry, &m.read_bytes);
        register(registry, &m.written_bytes);
        register(registry, &m.tasks);
        register(registry, &m.task_seconds);
        register(registry, &m.step_seconds);
        register(registry, &m.train_bytes);
        m
    }

    pub fn task(&self, op: &str, ok: bool, took: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.tasks.with_label_values(&[op, outcome]).inc();
        self.task_seconds
            .with_label_values(&[op])
            .observe(took.as_secs_f64());
    }

    pub fn step(&self, job: u64, took: Duration, bytes_in: u64, bytes_out: u64, ring: u64) {
        let job = format!("{job:016x}");
        self.step_seconds
            .with_label_values(&[&job])
            .observe(took.as_secs_f64());
        for (dir, n) in [("in", bytes_in), ("out", bytes_out), ("ring", ring)] {
            self.train_bytes.with_label_values(&[&job, dir]).inc_by(n);
        }
    }

    /// A freed job's series go: a job id never comes back, and series kept
    /// for every past job would grow without end.
    pub fn job_freed(&self, job: u64) {
        let job = format!("{job:016x}");
        let _ = self.step_seconds.remove_label_values(&[&job]);
        for dir in ["in", "out", "ring"] {
            let _ = self.train_bytes.remove_label_values(&[&job, dir]);
        }
    }

    pub fn heard_from_namenode(&self) {
        *self
            .last_heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    fn heartbeat_age(&self) -> Option<Duration> {
        self.last_heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }
}

/// Registers the gauges read from the node at each scrape.
pub(crate) fn register_gauges(node: &Arc<Node>, registry: &Registry) {
    let c = StoreGauges::new(Arc::downgrade(node));
    if let Err(e) = registry.register(Box::new(c)) {
        tracing::error!("datanode gauges not registered: {e}");
    }
}

struct StoreGauges {
    node: Weak<Node>,
    chunks: IntGauge,
    capacity: IntGauge,
    used: IntGauge,
    available: IntGauge,
    full: IntGauge,
    heartbeat_age: Gauge,
    scrub_verified: IntGauge,
    scrub_passes: IntGauge,
    scrub_errors: IntGauge,
    scrub_last_end: Gauge,
    jobs: IntGauge,
    job_bytes: IntGauge,
}

impl StoreGauges {
    fn new(node: Weak<Node>) -> StoreGauges {
        let g = |name: &str, help: &str| built(IntGauge::new(name, help));
        StoreGauges {
            node,
            chunks: g("quern_datanode_chunks", "Chunks stored on this datanode."),
            capacity: g(
                "quern_datanode_capacity_bytes",
                "Size of the filesystem holding the chunk directory.",
            ),
            used: g("quern_datanode_used_bytes", "Bytes of stored chunks."),
            available: g(
                "quern_datanode_available_bytes",
                "Bytes free for chunks on the filesystem.",
            ),
            full: g(
                "quern_datanode_full",
                "1 while the node refuses new chunks for lack of space.",
            ),
            heartbeat_age: built(Gauge::new(
                "quern_datanode_heartbeat_age_seconds",
                "Time since the namenode last answered this node (-1 before it ever did).",
            )),
            scrub_verified: g(
                "quern_scrub_pass_verified_chunks",
                "Chunks the scrubber has verified in the pass under way.",
            ),
            scrub_passes: g(
                "quern_scrub_passes",
                "Full scrubber passes completed since the node started.",
            ),
            scrub_errors: g(
                "quern_scrub_bad_replicas",
                "Bad replicas the scrubber found since the node started.",
            ),
            scrub_last_end: built(Gauge::new(
                "quern_scrub_last_pass_end_timestamp_seconds",
                "When the last full scrubber pass ended (Unix time; 0: none yet).",
            )),
            jobs: g(
                "quern_datanode_training_jobs",
                "Training jobs whose records this node holds.",
            ),
            job_bytes: g(
                "quern_datanode_training_job_bytes",
                "Memory the training jobs' records take on this node.",
            ),
        }
    }

    fn parts(&self) -> [&dyn Collector; 12] {
        [
            &self.chunks,
            &self.capacity,
            &self.used,
            &self.available,
            &self.full,
            &self.heartbeat_age,
            &self.scrub_verified,
            &self.scrub_passes,
            &self.scrub_errors,
            &self.scrub_last_end,
            &self.jobs,
            &self.job_bytes,
        ]
    }

    fn refresh(&self, node: &Node) {
        let (used, chunks) = node.store.used();
        let (capacity, available) = node.store.capacity();
        self.chunks.set(chunks as i64);
        self.used.set(used as i64);
        self.capacity.set(capacity as i64);
        self.available.set(available as i64);
        self.full.set(i64::from(node.is_full()));
        self.heartbeat_age.set(
            node.metrics
                .heartbeat_age()
                .map_or(-1.0, |d| d.as_secs_f64()),
        );
        let scrub = node.scrub.status();
        self.scrub_verified.set(scrub.verified_this_pass as i64);
        self.scrub_passes.set(scrub.passes as i64);
        self.scrub_errors.set(scrub.errors as i64);
        self.scrub_last_end
            .set(scrub.last_pass_end_ms.map_or(0.0, |ms| ms as f64 / 1000.0));
        let (jobs, job_bytes) = node.jobs.usage();
        self.jobs.set(jobs as i64);
        self.job_bytes.set(job_bytes as i64);
    }
}

impl Collector for StoreGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.parts().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(node) = self.node.upgrade() else {
            return Vec::new();
        };
        self.refresh(&node);
        self.parts().into_iter().flat_map(|c| c.collect()).collect()
    }
}
