//! Test harness: whole clusters inside one process (fast) and clusters of
//! real `quern` processes (end to end).

use quern_client::Client;
use quern_datanode::{Datanode, DatanodeConfig};
use quern_namenode::{Namenode, NamenodeConfig};
use quern_proto::tls::{init_cluster_dir, ClusterFiles, Identity};
use quern_proto::{NodeId, Principal, Role};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Settings for an in-process cluster; defaults keep time-based behaviour
/// (dead nodes, leases, re-replication) out of the way unless a test asks.
#[derive(Clone)]
pub struct Options {
    pub datanodes: usize,
    pub heartbeat: Duration,
    pub dead_timeout: Duration,
    pub lease_timeout: Duration,
    pub replication_interval: Duration,
    pub report_interval: Duration,
    pub token_lifetime: Duration,
    /// The datanodes' (and `client_with`'s) per-piece idle deadline.
    pub piece_idle: Duration,
    /// Chunks per page of a datanode's chunk report.
    pub report_page: usize,
    /// The datanodes' training job lease.
    pub job_lease: Duration,
    /// The datanodes' training job memory budget (their default if unset).
    pub job_memory: Option<u64>,
    /// Where every node serves HTTP (any free port of it), and the token
    /// callers from beyond loopback must present.
    pub http_ip: std::net::IpAddr,
    pub http_token: Option<String>,
    /// Where the namenode serves heartbeats (its default if unset).
    pub lifeline: Option<SocketAddr>,
    /// Datanodes (by index) whose training rings never use shared memory.
    pub ring_memory_off: Vec<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            datanodes: 3,
            heartbeat: Duration::from_millis(200),
            dead_timeout: Duration::from_secs(30),
            lease_timeout: Duration::from_secs(60),
            replication_interval: Duration::from_secs(3600),
            report_interval: Duration::from_secs(3600),
            token_lifetime: Duration::from_secs(3600),
            piece_idle: Duration::from_secs(10),
            report_page: quern_proto::msg::REPORT_PAGE,
            job_lease: Duration::from_secs(60),
            job_memory: None,
            http_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            http_token: None,
            lifeline: None,
            ring_memory_off: Vec::new(),
        }
    }
}

impl Options {
    fn http_config(&self) -> quern_web::HttpConfig {
        quern_web::HttpConfig {
            listen: SocketAddr::new(self.http_ip, 0),
            token: self.http_token.clone(),
        }
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub files: ClusterFiles,
    pub namenode: Option<Namenode>,
    pub namenode_addr: SocketAddr,
    pub datanodes: Vec<Option<Datanode>>,
    pub opts: Options,
}

impl TestCluster {
    pub async fn start(opts: Options) -> TestCluster {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let files = init_cluster_dir(dir.path()).expect("cluster init");
        let identity = files.namenode_identity().expect("namenode identity");
        Namenode::format(&dir.path().join("namenode")).expect("format");
        let mut cfg =
            NamenodeConfig::new(dir.path().join("namenode"), "127.0.0.1:0".parse().unwrap());
        cfg.dead_timeout = opts.dead_timeout;
        cfg.lease_timeout = opts.lease_timeout;
        cfg.replication_interval = opts.replication_interval;
        cfg.token_lifetime = opts.token_lifetime;
        cfg.http = Some(opts.http_config());
        cfg.lifeline = opts.lifeline;
        let nn = Namenode::start(cfg, &identity).await.expect("namenode");
        let namenode_addr = nn.addr();
        let mut c = TestCluster {
            dir,
            files,
            namenode: Some(nn),
            namenode_addr,
            datanodes: Vec::new(),
            opts: opts.clone(),
        };
        for _ in 0..opts.datanodes {
            c.add_datanode().await;
        }
        c.wait_live(opts.datanodes).await;
        c
    }

    /// The admin's identity (the superuser, as `client.toml` of a local
    /// cluster).
    pub fn admin_identity(&self) -> Identity {
        self.files.admin_identity().expect("admin identity")
    }

