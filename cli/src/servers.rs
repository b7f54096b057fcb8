//! `quern namenode` and `quern datanode`: servers in the foreground.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use quern_datanode::{Datanode, DatanodeConfig};
use quern_namenode::{Namenode, NamenodeConfig};
use quern_proto::tls::{ClusterFiles, Identity};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct NamenodeCmd {
    #[command(subcommand)]
    pub action: Option<NamenodeAction>,
    #[command(flatten)]
    pub run: NamenodeArgs,
}

#[derive(Subcommand)]
pub enum NamenodeAction {
    /// Make DIR a new, empty namespace with a new cluster id. A namenode
    /// never starts on a directory that was not formatted.
    Format {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args)]
pub struct NamenodeArgs {
    /// Metadata directory, made by `quern namenode format`.
    #[arg(long, required = true)]
    pub dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Serve datanode heartbeats here, apart from every other request
    /// (default: --listen's address, any free UDP port; datanodes learn it
    /// when they register).
    #[arg(long)]
    pub lifeline: Option<SocketAddr>,
    /// Directory with the cluster certificates (default: DIR/tls, else DIR/../tls);
    /// the namenode presents namenode.pem from it unless --cert is given.
    #[arg(long)]
    pub tls: Option<PathBuf>,
    /// A datanode silent this long is dead.
    #[arg(long, default_value = "30s", value_parser = crate::duration::parse)]
    pub dead_timeout: Duration,
    /// An unfinished file whose writer is silent this long is dropped.
    #[arg(long, default_value = "60s", value_parser = crate::duration::parse)]
    pub lease_timeout: Duration,
    /// Safe mode ends once this share of chunks has a live replica.
    #[arg(long, default_value_t = 0.999, value_parser = share)]
    pub safemode_threshold: f64,
    /// Longest wait for chunk reports after a start before leaving safe
    /// mode anyway; `off`: only the share or `quern safemode leave`.
    // Spelled in full so clap takes the parser's Option as the value
    // rather than making the flag optional.
    #[arg(long, default_value = "off", value_parser = crate::duration::parse_or_off)]
    pub safemode_wait: std::option::Option<Duration>,
    /// Copies each datanode takes part in per replication pass.
    #[arg(long, default_value_t = 8)]
    pub replication_per_node: usize,
    /// Datanodes sending a long full report at the same time.
    #[arg(long, default_value_t = 16)]
    pub report_leases: usize,
    /// How often under- and over-replicated chunks are looked for.
    #[arg(long, default_value = "3s", value_parser = crate::duration::parse)]
    pub replication_interval: Duration,
    /// How long a chunk access token is valid.
    #[arg(long, default_value = "10h", value_parser = crate::duration::parse)]
    pub token_lifetime: Duration,
    /// How often a new token signing key takes over.
    #[arg(long, default_value = "10h", value_parser = crate::duration::parse)]
    pub key_rotation: Duration,
    /// Finished jobs kept in the history the web UI shows.
    #[arg(long, default_value_t = 200)]
    pub job_history: usize,
    /// Serve the web UI and /metrics here. Beyond loopback it needs
    /// --http-token-file.
    #[arg(long, default_value = "127.0.0.1:7071", conflicts_with = "no_http")]
    pub http: SocketAddr,
    /// Serve no web UI and no /metrics.
    #[arg(long)]
    pub no_http: bool,
    #[command(flatten)]
    pub http_token: HttpToken,
    /// Write the bound address here once listening (for --listen with port
    /// 0), and the HTTP address on a second line.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct HttpToken {
    /// A file holding the bearer token that callers from beyond loopback
    /// must present to the HTTP pages (`Authorization: Bearer TOKEN`).
    #[arg(long, value_name = "FILE")]
    pub http_token_file: Option<PathBuf>,
}

