//! `quern bench io`: what the storage path achieves against what the
//! machine allows, measured in one run on one machine.
//!
//! Figures: put and get of one file at R=1 and R=3 on a local 3-datanode
//! cluster, create+complete and stat rates. Ceilings: the same bytes over
//! one QUIC stream (quinn's defaults and quern's tuning), over one TCP
//! loopback connection, and written to the datanodes' disk with fdatasync.
//!
//! The transfers and metadata calls run as an ordinary user (`bench`, in
//! directories the admin gives it), so every token and permission check
//! a user pays for is in the figures.

use crate::cluster::{self, UpArgs};
use anyhow::{Context, Result};
use bytes::Bytes;
use quern_client::{Client, WriteOptions};
use quern_proto::config::ClientConfig;
use quern_proto::tls::ClusterFiles;
use quern_proto::transport::{Endpoint, Tuning};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BLOCK: usize = 64 << 20;

pub(crate) fn mbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e6
}

pub async fn run(dir: &Path, size: u64, files: usize, scrape: Option<Duration>) -> Result<()> {
    let size = size.max(BLOCK as u64) / BLOCK as u64 * BLOCK as u64;
    eprintln!("starting a 3-datanode cluster in {}", dir.display());
    let c = cluster::up(UpArgs::local(dir, 3)).await?;
    let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let scraper = scrape.map(|every| {
        let nodes: Vec<std::net::SocketAddr> = std::iter::once(&c.namenode)
            .chain(&c.datanodes)
            .filter_map(|p| p.http)
            .collect();
        println!(
            "scraping /metrics of {} nodes every {:.1} s during the run",
            nodes.len(),
            every.as_secs_f64()
        );
        tokio::spawn(scrape_loop(nodes, every, scrapes.clone()))
    });
    let result = measure(&c, size, files).await;
    if let Some(s) = scraper {
        s.abort();
        if let Ok(Err(e)) = s.await {
            eprintln!("scraping failed: {e:#}");
        }
        println!(
            "{} scrapes of /metrics answered during the run",
            scrapes.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    cluster::down(&c.dir)?;
    result
}

/// GETs every node's /metrics each `every`, as a Prometheus server does;
/// stops at the first failed scrape (the figures would then not say what
/// scraping costs).
async fn scrape_loop(
    nodes: Vec<std::net::SocketAddr>,
    every: Duration,
    scrapes: Arc<std::sync::atomic::AtomicU64>,
) -> Result<()> {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for n in &nodes {
            scrape(*n).await?;
            scrapes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

async fn scrape(addr: std::net::SocketAddr) -> Result<usize> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr} for /metrics"))?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await?;
    anyhow::ensure!(
        body.starts_with(b"HTTP/1.1 200"),
        "{addr}/metrics answered {}",
        String::from_utf8_lossy(&body[..body.len().min(40)])
    );
    Ok(body.len())
}

async fn measure(c: &cluster::ClusterFile, size: u64, files: usize) -> Result<()> {
    let cfg = ClientConfig::load(&c.dir.join("client.toml"))?;
    let admin = Client::from_config(&cfg)?;
    let client = bench_user(c, &cfg, &admin).await?;
    let mut block = vec![0u8; BLOCK];
    {
        use rand::{RngCore, SeedableRng};
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut block);
    }
    let block = Bytes::from(block);
    let gib = size as f64 / (1u64 << 30) as f64;
    println!(
        "quern bench io: {gib:.2} GiB transfers, {files} files for metadata; MB/s = 10^6 bytes/s"
    );

    let mut rows: Vec<(String, f64)> = Vec::new();
    for r in [1u8, 3] {
        let path = format!("/bench/r{r}.bin");
        let t = Instant::now();
        let mut w = client
            .create(
                &path,
                WriteOptions {
                    replication: r,
                    chunk_size: 64 << 20,
                    ..Default::default()
                },
            )
            .await?;
        for _ in 0..size / BLOCK as u64 {
            w.write(&block).await?;
        }
        w.close().await?;
        let put = mbps(size, t.elapsed());
        let t = Instant::now();
        let n = client
            .read_to(&path, &mut tokio::io::sink(), |_| {})
            .await?;
        anyhow::ensure!(n == size, "get returned {n} bytes, expected {size}");
        let get = mbps(size, t.elapsed());
        println!("put R={r}: {put:>8.0} MB/s   get R={r}: {get:>8.0} MB/s");
        rows.push((format!("put R={r}"), put));
        rows.push((format!("get R={r}"), get));
        client.delete(&path, false).await?;
    }

    let (creates, stats) = metadata_rates(&client, files).await?;
    admin.delete("/bench", true).await?;
    admin.delete("/bench-meta", true).await?;
    println!("create+complete: {creates:>8.0} files/s   stat: {stats:>8.0} /s (32 in flight)");

    let files_tls = ClusterFiles::in_dir(&c.dir);
    let identity = files_tls.namenode_identity()?;
    let quinn_default = quic_ceiling(&identity, Tuning::quinn_defaults(), size, &block).await?;
    let quinn_tuned = quic_ceiling(&identity, Tuning::tuned(), size, &block).await?;
    let tcp = tcp_ceiling(size, &block).await?;
    let disk = disk_ceiling(&c.datanodes[0].data_dir, size, &block)?;
    println!("ceilings: quinn 1 stream (quinn defaults) {quinn_default:.0} MB/s, (quern tuning) {quinn_tuned:.0} MB/s, TCP loopback {tcp:.0} MB/s, disk write+fdatasync {disk:.0} MB/s");

    let get = |name: &str| {
        rows.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or(0.0)
    };
    let put1_ceiling = quinn_tuned.min(disk);
    println!();
    println!(
        "{:<34} {:>10} {:>12} {:>7} {:>7}",
        "figure", "measured", "baseline", "ratio", "target"
    );
    let line = |name: &str, v: f64, base: f64, target: f64, base_name: &str| {
        println!(
            "{:<34} {:>10.0} {:>12.0} {:>7.2} {:>7.2}  (baseline: {base_name})",
            name,
            v,
            base,
            v / base,
            target
        );
    };
    line(
        "get R=1 (MB/s)",
        get("get R=1"),
        quinn_tuned,
        0.6,
        "tuned quinn stream",
    );
    line(
        "get R=3 (MB/s)",
        get("get R=3"),
        quinn_tuned,
        0.6,
        "tuned quinn stream",
    );
    line(
        "put R=1 (MB/s)",
        get("put R=1"),
        put1_ceiling,
        0.6,
        "min(tuned quinn, disk)",
    );
    line(
        "put R=3 (MB/s)",
        get("put R=3"),
        disk / 3.0,
        0.6,
        "disk / 3",
    );
    line(
        "quinn tuning vs defaults (MB/s)",
        quinn_tuned,
        quinn_default,
        1.0,
        "quinn defaults",
    );
    println!(
        "{:<34} {:>10.0} {:>12} {:>7} {:>7}",
        "stat (/s)", stats, "-", "-", "10000"
    );
    println!(
        "{:<34} {:>10.0} {:>12} {:>7} {:>7}",
        "create+complete (files/s)", creates, "-", "-", "2000"
    );
    Ok(())
}

/// Creates `files` empty files under `dir` (which it makes), 32 at a time.
pub(crate) async fn create_empty_files(client: &Client, dir: &str, files: usize) -> Result<()> {
    const INFLIGHT: usize = 32;
    client.mkdir(dir, true).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..INFLIGHT {
        let client = client.clone();
        let dir = dir.to_string();
        tasks.spawn(async move {
            let mut i = w;
            while i < files {
                let f = client
                    .create(&format!("{dir}/f{i:05}"), WriteOptions::default())
                    .await?;
                f.close().await?;
                i += INFLIGHT;
            }
            Ok::<_, quern_client::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

async fn metadata_rates(client: &Client, files: usize) -> Result<(f64, f64)> {
    const INFLIGHT: usize = 32;
    let t = Instant::now();
    create_empty_files(client, "/bench-meta", files).await?;
    let creates = files as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..INFLIGHT {
        let client = client.clone();
        tasks.spawn(async move {
            let mut i = w;
            while i < files {
                client.stat(&format!("/bench-meta/f{i:05}")).await?;
                i += INFLIGHT;
            }
            Ok::<_, quern_client::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let stats = files as f64 / t.elapsed().as_secs_f64();
    Ok((creates, stats))
}

/// A client acting as user `bench` (certificate issued on first use), with
/// `/bench` and `/bench-meta` made by the admin and given to it.
async fn bench_user(
    c: &cluster::ClusterFile,
    cfg: &ClientConfig,
    admin: &Client,
) -> Result<Client> {
    let files = ClusterFiles::in_dir(&c.dir);
    let name = crate::cluster::user_cert_name("bench");
    let identity = if files.cert(&name).0.exists() {
        files.identity(&name)?
    } else {
        files.issue(
            &name,
            &quern_proto::Principal::new(quern_proto::Role::User("bench".into())),
        )?
    };
    for dir in ["/bench", "/bench-meta"] {
        let _ = admin.delete(dir, true).await;
        admin.mkdir(dir, true).await?;
        admin.set_owner(dir, Some("bench".into()), None).await?;
    }
    let timeout = Duration::from_secs(cfg.rpc_timeout_secs.unwrap_or(30));
    Ok(Client::new(&identity, cfg.namenode, timeout)?)
}

/// One stream, `size` bytes, no storage: the receiver discards and acks.
async fn quic_ceiling(
    identity: &quern_proto::tls::Identity,
    tuning: Tuning,
    size: u64,
    block: &Bytes,
) -> Result<f64> {
    let server = Arc::new(Endpoint::server(identity, "127.0.0.1:0".parse()?, tuning)?);
    let addr = server.local_addr()?;
    let srv = server.clone();
    let accept = tokio::spawn(async move {
        let conn = srv.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut got = 0u64;
        while let Some(c) = recv.read_chunk(1 << 20, false).await? {
            got += c.bytes.len() as u64;
        }
        send.write_all(&got.to_be_bytes()).await?;
        send.finish()?;
        let _ = send.stopped().await;
        anyhow::Ok(got)
    });
    let client = Endpoint::client(identity, tuning)?;
    let (conn, _) = client.connection(addr).await?;
    let t = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut sent = 0u64;
    while sent < size {
        send.write_chunk(block.clone()).await?;
        sent += block.len() as u64;
    }
    send.finish()?;
    let mut ack = [0u8; 8];
    recv.read_exact(&mut ack).await?;
    let elapsed = t.elapsed();
    let got = accept.await??;
    anyhow::ensure!(got == size, "receiver got {got} of {size} bytes");
    server.close();
    client.close();
    Ok(mbps(size, elapsed))
}

async fn tcp_ceiling(size: u64, block: &Bytes) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accept = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        s.write_all(&got.to_be_bytes()).await?;
        anyhow::Ok(got)
    });
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut sent = 0u64;
    while sent < size {
        s.write_all(block).await?;
        sent += block.len() as u64;
    }
    s.shutdown().await?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).await?;
    let elapsed = t.elapsed();
    anyhow::ensure!(accept.await?? == size, "TCP receiver lost bytes");
    Ok(mbps(size, elapsed))
}

fn disk_ceiling(dir: &Path, size: u64, block: &Bytes) -> Result<f64> {
    use std::io::Write;
    let path = dir.join("bench-disk.tmp");
    let t = Instant::now();
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut written = 0u64;
    while written < size {
        f.write_all(block)?;
        written += block.len() as u64;
    }
    f.sync_data()?;
    let elapsed = t.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(mbps(size, elapsed))
}
