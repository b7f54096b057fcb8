//! The job coordinator: plans map tasks next to their chunks, runs them on
//! the datanodes, retries failures on other holders, and folds the partial
//! results in chunk order so the answer never depends on arrival order.

use crate::scheduler::{Assignment, Scheduler};
use crate::{Client, Error, Result};
use quern_compute::ops::{self, Operator, Partial, Task};
use quern_compute::records::RecordLayout;
use quern_proto::msg::*;
use quern_proto::{frame, NodeId};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Semaphore;

/// How a job runs.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Attempts per task before the job fails.
    pub max_attempts: u32,
    /// Tasks in flight per datanode (each datanode also bounds its own pool).
    pub per_node: usize,
    /// Run tasks only on these datanodes (a training job's workers, which
    /// hold its parameters), fetching chunks none of them holds; None, on
    /// every live datanode.
    pub nodes: Option<Vec<NodeAddr>>,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            max_attempts: 4,
            per_node: 2,
            nodes: None,
        }
    }
}

/// A task that had to run again, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Retry {
    pub file: String,
    pub chunk_index: u32,
    pub node: String,
    pub error: String,
}

/// What every job reports when it ends.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobSummary {
    pub tasks: usize,
    pub attempts: usize,
    /// Tasks that ran on a node holding their chunk.
    pub node_local: usize,
    /// Tasks that ran on a node that had to fetch their chunk.
    pub remote: usize,
    pub local_bytes_read: u64,
    /// Task requests and results on the wire, plus chunks fetched by remote tasks.
    pub network_bytes: u64,
    pub wall_ms: u64,
    pub retries: Vec<Retry>,
    /// Tasks run per datanode (by address), for the load picture.
    pub per_node: Vec<(String, usize)>,
}

impl JobSummary {
    pub fn node_local_share(&self) -> f64 {
        if self.tasks == 0 {
            1.0
        } else {
            self.node_local as f64 / self.tasks as f64
        }
    }
}

struct Unit {
    file: String,
    chunk: LocatedChunk,
}

struct Shared {
    client: Client,
    sched: Mutex<Scheduler>,
    slots: HashMap<NodeId, Arc<Semaphore>>,
    per_node: usize,
    task: Vec<u8>,
    max_attempts: u32,
    /// Nodes that could not be reached during this job.
    unreachable: Mutex<HashSet<NodeId>>,
}

struct Done {
    index: usize,
    partial: Partial,
    attempts: usize,
    remote: bool,
    node: NodeAddr,
    local_bytes: u64,
    network_bytes: u64,
    retries: Vec<Retry>,
}

impl Client {
    /// Runs `op` over every record of the given files (all in `layout`) and
    /// returns the combined result with the job's summary.
    pub async fn run_map(
        &self,
        files: &[String],
        layout: &RecordLayout,
        op: Operator,
        opts: &JobOptions,
    ) -> Result<(Partial, JobSummary)> {
        let start = Instant::now();
        let mut units = Vec::new();
        for f in files {
            let loc = self.locate(f).await?;
            for chunk in loc.chunks {
                units.push(Unit {
                    file: f.clone(),
                    chunk,
                });
            }
        }
        let mut live: Vec<NodeAddr> = self.live_datanodes().await?;
        if let Some(only) = &opts.nodes {
            live.retain(|n| only.iter().any(|o| o.id == n.id));
            if live.is_empty() {
                return Err(Error::Job(
                    "none of the datanodes the job must run on is live".into(),
                ));
            }
        }
        let mut sched = Scheduler::new(live.clone());
        let plan = sched.assign_all(
            &units
                .iter()
                .map(|u| live_holders(&u.chunk))
                .collect::<Vec<_>>(),
        );
        let task = ops::encode(&Task {
            layout: layout.clone(),
            op: op.clone(),
        })
        .map_err(|e| Error::Job(format!("cannot encode the task: {e}")))?;
        let shared = Arc::new(Shared {
            client: self.clone(),
            sched: Mutex::new(sched),
            slots: live
                .iter()
                .map(|n| (n.id, Arc::new(Semaphore::new(opts.per_node.max(1)))))
                .collect(),
            per_node: opts.per_node.max(1),
            task,
            max_attempts: opts.max_attempts.max(1),
            unreachable: Mutex::new(HashSet::new()),
        });
        let units: Vec<Arc<Unit>> = units.into_iter().map(Arc::new).collect();
        let mut set = tokio::task::JoinSet::new();
        for (index, (unit, first)) in units.iter().cloned().zip(plan).enumerate() {
            let shared = shared.clone();
            set.spawn(async move { run_unit(shared, index, unit, first).await });
        }
        let mut partials: Vec<Option<Partial>> = vec![None; units.len()];
        let mut summary = JobSummary {
            tasks: units.len(),
            ..JobSummary::default()
        };
        let mut per_node: HashMap<String, usize> = HashMap::new();
        let mut failure = None;
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(d)) => {
                    summary.attempts += d.attempts;
                    if d.remote {
                        summary.remote += 1;
                    } else {
                        summary.node_local += 1;
                    }
                    summary.local_bytes_read += d.local_bytes;
                    summary.network_bytes += d.network_bytes;
                    summary.retries.extend(d.retries);
                    *per_node.entry(d.node.addr.to_string()).or_default() += 1;
                    partials[d.index] = Some(d.partial);
                }
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                    set.abort_all();
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => {
                    failure.get_or_insert(Error::Job(format!("a task coordinator failed: {e}")));
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let mut per_node: Vec<(String, usize)> = per_node.into_iter().collect();
        per_node.sort();
        summary.per_node = per_node;
        summary
            .retries
            .sort_by(|a, b| (&a.file, a.chunk_index).cmp(&(&b.file, b.chunk_index)));
        let combined = if partials.is_empty() {
            // An empty dataset still has an answer: the map of no records.
            let empty = layout
                .view("empty", &[])
                .map_err(|e| Error::Job(e.to_string()))?;
            op.map(&empty).map_err(|e| Error::Job(e.to_string()))?
        } else {
            op.fold(partials.into_iter().flatten())
                .map_err(|e| Error::Job(format!("combining partial results: {e}")))?
        };
        summary.wall_ms = start.elapsed().as_millis() as u64;
        Ok((combined, summary))
    }
}

