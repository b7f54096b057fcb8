//! `quern mount` and `quern umount`: the cluster as a local directory.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use quern_client::Client;
use quern_fuse::{mountinfo, Mount, MountOptions};
use quern_proto::size::parse_size;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// Local directory to mount on.
    pub mountpoint: PathBuf,
    /// Remote directory shown at the mount's root.
    #[arg(long, default_value = "/")]
    pub remote_root: String,
    /// Refuse every change (EROFS).
    #[arg(long)]
    pub read_only: bool,
    /// Stay in the foreground (logs to stderr) instead of returning once
    /// the mount is live.
    #[arg(long)]
    pub foreground: bool,
    /// Bound on each operation that talks to the cluster [default: the
    /// configuration's rpc_timeout_secs, else 30s].
    #[arg(long, value_parser = crate::duration::parse)]
    pub timeout: Option<Duration>,
    /// How long the kernel trusts attributes and directory entries; changes
    /// made by other clients show up after at most this long.
    #[arg(long, default_value = "1s", value_parser = crate::duration::parse)]
    pub attr_timeout: Duration,
    /// Memory for cached chunks.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub cache_size: u64,
    /// Chunks fetched ahead of a sequential reader.
    #[arg(long, default_value_t = 2)]
    pub read_ahead: usize,
    /// Copies of each chunk of files created through the mount.
    #[arg(short, long, default_value_t = 3)]
    pub replication: u8,
    /// Chunk size of files created through the mount.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Threads serving kernel requests.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Let other users use the mount (needs user_allow_other in
    /// /etc/fuse.conf unless run as root).
    #[arg(long)]
    pub allow_other: bool,
    /// Log file of a background mount [default: a file in the temp
    /// directory named after the mount point].
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
    /// Detach now even if files are open; the mount goes away when they
    /// are closed.
    #[arg(short = 'z', long)]
    pub lazy: bool,
}

