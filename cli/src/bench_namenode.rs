//! `quern bench namenode`: a namenode process under the load of a large
//! cluster, on one machine. Simulated datanodes (one certificate and one
//! QUIC endpoint each, in this process) register with paged full reports,
//! heartbeat, and obey the namenode's commands, while clients stat,
//! list and create files. The namespace is made up beforehand
//! (`quern_namenode::synthetic`): every chunk the datanodes report is one
//! the namenode knows.
//!
//! Phases, each timed: a cold start with every datanode registering at
//! once; client load with every datanode registering again (with its full
//! report) at the same time; one datanode going silent, its chunks re-replicated by commands
//! the simulated datanodes acknowledge; a SIGKILLed namenode restarted until
//! a file can be created. Heartbeat latency is recorded throughout.

use anyhow::{anyhow, bail, Context, Result};
use quern_client::{Client, WriteOptions};
use quern_namenode::synthetic;
use quern_proto::msg::*;
use quern_proto::report::PackedChunks;
use quern_proto::tls::{init_cluster_dir, ClusterFiles, Identity};
use quern_proto::transport::{Endpoint, Peer, Tuning};
use quern_proto::{ChunkId, NodeId, Principal, Role};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BenchNamenode {
    /// A new directory for the cluster it makes.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value_t = 100)]
    pub datanodes: usize,
    #[arg(long, default_value_t = 1_000_000)]
    pub chunks: u64,
    #[arg(long, default_value_t = 3)]
    pub replication: u8,
    /// Concurrent clients (half stat, half create+complete).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Calls each client keeps outstanding on its connection (an
    /// application's threads sharing one client, as HDFS clients do).
    #[arg(long, default_value_t = 16)]
    pub in_flight: usize,
    /// How long the client load runs.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    #[arg(long, default_value = "3s", value_parser = crate::duration::parse)]
    pub heartbeat: Duration,
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse)]
    pub dead_timeout: Duration,
    /// The namenode's replication pass interval.
    #[arg(long, default_value = "3s", value_parser = crate::duration::parse)]
    pub replication_interval: Duration,
    /// Copies each datanode takes part in per pass (the namenode's flag).
    #[arg(long, default_value_t = 8)]
    pub replication_per_node: usize,
    /// Datanodes sending a long full report at once (the namenode's flag).
    #[arg(long, default_value_t = 16)]
    pub report_leases: usize,
    /// The figures as JSON.
    #[arg(long)]
    pub json: bool,
}

const CHUNK_SIZE: u64 = 64 << 20;

/// Cold start, report storm with client load, clients alone, one node
/// lost, restart.
const PHASES: usize = 5;

/// The phases as the figures' keys name them, in order.
const PHASE_NAMES: [&str; PHASES] = ["cold", "storm", "clients_alone", "rereplicating", "restart"];

/// One simulated datanode.
struct Sim {
    id: NodeId,
    addr: SocketAddr,
    endpoint: Endpoint,
    chunks: Vec<StoredChunk>,
    /// Set to make it go silent, as a dead node.
    stopped: AtomicBool,
    /// Set when the namenode asked it to register again.
    reregister: AtomicBool,
}

impl Sim {
    /// Its list is too long for a registration: it registers with
    /// `report_follows` and sends the list in its turn.
    fn paged(&self) -> bool {
        self.chunks.len() > INLINE_REPORT
    }
}

#[derive(Default)]
struct Shared {
    /// Heartbeat round trips (ms), by phase, each marked if it was the
    /// first on a new connection (its QUIC and TLS handshake included).
    latencies: Mutex<Vec<(u8, f64, bool)>>,
    /// How long those first heartbeats took to connect (ms), by phase.
    connects: Mutex<Vec<(u8, f64)>>,
    phase: AtomicU64,
    /// Replicas the simulated targets acknowledged.
    replicated: AtomicU64,
    /// Heartbeats that failed, by phase.
    heartbeat_errors: [AtomicU64; PHASES],
    register_errors: AtomicU64,
    /// The namenode's lifeline port, once a reply has named it (0 before):
    /// heartbeats go there, as a datanode's do.
    lifeline: AtomicU16,
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the memory of process {pid}"))?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// CPU time (user and system) process `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading the CPU time of process {pid}"))?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is the first, utime the 12th, stime the 13th.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unreadable /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("no CPU times in /proc/{pid}/stat"))
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

struct NamenodeProc {
    child: std::process::Child,
    addr: SocketAddr,
    /// Where it serves `/metrics`.
    http: Option<SocketAddr>,
}

