//! Where a training job runs: on one worker that holds (or fetches) the
//! whole dataset and keeps the parameters between rounds, or spread over
//! datanodes holding the data, summing gradients around a ring of workers
//! each step. SystemML calls these its hybrid plans; `auto` estimates the
//! step time of one worker and of every number of distributed workers, and
//! takes the fastest.

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

/// A set of workers the estimate weighs: the hosts they are on, the
/// training rate each sustains, and the dataset bytes none of them holds,
/// which they fetch when the job opens.
#[derive(Debug, Clone)]
pub struct WorkerSet {
    pub workers: Vec<IpAddr>,
    /// Training FLOP/s of each worker's host (as its node measured it).
    pub flops_per_s: Vec<f64>,
    pub fetch_bytes: u64,
}

/// What the estimate needs to know about a job.
#[derive(Debug, Clone)]
pub struct PlanInputs {
    /// Nominal training FLOPs of one step (forward + backward, global batch).
    pub step_flops: f64,
    pub params: usize,
    /// The local plan's one worker.
    pub local: WorkerSet,
    /// The distributed plan's candidate sets of workers, two or more each.
    pub distributed: Vec<WorkerSet>,
    pub iterations: u64,
    /// Steps the local plan's worker takes between parameter exchanges.
    pub round: u64,
}

/// Seconds per step of each plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    pub local_s: f64,
    /// The fastest of the distributed sets.
    pub distributed_s: f64,
    /// Hosts and workers of that set.
    pub hosts: usize,
    pub workers: usize,
    /// Every distributed set weighed: its workers and seconds per step.
    pub by_workers: Vec<(usize, f64)>,
}

/// The plan a job runs, how many workers, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub plan: Plan,
    pub requested: Plan,
    /// Workers the job opens: 1 on the local plan.
    pub workers: usize,
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

fn distinct_hosts(workers: &[IpAddr]) -> Vec<IpAddr> {
    let mut hosts = workers.to_vec();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// The slowest worker's rate: the step waits for it.
fn slowest(set: &WorkerSet) -> f64 {
    set.flops_per_s
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .clamp(1.0, f64::MAX)
}

/// The dataset bytes a set fetches, spread over the job's steps.
fn fetch_s(i: &PlanInputs, set: &WorkerSet) -> f64 {
    set.fetch_bytes as f64 / link(&set.workers) / i.iterations.max(1) as f64
}

/// One worker computes every step and exchanges the parameters once a
/// round.
fn local_step_s(i: &PlanInputs) -> f64 {
    let exchange = 8.0 * i.params as f64;
    i.step_flops / slowest(&i.local)
        + (exchange / link(&i.local.workers) + REQUEST_OVERHEAD_S) / i.round.max(1) as f64
        + fetch_s(i, &i.local)
}

/// Workers on one host share its cores, so only distinct hosts add
/// compute, each an equal share at the pace of the slowest; the ring
/// costs each host its workers' sends, all hosts at once, plus a request
/// per worker and a hop per turn.
fn distributed_step_s(i: &PlanInputs, set: &WorkerSet) -> f64 {
    let hosts = distinct_hosts(&set.workers);
    let busiest = hosts
        .iter()
        .map(|h| set.workers.iter().filter(|w| *w == h).count())
        .max()
        .unwrap_or(1) as f64;
    let n = set.workers.len().max(1);
    let ring = busiest * ring_bytes_per_worker(i.params, n) / ring_link(&set.workers);
    let hops = (2 * (n - 1) + n) as f64 * REQUEST_OVERHEAD_S;
    i.step_flops / hosts.len().max(1) as f64 / slowest(set) + ring + hops + fetch_s(i, set)
}

/// Seconds per step on one worker and on the fastest distributed set
/// (the fewest workers among equals).
pub fn estimate(i: &PlanInputs) -> Estimate {
    let by_workers: Vec<(usize, f64)> = i
        .distributed
        .iter()
        .map(|s| (s.workers.len(), distributed_step_s(i, s)))
        .collect();
    let best = by_workers
        .iter()
        .enumerate()
        .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1).then(a.1 .0.cmp(&b.1 .0)))
        .map(|(k, _)| k);
    let (distributed_s, hosts, workers) = match best {
        Some(k) => (
            by_workers[k].1,
            distinct_hosts(&i.distributed[k].workers).len(),
            by_workers[k].0,
        ),
        None => (f64::INFINITY, 0, 0),
    };
    Estimate {
        local_s: local_step_s(i),
        distributed_s,
        hosts,
        workers,
        by_workers,
    }
}