pub async fn mount(args: MountArgs, config: Option<&Path>) -> Result<i32> {
    let cfg = crate::client_config(config)?;
    let mountpoint = mountinfo::resolve(&args.mountpoint)
        .with_context(|| format!("mount: {}", args.mountpoint.display()))?;
    if mountinfo::find(&mountpoint).is_some() {
        bail!(
            "mount: {} is already a mount point (unmount it with `quern umount {}`)",
            mountpoint.display(),
            mountpoint.display()
        );
    }
    let meta = std::fs::metadata(&mountpoint)
        .with_context(|| format!("mount: {}", mountpoint.display()))?;
    if !meta.is_dir() {
        bail!("mount: {} is not a directory", mountpoint.display());
    }
    if !args.remote_root.starts_with('/') {
        bail!(
            "mount: --remote-root {} must be absolute, like /data",
            args.remote_root
        );
    }
    let timeout = args
        .timeout
        .unwrap_or_else(|| Duration::from_secs(cfg.rpc_timeout_secs.unwrap_or(30)));
    let client = Client::new(&cfg.identity()?, cfg.namenode, timeout)?;
    tokio::time::timeout(
        timeout,
        quern_fuse::check_remote_root(&client, &args.remote_root),
    )
    .await
    .map_err(|_| {
        anyhow!(
            "mount: the namenode at {} did not answer within {:.0} s",
            cfg.namenode,
            timeout.as_secs_f64()
        )
    })?
    .with_context(|| format!("mount: remote root {}", args.remote_root))?;
    if !args.foreground {
        return background(&args, &mountpoint, config);
    }
    let opts = MountOptions {
        remote_root: args.remote_root.clone(),
        read_only: args.read_only,
        timeout,
        attr_ttl: args.attr_timeout,
        cache_bytes: args.cache_size,
        read_ahead_chunks: args.read_ahead,
        read_ahead_kb: 1024,
        replication: args.replication,
        chunk_size: args.chunk_size,
        threads: args.threads,
        allow_other: args.allow_other,
    };
    let rt = tokio::runtime::Handle::current();
    let mp = mountpoint.clone();
    let mut m = tokio::task::spawn_blocking(move || Mount::new(client, rt, &mp, opts))
        .await
        .context("mount: mounting thread failed")??;
    let mut unmounter = m.unmounter();
    tracing::info!(
        "mounted {} of namenode {} at {}{}",
        args.remote_root,
        cfg.namenode,
        mountpoint.display(),
        if args.read_only { " (read-only)" } else { "" }
    );
    let (done_tx, mut done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("quern-fuse".into())
        .spawn(move || {
            let _ = done_tx.send(m.run());
        })
        .context("mount: starting the FUSE session")?;
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let result = loop {
        tokio::select! {
            r = &mut done => break r,
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received: unmounting {}", mountpoint.display());
        let r = tokio::task::spawn_blocking(move || {
            let r = unmounter.unmount();
            (unmounter, r)
        })
        .await
        .context("mount: unmounting thread failed")?;
        unmounter = r.0;
        if let Err(e) = r.1 {
            tracing::error!("{e}");
        }
    };
    match result {
        Ok(Ok(())) => {
            tracing::info!("{} unmounted", mountpoint.display());
            Ok(0)
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => bail!("mount: the FUSE session ended abnormally"),
    }
}

fn default_log(mountpoint: &Path) -> PathBuf {
    let name: String = mountpoint
        .display()
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("quern-mount-{uid}{name}.log"))
}

/// Starts `quern mount --foreground` detached and returns once the kernel
/// shows the mount (or the child has failed).
fn background(args: &MountArgs, mountpoint: &Path, config: Option<&Path>) -> Result<i32> {
    let log = args.log.clone().unwrap_or_else(|| default_log(mountpoint));
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("mount: opening log {}", log.display()))?;
    let start_len = log_file.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("mount: finding the quern binary")?;
    let mut cmd = Command::new(exe);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    // The mount acts as the identity it was asked to, not the configuration's.
    let who = crate::identity_flags();
    for (flag, file) in [("--cert", who.cert), ("--key", who.key), ("--ca", who.ca)] {
        if let Some(f) = file {
            cmd.arg(flag).arg(f);
        }
    }
    cmd.arg("mount")
        .arg(mountpoint)
        .arg("--foreground")
        .args(["--remote-root", &args.remote_root])
        .args([
            "--attr-timeout",
            &format!("{}ms", args.attr_timeout.as_millis()),
        ])
        .args(["--cache-size", &args.cache_size.to_string()])
        .args(["--read-ahead", &args.read_ahead.to_string()])
        .args(["--replication", &args.replication.to_string()])
        .args(["--chunk-size", &args.chunk_size.to_string()])
        .args(["--threads", &args.threads.to_string()]);
    if let Some(t) = args.timeout {
        cmd.args(["--timeout", &format!("{}ms", t.as_millis())]);
    }
    if args.read_only {
        cmd.arg("--read-only");
    }
    if args.allow_other {
        cmd.arg("--allow-other");
    }
    let stderr = log_file
        .try_clone()
        .with_context(|| format!("mount: {}", log.display()))?;
    // Its own process group: a Ctrl-C meant for the shell that ran
    // `quern mount` must not take the mount down.
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .env("NO_COLOR", "1")
        .process_group(0)
        .spawn()
        .context("mount: starting the mount process")?;
    let limit = args.timeout.unwrap_or(Duration::from_secs(30)) + Duration::from_secs(15);
    let deadline = Instant::now() + limit;
    loop {
        if mountinfo::find(mountpoint).is_some() {
            println!(
                "mounted {} at {} (pid {}, log {}); unmount with `quern umount {}`",
                args.remote_root,
                mountpoint.display(),
                child.id(),
                log.display(),
                mountpoint.display()
            );
            return Ok(0);
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read(&log).unwrap_or_default();
            let tail = String::from_utf8_lossy(&text[(start_len as usize).min(text.len())..])
                .trim()
                .to_string();
            bail!("mount failed ({status}): {tail}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "mount: {} did not become a mount within {:.0} s; see {}",
                mountpoint.display(),
                limit.as_secs_f64(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub async fn umount(args: UmountArgs) -> Result<i32> {
    let mp = mountinfo::resolve(&args.mountpoint)
        .with_context(|| format!("umount: {}", args.mountpoint.display()))?;
    match mountinfo::find(&mp) {
        Some(m) if m.fs_type.starts_with("fuse") => {}
        Some(m) => bail!(
            "umount: {} is a {} mount, not a quern one",
            mp.display(),
            m.fs_type
        ),
        None => bail!("umount: {} is not mounted", mp.display()),
    }
    if args.lazy {
        quern_fuse::lazy_unmount(&mp)?;
    } else {
        let out = Command::new("fusermount3").arg("-u").arg(&mp).output();
        let ok = matches!(&out, Ok(o) if o.status.success());
        if !ok {
            // Root may unmount directly where fusermount3 is missing.
            let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes())
                .context("umount: path contains a NUL byte")?;
            // SAFETY: `c` is a valid NUL-terminated path for the call.
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                let errno = std::io::Error::last_os_error();
                let why = match out {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => format!("fusermount3: {e}"),
                };
                if errno.raw_os_error() == Some(libc::EBUSY) {
                    bail!(
                        "umount: {} is busy: a process has a file open or its working directory \
                         in it (close it, or use --lazy)",
                        mp.display()
                    );
                }
                bail!("umount: {}: {errno} ({why})", mp.display());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !args.lazy && mountinfo::find(&mp).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(0)
}
