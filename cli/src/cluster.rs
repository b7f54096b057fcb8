//! Local clusters: `quern cluster init|up|status|down|add-user`.
//!
//! `up` starts the namenode and datanodes as background processes of this
//! binary, records them in `DIR/cluster.json` (with the exact arguments, so
//! a later `up` restarts any that died on the same addresses) and writes
//! `DIR/client.toml`.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use quern_client::Client;
use quern_proto::config::ClientConfig;
use quern_proto::msg::NodeState;
use quern_proto::tls::{init_cluster_dir, ClusterFiles};
use quern_proto::{NodeId, Principal, Role};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Make a cluster: a CA and the namenode's and admin's certificates
    /// under DIR/tls, and a formatted namenode directory DIR/namenode.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a user's certificate and a ready client configuration,
    /// DIR/users/NAME.toml; with the cluster running, also make their home
    /// directory /user/NAME.
    AddUser {
        name: String,
        #[arg(long)]
        dir: PathBuf,
        /// Groups the user belongs to, comma-separated.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
    },
    /// Start (or restart) a local cluster in the background.
    // Boxed: the flags of `up` make it far larger than the other commands.
    Up(Box<UpArgs>),
    /// Show the cluster's processes and datanodes.
    Status {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Stop every process of the cluster (SIGTERM, then SIGKILL after 10 s).
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args, Clone)]
pub struct UpArgs {
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub datanodes: usize,
    /// Datanode heartbeat interval.
    #[arg(long, default_value = "3s")]
    pub heartbeat: String,
    #[arg(long, default_value = "30s")]
    pub dead_timeout: String,
    #[arg(long, default_value = "60s")]
    pub lease_timeout: String,
    #[arg(long, default_value = "3s")]
    pub replication_interval: String,
    /// Longest wait in safe mode after a start (`off`: until 99.9% of
    /// chunks are reported, or `quern safemode leave`).
    #[arg(long, default_value = "off")]
    pub safemode_wait: String,
    #[arg(long, default_value = "60s")]
    pub report_interval: String,
    /// Time between the datanodes' scrubber passes.
    #[arg(long, default_value = "24h")]
    pub scrub_interval: String,
    /// Most bytes per second each datanode's scrubber reads.
    #[arg(long, default_value = "16MiB")]
    pub scrub_rate: String,
    /// How long the datanodes keep a training job whose coordinator went
    /// silent.
    #[arg(long, default_value = "60s")]
    pub job_lease: String,
    /// Memory budget for training jobs on each datanode (default: a
    /// quarter of the machine's memory).
    #[arg(long, value_name = "BYTES")]
    pub job_memory: Option<String>,
    /// Where the namenode serves its web UI and /metrics (port 0: any
    /// free port; the URL is printed and kept in cluster.json).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http: String,
    /// How long to wait for every datanode to register.
    #[arg(long, default_value = "30s", value_parser = crate::duration::parse)]
    pub wait: Duration,
}

