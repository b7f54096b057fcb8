//! `quern bench fuse`: the FUSE mount against the CLI path it wraps, in one
//! run on one local 3-datanode cluster.
//!
//! Figures: sequential read of a file through the mount (`dd bs=1M`) versus
//! `quern get` of the same file to a sink; sequential write with `cp` into
//! the mount versus `quern put` of the same local file; `ls -l` of a
//! 10,000-file directory through the mount. Each transfer runs twice and
//! the best of each is kept; the kernel page cache is dropped before every
//! mount read and the mount's chunk cache is smaller than the file, so no
//! read is served from memory.

use crate::bench_io::mbps;
use crate::cluster::{self, UpArgs};
use anyhow::{bail, Context, Result};
use quern_client::{Client, WriteOptions};
use quern_proto::config::ClientConfig;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

const ROUNDS: usize = 3;

pub async fn run(dir: &Path, size: u64, files: usize) -> Result<()> {
    eprintln!("starting a 3-datanode cluster in {}", dir.display());
    let c = cluster::up(UpArgs::local(dir, 3)).await?;
    let result = measure(&c.dir, size, files).await;
    cluster::down(&c.dir)?;
    result
}

/// `quern mount --foreground` as a child, stopped (unmounted) on drop.
struct MountProc {
    child: std::process::Child,
    mp: PathBuf,
}