    /// The identity of datanode `i`, issued at its first start and kept.
    pub fn datanode_identity(&self, i: usize) -> Identity {
        let name = format!("test-datanode-{i}");
        if self.files.cert(&name).0.exists() {
            return self.files.identity(&name).expect("datanode identity");
        }
        let id = NodeId(rand::random::<u64>() | 1);
        self.files
            .issue(&name, &Principal::new(Role::Datanode(id)))
            .expect("datanode certificate")
    }

    /// A user's identity (issued on first use) and a client acting as them.
    pub fn user_client(&self, name: &str) -> Client {
        let cert = format!("user-{name}");
        let identity = if self.files.cert(&cert).0.exists() {
            self.files.identity(&cert).expect("user identity")
        } else {
            self.files
                .issue(&cert, &Principal::new(Role::User(name.into())))
                .expect("user certificate")
        };
        Client::new(&identity, self.namenode_addr, Duration::from_secs(20)).expect("client")
    }

    pub fn datanode_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("datanode-{}", i + 1))
    }

    /// Where the namenode serves its web UI and /metrics.
    pub fn namenode_http(&self) -> SocketAddr {
        self.namenode
            .as_ref()
            .and_then(|n| n.http_addr())
            .expect("the namenode serves HTTP")
    }

    /// Where datanode `i` serves /metrics.
    pub fn datanode_http(&self, i: usize) -> SocketAddr {
        self.datanodes[i]
            .as_ref()
            .and_then(|d| d.http_addr())
            .expect("the datanode serves HTTP")
    }

    pub async fn add_datanode(&mut self) -> usize {
        let i = self.datanodes.len();
        self.datanodes.push(None);
        self.start_datanode(i).await;
        i
    }

    pub async fn start_datanode(&mut self, i: usize) {
        let mut cfg = DatanodeConfig::new(
            self.datanode_dir(i),
            "127.0.0.1:0".parse().unwrap(),
            self.namenode_addr,
        );
        cfg.heartbeat = self.opts.heartbeat;
        cfg.report_interval = self.opts.report_interval;
        cfg.report_page = self.opts.report_page;
        cfg.tuning = quern_proto::transport::Tuning {
            piece_idle: self.opts.piece_idle,
            ..quern_proto::transport::Tuning::tuned()
        };
        cfg.job_lease = self.opts.job_lease;
        if let Some(m) = self.opts.job_memory {
            cfg.job_memory = m;
        }
        cfg.http = Some(self.opts.http_config());
        cfg.ring_shared_memory = !self.opts.ring_memory_off.contains(&i);
        let dn = Datanode::start(cfg, &self.datanode_identity(i))
            .await
            .expect("datanode");
        self.datanodes[i] = Some(dn);
    }

    /// Stops a datanode abruptly (no goodbye), as a crash would.
    pub fn stop_datanode(&mut self, i: usize) {
        if let Some(dn) = self.datanodes[i].take() {
            dn.shutdown();
        }
    }

    pub fn client(&self) -> Client {
        Client::new(
            &self.admin_identity(),
            self.namenode_addr,
            Duration::from_secs(20),
        )
        .expect("client")
    }

    /// An admin client with the cluster's piece idle deadline and its own
    /// RPC timeout.
    pub fn client_with(&self, rpc_timeout: Duration) -> Client {
        let tuning = quern_proto::transport::Tuning {
            piece_idle: self.opts.piece_idle,
            ..quern_proto::transport::Tuning::tuned()
        };
        Client::with_tuning(
            &self.admin_identity(),
            self.namenode_addr,
            rpc_timeout,
            tuning,
        )
        .expect("client")
    }

    pub async fn wait_live(&self, n: usize) {
        let client = self.client();
        wait_for(Duration::from_secs(20), "datanodes to register", || {
            let client = client.clone();
            async move {
                client.report().await.is_ok_and(|r| {
                    r.safe_mode.is_none()
                        && r.datanodes
                            .iter()
                            .filter(|d| d.state == quern_proto::msg::NodeState::Live)
                            .count()
                            >= n
                })
            }
        })
        .await;
        // The namenode counts a node live at its registration; the node
        // serves chunks once it has read the answer, a moment later.
        wait_for(
            Duration::from_secs(20),
            "datanodes to take their keys",
            || {
                let ready = self.datanodes.iter().flatten().all(|d| d.has_token_keys());
                async move { ready }
            },
        )
        .await;
    }

    /// Every chunk file on the datanodes, as paths.
    pub fn chunk_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for i in 0..self.datanodes.len() {
            out.extend(chunk_files_in(&self.datanode_dir(i)));
        }
        out
    }
}

