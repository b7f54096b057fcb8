//! quern as a local filesystem through FUSE (fuser 0.18, no libfuse).
//!
//! A thin layer over [`quern_client::Client`]: paths map to inode numbers
//! in this process, reads come from whole verified chunks cached in memory
//! and fetched ahead on sequential access, and writes stream into a
//! [`quern_client::FileWriter`] that makes the file visible when the last
//! descriptor is closed (or fsynced). quern files are written once, front to
//! back: a write before the end fails with `EOPNOTSUPP` (one past the end
//! fills the gap with zeros, which is how `cp` copies a sparse file).
//!
//! Every operation that talks to the cluster is bounded by
//! [`MountOptions::timeout`]; past it the caller gets `ETIMEDOUT` and the
//! mount stays usable (and unmountable).

mod cache;
mod errno;
mod fs;
mod inodes;
pub mod mountinfo;

use fs::QuernFs;
use quern_client::Client;
use quern_proto::msg::FileKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How a mount behaves; see `docs/fuse.md` for the reasoning behind the
/// defaults.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Remote directory shown at the mount's root.
    pub remote_root: String,
    pub read_only: bool,
    /// Bound on each operation that talks to the cluster.
    pub timeout: Duration,
    /// How long the kernel may trust attributes and directory entries.
    pub attr_ttl: Duration,
    /// Memory for cached chunks.
    pub cache_bytes: u64,
    /// Chunks fetched ahead of a sequential reader.
    pub read_ahead_chunks: usize,
    /// Kernel read-ahead (and largest read request), at most 1024.
    pub read_ahead_kb: u32,
    /// Replication and chunk size of files created through the mount.
    pub replication: u8,
    pub chunk_size: u64,
    /// Threads serving kernel requests.
    pub threads: usize,
    /// Let other users (and root) use the mount.
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            remote_root: "/".into(),
            read_only: false,
            timeout: Duration::from_secs(30),
            attr_ttl: Duration::from_secs(1),
            cache_bytes: 1 << 30,
            read_ahead_chunks: 2,
            read_ahead_kb: 1024,
            replication: 3,
            chunk_size: 64 << 20,
            threads: 8,
            allow_other: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Client(#[from] quern_client::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
}

/// Checks that `root` exists on the cluster and is a directory, so a typo
/// fails the mount instead of showing an empty tree.
pub async fn check_remote_root(client: &Client, root: &str) -> Result<(), Error> {
    let status = client.stat(root).await?;
    if status.kind != FileKind::Dir {
        return Err(Error::Invalid(format!(
            "remote root {root} is a file; mount a directory"
        )));
    }
    Ok(())
}

/// A live mount. Dropping it without [`Mount::run`] unmounts.
pub struct Mount {
    session: fuser::Session<QuernFs>,
    mountpoint: PathBuf,
}

impl Mount {
    /// Mounts at `mountpoint`. Calls into the cluster run on `runtime`
    /// (the kernel's requests arrive on threads of their own). Blocks
    /// briefly: call it off the async runtime.
    pub fn new(
        client: Client,
        runtime: tokio::runtime::Handle,
        mountpoint: &Path,
        opts: MountOptions,
    ) -> Result<Mount, Error> {
        let mut options = vec![
            fuser::MountOption::FSName("quern".into()),
            fuser::MountOption::Subtype("quern".into()),
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoAtime,
        ];
        if opts.read_only {
            options.push(fuser::MountOption::RO);
        }
        let mut config = fuser::Config::default();
        config.mount_options = options;
        config.n_threads = Some(opts.threads.max(1));
        if opts.allow_other {
            config.acl = fuser::SessionACL::All;
        }
        let read_ahead_kb = opts.read_ahead_kb.clamp(4, 1024);
        let fs = QuernFs::new(client, runtime, opts);
        let session = fuser::Session::new(fs, mountpoint, &config).map_err(|e| Error::Io {
            context: format!("mounting {}", mountpoint.display()),
            cause: e,
        })?;
        match mountinfo::find(mountpoint) {
            Some(entry) => {
                if let Err(e) = mountinfo::set_read_ahead_kb(&entry, read_ahead_kb) {
                    tracing::info!(
                        "kernel read-ahead left at its default (reads arrive as 128 KiB requests): {e}"
                    );
                }
            }
            None => tracing::debug!("{} not in mountinfo yet", mountpoint.display()),
        }
        Ok(Mount {
            session,
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Something another thread can use to end the mount.
    pub fn unmounter(&mut self) -> Unmounter {
        Unmounter {
            inner: self.session.unmount_callable(),
            mountpoint: self.mountpoint.clone(),
        }
    }

    /// Serves the kernel until the filesystem is unmounted (by
    /// [`Unmounter`], `quern umount`, `fusermount3 -u` or `umount`). Files
    /// still being written are abandoned.
    pub fn run(self) -> Result<(), Error> {
        self.session.run().map_err(|e| Error::Io {
            context: format!("serving {}", self.mountpoint.display()),
            cause: e,
        })
    }
}

pub struct Unmounter {
    inner: fuser::SessionUnmounter,
    mountpoint: PathBuf,
}

impl Unmounter {
    /// Unmounts; if the mount is busy (a process has a file open in it)
    /// it is detached now and goes away when the last user lets go.
    pub fn unmount(&mut self) -> Result<(), Error> {
        if let Err(e) = self.inner.unmount() {
            tracing::warn!(
                "{} is busy ({e}); detaching it: it goes away when the last open file is closed",
                self.mountpoint.display()
            );
            lazy_unmount(&self.mountpoint)?;
        }
        Ok(())
    }
}

/// `fusermount3 -uz`, or `umount2(MNT_DETACH)` where fusermount3 is missing.
pub fn lazy_unmount(mountpoint: &Path) -> Result<(), Error> {
    let out = std::process::Command::new("fusermount3")
        .arg("-uz")
        .arg(mountpoint)
        .output();
    if let Ok(o) = &out {
        if o.status.success() {
            return Ok(());
        }
    }
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid(format!("{} contains a NUL byte", mountpoint.display())))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        return Ok(());
    }
    let why = match out {
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("fusermount3: {e}"),
    };
    Err(Error::Io {
        context: format!("unmounting {} ({why})", mountpoint.display()),
        cause: std::io::Error::last_os_error(),
    })
}