impl MountProc {
    fn start(config: &Path, mp: &Path, log: &Path) -> Result<MountProc> {
        std::fs::create_dir_all(mp)?;
        let log = std::fs::File::create(log)?;
        let child = Command::new(std::env::current_exe()?)
            .arg("--config")
            .arg(config)
            .arg("mount")
            .arg(mp)
            .args(["--foreground", "--cache-size", "256MiB"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env("NO_COLOR", "1")
            .spawn()
            .context("starting quern mount")?;
        let mut m = MountProc {
            child,
            mp: mp.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while quern_fuse::mountinfo::find(mp).is_none() {
            if m.child.try_wait()?.is_some() || Instant::now() > deadline {
                bail!("the mount at {} did not come up", mp.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }
}

impl Drop for MountProc {
    fn drop(&mut self) {
        // SAFETY: signal to the child this process started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = quern_fuse::lazy_unmount(&self.mp);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn drop_page_cache() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn timed(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

async fn put(client: &Client, local: &Path, remote: &str) -> Result<()> {
    let mut f = tokio::fs::File::open(local).await?;
    let mut w = client.create(remote, WriteOptions::default()).await?;
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write(&buf[..n]).await?;
    }
    w.close().await?;
    Ok(())
}

async fn measure(dir: &Path, size: u64, files: usize) -> Result<()> {
    let config = dir.join("client.toml");
    let cfg = ClientConfig::load(&config)?;
    let client = Client::from_config(&cfg)?;
    let mp = dir.join("mnt");
    let m = MountProc::start(&config, &mp, &dir.join("mount.log"))?;

    let local = dir.join("local.bin");
    {
        use rand::{RngCore, SeedableRng};
        use std::io::Write;
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut out = std::io::BufWriter::new(std::fs::File::create(&local)?);
        let mut block = vec![0u8; 16 << 20];
        let mut left = size;
        while left > 0 {
            rng.fill_bytes(&mut block);
            let n = left.min(block.len() as u64) as usize;
            out.write_all(&block[..n])?;
            left -= n as u64;
        }
        out.flush()?;
    }
    let gib = size as f64 / (1u64 << 30) as f64;
    println!("quern bench fuse: {gib:.2} GiB files, R=3, 64 MiB chunks, {files}-file directory; MB/s = 10^6 bytes/s");
    if !drop_page_cache() {
        println!("(cannot drop the page cache (not root): reads may come from memory)");
    }

    let (mut put_best, mut cp_best, mut get_best, mut dd_best) = (0f64, 0f64, 0f64, 0f64);
    // Same-round ratios: both sides ran back to back under the same load.
    let (mut read_ratios, mut write_ratios) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let put_path = format!("/put{round}.bin");
        let cp_path = mp.join(format!("cp{round}.bin"));
        // Both writers read the local file from the page cache, and each
        // starts with no dirty pages left over from the one before; the
        // order alternates so neither always runs on a fresher disk.
        std::fs::read(&local)?;
        let time_put = || async {
            settle();
            let t = Instant::now();
            put(&client, &local, &put_path).await?;
            anyhow::Ok(mbps(size, t.elapsed()))
        };
        let time_cp = || {
            settle();
            anyhow::Ok(mbps(
                size,
                timed(Command::new("cp").arg(&local).arg(&cp_path))?,
            ))
        };
        let (put_mbps, cp_mbps) = if round % 2 == 0 {
            let p = time_put().await?;
            (p, time_cp()?)
        } else {
            let c = time_cp()?;
            (time_put().await?, c)
        };

        // Both readers start cold: the page cache (which also holds the
        // datanodes' chunk files) is dropped before each.
        let time_get = || async {
            drop_page_cache();
            let t = Instant::now();
            let n = client
                .read_to(&put_path, &mut tokio::io::sink(), |_| {})
                .await?;
            anyhow::ensure!(n == size, "get returned {n} bytes, expected {size}");
            anyhow::Ok(mbps(size, t.elapsed()))
        };
        let time_dd = || {
            drop_page_cache();
            anyhow::Ok(mbps(
                size,
                timed(
                    Command::new("dd")
                        .arg(format!("if={}", mp.join(&put_path[1..]).display()))
                        .args(["of=/dev/null", "bs=1M"]),
                )?,
            ))
        };
        let (get_mbps, dd_mbps) = if round % 2 == 0 {
            let g = time_get().await?;
            (g, time_dd()?)
        } else {
            let d = time_dd()?;
            (time_get().await?, d)
        };
        println!(
            "round {}: put {put_mbps:>6.0}  cp {cp_mbps:>6.0}  get {get_mbps:>6.0}  dd {dd_mbps:>6.0}  MB/s",
            round + 1
        );
        read_ratios.push(dd_mbps / get_mbps);
        write_ratios.push(cp_mbps / put_mbps);
        put_best = put_best.max(put_mbps);
        cp_best = cp_best.max(cp_mbps);
        get_best = get_best.max(get_mbps);
        dd_best = dd_best.max(dd_mbps);
        client.delete(&put_path, false).await?;
        std::fs::remove_file(&cp_path)?;
    }

    // A wide directory, made through the client library.
    crate::bench_io::create_empty_files(&client, "/many", files).await?;
    let ls = |mp: &Path| -> Result<(Duration, usize)> {
        let t = Instant::now();
        let out = Command::new("ls").arg("-l").arg(mp.join("many")).output()?;
        let took = t.elapsed();
        if !out.status.success() {
            bail!("ls -l failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((
            took,
            out.stdout.split(|b| *b == b'\n').count().saturating_sub(2),
        ))
    };
    let (cold, n) = ls(&mp)?;
    anyhow::ensure!(n == files, "ls -l listed {n} files, expected {files}");
    // Past the attribute timeout: every entry has to be fetched again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (again, _) = ls(&mp)?;
    let t = Instant::now();
    let listed = client.list("/many").await?.len();
    let list_rpc = t.elapsed();
    anyhow::ensure!(listed == files);
    drop(m);

    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "median same-round ratio: read {:.2}, write {:.2}",
        median(&mut read_ratios),
        median(&mut write_ratios)
    );
    println!();
    println!(
        "{:<40} {:>10} {:>10} {:>7} {:>7}",
        "figure", "measured", "baseline", "ratio", "target"
    );
    println!(
        "{:<40} {:>10.0} {:>10.0} {:>7.2} {:>7}  (baseline: quern get to a sink)",
        "read through the mount, dd bs=1M (MB/s)",
        dd_best,
        get_best,
        dd_best / get_best,
        ">=0.8"
    );
    println!(
        "{:<40} {:>10.0} {:>10.0} {:>7.2} {:>7}  (baseline: quern put of the same file)",
        "write into the mount, cp (MB/s)",
        cp_best,
        put_best,
        cp_best / put_best,
        ">=0.7"
    );
    println!(
        "{:<40} {:>10.3} {:>10.3} {:>7} {:>7}  (baseline: one List RPC of the directory)",
        format!("ls -l of {files} files, first (s)"),
        cold.as_secs_f64(),
        list_rpc.as_secs_f64(),
        "-",
        "<1s"
    );
    println!(
        "{:<40} {:>10.3} {:>10} {:>7} {:>7}",
        format!("ls -l of {files} files, after TTL (s)"),
        again.as_secs_f64(),
        "-",
        "-",
        "<1s"
    );
    Ok(())
}
