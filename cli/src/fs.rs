//! File verbs: put, get, cat, ls, mkdir, rm, mv, stat, du, setrep, locate,
//! fsck, report.

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use quern_client::{Client, WriteOptions};
use quern_proto::msg::{FileKind, FileStatus, Health, NodeState, ReplicaState, SafeModeAction};
use quern_proto::size::{format_size, parse_size};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Subcommand)]
pub enum FsCommand {
    /// Store a local file (`-` for stdin) at a remote path.
    Put {
        local: String,
        remote: String,
        /// Copies of each chunk.
        #[arg(short, long, default_value_t = 3)]
        replication: u8,
        /// Chunk size, like 4M or 64MiB.
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        chunk_size: u64,
        /// Replace an existing remote file.
        #[arg(short, long)]
        force: bool,
        /// Permissions of the new file, in octal.
        #[arg(long, default_value = "644", value_parser = parse_mode)]
        mode: u32,
    },
    /// Fetch a remote file to a local path (`-` for stdout).
    Get {
        remote: String,
        local: String,
        /// Replace an existing local file.
        #[arg(short, long)]
        force: bool,
    },
    /// Print a remote file.
    Cat { remote: String },
    /// List a directory.
    Ls {
        #[arg(default_value = "/")]
        path: String,
        #[arg(short = 'l')]
        long: bool,
        #[arg(short = 'R')]
        recursive: bool,
        #[arg(long)]
        json: bool,
    },
    /// Make a directory.
    Mkdir {
        path: String,
        /// Make parents as needed; no error if it exists.
        #[arg(short)]
        parents: bool,
    },
    /// Remove a file, or a directory with -r.
    Rm {
        path: String,
        #[arg(short)]
        recursive: bool,
    },
    /// Rename or move (into DST when DST is a directory).
    Mv { src: String, dst: String },
    /// Show a path's attributes.
    Stat {
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Space used below a path.
    Du {
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Change the replication of a file (or every file below a directory).
    Setrep { replication: u8, path: String },
    /// Show every chunk of a file and the datanodes holding it.
    Locate {
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Check the health of files; exit 0 only when HEALTHY.
    Fsck {
        #[arg(default_value = "/")]
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Show every datanode.
    Report {
        #[arg(long)]
        json: bool,
    },
    /// Safe mode: `get` it, `enter` or `leave` it (admin certificate), or
    /// `wait` until the namenode leaves it.
    Safemode {
        #[arg(value_enum, default_value = "get")]
        action: SafemodeArg,
    },
    /// Change the permissions of a path (its owner or the admin).
    Chmod {
        /// Octal mode, like 640 or 1777.
        #[arg(value_parser = parse_mode)]
        mode: u32,
        path: String,
    },
    /// Change the owner (the admin only) and/or group of a path.
    Chown {
        /// OWNER, OWNER:GROUP or :GROUP.
        owner: String,
        path: String,
    },
}

/// When a datanode's scrubber last finished a full pass, as an age.
fn scrub_age(end_ms: Option<i64>) -> String {
    let Some(end) = end_ms else {
        return "never".into();
    };
    let secs = (quern_proto::token::now_ms() - end).max(0) / 1000;
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// An octal permission mode such as `644` or `0750`.
fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!(
            "'{s}' is not an octal mode from 0 to 7777 (for example 644 or 0750)"
        )),
    }
}

pub async fn run(cmd: FsCommand, config: Option<&Path>) -> Result<i32> {
    // Local mistakes are caught before anything touches the network.
    if let FsCommand::Put { local, .. } = &cmd {
        if local != "-" {
            let meta = std::fs::metadata(local).with_context(|| format!("put: {local}"))?;
            if meta.is_dir() {
                bail!("put: {local} is a directory; put stores files");
            }
        }
    }
    let cfg = crate::client_config(config)?;
    let client = Client::from_config(&cfg)?;
    match cmd {
        FsCommand::Chmod { mode, path } => client.set_attr(&path, Some(mode), None).await?,
        FsCommand::Chown { owner, path } => {
            let (o, g) = match owner.split_once(':') {
                Some((o, g)) => (o, Some(g.to_string()).filter(|g| !g.is_empty())),
                None => (owner.as_str(), None),
            };
            let o = Some(o.to_string()).filter(|o| !o.is_empty());
            if o.is_none() && g.is_none() {
                bail!("chown: give OWNER, OWNER:GROUP or :GROUP");
            }
            client.set_owner(&path, o, g).await?;
        }
        FsCommand::Put {
            local,
            remote,
            replication,
            chunk_size,
            force,
            mode,
        } => {
            let opts = WriteOptions {
                replication,
                chunk_size,
                overwrite: force,
                mode,
            };
            put(&client, &local, &remote, opts).await?;
        }
        FsCommand::Get {
            remote,
            local,
            force,
        } => get(&client, &remote, &local, force).await?,
        FsCommand::Cat { remote } => {
            let mut out = tokio::io::stdout();
            client.read_to(&remote, &mut out, |_| {}).await?;
        }
        FsCommand::Ls {
            path,
            long,
            recursive,
            json,
        } => ls(&client, &path, long, recursive, json).await?,
        FsCommand::Mkdir { path, parents } => client.mkdir(&path, parents).await?,
        FsCommand::Rm { path, recursive } => client.delete(&path, recursive).await?,
        FsCommand::Mv { src, dst } => {
            let target = match client.try_stat(&dst).await? {
                Some(s) if s.kind == FileKind::Dir => {
                    let name = src
                        .trim_end_matches('/')
                        .rsplit('/')
                        .next()
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| anyhow!("mv: cannot move /"))?;
                    join(&dst, name)
                }
                _ => dst,
            };
            client.rename(&src, &target, false).await?;
        }
        FsCommand::Stat { path, json } => {
            let s = client.stat(&path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_stat(&s);
            }
        }
        FsCommand::Du { path, json } => {
            let s = client.summary(&path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "{}  {} bytes ({}), {} stored with replication, {} files, {} directories",
                    path,
                    s.bytes,
                    format_size(s.bytes),
                    format_size(s.stored_bytes),
                    s.files,
                    s.dirs
                );
            }
        }
        FsCommand::Setrep { replication, path } => {
            client.set_replication(&path, replication).await?;
            println!("replication of {path} set to {replication}");
        }
        FsCommand::Locate { path, json } => {
            let loc = client.locate(&path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&loc)?);
            } else {
                println!(
                    "{}: {} bytes in {} chunks of {}, replication {}",
                    path,
                    loc.status.size,
                    loc.chunks.len(),
                    format_size(loc.status.chunk_size),
                    loc.status.replication
                );
                println!(
                    "{:>5} {:>12} {:>12} {:<20} {:<16} HOLDERS",
                    "INDEX", "OFFSET", "SIZE", "CHUNK", "DIGEST"
                );
                for c in &loc.chunks {
                    let holders: Vec<String> = c
                        .replicas
                        .iter()
                        .map(|r| {
                            let state = match r.state {
                                ReplicaState::Live => "",
                                ReplicaState::Dead => " (dead)",
                                ReplicaState::Corrupt => " (corrupt)",
                            };
                            format!("{}{state}", r.node.addr)
                        })
                        .collect();
                    println!(
                        "{:>5} {:>12} {:>12} {:<20} {:<16} {}",
                        c.index,
                        c.offset,
                        c.meta.size,
                        c.meta.id.to_string(),
                        &c.meta.digest.to_hex()[..16],
                        holders.join(", ")
                    );
                }
            }
        }
        FsCommand::Fsck { path, json } => {
            let r = client.fsck(&path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for f in &r.files {
                    if f.health != Health::Healthy {
                        println!("{}: {}", f.path, f.health.word());
                        for p in &f.problems {
                            println!("  {p}");
                        }
                    }
                }
                if r.safe_mode {
                    println!("namenode is in safe mode: replica counts may still be rising");
                }
                println!(
                    "{} {}: {} files, {} directories, {} chunks, {} under-replicated, {} corrupt replicas, {} missing, {} live datanodes",
                    r.health.word(),
                    r.path,
                    r.files.len(),
                    r.dirs,
                    r.chunks,
                    r.under_replicated_chunks,
                    r.corrupt_replicas,
                    r.missing_chunks,
                    r.live_datanodes
                );
            }
            return Ok(if r.health == Health::Healthy { 0 } else { 1 });
        }
        FsCommand::Safemode { action } => {
            let status = match action {
                SafemodeArg::Get => client.safe_mode(SafeModeAction::Get).await?,
                SafemodeArg::Enter => client.safe_mode(SafeModeAction::Enter).await?,
                SafemodeArg::Leave => client.safe_mode(SafeModeAction::Leave).await?,
                SafemodeArg::Wait => loop {
                    match client.safe_mode(SafeModeAction::Get).await? {
                        None => break None,
                        Some(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
                    }
                },
            };
            match status {
                Some(why) => println!("safe mode is ON: {why}"),
                None => println!("safe mode is OFF"),
            }
            return Ok(0);
        }
        FsCommand::Report { json } => {
            let r = client.report().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("cluster {}", r.cluster_id);
                if let Some(s) = &r.safe_mode {
                    println!("{s}");
                }
                println!(
                    "{:<22} {:<18} {:<5} {:>12} {:>12} {:>12} {:>7} {:>10} {:>20} {:>5} {:>16} {:>7} {:>9}",
                    "ADDRESS",
                    "ID",
                    "STATE",
                    "CAPACITY",
                    "USED",
                    "AVAILABLE",
                    "CHUNKS",
                    "TRASH",
                    "LAST SCRUB",
                    "BAD",
                    "JOBS",
                    "GFLOP/S",
                    "LAST HB"
                );
                for d in &r.datanodes {
                    // Training jobs held in memory, and how much they hold.
                    let jobs = format!("{} ({})", d.jobs, format_size(d.job_bytes));
                    println!(
                        "{:<22} {:<18} {:<5} {:>12} {:>12} {:>12} {:>7} {:>10} {:>20} {:>5} {:>16} {:>7.0} {:>8.1}s",
                        d.node.addr.to_string(),
                        d.node.id.to_string(),
                        match d.state {
                            NodeState::Live if d.full => "full",
                            NodeState::Live => "live",
                            NodeState::Dead => "dead",
                        },
                        format_size(d.capacity),
                        format_size(d.used),
                        format_size(d.available),
                        d.chunks,
                        format_size(d.trash_bytes),
                        // When the last full pass ended, and the chunks it verified.
                        format!(
                            "{} ({})",
                            scrub_age(d.scrub.last_pass_end_ms),
                            d.scrub.last_pass_chunks
                        ),
                        d.scrub.errors,
                        jobs,
                        // sgemm, measured when the node started.
                        d.gflops,
                        d.since_heartbeat_secs
                    );
                }
            }
        }
    }
    Ok(0)
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn progress_bar(len: Option<u64>, what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match len {
        Some(l) => ProgressBar::new(l),
        None => ProgressBar::new_spinner(),
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    Some(bar)
}

async fn put(client: &Client, local: &str, remote: &str, opts: WriteOptions) -> Result<()> {
    let mut target = remote.to_string();
    if let Some(s) = client.try_stat(remote).await? {
        if s.kind == FileKind::Dir {
            if local == "-" {
                bail!("put: {remote} is a directory; name the file to write from stdin");
            }
            let name = Path::new(local)
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("put: {local} has no file name"))?;
            target = join(remote, name);
        }
    }
    let (mut input, len): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, Option<u64>) =
        if local == "-" {
            (Box::new(tokio::io::stdin()), None)
        } else {
            let f = tokio::fs::File::open(local)
                .await
                .with_context(|| format!("put: {local}"))?;
            let len = f.metadata().await.ok().map(|m| m.len());
            (Box::new(f), len)
        };
    let bar = progress_bar(len, &target);
    let mut writer = client.create(&target, opts).await?;
    let mut buf = vec![0u8; 4 << 20];
    let result: Result<()> = async {
        loop {
            // Take what is there: a pipe's writer may pause for long.
            let n = input
                .read(&mut buf)
                .await
                .with_context(|| format!("put: reading {local}"))?;
            if n == 0 {
                break;
            }
            writer.write(&buf[..n]).await?;
            if let Some(b) = &bar {
                b.set_position(writer.written());
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        writer.abort().await;
        return Err(e);
    }
    writer.close().await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}

async fn get(client: &Client, remote: &str, local: &str, force: bool) -> Result<()> {
    if local == "-" {
        let mut out = tokio::io::stdout();
        client.read_to(remote, &mut out, |_| {}).await?;
        return Ok(());
    }
    let status = client.stat(remote).await?;
    if status.kind == FileKind::Dir {
        bail!("get: {remote} is a directory; get fetches files");
    }
    let mut dest = PathBuf::from(local);
    if dest.is_dir() {
        let name = remote
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| anyhow!("get: {remote} has no file name"))?;
        dest = dest.join(name);
    }
    // A device or a pipe (/dev/null, a FIFO) is written into, never
    // replaced: renaming over it would turn it into a plain file.
    if let Ok(meta) = std::fs::metadata(&dest) {
        if !meta.file_type().is_file() {
            let f = tokio::fs::OpenOptions::new()
                .write(true)
                .open(&dest)
                .await
                .with_context(|| format!("get: opening {}", dest.display()))?;
            let mut out = tokio::io::BufWriter::with_capacity(4 << 20, f);
            client.read_to(remote, &mut out, |_| {}).await?;
            out.flush()
                .await
                .with_context(|| format!("get: writing {}", dest.display()))?;
            return Ok(());
        }
    }
    if dest.exists() && !force {
        bail!(
            "get: {} already exists (use --force to replace it)",
            dest.display()
        );
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Write beside the target and rename, so a failed get leaves nothing.
    let tmp = tempfile::NamedTempFile::new_in(parent)
        .with_context(|| format!("get: cannot write in {}", parent.display()))?;
    let (std_file, tmp_path) = tmp.into_parts();
    let mut out = tokio::io::BufWriter::with_capacity(4 << 20, tokio::fs::File::from_std(std_file));
    let bar = progress_bar(Some(status.size), remote);
    client
        .read_to(remote, &mut out, |n| {
            if let Some(b) = &bar {
                b.set_position(n);
            }
        })
        .await?;
    drop(out);
    tmp_path
        .persist(&dest)
        .with_context(|| format!("get: writing {}", dest.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}

fn mode_string(s: &FileStatus) -> String {
    let mut out = String::with_capacity(10);
    out.push(if s.kind == FileKind::Dir { 'd' } else { '-' });
    for shift in [6, 3, 0] {
        let bits = (s.mode >> shift) & 7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    if s.mode & 0o1000 != 0 {
        // The sticky bit shows in the last place, as ls does.
        out.pop();
        out.push(if s.mode & 1 != 0 { 't' } else { 'T' });
    }
    out
}

fn time_string(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

fn print_long(s: &FileStatus) {
    println!("{}", long_line(s));
}

fn long_line(s: &FileStatus) -> String {
    let rep = if s.kind == FileKind::Dir {
        "-".to_string()
    } else {
        s.replication.to_string()
    };
    format!(
        "{} {:>3} {:<10} {:<10} {:>14} {} {}",
        mode_string(s),
        rep,
        s.owner,
        s.group,
        s.size,
        time_string(s.mtime_ms),
        s.path
    )
}

fn print_stat(s: &FileStatus) {
    println!("path:        {}", s.path);
    println!(
        "type:        {}",
        if s.kind == FileKind::Dir {
            "directory"
        } else {
            "file"
        }
    );
    println!("size:        {} ({})", s.size, format_size(s.size));
    if s.kind == FileKind::File {
        println!("replication: {}", s.replication);
        println!(
            "chunk size:  {} ({})",
            s.chunk_size,
            format_size(s.chunk_size)
        );
        println!("chunks:      {}", s.chunks);
    }
    println!("mode:        {} ({:04o})", mode_string(s), s.mode);
    println!("owner:       {}", s.owner);
    println!("group:       {}", s.group);
    println!("modified:    {} UTC", time_string(s.mtime_ms));
}

async fn ls(client: &Client, path: &str, long: bool, recursive: bool, json: bool) -> Result<()> {
    if !recursive && !json {
        // Pages arrive in name order: print them as they come, so a
        // directory of millions lists in bounded memory.
        let mut out = std::io::stdout().lock();
        let mut failed = None;
        client
            .list_pages(path, |page| {
                for s in &page {
                    let line = if long { long_line(s) } else { s.path.clone() };
                    if failed.is_none() {
                        failed = writeln!(out, "{line}").err();
                    }
                }
            })
            .await?;
        return match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        };
    }
    let mut all = Vec::new();
    let mut stack = vec![path.to_string()];
    while let Some(dir) = stack.pop() {
        let mut entries = client.list(&dir).await?;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        if recursive {
            for e in entries.iter().rev() {
                if e.kind == FileKind::Dir {
                    stack.push(e.path.clone());
                }
            }
        }
        all.extend(entries);
    }
    if recursive {
        all.sort_by(|a, b| a.path.cmp(&b.path));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for s in &all {
        if long {
            print_long(s);
        } else {
            println!("{}", s.path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_civil_time() {
        assert_eq!(super::time_string(0), "1970-01-01 00:00");
        assert_eq!(super::time_string(1_795_651_200_000), "2026-11-26 00:00");
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SafemodeArg {
    Get,
    Enter,
    Leave,
    Wait,
}