impl HttpToken {
    fn config(&self, listen: SocketAddr) -> Result<quern_web::HttpConfig> {
        let token = match &self.http_token_file {
            Some(f) => {
                let t = std::fs::read_to_string(f)
                    .with_context(|| format!("reading the HTTP token file {}", f.display()))?;
                let t = t.trim().to_string();
                if t.len() < 16 {
                    bail!(
                        "the HTTP token in {} is {} characters; use at least 16 (for example                          `openssl rand -hex 24 > {}`)",
                        f.display(),
                        t.len(),
                        f.display()
                    );
                }
                Some(t)
            }
            None => None,
        };
        Ok(quern_web::HttpConfig { listen, token })
    }
}

#[derive(Args)]
pub struct DatanodeArgs {
    /// Chunk directory (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Namenode address.
    #[arg(long)]
    pub namenode: SocketAddr,
    /// Address others reach this node at (default: the listen address).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Directory with the cluster certificates (default: DIR/tls, else
    /// DIR/../tls); the node presents datanode-<its id>.pem from it unless
    /// --cert is given.
    #[arg(long)]
    pub tls: Option<PathBuf>,
    #[arg(long, default_value = "3s", value_parser = crate::duration::parse)]
    pub heartbeat: Duration,
    /// How often the full chunk list is reported (the first time at a
    /// random point of the interval); received chunks are reported as
    /// they arrive.
    #[arg(long, default_value = "6h", value_parser = crate::duration::parse)]
    pub report_interval: Duration,
    /// How long chunks the namenode did not know stay in the trash.
    #[arg(long, default_value = "24h", value_parser = crate::duration::parse)]
    pub trash_ttl: Duration,
    /// Time between the starts of the scrubber's full passes over every
    /// stored chunk.
    #[arg(long, default_value = "24h", value_parser = crate::duration::parse)]
    pub scrub_interval: Duration,
    /// Most bytes per second the scrubber reads.
    #[arg(long, default_value = "16MiB", value_parser = quern_proto::size::parse_size)]
    pub scrub_rate: u64,
    /// How long a transfer may go without a piece moving before the peer
    /// counts as stuck.
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse)]
    pub piece_idle: Duration,
    /// A training job whose coordinator neither steps nor renews it for
    /// this long is freed (the coordinator died).
    #[arg(long, default_value = "60s", value_parser = crate::duration::parse)]
    pub job_lease: Duration,
    /// Most memory the decoded records of all training jobs may take on
    /// this node; a job beyond it is refused [default: a quarter of the
    /// machine's memory].
    #[arg(long, value_name = "BYTES", value_parser = quern_proto::size::parse_size)]
    pub job_memory: Option<u64>,
    /// Send training rings' partial sums to workers on this host through
    /// their connections, not shared memory.
    #[arg(long)]
    pub no_ring_shared_memory: bool,
    /// Serve /metrics here (beyond loopback it needs --http-token-file).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    #[command(flatten)]
    pub http_token: HttpToken,
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
}

fn tls_dir(dir: &Path, tls: Option<&Path>) -> PathBuf {
    match tls {
        Some(t) => t.to_path_buf(),
        None => {
            let own = dir.join("tls");
            if own.exists() {
                own
            } else {
                dir.parent().unwrap_or(Path::new(".")).join("tls")
            }
        }
    }
}

/// A server's identity: `--cert/--key` (with `--ca`, else the certificate
/// directory's CA) when given, else the file called `name` in the
/// certificate directory.
fn server_identity(dir: &Path, tls: Option<&Path>, name: &str) -> Result<Identity> {
    let files = ClusterFiles::in_tls_dir(&tls_dir(dir, tls));
    let flags = crate::identity_flags();
    let ca = flags.ca.clone().unwrap_or_else(|| files.ca());
    let (cert, key) = match (flags.cert, flags.key) {
        (Some(c), Some(k)) => (c, k),
        _ => files.cert(name),
    };
    Identity::load(&ca, &cert, &key).with_context(|| {
        format!(
            "loading the certificate {} (make a cluster's certificates with `quern cluster init \
             --dir DIR`, or pass --tls, or --cert/--key/--ca)",
            cert.display()
        )
    })
}

fn write_addr(file: Option<&Path>, addr: SocketAddr, http: Option<SocketAddr>) -> Result<()> {
    if let Some(f) = file {
        let tmp = f.with_extension("tmp");
        let text = match http {
            Some(h) => format!("{addr}\n{h}\n"),
            None => format!("{addr}\n"),
        };
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, f).with_context(|| format!("writing {}", f.display()))?;
    }
    Ok(())
}

