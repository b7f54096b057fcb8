//! Where a training job runs: on one worker that holds (or fetches) the
//! whole dataset and keeps the parameters between rounds, or spread over
//! every datanode holding the data, summing gradients around a ring of
//! workers each step. SystemML calls these its hybrid plans; `auto` estimates the
//! step time of both and takes the faster.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// What the user asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// Estimate both and run the faster.
    #[default]
    Auto,
    /// One worker, parameters kept on it between rounds.
    Local,
    /// Every holder of the data a worker, gradients summed around a ring
    /// each step.
    Distributed,
}

impl std::str::FromStr for Plan {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Plan::Auto),
            "local" => Ok(Plan::Local),
            "distributed" => Ok(Plan::Distributed),
            other => Err(format!(
                "unknown plan '{other}': use auto, local or distributed"
            )),
        }
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Plan::Auto => "auto",
            Plan::Local => "local",
            Plan::Distributed => "distributed",
        })
    }
}

/// Bandwidth assumed between the coordinator and workers on its host
/// (loopback QUIC, all of the host's workers together: they share its
/// cores for encryption; three datanodes on a 2-core host moved ring sums
/// at about 0.5 GB/s this way), between workers of one host summing
/// around a ring (through shared memory: a write and a read of each piece,
/// on cores the workers share), and between hosts (gigabit Ethernet, each
/// host its own link), in bytes per second.
pub const LOOPBACK_BYTES_PER_S: f64 = 0.5e9;
pub const SHARED_MEMORY_BYTES_PER_S: f64 = 4.0e9;
pub const NETWORK_BYTES_PER_S: f64 = 117.0e6;
/// Fixed cost of one request to one worker (framing, scheduling).
pub const REQUEST_OVERHEAD_S: f64 = 0.5e-3;

/// What the estimate needs to know about a job.
#[derive(Debug, Clone)]
pub struct PlanInputs {
    /// Nominal training FLOPs of one step (forward + backward, global batch).
    pub step_flops: f64,
    pub params: usize,
    /// The distributed plan's workers' addresses (one per worker).
    pub workers: Vec<IpAddr>,
    /// Training rate one host sustains, in FLOP/s.
    pub host_flops_per_s: f64,
    /// Dataset bytes the local plan's worker does not hold and must fetch.
    pub fetch_bytes: u64,
    pub iterations: u64,
    /// Steps the local plan's worker takes between parameter exchanges.
    pub round: u64,
}

/// Seconds per step of each plan.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub local_s: f64,
    pub distributed_s: f64,
    /// Hosts the distributed plan's workers are on.
    pub hosts: usize,
}

/// The plan a job runs, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub plan: Plan,
    pub requested: Plan,
    pub estimate: Option<Estimate>,
    pub reason: String,
}

fn link(workers: &[IpAddr]) -> f64 {
    if workers.iter().all(|a| a.is_loopback()) {
        LOOPBACK_BYTES_PER_S
    } else {
        NETWORK_BYTES_PER_S
    }
}

/// The ring's rate: through shared memory when every worker is on one
/// host, else bounded by the hosts' links.
fn ring_link(workers: &[IpAddr]) -> f64 {
    match workers.split_first() {
        Some((first, rest)) if rest.iter().all(|a| a == first) => SHARED_MEMORY_BYTES_PER_S,
        _ => NETWORK_BYTES_PER_S,
    }
}

/// Bytes each worker sends around the ring in one step: 2 (n - 1) / n of
/// the gradient.
pub fn ring_bytes_per_worker(params: usize, workers: usize) -> f64 {
    let n = workers.max(1) as f64;
    2.0 * (n - 1.0) / n * 4.0 * params as f64
}