impl Drop for NamenodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the namenode as `cluster up` does (its log and address file in
/// DIR), with room for a namespace of millions of chunks to load first.
async fn start_namenode(dir: &Path, a: &BenchNamenode) -> Result<NamenodeProc> {
    let addr_file = dir.join("namenode.addr");
    let _ = std::fs::remove_file(&addr_file);
    let log = dir.join("namenode.log");
    let path = |p: PathBuf| p.display().to_string();
    let args = [
        "namenode".to_string(),
        "--dir".into(),
        path(dir.join("namenode")),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--safemode-wait".into(),
        "1h".into(),
        "--dead-timeout".into(),
        format!("{}ms", a.dead_timeout.as_millis()),
        "--replication-interval".into(),
        format!("{}ms", a.replication_interval.as_millis()),
        "--replication-per-node".into(),
        a.replication_per_node.to_string(),
        "--report-leases".into(),
        a.report_leases.to_string(),
        "--tls".into(),
        path(dir.join("tls")),
        "--addr-file".into(),
        path(addr_file.clone()),
    ];
    let mut child = crate::cluster::spawn("namenode", dir, &log, &args)?;
    let within = Duration::from_secs(600);
    match crate::cluster::wait_addr(&addr_file, &mut child, "namenode", &log, within).await {
        Ok((addr, http)) => Ok(NamenodeProc { child, addr, http }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Load {
    /// Half the clients stat, half create and complete.
    Mixed,
    Stat,
    Create,
}

struct Rates {
    stat_per_s: f64,
    create_per_s: f64,
    /// The namenode's own CPU time per call (a create+complete counting
    /// as one), which says what it would serve with the clients and
    /// datanodes on other machines.
    namenode_cpu_us: f64,
}

/// `in_flight` calls at a time from each client for `seconds`, against
/// the namenode process `namenode`.
async fn client_load(
    clients: Vec<Client>,
    load: Load,
    seconds: u64,
    in_flight: usize,
    nfiles: u64,
    namenode: u32,
) -> Result<Rates> {
    let cpu_before = cpu_seconds(namenode)?;
    let stats = Arc::new(AtomicU64::new(0));
    let creates = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let lanes = in_flight.max(1) as u64;
    let mut all = tokio::task::JoinSet::new();
    for (c, client) in clients.into_iter().enumerate() {
        let stat = match load {
            Load::Mixed => c % 2 == 0,
            Load::Stat => true,
            Load::Create => false,
        };
        for lane in 0..lanes {
            let (stats, creates, client) = (stats.clone(), creates.clone(), client.clone());
            all.spawn(async move {
                let mut i = lane;
                while Instant::now() < until {
                    if stat {
                        let f = (i * 7919 + c as u64) % nfiles;
                        client.stat(&format!("/synthetic/f{f:08}")).await?;
                        stats.fetch_add(1, Ordering::Relaxed);
                    } else {
                        create_empty(&client, &format!("/load/{load:?}-c{c}-{i}")).await?;
                        creates.fetch_add(1, Ordering::Relaxed);
                    }
                    i += lanes;
                }
                anyhow::Ok(())
            });
        }
    }
    while let Some(r) = all.join_next().await {
        r??;
    }
    let secs = started.elapsed().as_secs_f64();
    let (stats, creates) = (
        stats.load(Ordering::Relaxed),
        creates.load(Ordering::Relaxed),
    );
    Ok(Rates {
        stat_per_s: stats as f64 / secs,
        create_per_s: creates as f64 / secs,
        namenode_cpu_us: (cpu_seconds(namenode)? - cpu_before) * 1e6
            / (stats + creates).max(1) as f64,
    })
}

/// Waits until a file can be created (safe mode over); returns how long.
async fn until_writable(client: &Client, probe: &str, since: Instant) -> Result<f64> {
    let deadline = since + Duration::from_secs(3600);
    loop {
        match create_empty(client, probe).await {
            Ok(()) => return Ok(since.elapsed().as_secs_f64()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("not writable yet: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn create_empty(client: &Client, path: &str) -> Result<()> {
    let w = client
        .create(
            path,
            WriteOptions {
                replication: 1,
                ..Default::default()
            },
        )
        .await?;
    w.close().await?;
    Ok(())
}

/// Registers as a datanode does: a short chunk list in the registration,
/// a long one owed until the namenode says to send it.
async fn register(sim: &Sim, nn: SocketAddr) -> Result<Vec<DatanodeCommand>> {
    let peer = Peer::namenode(nn);
    let inline = !sim.paged();
    let commands = sim
        .endpoint
        .call(
            peer,
            Register {
                cluster_id: None,
                node: NodeAddr {
                    id: sim.id,
                    addr: sim.addr,
                },
                capacity: 1 << 50,
                available: 1 << 49,
                chunks: if inline {
                    PackedChunks::pack(&sim.chunks)
                } else {
                    PackedChunks::default()
                },
                report_follows: !inline,
            },
        )
        .await?
        .commands;
    Ok(commands)
}

/// Asks for a turn, as a datanode does, until one is granted, and sends
/// the full report in it.
async fn report_in_turn(
    sims: &[Arc<Sim>],
    me: usize,
    shared: &Shared,
    nn: SocketAddr,
) -> Result<()> {
    let sim = &sims[me];
    loop {
        let reply = sim
            .endpoint
            .call(Peer::namenode(nn), ReportTurn { node: sim.id })
            .await?;
        if reply.commands.contains(&DatanodeCommand::Reregister) {
            bail!("{} must register again before it reports", sim.id);
        }
        if reply.commands.contains(&DatanodeCommand::SendReport) {
            break;
        }
    }
    let mut commands = Vec::new();
    for page in ChunkReport::pages(sim.id, &sim.chunks, REPORT_PAGE) {
        let reply = sim.endpoint.call(Peer::namenode(nn), page).await?;
        commands.extend(reply.commands);
    }
    obey(sims, shared, nn, commands).await;
    Ok(())
}

/// Obeys commands as a datanode would, without data: a replication is
/// acknowledged by its targets as received.
async fn obey(sims: &[Arc<Sim>], shared: &Shared, nn: SocketAddr, commands: Vec<DatanodeCommand>) {
    for c in commands {
        match c {
            DatanodeCommand::Replicate {
                chunk,
                size,
                targets,
                ..
            } => {
                for t in targets {
                    // Node ids are positions plus one (see `run`).
                    let Some(sim) = (t.id.0 as usize).checked_sub(1).and_then(|i| sims.get(i))
                    else {
                        continue;
                    };
                    let got = sim
                        .endpoint
                        .call(
                            Peer::namenode(nn),
                            ChunkReceived {
                                node: sim.id,
                                chunk: StoredChunk {
                                    id: chunk,
                                    size,
                                    digest: synthetic::digest_of(chunk),
                                },
                            },
                        )
                        .await;
                    if got.is_ok() {
                        shared.replicated.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Registering again and reporting are the heartbeat loop's.
            DatanodeCommand::Reregister
            | DatanodeCommand::SendReport
            | DatanodeCommand::Delete(_)
            | DatanodeCommand::Trash(_) => {}
        }
    }
}

async fn heartbeats(
    me: usize,
    sims: Arc<Vec<Arc<Sim>>>,
    shared: Arc<Shared>,
    nn: Arc<Mutex<SocketAddr>>,
    every: Duration,
    done: Arc<AtomicBool>,
) {
    let sim = sims[me].clone();
    // Spread the nodes over the interval, as real ones drift apart.
    tokio::time::sleep(every.mul_f64(me as f64 / sims.len() as f64)).await;
    let mut tick = tokio::time::interval(every);
    // A round that ran long (a registration waits for the chunk map to
    // load) is followed by a whole interval, as a datanode sleeps one
    // after each round, not by a burst of the rounds missed.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Where the last heartbeat was answered: one to anywhere else, or
    // after a failure, opens a connection first.
    let mut connected: Option<SocketAddr> = None;
    while !done.load(Ordering::Relaxed) {
        tick.tick().await;
        if sim.stopped.load(Ordering::Relaxed) {
            continue;
        }
        let addr = *nn.lock().unwrap_or_else(|p| p.into_inner());
        if sim.reregister.swap(false, Ordering::Relaxed) {
            match register(&sim, addr).await {
                Ok(cmds) => {
                    tick.reset_after(first_heartbeat_after(every));
                    obey(&sims, &shared, addr, cmds).await;
                    if sim.paged() {
                        // The report waits for its turn beside heartbeats.
                        let (sims, shared) = (sims.clone(), shared.clone());
                        tokio::spawn(async move {
                            if report_in_turn(&sims, me, &shared, addr).await.is_err() {
                                shared.register_errors.fetch_add(1, Ordering::Relaxed);
                                sims[me].reregister.store(true, Ordering::Relaxed);
                            }
                        });
                    }
                }
                Err(_) => {
                    shared.register_errors.fetch_add(1, Ordering::Relaxed);
                    sim.reregister.store(true, Ordering::Relaxed);
                }
            }
            continue;
        }
        let to = match shared.lifeline.load(Ordering::Relaxed) {
            0 => addr,
            port => SocketAddr::new(addr.ip(), port),
        };
        let t = Instant::now();
        let fresh = connected != Some(to);
        if fresh && sim.endpoint.connection(to).await.is_ok() {
            let phase = shared.phase.load(Ordering::Relaxed) as u8;
            shared
                .connects
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((phase, t.elapsed().as_secs_f64() * 1e3));
        }
        let reply = sim
            .endpoint
            .call(
                Peer::namenode(to),
                Heartbeat {
                    node: sim.id,
                    capacity: 1 << 50,
                    available: 1 << 49,
                    used: sim.chunks.len() as u64 * CHUNK_SIZE,
                    chunks: sim.chunks.len() as u64,
                    trash_bytes: 0,
                    scrub: Default::default(),
                    full: false,
                    jobs: 0,
                    job_bytes: 0,
                    gflops: 0.0,
                },
            )
            .await;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        match reply {
            Ok(r) => {
                if let Some(port) = r.lifeline {
                    shared.lifeline.store(port, Ordering::Relaxed);
                }
                let phase = shared.phase.load(Ordering::Relaxed) as u8;
                connected = Some(to);
                shared
                    .latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((phase, ms, fresh));
                let mut cmds = r.commands;
                if cmds
                    .iter()
                    .any(|c| matches!(c, DatanodeCommand::Reregister))
                {
                    sim.reregister.store(true, Ordering::Relaxed);
                    cmds.retain(|c| !matches!(c, DatanodeCommand::Reregister));
                }
                obey(&sims, &shared, addr, cmds).await;
            }
            Err(_) => {
                // A namenode that went away: register again once it is back.
                connected = None;
                let phase = shared.phase.load(Ordering::Relaxed) as usize;
                shared.heartbeat_errors[phase.min(PHASES - 1)].fetch_add(1, Ordering::Relaxed);
                sim.reregister.store(true, Ordering::Relaxed);
            }
        }
    }
}

async fn scrape(nn: &NamenodeProc) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let http = nn
        .http
        .ok_or_else(|| anyhow!("the namenode wrote no HTTP address"))?;
    let mut s = tokio::net::TcpStream::connect(http)
        .await
        .with_context(|| format!("scraping {http}/metrics"))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}

/// One of the namenode's own figures from its `/metrics`, by the
/// series' name with its labels (`quern_chunk_map_bytes`,
/// `quern_datanodes{state="dead"}`).
async fn gauge(nn: &NamenodeProc, series: &str) -> Result<f64> {
    let body = scrape(nn).await?;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no {series} in the namenode's /metrics"))
}

/// The namenode's own histogram of heartbeat handling times, from its
/// `/metrics`: (bucket upper bound in seconds, cumulative count).
async fn heartbeat_buckets(nn: &NamenodeProc) -> Result<Vec<(f64, u64)>> {
    let body = scrape(nn).await?;
    let mut out = Vec::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("quern_request_duration_seconds_bucket{") else {
            continue;
        };
        if !rest.contains("kind=\"Heartbeat\"") {
            continue;
        }
        let le = rest
            .split("le=\"")
            .nth(1)
            .and_then(|v| v.split('"').next())
            .map(|v| {
                if v == "+Inf" {
                    f64::INFINITY
                } else {
                    v.parse().unwrap_or(f64::NAN)
                }
            });
        let count = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok());
        if let (Some(le), Some(count)) = (le, count) {
            out.push((le, count as u64));
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(out)
}

/// The 99th percentile, in ms, of heartbeats handled between two scrapes,
/// to the resolution of the histogram's buckets (the bound it is under).
fn bucket_p99_ms(before: &[(f64, u64)], after: &[(f64, u64)]) -> f64 {
    let diff: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(l, _)| l == le)
                .map(|(_, c)| *c)
                .unwrap_or(0);
            (*le, n.saturating_sub(was))
        })
        .collect();
    let total = diff.last().map(|(_, n)| *n).unwrap_or(0);
    if total == 0 {
        return f64::NAN;
    }
    diff.iter()
        .find(|(_, n)| *n as f64 >= 0.99 * total as f64)
        .map(|(le, _)| le * 1e3)
        .unwrap_or(f64::INFINITY)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// p50, p99, max and count of the heartbeats in `phase` (all phases if
/// none), leaving out those that opened a connection unless `connecting`.
fn latency(shared: &Shared, phase: Option<u8>, connecting: bool) -> (f64, f64, f64, usize) {
    spread(
        shared
            .latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(ph, _, fresh)| phase.is_none_or(|p| p == *ph) && (connecting || !fresh))
            .map(|(_, ms, _)| *ms)
            .collect(),
    )
}

/// p50, p99, max and count of the first heartbeats' connecting in `phase`.
fn connecting(shared: &Shared, phase: u8) -> (f64, f64, f64, usize) {
    spread(
        shared
            .connects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(ph, _)| *ph == phase)
            .map(|(_, ms)| *ms)
            .collect(),
    )
}

/// p50, p99, max and count of round trips (ms).
fn spread(mut v: Vec<f64>) -> (f64, f64, f64, usize) {
    v.sort_by(f64::total_cmp);
    (
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN),
        v.len(),
    )
}

/// Each chunk's replicas on `replication` distinct nodes drawn at random
/// (seeded, so runs compare), as a namenode placing by free space spreads
/// them: a lost node's chunks then have their other replicas all over the
/// cluster, and copying them back can use every node.
fn placement(ids: &[ChunkId], nodes: usize, replication: usize) -> Vec<Vec<StoredChunk>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut per: Vec<Vec<StoredChunk>> = vec![Vec::new(); nodes];
    let mut chosen = Vec::with_capacity(replication);
    for id in ids {
        let c = StoredChunk {
            id: *id,
            size: CHUNK_SIZE,
            digest: synthetic::digest_of(*id),
        };
        chosen.clear();
        while chosen.len() < replication.min(nodes) {
            let n = rng.random_range(0..nodes);
            if !chosen.contains(&n) {
                chosen.push(n);
                per[n].push(c);
            }
        }
    }
    per
}

pub async fn run(a: BenchNamenode) -> Result<()> {
    if a.datanodes < a.replication as usize {
        bail!(
            "--datanodes {} cannot hold replication {}",
            a.datanodes,
            a.replication
        );
    }
    if a.dir.exists() {
        bail!(
            "{} exists; give a new directory (the benchmark makes its own cluster)",
            a.dir.display()
        );
    }
    std::fs::create_dir_all(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    let files: ClusterFiles = init_cluster_dir(&dir)?;
    quern_namenode::Namenode::format(&dir.join("namenode"))?;

    // The namenode's own memory, with nothing in it.
    let empty = start_namenode(&dir, &a).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_empty = rss_bytes(empty.child.id())?;
    drop(empty);

    let per_file = 1000u64.min(a.chunks.max(1));
    let nfiles = a.chunks.div_ceil(per_file);
    let t = Instant::now();
    let ids = synthetic::populate(
        &dir.join("namenode"),
        nfiles,
        per_file as u32,
        a.replication,
        CHUNK_SIZE,
    )?;
    let populate_s = t.elapsed().as_secs_f64();
    eprintln!(
        "made {} chunks in {nfiles} files in {populate_s:.1} s",
        ids.len()
    );
    let ca = files.load_ca()?;
    let ca_pem = std::fs::read_to_string(files.ca())?;
    let per_node = placement(&ids, a.datanodes, a.replication as usize);
    drop(ids);
    let mut sims = Vec::with_capacity(a.datanodes);
    for (i, chunks) in per_node.into_iter().enumerate() {
        let id = NodeId(i as u64 + 1);
        let issued = ca.issue(&Principal::new(Role::Datanode(id)))?;
        let identity = Identity::from_pem(&ca_pem, &issued.cert_pem, &issued.key_pem)?;
        sims.push(Arc::new(Sim {
            id,
            // Never dialled: only named in placements and commands.
            addr: SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16)),
            endpoint: Endpoint::client(&identity, Tuning::tuned())?,
            chunks,
            stopped: AtomicBool::new(false),
            reregister: AtomicBool::new(true),
        }));
    }
    let sims = Arc::new(sims);
    let admin = files.admin_identity()?;

    // Cold start: every datanode registers at once.
    let started = Instant::now();
    let nn = start_namenode(&dir, &a).await?;
    let listening_s = started.elapsed().as_secs_f64();
    let client = Client::new(&admin, nn.addr, Duration::from_secs(600))?;
    // Every datanode registers at its first heartbeat, spread over one
    // interval as nodes started together are; one whose registration fails
    // tries again at its next heartbeat, as a datanode does.
    let shared = Arc::new(Shared::default());
    let done = Arc::new(AtomicBool::new(false));
    let nn_addr = Arc::new(Mutex::new(nn.addr));
    let mut beats = Vec::new();
    for i in 0..sims.len() {
        beats.push(tokio::spawn(heartbeats(
            i,
            sims.clone(),
            shared.clone(),
            nn_addr.clone(),
            a.heartbeat,
            done.clone(),
        )));
    }
    let cold_writable_s = until_writable(&client, "/probe-cold", started).await?;
    let rss = rss_bytes(nn.child.id())?;
    let rss_per_chunk = rss.saturating_sub(rss_empty) as f64 / a.chunks.max(1) as f64;
    let bytes_per_chunk = gauge(&nn, "quern_chunk_map_bytes").await? / a.chunks.max(1) as f64;
    eprintln!(
        "cold start: listening after {listening_s:.1} s, writable after {cold_writable_s:.1} s; \
         namenode RSS {:.0} MiB ({:.0} MiB empty)",
        rss as f64 / (1 << 20) as f64,
        rss_empty as f64 / (1 << 20) as f64
    );

    let register_retries = shared.register_errors.load(Ordering::Relaxed);
    tokio::time::sleep(a.heartbeat * 2).await;
    let served_cold = heartbeat_buckets(&nn).await?;

    // Phase 1: client load while every datanode registers again at once,
    // with its full report (as after a network blip or a namenode
    // failover).
    shared.phase.store(1, Ordering::Relaxed);
    eprintln!("storm: every datanode registers again, with client load");
    client.mkdir("/load", true).await?;
    // Clients connect before the storm, as running applications are.
    let mut clients = Vec::with_capacity(a.clients);
    for _ in 0..a.clients {
        let client = Client::new(&admin, nn.addr, Duration::from_secs(60))?;
        client.stat("/load").await?;
        clients.push(client);
    }
    let nfiles = nfiles.max(1);
    let pid = nn.child.id();
    let mixed = tokio::spawn(client_load(
        clients.clone(),
        Load::Mixed,
        a.seconds,
        a.in_flight,
        nfiles,
        pid,
    ));
    let storm = {
        let sims = sims.clone();
        let shared = shared.clone();
        let addr = nn.addr;
        tokio::spawn(async move {
            let mut all = tokio::task::JoinSet::new();
            let t = Instant::now();
            for me in 0..sims.len() {
                let (sims, shared) = (sims.clone(), shared.clone());
                all.spawn(async move {
                    let cmds = register(&sims[me], addr).await?;
                    obey(&sims, &shared, addr, cmds).await;
                    if sims[me].paged() {
                        report_in_turn(&sims, me, &shared, addr).await?;
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(r) = all.join_next().await {
                r??;
            }
            anyhow::Ok(t.elapsed().as_secs_f64())
        })
    };
    let mixed = mixed.await??;
    let storm_s = storm.await??;
    // Nobody declared dead and nothing lost for it.
    let after_storm = client.report().await?;
    let storm_dead = after_storm
        .datanodes
        .iter()
        .filter(|d| d.state == NodeState::Dead)
        .count();
    let health = client.fsck("/synthetic").await?;
    let storm_missing = health.missing_chunks;
    let storm_under = health.under_replicated_chunks;
    let served_storm = heartbeat_buckets(&nn).await?;
    // Then each kind of call alone from every client, as fast as they go,
    // as HDFS's NNThroughputBenchmark measures them.
    shared.phase.store(2, Ordering::Relaxed);
    eprintln!(
        "clients alone: stat for {} s, then create+complete",
        a.seconds
    );
    let stat = client_load(
        clients.clone(),
        Load::Stat,
        a.seconds,
        a.in_flight,
        nfiles,
        pid,
    )
    .await?;
    let create = client_load(clients, Load::Create, a.seconds, a.in_flight, nfiles, pid).await?;
    let (stat_per_s, stat_cpu_us) = (stat.stat_per_s, stat.namenode_cpu_us);
    let (create_per_s, create_cpu_us) = (create.create_per_s, create.namenode_cpu_us);
    let served_load = heartbeat_buckets(&nn).await?;

    // Phase 3: one datanode goes silent; its chunks are copied back. Done
    // when the namenode has declared it dead and counts no chunk short of
    // replicas (its own figures: the node may have held a few replicas
    // more or less than placed, after the storm's copies and drops).
    shared.phase.store(3, Ordering::Relaxed);
    eprintln!("lost node: one datanode goes silent");
    let lost = sims[0].chunks.len() as u64;
    let before = shared.replicated.load(Ordering::Relaxed);
    let limit = a.dead_timeout + Duration::from_secs(600);
    let dead = "quern_datanodes{state=\"dead\"}";
    let dead_before = gauge(&nn, dead).await?;
    sims[0].stopped.store(true, Ordering::Relaxed);
    let t = Instant::now();
    let mut declared = false;
    while t.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
        declared = declared || gauge(&nn, dead).await? > dead_before;
        if declared
            && gauge(&nn, "quern_under_replicated_chunks").await? == 0.0
            && gauge(&nn, "quern_missing_chunks").await? == 0.0
        {
            break;
        }
    }
    let rereplicated = shared.replicated.load(Ordering::Relaxed) - before;
    let rereplicate_s = t.elapsed().as_secs_f64();
    let served_rerep = heartbeat_buckets(&nn).await?;

    // Phase 4: the namenode is SIGKILLed and started again.
    shared.phase.store(4, Ordering::Relaxed);
    eprintln!("restart: the namenode is killed and started again");
    sims[0].stopped.store(false, Ordering::Relaxed);
    drop(nn);
    let restarted = Instant::now();
    let nn = start_namenode(&dir, &a).await?;
    *nn_addr.lock().unwrap_or_else(|p| p.into_inner()) = nn.addr;
    let client = Client::new(&admin, nn.addr, Duration::from_secs(600))?;
    let restart_listening_s = restarted.elapsed().as_secs_f64();
    let restart_to_writable_s = until_writable(&client, "/probe-restart", restarted).await?;
    let served_restart = heartbeat_buckets(&nn).await?;
    done.store(true, Ordering::Relaxed);
    for b in beats {
        let _ = b.await;
    }

    let (p50, p99, max, n) = latency(&shared, None, true);
    let failed: Vec<u64> = shared
        .heartbeat_errors
        .iter()
        .map(|e| e.load(Ordering::Relaxed))
        .collect();
    let phases: Vec<(f64, f64, f64, usize)> = (0..PHASES as u8)
        .map(|p| latency(&shared, Some(p), true))
        .collect();
    // The cold start and the restart again on connections already open
    // (what the namenode's load adds, without the handshakes of a thousand
    // nodes connecting at once), and those handshakes alone.
    let (cold, restart) = (0, PHASES as u8 - 1);
    let open = [cold, restart].map(|p| latency(&shared, Some(p), false));
    let connects = n - latency(&shared, None, false).3;
    let (connect_cold, connect_restart) =
        (connecting(&shared, cold).1, connecting(&shared, restart).1);
    let mut figures = serde_json::json!({
        "datanodes": a.datanodes,
        "chunks": a.chunks,
        "replication": a.replication,
        "clients": a.clients,
        "bytes_per_chunk": bytes_per_chunk,
        "rss_bytes_per_chunk": rss_per_chunk,
        "namenode_rss_bytes": rss,
        "namenode_empty_rss_bytes": rss_empty,
        "populate_s": populate_s,
        "cold_listening_s": listening_s,
        "cold_writable_s": cold_writable_s,
        "cold_register_retries": register_retries,
        "restart_listening_s": restart_listening_s,
        "restart_to_writable_s": restart_to_writable_s,
        "heartbeat_p50_ms": p50,
        "heartbeat_p99_ms": p99,
        "heartbeat_max_ms": max,
        "heartbeats": n,
        "heartbeat_connects": connects,
        "heartbeat_connect_p99_ms_cold": connect_cold,
        "heartbeat_connect_p99_ms_restart": connect_restart,
        "heartbeat_errors": failed.iter().sum::<u64>(),
        "heartbeat_errors_by_phase": failed,
        "namenode_heartbeat_p99_ms_cold": bucket_p99_ms(&[], &served_cold),
        "namenode_heartbeat_p99_ms_storm": bucket_p99_ms(&served_cold, &served_storm),
        "namenode_heartbeat_p99_ms_clients_alone": bucket_p99_ms(&served_storm, &served_load),
        "namenode_heartbeat_p99_ms_rereplicating": bucket_p99_ms(&served_load, &served_rerep),
        "namenode_heartbeat_p99_ms_restart": bucket_p99_ms(&[], &served_restart),
        "stat_per_s": stat_per_s,
        "create_per_s": create_per_s,
        "namenode_cpu_us_per_stat": stat_cpu_us,
        "namenode_cpu_us_per_create": create_cpu_us,
        "mixed_stat_per_s": mixed.stat_per_s,
        "mixed_create_per_s": mixed.create_per_s,
        "in_flight_per_client": a.in_flight,
        "report_storm_s": storm_s,
        "storm_dead_datanodes": storm_dead,
        "storm_missing_chunks": storm_missing,
        "storm_under_replicated_chunks": storm_under,
        "rereplicate_per_s": rereplicated as f64 / rereplicate_s.max(1e-9),
        "lost_replicas": lost,
        "rereplicated": rereplicated,
        "rereplicate_s": rereplicate_s,
    });
    if let Some(keys) = figures.as_object_mut() {
        let per_phase = PHASE_NAMES
            .iter()
            .zip(&phases)
            .map(|(name, p)| (name.to_string(), p))
            .chain(
                [("cold_open", &open[0]), ("restart_open", &open[1])]
                    .map(|(name, p)| (name.to_string(), p)),
            );
        for (name, (_, p99, max, _)) in per_phase {
            keys.insert(format!("heartbeat_p99_ms_{name}"), (*p99).into());
            keys.insert(format!("heartbeat_max_ms_{name}"), (*max).into());
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        println!(
            "quern bench namenode: {} simulated datanodes, {} chunks (replication {}), {} clients",
            a.datanodes, a.chunks, a.replication, a.clients
        );
        println!(
            "memory: chunk map {bytes_per_chunk:.0} bytes per chunk; namenode RSS {:.0} MiB \
             ({:.0} MiB empty, {rss_per_chunk:.0} bytes per chunk with connections, caches and \
             freed report buffers)",
            rss as f64 / (1 << 20) as f64,
            rss_empty as f64 / (1 << 20) as f64
        );
        println!(
            "cold start: listening {listening_s:.2} s, writable {cold_writable_s:.2} s \
             ({register_retries} registrations retried); restart after SIGKILL: listening \
             {restart_listening_s:.2} s, writable {restart_to_writable_s:.2} s"
        );
        println!(
            "heartbeats: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms over {n}; p99 (max) \
             in the cold start {:.1} ms ({:.1}), in the report storm with client load {:.1} ms \
             ({:.1}), with clients alone at full speed {:.1} ms ({:.1}), while re-replicating \
             {:.1} ms ({:.1}), across the restart {:.1} ms ({:.1}); failed: {} in the cold \
             start, {} in the storm, {} with clients alone, {} re-replicating, {} across the \
             restart",
            phases[0].1,
            phases[0].2,
            phases[1].1,
            phases[1].2,
            phases[2].1,
            phases[2].2,
            phases[3].1,
            phases[3].2,
            phases[4].1,
            phases[4].2,
            failed[0],
            failed[1],
            failed[2],
            failed[3],
            failed[4]
        );
        println!(
            "heartbeats on connections already open ({connects} opened one, whose connecting \
             took p99 {connect_cold:.1} ms in the cold start, {connect_restart:.1} ms across the \
             restart): p99 (max) in the cold start {:.1} ms ({:.1}), across the restart {:.1} ms \
             ({:.1})",
            open[0].1, open[0].2, open[1].1, open[1].2
        );
        println!(
            "heartbeats as the namenode handled them (p99, to its histogram's buckets): cold start \
             {:.1} ms, report storm {:.1} ms, clients alone {:.1} ms, re-replicating {:.1} ms, \
             restart {:.1} ms",
            bucket_p99_ms(&[], &served_cold),
            bucket_p99_ms(&served_cold, &served_storm),
            bucket_p99_ms(&served_storm, &served_load),
            bucket_p99_ms(&served_load, &served_rerep),
            bucket_p99_ms(&[], &served_restart)
        );
        println!(
            "clients ({} of them, {} calls in flight each): stat {stat_per_s:.0}/s alone, \
             create+complete {create_per_s:.0}/s alone; together (half each) during the storm \
             {:.0}/s and {:.0}/s",
            a.clients, a.in_flight, mixed.stat_per_s, mixed.create_per_s
        );
        println!(
            "namenode CPU (heartbeats of every datanode included): {stat_cpu_us:.0} µs per stat, \
             {create_cpu_us:.0} µs per create+complete"
        );
        println!(
            "report storm: every datanode registering again at once took {storm_s:.1} s, \
             leaving {storm_dead} declared dead, {storm_missing} chunks missing and \
             {storm_under} under-replicated"
        );
        println!(
            "one datanode lost: {rereplicated} of its {lost} replicas copied back in \
             {rereplicate_s:.1} s ({:.0}/s; dead after {:.1} s, {} copies per node per {:.1} s \
             pass)",
            rereplicated as f64 / rereplicate_s.max(1e-9),
            a.dead_timeout.as_secs_f64(),
            a.replication_per_node,
            a.replication_interval.as_secs_f64()
        );
    }
    Ok(())
}