/// The decision that needs no estimate: a plan the user named, or `auto`
/// with a single candidate worker. None when `auto` must compare.
/// The named distributed plan takes `workers` when the user gave a
/// number, else every one of the `holders`.
pub fn settled(requested: Plan, holders: usize, workers: Option<usize>) -> Option<Decision> {
    let (plan, workers, reason) = match requested {
        Plan::Local => (requested, 1, "asked for"),
        Plan::Distributed => (requested, workers.unwrap_or(holders), "asked for"),
        Plan::Auto if holders <= 1 => (
            Plan::Local,
            1,
            "one datanode holds the data: the parameters stay on it between rounds",
        ),
        Plan::Auto => return None,
    };
    Some(Decision {
        plan,
        requested,
        workers,
        estimate: None,
        reason: reason.into(),
    })
}

/// Resolves `auto` from the estimate of every plan's step time.
pub fn decide(i: &PlanInputs) -> Decision {
    let e = estimate(i);
    let plan = if e.local_s <= e.distributed_s {
        Plan::Local
    } else {
        Plan::Distributed
    };
    let workers = if plan == Plan::Local { 1 } else { e.workers };
    let others: Vec<String> = e
        .by_workers
        .iter()
        .filter(|(n, _)| *n != e.workers)
        .map(|(n, s)| format!("{:.0} ms/step on {n} workers", s * 1e3))
        .collect();
    let chosen = i.distributed.iter().find(|s| s.workers.len() == e.workers);
    let set = chosen.map_or(&[][..], |s| &s.workers[..]);
    let rates = format!(
        "steps at {:.0} GFLOP/s on the local worker, {:.0} on the slowest distributed one, \
         from the nodes' measured sgemm",
        slowest(&i.local) / 1e9,
        chosen.map_or(0.0, slowest) / 1e9
    );
    let reason = format!(
        "estimated {:.0} ms/step on one worker vs {:.0} ms/step on {} workers \
         over {} host{} ({:.1} MB of gradient sums sent per worker per step around the ring, \
         at {:.0} MB/s{}){}; {rates}",
        e.local_s * 1e3,
        e.distributed_s * 1e3,
        e.workers,
        e.hosts,
        if e.hosts == 1 { "" } else { "s" },
        ring_bytes_per_worker(i.params, e.workers) / 1e6,
        ring_link(set) / 1e6,
        if e.hosts == 1 {
            " through shared memory"
        } else {
            ""
        },
        if others.is_empty() {
            String::new()
        } else {
            format!("; {}", others.join(", "))
        }
    );
    Decision {
        plan,
        requested: Plan::Auto,
        workers,
        estimate: Some(e),
        reason,
    }
}