pub fn chunk_files_in(dn_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dn_dir.join("chunks")) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "chunk") {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Flips bits of one byte in every chunk file a datanode holds; returns
/// how many it damaged. A chunk deleted meanwhile (the namenode sends
/// deletes for replaced files, such as a rewritten manifest, a heartbeat
/// later) is skipped rather than failing the test.
pub fn damage_chunks_in(dn_dir: &Path, at: usize, mask: u8) -> usize {
    let mut damaged = 0;
    for f in chunk_files_in(dn_dir) {
        let mut b = match std::fs::read(&f) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("reading {}: {e}", f.display()),
        };
        if let Some(x) = b.get_mut(at) {
            *x ^= mask;
        }
        std::fs::write(&f, b).unwrap_or_else(|e| panic!("writing {}: {e}", f.display()));
        damaged += 1;
    }
    damaged
}

/// Polls `check` until it holds; panics naming `what` after `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stores `data` at `path` with the given replication and chunk size.
pub async fn put_file(client: &Client, path: &str, data: &[u8], replication: u8, chunk_size: u64) {
    let mut w = client
        .create(
            path,
            quern_client::WriteOptions {
                replication,
                chunk_size,
                ..Default::default()
            },
        )
        .await
        .expect("create");
    w.write(data).await.expect("write");
    w.close().await.expect("close");
}

/// One HTTP/1.1 GET, as a browser or Prometheus would send it: the
/// status and the body. `headers` are extra request lines.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[&str]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP server");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// An IPv4 address of this machine that is not loopback, to reach a
/// server as a caller from elsewhere would.
pub fn outside_ip() -> Option<std::net::Ipv4Addr> {
    let mut found = None;
    // SAFETY: getifaddrs fills a list we only read and then free; each
    // sockaddr is read as sockaddr_in only when its family says so.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return None;
        }
        let mut at = list;
        while !at.is_null() {
            let a = (*at).ifa_addr;
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && found.is_none() {
                    found = Some(ip);
                }
            }
            at = (*at).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}

/// Creates `path` (replication 1, 1 MiB chunks) and allocates its first
/// chunk, for tests that then talk to the datanode directly.
pub async fn allocate_first_chunk(
    client: &Client,
    path: &str,
) -> quern_proto::msg::ChunkAllocation {
    use quern_proto::msg::{AllocateChunk, CreateFile};
    let file = client
        .call(CreateFile {
            path: path.into(),
            replication: 1,
            chunk_size: 1 << 20,
            mode: 0o644,
            overwrite: false,
        })
        .await
        .expect("create the file");
    client
        .call(AllocateChunk {
            file,
            index: 0,
            exclude: Vec::new(),
        })
        .await
        .expect("allocate its first chunk")
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

// ------------------------------------------------------------- real binary

/// The `quern` binary built beside this test executable.
pub fn quern_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_quern") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/quern
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("quern"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p quern)",
        bin.display()
    );
    bin
}

/// Asserts a `quern` run succeeded, showing its output when not.
pub fn ok(r: &Run) {
    assert_eq!(r.status, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
}

/// The path of a Keras fixture in `tests/fixtures/keras`.
pub fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/keras")
        .join(name)
        .display()
        .to_string()
}