/// Workers on one host share its cores, so only distinct hosts add
/// compute; the ring costs each host its workers' sends, all hosts at
/// once, plus a request per worker and a hop per turn.
pub fn estimate(i: &PlanInputs) -> Estimate {
    let mut hosts: Vec<IpAddr> = i.workers.clone();
    hosts.sort();
    hosts.dedup();
    let busiest = hosts
        .iter()
        .map(|h| i.workers.iter().filter(|w| *w == h).count())
        .max()
        .unwrap_or(1) as f64;
    let hosts = hosts.len().max(1);
    let n = i.workers.len().max(1);
    let bw = link(&i.workers);
    let exchange = 8.0 * i.params as f64;
    let compute = i.step_flops / i.host_flops_per_s.max(1.0);
    let ring = busiest * ring_bytes_per_worker(i.params, n) / ring_link(&i.workers);
    let hops = (2 * (n - 1) + n) as f64 * REQUEST_OVERHEAD_S;
    let distributed_s = compute / hosts as f64 + ring + hops;
    let local_s = compute
        + (exchange / bw + REQUEST_OVERHEAD_S) / i.round.max(1) as f64
        + i.fetch_bytes as f64 / bw / i.iterations.max(1) as f64;
    Estimate {
        local_s,
        distributed_s,
        hosts,
    }
}

/// The decision that needs no estimate: a plan the user named, or `auto`
/// with a single worker. None when `auto` must compare the two.
pub fn settled(requested: Plan, workers: usize) -> Option<Decision> {
    let (plan, reason) = match requested {
        Plan::Local | Plan::Distributed => (requested, "asked for"),
        Plan::Auto if workers <= 1 => (
            Plan::Local,
            "one datanode holds the data: the parameters stay on it between rounds",
        ),
        Plan::Auto => return None,
    };
    Some(Decision {
        plan,
        requested,
        estimate: None,
        reason: reason.into(),
    })
}

/// Resolves `auto` from the estimate of both plans' step time; a plan the
/// user named is kept.
pub fn decide(requested: Plan, i: &PlanInputs) -> Decision {
    let workers = i.workers.len();
    if let Some(d) = settled(requested, workers) {
        return d;
    }
    let e = estimate(i);
    let plan = if e.local_s <= e.distributed_s {
        Plan::Local
    } else {
        Plan::Distributed
    };
    let reason = format!(
        "estimated {:.0} ms/step on one worker vs {:.0} ms/step on {workers} workers \
         over {} host{} ({:.1} MB of gradient sums sent per worker per step around the ring, \
         at {:.0} MB/s{})",
        e.local_s * 1e3,
        e.distributed_s * 1e3,
        e.hosts,
        if e.hosts == 1 { "" } else { "s" },
        ring_bytes_per_worker(i.params, workers) / 1e6,
        ring_link(&i.workers) / 1e6,
        if e.hosts == 1 {
            " through shared memory"
        } else {
            ""
        }
    );
    Decision {
        plan,
        requested,
        estimate: Some(e),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(workers: &[&str], params: usize) -> PlanInputs {
        PlanInputs {
            step_flops: 7.4e9,
            params,
            workers: workers.iter().map(|a| a.parse().unwrap()).collect(),
            host_flops_per_s: 100e9,
            fetch_bytes: 0,
            iterations: 600,
            round: 50,
        }
    }

    #[test]
    fn workers_sharing_one_host_do_not_beat_one_worker() {
        let d = decide(
            Plan::Auto,
            &inputs(&["127.0.0.1", "127.0.0.1", "127.0.0.1"], 1_663_370),
        );
        assert_eq!(d.plan, Plan::Local, "{}", d.reason);
        assert!(d.reason.contains("1 host"), "{}", d.reason);
    }

    #[test]
    fn separate_hosts_win_when_compute_outweighs_the_exchange() {
        // A small model with much compute per step: three hosts divide it.
        let d = decide(
            Plan::Auto,
            &inputs(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], 6_378),
        );
        assert_eq!(d.plan, Plan::Distributed, "{}", d.reason);
        // A large model over gigabit: the exchange dominates.
        let d = decide(
            Plan::Auto,
            &inputs(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], 1_663_370),
        );
        assert_eq!(d.plan, Plan::Local, "{}", d.reason);
    }

    #[test]
    fn a_named_plan_is_kept() {
        let i = inputs(&["127.0.0.1", "127.0.0.1"], 1_663_370);
        assert_eq!(decide(Plan::Distributed, &i).plan, Plan::Distributed);
        assert_eq!(decide(Plan::Local, &i).plan, Plan::Local);
        assert_eq!("auto".parse::<Plan>(), Ok(Plan::Auto));
        assert!("fast".parse::<Plan>().unwrap_err().contains("auto, local"));
    }
}