async fn until_signal() -> Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

pub async fn namenode(cmd: NamenodeCmd) -> Result<()> {
    if let Some(NamenodeAction::Format { dir }) = cmd.action {
        let id = Namenode::format(&dir)?;
        println!("formatted {} for new cluster {id}", dir.display());
        return Ok(());
    }
    let a = cmd.run;
    let dir = a
        .dir
        .clone()
        .ok_or_else(|| anyhow!("quern namenode needs --dir"))?;
    let identity = server_identity(&dir, a.tls.as_deref(), quern_proto::tls::NAMENODE)?;
    let mut cfg = NamenodeConfig::new(dir, a.listen);
    cfg.dead_timeout = a.dead_timeout;
    cfg.lease_timeout = a.lease_timeout;
    cfg.safemode_max_wait = a.safemode_wait;
    cfg.safemode_threshold = a.safemode_threshold;
    cfg.replication_per_node = a.replication_per_node.max(1);
    cfg.report_leases = a.report_leases.max(1);
    cfg.replication_interval = a.replication_interval;
    cfg.token_lifetime = a.token_lifetime;
    cfg.key_rotation = a.key_rotation;
    cfg.job_history = a.job_history;
    cfg.lifeline = a.lifeline;
    if !a.no_http {
        cfg.http = Some(a.http_token.config(a.http)?);
    }
    let nn = Namenode::start(cfg, &identity)
        .await
        .with_context(|| format!("starting the namenode on {}", a.listen))?;
    write_addr(a.addr_file.as_deref(), nn.addr(), nn.http_addr())?;
    let sig = until_signal().await?;
    tracing::info!("{sig}: namenode shutting down");
    nn.shutdown().await;
    Ok(())
}

/// The certificate file name of the datanode whose id is in `DIR/node_id`.
pub fn datanode_cert_name(id: quern_proto::NodeId) -> String {
    format!("datanode-{:016x}", id.0)
}

pub async fn datanode(a: DatanodeArgs) -> Result<()> {
    let name = match std::fs::read_to_string(a.dir.join("node_id")) {
        Ok(t) => u64::from_str_radix(t.trim(), 16)
            .map(|id| datanode_cert_name(quern_proto::NodeId(id)))
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    if name.is_empty() && crate::identity_flags().cert.is_none() {
        bail!(
            "{} is a new datanode directory: pass its certificate with --cert/--key (`quern \
             cluster up` issues one per datanode)",
            a.dir.display()
        );
    }
    let identity = server_identity(&a.dir, a.tls.as_deref(), &name)?;
    let mut cfg = DatanodeConfig::new(a.dir.clone(), a.listen, a.namenode);
    cfg.advertise = a.advertise;
    cfg.heartbeat = a.heartbeat;
    cfg.report_interval = a.report_interval;
    cfg.trash_ttl = a.trash_ttl;
    cfg.tuning.piece_idle = a.piece_idle;
    cfg.scrub = quern_datanode::ScrubConfig {
        interval: a.scrub_interval,
        rate: a.scrub_rate,
    };
    if a.job_lease.is_zero() {
        bail!("--job-lease must be more than zero");
    }
    cfg.job_lease = a.job_lease;
    if let Some(m) = a.job_memory {
        cfg.job_memory = m;
    }
    cfg.ring_shared_memory = !a.no_ring_shared_memory;
    if let Some(h) = a.http {
        cfg.http = Some(a.http_token.config(h)?);
    }
    let dn = Datanode::start(cfg, &identity)
        .await
        .with_context(|| format!("starting the datanode on {}", a.listen))?;
    write_addr(a.addr_file.as_deref(), dn.addr(), dn.http_addr())?;
    let sig = until_signal().await?;
    tracing::info!("{sig}: datanode shutting down");
    dn.shutdown();
    Ok(())
}

fn share(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "invalid share {raw:?}: a number from 0 to 1, such as 0.999"
        )),
    }
}