/// A cluster of real processes started by `quern cluster up`; stopped (or
/// killed) when dropped.
pub struct BinCluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            status: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl BinCluster {
    pub fn up(datanodes: usize, extra: &[&str]) -> BinCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BinCluster {
            config: dir.path().join("client.toml"),
            dir,
        };
        let n = datanodes.to_string();
        let mut args = vec!["cluster", "up", "--datanodes", &n, "--heartbeat", "200ms"];
        args.extend_from_slice(extra);
        let r = c.run_in_dir(&args);
        assert_eq!(r.status, 0, "cluster up failed: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("export QUERN_CONFIG="), "{}", r.stdout);
        c
    }

    fn run_in_dir(&self, args: &[&str]) -> Run {
        let mut full: Vec<&str> = args.to_vec();
        let dir = self.dir.path().display().to_string();
        full.extend(["--dir", &dir]);
        Command::new(quern_bin())
            .args(&full)
            .env_remove("QUERN_CONFIG")
            .output()
            .expect("run quern")
            .into()
    }

    /// Runs `quern ARGS` with this cluster's client configuration.
    pub fn quern(&self, args: &[&str]) -> Run {
        self.command(args).output().expect("run quern").into()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(quern_bin());
        cmd.args(args).env("QUERN_CONFIG", &self.config);
        cmd
    }

    pub fn cluster_json(&self) -> serde_json::Value {
        let text =
            std::fs::read_to_string(self.dir.path().join("cluster.json")).expect("cluster.json");
        serde_json::from_str(&text).expect("cluster.json parses")
    }

    pub fn pid(&self, role: &str, index: usize) -> i32 {
        let j = self.cluster_json();
        let p = if role == "namenode" {
            &j["namenode"]
        } else {
            &j["datanodes"][index]
        };
        p["pid"].as_i64().expect("pid") as i32
    }

    pub fn datanode_dir(&self, index: usize) -> PathBuf {
        PathBuf::from(
            self.cluster_json()["datanodes"][index]["data_dir"]
                .as_str()
                .expect("data_dir"),
        )
    }