/// The `k` workers a distributed plan takes from `candidates` (each
/// one's host), given the candidates holding each chunk and its size:
/// distinct hosts first, since workers on one host share its cores, then
/// the most data none of the chosen holds yet, then the most data held.
/// Returns the chosen indices in candidate order and the bytes none of
/// them holds.
pub fn pick_workers(
    candidates: &[IpAddr],
    chunk_holders: &[Vec<usize>],
    chunk_sizes: &[u64],
    k: usize,
) -> (Vec<usize>, u64) {
    // The bytes of the chunks whose holders pass `which`.
    let bytes = |which: &dyn Fn(&[usize]) -> bool| -> u64 {
        chunk_holders
            .iter()
            .zip(chunk_sizes)
            .filter(|(h, _)| which(h))
            .map(|(_, s)| s)
            .sum()
    };
    let mut chosen: Vec<usize> = Vec::new();
    while chosen.len() < k.min(candidates.len()) {
        let none_chosen = |h: &[usize]| !h.iter().any(|x| chosen.contains(x));
        let next = (0..candidates.len())
            .filter(|c| !chosen.contains(c))
            .max_by_key(|&c| {
                let new_host = !chosen.iter().any(|&x| candidates[x] == candidates[c]);
                let covered = bytes(&|h| h.contains(&c) && none_chosen(h));
                let held = bytes(&|h| h.contains(&c));
                (new_host, covered, held, std::cmp::Reverse(c))
            });
        match next {
            Some(c) => chosen.push(c),
            None => break,
        }
    }
    chosen.sort_unstable();
    let missing = bytes(&|h| !h.iter().any(|x| chosen.contains(x)));
    (chosen, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The local plan on the first worker; the distributed plan on the
    /// first two, three, ... of them; every chunk held by every worker.
    fn inputs(workers: &[&str], params: usize) -> PlanInputs {
        let addrs: Vec<IpAddr> = workers.iter().map(|a| a.parse().unwrap()).collect();
        let set = |k: usize| WorkerSet {
            workers: addrs[..k].to_vec(),
            flops_per_s: vec![100e9; k],
            fetch_bytes: 0,
        };
        PlanInputs {
            step_flops: 7.4e9,
            params,
            local: set(1),
            distributed: (2..=addrs.len()).map(set).collect(),
            iterations: 600,
            round: 50,
        }
    }

    #[test]
    fn workers_sharing_one_host_do_not_beat_one_worker() {
        let d = decide(&inputs(&["127.0.0.1", "127.0.0.1", "127.0.0.1"], 1_663_370));
        assert_eq!(d.plan, Plan::Local, "{}", d.reason);
        assert_eq!(d.workers, 1);
        assert!(d.reason.contains("1 host"), "{}", d.reason);
        // Of the distributed sets, two workers on the host send less
        // around the ring than three and compute as fast.
        let e = d.estimate.unwrap();
        assert_eq!(e.workers, 2, "{:?}", e.by_workers);
        assert!(e.by_workers[0].1 < e.by_workers[1].1, "{:?}", e.by_workers);
        assert!(d.reason.contains("ms/step on 3 workers"), "{}", d.reason);
    }

    #[test]
    fn separate_hosts_win_when_compute_outweighs_the_exchange() {
        // A small model with much compute per step: three hosts divide it.
        let d = decide(&inputs(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], 6_378));
        assert_eq!(d.plan, Plan::Distributed, "{}", d.reason);
        assert_eq!(d.workers, 3, "{}", d.reason);
        // A large model over gigabit: the exchange dominates.
        let d = decide(&inputs(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], 1_663_370));
        assert_eq!(d.plan, Plan::Local, "{}", d.reason);
    }

    #[test]
    fn a_second_worker_on_a_host_adds_ring_traffic_and_no_compute() {
        // Two datanodes on one host and one on another: a worker on each
        // host computes as fast as all three and sends less.
        let mut i = inputs(&["10.0.0.1", "10.0.0.2", "10.0.0.1"], 6_378);
        i.step_flops = 40e9;
        let d = decide(&i);
        assert_eq!(d.plan, Plan::Distributed, "{}", d.reason);
        assert_eq!(d.workers, 2, "{}", d.reason);
        assert!(d.reason.contains("over 2 hosts"), "{}", d.reason);
    }

    #[test]
    fn data_no_chosen_worker_holds_counts_against_a_set() {
        let mut i = inputs(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], 6_378);
        let three = decide(&i).estimate.unwrap().distributed_s;
        i.distributed[1].fetch_bytes = 10_000_000_000;
        let e = decide(&i).estimate.unwrap();
        assert_eq!(e.workers, 2, "{:?}", e.by_workers);
        assert!(e.by_workers[1].1 > three, "{:?}", e.by_workers);
    }

    #[test]
    fn a_slow_host_paces_the_distributed_step_and_a_fast_one_trains_alone() {
        // Compute-bound: three equal hosts beat one.
        let mut i = inputs(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], 6_378);
        assert_eq!(decide(&i).plan, Plan::Distributed);
        // The local worker's node is five times as fast as the others:
        // the ring waits for the slowest, so one fast node wins.
        i.local.flops_per_s = vec![500e9];
        let d = decide(&i);
        assert_eq!(d.plan, Plan::Local, "{}", d.reason);
        assert!(
            d.reason
                .contains("steps at 500 GFLOP/s on the local worker, 100 on the slowest"),
            "{}",
            d.reason
        );
        // One slow host among three: two fast hosts without it win.
        let mut i = inputs(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], 6_378);
        i.distributed[1].flops_per_s[2] = 10e9;
        let e = decide(&i).estimate.unwrap();
        assert_eq!(e.workers, 2, "{:?}", e.by_workers);
    }

    #[test]
    fn workers_are_picked_one_per_host_then_by_the_data_they_add() {
        let hosts: Vec<IpAddr> = ["10.0.0.1", "10.0.0.1", "10.0.0.2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let holders = vec![vec![0, 1], vec![1, 2], vec![0, 2]];
        let sizes = [10, 20, 30];
        // The second host's node holds the most; then of the first host's
        // two, each adds chunk 0, and node 0 holds more.
        assert_eq!(pick_workers(&hosts, &holders, &sizes, 2), (vec![0, 2], 0));
        assert_eq!(pick_workers(&hosts, &holders, &sizes, 1), (vec![2], 10));
        assert_eq!(
            pick_workers(&hosts, &holders, &sizes, 3),
            (vec![0, 1, 2], 0)
        );
        // A host of its own counts before data: a node on the second host
        // holding nothing adds compute, and the first host's holder the data.
        let (set, missing) = pick_workers(&hosts, &[vec![1], vec![1]], &sizes[..2], 2);
        assert_eq!((set, missing), (vec![1, 2], 0));
    }

    #[test]
    fn a_named_plan_is_kept() {
        assert_eq!(settled(Plan::Local, 3, None).unwrap().workers, 1);
        let d = settled(Plan::Distributed, 3, None).unwrap();
        assert_eq!((d.plan, d.workers), (Plan::Distributed, 3));
        let d = settled(Plan::Distributed, 3, Some(2)).unwrap();
        assert_eq!((d.plan, d.workers), (Plan::Distributed, 2));
        assert!(settled(Plan::Auto, 3, None).is_none());
        assert_eq!(settled(Plan::Auto, 1, None).unwrap().plan, Plan::Local);
        assert_eq!("auto".parse::<Plan>(), Ok(Plan::Auto));
        assert!("fast".parse::<Plan>().unwrap_err().contains("auto, local"));
    }
}