fn live_holders(chunk: &LocatedChunk) -> Vec<NodeAddr> {
    chunk
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Live)
        .map(|r| r.node)
        .collect()
}

async fn run_unit(
    shared: Arc<Shared>,
    index: usize,
    unit: Arc<Unit>,
    first: Option<Assignment>,
) -> Result<Done> {
    let holders = live_holders(&unit.chunk);
    let mut exclude: HashSet<NodeId> = HashSet::new();
    let mut retries = Vec::new();
    let mut next = first;
    let mut attempts = 0;
    let mut network_bytes = 0u64;
    loop {
        let Some(a) = next else {
            let mut why: Vec<String> = retries
                .iter()
                .map(|r: &Retry| format!("{}: {}", r.node, r.error))
                .collect();
            if why.is_empty() {
                why.push("no live datanode (see `quern report`)".into());
            }
            return Err(Error::Job(format!(
                "{}: the task for chunk {} could not run anywhere: {}",
                unit.file,
                unit.chunk.index,
                why.join("; ")
            )));
        };
        attempts += 1;
        let sources: Vec<NodeAddr> = if a.remote {
            // Dead-marked holders too: the namenode may be wrong about them.
            unit.chunk
                .replicas
                .iter()
                .filter(|r| r.state != ReplicaState::Corrupt)
                .map(|r| r.node)
                .collect()
        } else {
            Vec::new()
        };
        let req = RunTask {
            chunk: unit.chunk.meta,
            sources,
            token: Some(unit.chunk.token.clone()),
            task: shared.task.clone(),
        };
        network_bytes += frame::encode(&DataRequest::RunTask(req.clone()))
            .map(|v| v.len() as u64)
            .unwrap_or(0);
        let slot = shared
            .slots
            .get(&a.node.id)
            .cloned()
            .unwrap_or_else(|| Arc::new(Semaphore::new(shared.per_node)));
        let outcome = {
            let _permit = slot.acquire().await;
            // Queued behind a task that found the node dead: do not wait
            // for a second connect timeout.
            let dead = shared
                .unreachable
                .lock()
                .map(|u| u.contains(&a.node.id))
                .unwrap_or(false);
            if dead {
                Err(quern_proto::Error::Connect {
                    peer: a.node.addr.to_string(),
                    reason: "unreachable earlier in this job".into(),
                })
            } else {
                shared.client.endpoint().call(a.node, req).await
            }
        };
        match outcome.map_err(Error::from).and_then(|out| {
            let partial: Partial = ops::decode(&out.partial)
                .map_err(|e| Error::Job(format!("{}: unreadable task result: {e}", a.node.addr)))?;
            Ok((out, partial))
        }) {
            Ok((out, partial)) => {
                network_bytes += frame::encode(&Ok::<_, quern_proto::WireError>(out.clone()))
                    .map(|v| v.len() as u64)
                    .unwrap_or(0)
                    + out.fetched_bytes;
                return Ok(Done {
                    index,
                    partial,
                    attempts,
                    remote: a.remote,
                    node: a.node,
                    local_bytes: out.local_bytes,
                    network_bytes,
                    retries,
                });
            }
            Err(e) => {
                tracing::warn!(file = %unit.file, chunk = unit.chunk.index, node = %a.node.addr, "task failed, retrying elsewhere: {e}");
                retries.push(Retry {
                    file: unit.file.clone(),
                    chunk_index: unit.chunk.index,
                    node: a.node.addr.to_string(),
                    error: e.to_string(),
                });
                exclude.insert(a.node.id);
                let mut sched = shared
                    .sched
                    .lock()
                    .map_err(|_| Error::Job("scheduler state poisoned".into()))?;
                // A node that cannot be reached takes no more tasks from
                // this job; one that refused a single task (a bad replica)
                // still serves the others.
                if is_unreachable(&e) {
                    sched.forget(a.node.id);
                    if let Ok(mut u) = shared.unreachable.lock() {
                        u.insert(a.node.id);
                    }
                }
                next = if attempts as u32 >= shared.max_attempts {
                    None
                } else {
                    sched.assign(&holders, &exclude)
                };
            }
        }
    }
}

fn is_unreachable(e: &Error) -> bool {
    matches!(
        e,
        Error::Proto(
            quern_proto::Error::Connect { .. }
                | quern_proto::Error::Timeout { .. }
                | quern_proto::Error::Stream { .. }
        )
    )
}