    pub fn sigkill(&self, role: &str, index: usize) {
        let pid = self.pid(role, index);
        // SAFETY: signal to a pid this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !is_zombie(pid)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `quern cluster up` again: restarts whatever is not running.
    pub fn restart(&self) -> Run {
        self.restart_with(&[])
    }

    pub fn restart_with(&self, extra: &[&str]) -> Run {
        let mut args = vec!["cluster", "up", "--datanodes", "0"];
        args.extend_from_slice(extra);
        self.run_in_dir(&args)
    }

    pub fn down(&self) -> Run {
        self.run_in_dir(&["cluster", "down"])
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for BinCluster {
    fn drop(&mut self) {
        if self.dir.path().join("cluster.json").exists() {
            let j = self.cluster_json();
            let mut pids = vec![j["namenode"]["pid"].as_i64()];
            if let Some(d) = j["datanodes"].as_array() {
                pids.extend(d.iter().map(|p| p["pid"].as_i64()));
            }
            for pid in pids.into_iter().flatten() {
                // SAFETY: signal to a pid this test started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// An IDX file (unsigned bytes) with the given dimensions, as MNIST ships.
pub fn idx_file(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// `n` random `rows x cols` images and labels below `classes`, as
/// (images IDX, labels IDX, pixels, labels).
pub fn random_idx(
    n: usize,
    rows: usize,
    cols: usize,
    classes: u8,
    seed: u64,
) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let pixels = random_bytes(n * rows * cols, seed);
    let labels: Vec<u8> = random_bytes(n, seed + 1)
        .iter()
        .map(|b| b % classes)
        .collect();
    (
        idx_file(&[n as u32, rows as u32, cols as u32], &pixels),
        idx_file(&[n as u32], &labels),
        pixels,
        labels,
    )
}

/// Statistics computed directly, the slow obvious way, for comparison.
pub struct DirectStats {
    pub count: u64,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub label_counts: Vec<u64>,
}

pub fn direct_stats(features: &[f32], labels: &[u32], width: usize) -> DirectStats {
    let n = labels.len();
    let mut s = DirectStats {
        count: n as u64,
        min: vec![f32::INFINITY; width],
        max: vec![f32::NEG_INFINITY; width],
        mean: vec![0.0; width],
        std: vec![0.0; width],
        label_counts: vec![0; labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0)],
    };
    for j in 0..width {
        let col = (0..n).map(|i| features[i * width + j]);
        let sum: f64 = col.clone().map(f64::from).sum();
        let mean = sum / n as f64;
        let var: f64 = col
            .clone()
            .map(|x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        s.mean[j] = mean;
        s.std[j] = var.sqrt();
        s.min[j] = col.clone().fold(f32::INFINITY, f32::min);
        s.max[j] = col.fold(f32::NEG_INFINITY, f32::max);
    }
    for &l in labels {
        s.label_counts[l as usize] += 1;
    }
    s
}

/// Asserts stored statistics equal the direct ones (exact for counts and
/// extremes, to 1e-9 relative for moments, which differ only in rounding).
pub fn assert_stats_eq(got: &quern_compute::ops::DatasetStats, want: &DirectStats) {
    assert_eq!(got.count, want.count);
    assert_eq!(got.label_counts, want.label_counts);
    assert_eq!(got.min, want.min);
    assert_eq!(got.max, want.max);
    for j in 0..want.mean.len() {
        let tol = 1e-9 * want.mean[j].abs().max(1.0);
        assert!(
            (got.mean[j] - want.mean[j]).abs() <= tol,
            "mean[{j}] {} vs {}",
            got.mean[j],
            want.mean[j]
        );
        let tol = 1e-9 * want.std[j].abs().max(1.0);
        assert!(
            (got.std[j] - want.std[j]).abs() <= tol,
            "std[{j}] {} vs {}",
            got.std[j],
            want.std[j]
        );
    }
}

impl BinCluster {
    /// Writes `n` random `rows x cols` images with labels below `classes`
    /// as IDX files in `local` and imports them as dataset `remote` with
    /// `extra` import flags.
    #[allow(clippy::too_many_arguments)]
    pub fn import_random(
        &self,
        local: &Path,
        remote: &str,
        n: usize,
        rows: usize,
        cols: usize,
        classes: u8,
        seed: u64,
        extra: &[&str],
    ) -> Run {
        let (images, labels, _, _) = random_idx(n, rows, cols, classes, seed);
        let img = local.join(format!("images-{seed}.idx"));
        let lab = local.join(format!("labels-{seed}.idx"));
        std::fs::write(&img, images).expect("write images");
        std::fs::write(&lab, labels).expect("write labels");
        self.import_idx(&img, &lab, remote, extra)
    }
}

/// Fashion-MNIST's test images and labels from Debian's
/// dataset-fashion-mnist, when installed (.ci/run installs it).
pub fn fashion_test_files() -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    let images = dir.join("t10k-images-idx3-ubyte.gz");
    if !images.exists() {
        eprintln!("skipping: {} is not installed", images.display());
        return None;
    }
    Some((images, dir.join("t10k-labels-idx1-ubyte.gz")))
}

impl BinCluster {
    /// `quern dataset import idx` of local files as `remote`, with `extra` flags.
    pub fn import_idx(&self, images: &Path, labels: &Path, remote: &str, extra: &[&str]) -> Run {
        let (img, lab) = (images.display().to_string(), labels.display().to_string());
        let mut args = vec![
            "dataset", "import", "idx", "--images", &img, "--labels", &lab, remote,
        ];
        args.extend_from_slice(extra);
        self.quern(&args)
    }
}