impl UpArgs {
    /// A local cluster for benchmarks and the demo: `datanodes` nodes,
    /// 1 s heartbeats, the usual timeouts.
    pub fn local(dir: &std::path::Path, datanodes: usize) -> UpArgs {
        UpArgs {
            dir: dir.to_path_buf(),
            datanodes,
            heartbeat: "1s".into(),
            dead_timeout: "30s".into(),
            lease_timeout: "60s".into(),
            replication_interval: "3s".into(),
            safemode_wait: "off".into(),
            report_interval: "6h".into(),
            scrub_interval: "24h".into(),
            scrub_rate: "16MiB".into(),
            job_lease: "60s".into(),
            job_memory: None,
            http: "127.0.0.1:0".into(),
            wait: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Process {
    pub role: String,
    pub addr: SocketAddr,
    /// Where its web pages and /metrics answer.
    #[serde(default)]
    pub http: Option<SocketAddr>,
    pub pid: u32,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Arguments after the binary, with the bound address made explicit.
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    pub dir: PathBuf,
    pub namenode: Process,
    pub datanodes: Vec<Process>,
}

impl ClusterFile {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("cluster.json")
    }

    pub fn load(dir: &Path) -> Result<Option<ClusterFile>> {
        let p = Self::path(dir);
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(Some(
                serde_json::from_str(&t).with_context(|| format!("reading {}", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    fn save(&self) -> Result<()> {
        let p = Self::path(&self.dir);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
    }
}

pub async fn run(cmd: ClusterCommand) -> Result<i32> {
    match cmd {
        ClusterCommand::Init { dir } => {
            let files = init_cluster_dir(&dir)?;
            let id = quern_namenode::Namenode::format(&dir.join("namenode"))?;
            println!(
                "cluster {id}: CA and certificates written to {}, namenode formatted in {}",
                files.dir.display(),
                dir.join("namenode").display()
            );
            Ok(0)
        }
        ClusterCommand::AddUser { name, dir, groups } => {
            add_user(&dir, &name, groups).await.map(|_| 0)
        }
        ClusterCommand::Up(a) => up(*a).await.map(|_| 0),
        ClusterCommand::Status { dir, json } => status(&dir, json).await,
        ClusterCommand::Down { dir } => down(&dir).map(|_| 0),
    }
}

/// True when `pid` is a running quern process (not a reused pid).
pub fn alive(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has exited; only its parent has not reaped it yet.
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        {
            return false;
        }
    }
    // The command line reads empty while the process is between fork and
    // exec; that is still our process starting.
    cmdline.is_empty() || String::from_utf8_lossy(&cmdline).contains("quern")
}

pub(crate) fn spawn(
    role: &str,
    data_dir: &Path,
    log: &Path,
    args: &[String],
) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the quern binary")?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let err = out.try_clone()?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let child = std::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        // Own process group: a Ctrl-C in the shell that ran `up` must not
        // take the cluster down with it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the {role}"))?;
    Ok(child)
}

/// The QUIC address a started process wrote, and its HTTP one if any.
pub(crate) async fn wait_addr(
    file: &Path,
    child: &mut std::process::Child,
    role: &str,
    log: &Path,
    within: Duration,
) -> Result<(SocketAddr, Option<SocketAddr>)> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(t) = std::fs::read_to_string(file) {
            let mut lines = t.lines();
            if let Some(Ok(a)) = lines.next().map(|l| l.trim().parse()) {
                return Ok((a, lines.next().and_then(|l| l.trim().parse().ok())));
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the {role} exited during start-up ({status}); see {}:\n{}",
                log.display(),
                tail(log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the {role} did not start within {} s; see {}",
                within.as_secs(),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

async fn start_process(
    dir: &Path,
    role: &str,
    name: &str,
    mut args: Vec<String>,
) -> Result<Process> {
    let data_dir = dir.join(name);
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = logs.join(format!("{name}.log"));
    let addr_file = data_dir.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut spawn_args = args.clone();
    spawn_args.extend(["--addr-file".into(), addr_file.display().to_string()]);
    let mut child = spawn(role, &data_dir, &log, &spawn_args)?;
    let pid = child.id();
    let (addr, http) =
        wait_addr(&addr_file, &mut child, role, &log, Duration::from_secs(20)).await?;
    // Restarts reuse the addresses the process actually bound.
    if let Some(i) = args.iter().position(|a| a == "--listen") {
        args[i + 1] = addr.to_string();
    }
    if let (Some(i), Some(h)) = (args.iter().position(|a| a == "--http"), http) {
        args[i + 1] = h.to_string();
    }
    Ok(Process {
        role: role.into(),
        addr,
        http,
        pid,
        data_dir,
        log,
        args,
    })
}

async fn restart(p: &mut Process, dir: &Path) -> Result<()> {
    let name = p
        .data_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("bad data dir {}", p.data_dir.display()))?
        .to_string();
    let np = start_process(dir, &p.role, &name, p.args.clone()).await?;
    *p = np;
    Ok(())
}

pub async fn up(a: UpArgs) -> Result<ClusterFile> {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let dir = a
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", a.dir.display()))?;
    let files = ClusterFiles::in_dir(&dir);
    if !files.ca().exists() {
        init_cluster_dir(&dir)?;
    } else {
        issue_missing_role_certs(&files)?;
    }
    let nn_dir = dir.join("namenode");
    if ClusterFile::load(&dir)?.is_none() && !nn_dir.join("meta").exists() {
        let id = quern_namenode::Namenode::format(&nn_dir)?;
        println!("formatted {} for new cluster {id}", nn_dir.display());
    }
    let tls = files.dir.display().to_string();
    let mut cluster = match ClusterFile::load(&dir)? {
        Some(mut c) => {
            for d in c.datanodes.iter_mut() {
                give_datanode_its_certificate(&files, d)?;
            }
            if !alive(c.namenode.pid) {
                restart(&mut c.namenode, &dir).await?;
            }
            for d in c.datanodes.iter_mut() {
                if !alive(d.pid) {
                    restart(d, &dir).await?;
                }
            }
            c
        }
        None => {
            let args = vec![
                "namenode".into(),
                "--dir".into(),
                dir.join("namenode").display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--tls".into(),
                tls.clone(),
                "--dead-timeout".into(),
                a.dead_timeout.clone(),
                "--lease-timeout".into(),
                a.lease_timeout.clone(),
                "--replication-interval".into(),
                a.replication_interval.clone(),
                "--safemode-wait".into(),
                a.safemode_wait.clone(),
                "--http".into(),
                a.http.clone(),
            ];
            let namenode = start_process(&dir, "namenode", "namenode", args).await?;
            ClusterFile {
                dir: dir.clone(),
                namenode,
                datanodes: Vec::new(),
            }
        }
    };
    cluster.save()?;
    while cluster.datanodes.len() < a.datanodes {
        let name = format!("datanode-{}", cluster.datanodes.len() + 1);
        let id = NodeId(rand::random::<u64>() | 1);
        let cert_name = crate::servers::datanode_cert_name(id);
        files.issue(&cert_name, &Principal::new(Role::Datanode(id)))?;
        let (cert, key) = files.cert(&cert_name);
        let mut args: Vec<String> = vec![
            "datanode".into(),
            "--dir".into(),
            dir.join(&name).display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--namenode".into(),
            cluster.namenode.addr.to_string(),
            "--tls".into(),
            tls.clone(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
            "--heartbeat".into(),
            a.heartbeat.clone(),
            "--report-interval".into(),
            a.report_interval.clone(),
            "--scrub-interval".into(),
            a.scrub_interval.clone(),
            "--scrub-rate".into(),
            a.scrub_rate.clone(),
            "--job-lease".into(),
            a.job_lease.clone(),
            "--http".into(),
            "127.0.0.1:0".into(),
        ];
        if let Some(m) = &a.job_memory {
            args.extend(["--job-memory".into(), m.clone()]);
        }
        let p = start_process(&dir, "datanode", &name, args).await?;
        cluster.datanodes.push(p);
        cluster.save()?;
    }
    let client_cfg =
        ClientConfig::for_identity(cluster.namenode.addr, &files, quern_proto::tls::ADMIN);
    let cfg_path = dir.join("client.toml");
    client_cfg.save(&cfg_path)?;
    let client = Client::from_config(&client_cfg)?;
    let want: Vec<SocketAddr> = cluster.datanodes.iter().map(|d| d.addr).collect();
    let deadline = Instant::now() + a.wait;
    loop {
        let report = client.report().await;
        if let Ok(r) = &report {
            let live = want
                .iter()
                .filter(|addr| {
                    r.datanodes
                        .iter()
                        .any(|d| d.node.addr == **addr && d.state == NodeState::Live)
                })
                .count();
            if live == want.len() && r.safe_mode.is_none() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{live} of {} datanodes registered within {:?}{}; see the logs in {}",
                    want.len(),
                    a.wait,
                    r.safe_mode
                        .as_ref()
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default(),
                    dir.join("logs").display()
                );
            }
        } else if Instant::now() > deadline {
            bail!(
                "the namenode did not answer: {}",
                report.err().map(|e| e.to_string()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "cluster up in {}: namenode {}, {} datanodes live",
        dir.display(),
        cluster.namenode.addr,
        cluster.datanodes.len()
    );
    if let Some(h) = cluster.namenode.http {
        println!("web UI: http://{h}/");
    }
    println!("export QUERN_CONFIG={}", cfg_path.display());
    Ok(cluster)
}

/// A cluster directory from before roles has a CA but no namenode or
/// admin certificate: issue them, so it upgrades in place.
fn issue_missing_role_certs(files: &ClusterFiles) -> Result<()> {
    for (name, role) in [
        (quern_proto::tls::NAMENODE, Role::Namenode),
        (
            quern_proto::tls::ADMIN,
            Role::Admin(quern_proto::tls::ADMIN_USER.into()),
        ),
    ] {
        if !files.cert(name).0.exists() {
            files.issue(name, &Principal::new(role))?;
            println!("issued {}", files.cert(name).0.display());
        }
    }
    Ok(())
}

/// A datanode recorded before certificates named node ids gets one for
/// the id its directory holds, and the arguments to present it.
fn give_datanode_its_certificate(files: &ClusterFiles, d: &mut Process) -> Result<()> {
    if d.args.iter().any(|a| a == "--cert") {
        return Ok(());
    }
    let path = d.data_dir.join("node_id");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let id = u64::from_str_radix(text.trim(), 16)
        .map(NodeId)
        .map_err(|_| anyhow!("{}: not a node id", path.display()))?;
    let name = crate::servers::datanode_cert_name(id);
    if !files.cert(&name).0.exists() {
        files.issue(&name, &Principal::new(Role::Datanode(id)))?;
    }
    let (cert, key) = files.cert(&name);
    d.args.extend([
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
    ]);
    Ok(())
}

/// The file name of a user's certificate in the cluster's tls directory.
pub fn user_cert_name(name: &str) -> String {
    format!("user-{name}")
}

async fn add_user(dir: &Path, name: &str, groups: Vec<String>) -> Result<()> {
    let name = quern_proto::identity::valid_name(name)?;
    if name == quern_proto::tls::ADMIN_USER {
        bail!("'{name}' is the superuser's name (the admin certificate); choose another");
    }
    let groups = groups
        .iter()
        .map(|g| quern_proto::identity::valid_name(g))
        .collect::<Result<Vec<_>, _>>()?;
    let cluster = ClusterFile::load(dir)?.ok_or_else(|| {
        anyhow!(
            "{} holds no cluster.json; start the cluster first with `quern cluster up --dir {}`",
            dir.display(),
            dir.display()
        )
    })?;
    let files = ClusterFiles::in_dir(&cluster.dir);
    let cert_name = user_cert_name(&name);
    files.issue(
        &cert_name,
        &Principal {
            role: Role::User(name.clone()),
            groups,
        },
    )?;
    let users = cluster.dir.join("users");
    std::fs::create_dir_all(&users).with_context(|| format!("creating {}", users.display()))?;
    let cfg_path = users.join(format!("{name}.toml"));
    ClientConfig::for_identity(cluster.namenode.addr, &files, &cert_name).save(&cfg_path)?;
    println!("user {name}: certificate in {}", files.dir.display());
    let admin = Client::from_config(&ClientConfig::load(&cluster.dir.join("client.toml"))?)?;
    let home = format!("/user/{name}");
    let made = async {
        admin.mkdir(&home, true).await?;
        admin.set_owner(&home, Some(name.clone()), None).await
    };
    match made.await {
        Ok(()) => println!("home directory {home} (owner {name})"),
        Err(e) => println!("home directory {home} not made ({e}); make it later as the admin"),
    }
    println!("export QUERN_CONFIG={}", cfg_path.display());
    Ok(())
}

async fn status(dir: &Path, json: bool) -> Result<i32> {
    let cluster = ClusterFile::load(dir)?.ok_or_else(|| {
        anyhow!(
            "{} holds no cluster.json; start one with `quern cluster up --dir {}`",
            dir.display(),
            dir.display()
        )
    })?;
    let procs: Vec<&Process> = std::iter::once(&cluster.namenode)
        .chain(cluster.datanodes.iter())
        .collect();
    let cfg = ClientConfig::load(&dir.join("client.toml"))?;
    let client = Client::from_config(&cfg)?;
    let report = if alive(cluster.namenode.pid) {
        client.report().await.ok()
    } else {
        None
    };
    let all_up = procs.iter().all(|p| alive(p.pid));
    if json {
        let v = serde_json::json!({
            "dir": cluster.dir,
            "processes": procs.iter().map(|p| serde_json::json!({
                "role": p.role, "addr": p.addr, "http": p.http, "pid": p.pid,
                "running": alive(p.pid),
                "data_dir": p.data_dir, "log": p.log,
            })).collect::<Vec<_>>(),
            "report": report,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<10} {:<22} {:>8} {:<8} DATA DIR",
            "ROLE", "ADDRESS", "PID", "STATE"
        );
        for p in &procs {
            println!(
                "{:<10} {:<22} {:>8} {:<8} {}",
                p.role,
                p.addr,
                p.pid,
                if alive(p.pid) { "running" } else { "stopped" },
                p.data_dir.display()
            );
        }
        match &report {
            Some(r) => {
                let live = r
                    .datanodes
                    .iter()
                    .filter(|d| d.state == NodeState::Live)
                    .count();
                println!(
                    "namenode reports {live} live of {} datanodes",
                    r.datanodes.len()
                );
                if let Some(s) = &r.safe_mode {
                    println!("{s}");
                }
                if let Some(h) = cluster.namenode.http {
                    println!("web UI: http://{h}/");
                }
            }
            None => println!("namenode not reachable"),
        }
    }
    Ok(if all_up { 0 } else { 1 })
}

pub fn down(dir: &Path) -> Result<()> {
    let cluster = ClusterFile::load(dir)?
        .ok_or_else(|| anyhow!("{} holds no cluster.json: nothing to stop", dir.display()))?;
    let procs: Vec<&Process> = cluster
        .datanodes
        .iter()
        .chain(std::iter::once(&cluster.namenode))
        .collect();
    for p in &procs {
        if alive(p.pid) {
            // SAFETY: plain signal delivery to a pid we started.
            unsafe { libc::kill(p.pid as i32, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while procs.iter().any(|p| alive(p.pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut killed = 0;
    for p in &procs {
        if alive(p.pid) {
            // SAFETY: as above.
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
            killed += 1;
        }
    }
    println!(
        "cluster in {} stopped ({} processes{})",
        dir.display(),
        procs.len(),
        if killed > 0 {
            format!(", {killed} killed after 10 s")
        } else {
            String::new()
        }
    );
    Ok(())
}
