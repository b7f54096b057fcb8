//! `quern namenode` and `quern datanode`: servers in the foreground.

use anyhow::{Context, Result};
use clap::Args;
use quern_datanode::{Datanode, DatanodeConfig};
use quern_namenode::{Namenode, NamenodeConfig};
use quern_proto::tls::{ClusterFiles, Identity};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct NamenodeArgs {
    /// Metadata directory (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Directory with the cluster certificates (default: DIR/tls, else DIR/../tls).
    #[arg(long)]
    pub tls: Option<PathBuf>,
    /// A datanode silent this long is dead.
    #[arg(long, default_value = "30s", value_parser = crate::duration::parse)]
    pub dead_timeout: Duration,
    /// An unfinished file whose writer is silent this long is dropped.
    #[arg(long, default_value = "60s", value_parser = crate::duration::parse)]
    pub lease_timeout: Duration,
    /// Longest wait for chunk reports after a start before leaving safe mode.
    #[arg(long, default_value = "30s", value_parser = crate::duration::parse)]
    pub safemode_wait: Duration,
    /// How often under- and over-replicated chunks are looked for.
    #[arg(long, default_value = "3s", value_parser = crate::duration::parse)]
    pub replication_interval: Duration,
    /// Write the bound address here once listening (for --listen with port 0).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
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
    /// Directory with the cluster certificates (default: DIR/tls, else DIR/../tls).
    #[arg(long)]
    pub tls: Option<PathBuf>,
    #[arg(long, default_value = "3s", value_parser = crate::duration::parse)]
    pub heartbeat: Duration,
    /// How often the full chunk list is reported.
    #[arg(long, default_value = "60s", value_parser = crate::duration::parse)]
    pub report_interval: Duration,
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
}

fn node_identity(dir: &Path, tls: Option<&Path>) -> Result<Identity> {
    let tls_dir = match tls {
        Some(t) => t.to_path_buf(),
        None => {
            let own = dir.join("tls");
            if own.exists() {
                own
            } else {
                dir.parent().unwrap_or(Path::new(".")).join("tls")
            }
        }
    };
    let files = ClusterFiles::in_tls_dir(&tls_dir);
    files.node_identity().with_context(|| {
        format!(
            "loading node certificates from {} (make them with `quern cluster init --dir DIR`, or pass --tls)",
            tls_dir.display()
        )
    })
}

fn write_addr(file: Option<&Path>, addr: SocketAddr) -> Result<()> {
    if let Some(f) = file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())
            .with_context(|| format!("writing {}", tmp.display()))?;
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

pub async fn namenode(a: NamenodeArgs) -> Result<()> {
    let identity = node_identity(&a.dir, a.tls.as_deref())?;
    let mut cfg = NamenodeConfig::new(a.dir.clone(), a.listen);
    cfg.dead_timeout = a.dead_timeout;
    cfg.lease_timeout = a.lease_timeout;
    cfg.safemode_max_wait = a.safemode_wait;
    cfg.replication_interval = a.replication_interval;
    let nn = Namenode::start(cfg, &identity)
        .await
        .with_context(|| format!("starting the namenode on {}", a.listen))?;
    write_addr(a.addr_file.as_deref(), nn.addr())?;
    let sig = until_signal().await?;
    tracing::info!("{sig}: namenode shutting down");
    nn.shutdown().await;
    Ok(())
}

pub async fn datanode(a: DatanodeArgs) -> Result<()> {
    let identity = node_identity(&a.dir, a.tls.as_deref())?;
    let mut cfg = DatanodeConfig::new(a.dir.clone(), a.listen, a.namenode);
    cfg.advertise = a.advertise;
    cfg.heartbeat = a.heartbeat;
    cfg.report_interval = a.report_interval;
    let dn = Datanode::start(cfg, &identity)
        .await
        .with_context(|| format!("starting the datanode on {}", a.listen))?;
    write_addr(a.addr_file.as_deref(), dn.addr())?;
    let sig = until_signal().await?;
    tracing::info!("{sig}: datanode shutting down");
    dn.shutdown();
    Ok(())
}
