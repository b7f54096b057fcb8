//! Each node's Prometheus registry and the request figures every server
//! keeps. A registry per endpoint, not the process-wide default: tests run
//! a whole cluster in one process, and each node must count only its own.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use std::time::Duration;

/// Requests served, by kind (`WriteChunk`, `Stat`, ...).
#[derive(Clone)]
pub struct RequestMetrics {
    pub registry: Registry,
    served: IntCounterVec,
    seconds: HistogramVec,
}

impl RequestMetrics {
    pub fn new() -> RequestMetrics {
        let registry = Registry::new();
        let served = built(IntCounterVec::new(
            Opts::new("quern_requests_total", "Requests served, by request kind."),
            &["kind"],
        ));
        let seconds = built(HistogramVec::new(
            HistogramOpts::new(
                "quern_request_duration_seconds",
                "Time from a request's frame to the end of its handling, by request kind.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["kind"],
        ));
        register(&registry, &served);
        register(&registry, &seconds);
        RequestMetrics {
            registry,
            served,
            seconds,
        }
    }

    pub fn observe(&self, kind: &str, took: Duration) {
        self.served.with_label_values(&[kind]).inc();
        self.seconds
            .with_label_values(&[kind])
            .observe(took.as_secs_f64());
    }
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A metric built from options fixed in the source: they are valid, or
/// the first test that starts a node fails here.
pub fn built<T>(metric: prometheus::Result<T>) -> T {
    metric.expect("static metric options are valid")
}

/// Registers a collector whose name is fixed in the source: a clash is a
/// programming error, found by the first test that starts a node.
pub fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: &C) {
    if let Err(e) = registry.register(Box::new(c.clone())) {
        tracing::error!("metric not registered: {e}");
    }
}
