//! The namenode's shared state: settings, namespace, soft cluster map,
//! leases, safe mode and token keys. Request handlers (`service`) and the
//! background monitor are both handed a `State`; neither reaches into the
//! other.

use crate::cluster::Cluster;
use crate::keys::Authority;
use crate::namespace::{Namespace, PendingFile, Resolved};
use crate::perm::{denied, User, W, X};
use quern_proto::msg::*;
use quern_proto::transport::Endpoint;
use quern_proto::WireError;
use quern_proto::{ErrorCode, FileId, RemotePath};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

type Res<T> = Result<T, WireError>;

#[derive(Debug, Clone)]
pub struct NamenodeConfig {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    /// A datanode silent this long is dead.
    pub dead_timeout: Duration,
    /// A file being written whose client stays silent this long is dropped
    /// and its chunks reclaimed.
    pub lease_timeout: Duration,
    /// Leave safe mode after this long even if some chunks were never
    /// reported (they then show as MISSING).
    pub safemode_max_wait: Duration,
    pub replication_interval: Duration,
    /// How long a chunk access token is valid.
    pub token_lifetime: Duration,
    /// How often a new token key takes over.
    pub key_rotation: Duration,
    /// Finished jobs kept in the history.
    pub job_history: usize,
    /// Where the web UI and `/metrics` are served; `None`: not at all.
    pub http: Option<quern_web::HttpConfig>,
}

impl NamenodeConfig {
    pub fn new(dir: PathBuf, listen: SocketAddr) -> NamenodeConfig {
        NamenodeConfig {
            dir,
            listen,
            dead_timeout: Duration::from_secs(30),
            lease_timeout: Duration::from_secs(60),
            safemode_max_wait: Duration::from_secs(30),
            replication_interval: Duration::from_secs(3),
            token_lifetime: Duration::from_secs(10 * 3600),
            key_rotation: Duration::from_secs(10 * 3600),
            job_history: 200,
            http: None,
        }
    }
}

pub(crate) struct State {
    pub cfg: NamenodeConfig,
    pub ns: Namespace,
    pub cluster: Mutex<Cluster>,
    /// Expiry of each pending file's lease.
    pub leases: Mutex<HashMap<FileId, Instant>>,
    /// Set while the namenode waits for chunk reports after a start.
    pub safe_since: Mutex<Option<Instant>>,
    /// The last count of unreported chunks (when, missing, total) that
    /// safe mode's decision rests on.
    pub safe_count: Mutex<Option<(Instant, usize, usize)>>,
    /// One namespace mutation at a time; readers do not take it.
    pub writer: tokio::sync::Mutex<()>,
    /// Chunks with a replication in flight, so it is not scheduled twice.
    pub replicating: Mutex<HashMap<quern_proto::ChunkId, Instant>>,
    pub tokens: Authority,
    /// For probing a datanode's old address when it registers anew.
    pub endpoint: Arc<Endpoint>,
    /// Pages of chunk reports received so far, per node.
    pub reports: Mutex<HashMap<quern_proto::NodeId, Vec<StoredChunk>>>,
    /// The jobs coordinators ran and run.
    pub jobs: crate::jobs::Jobs,
}

/// How long one count of unreported chunks stands for safe mode between
/// reports. Every reply to a datanode says whether the namenode is in safe
/// mode, and a count walks the whole chunk map: counted per reply, a
/// thousand datanodes' heartbeats kept the namenode busy counting
/// (measured in docs/scale.md). Reports and received chunks count again
/// at once; a node declared dead is counted within this time.
const SAFE_RECOUNT: Duration = Duration::from_millis(250);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    pub fn cluster(&self) -> MutexGuard<'_, Cluster> {
        lock(&self.cluster)
    }

    /// `Some(reason)` while in safe mode; leaves it once every chunk has a
    /// live replica or the wait is over.
    pub fn safe_mode(&self) -> Option<String> {
        let mut since = lock(&self.safe_since);
        let started = (*since)?;
        let (missing, total) = {
            let mut last = lock(&self.safe_count);
            match *last {
                Some((at, missing, total)) if at.elapsed() < SAFE_RECOUNT => (missing, total),
                _ => {
                    let (missing, total) = self.cluster().unreported();
                    *last = Some((Instant::now(), missing, total));
                    (missing, total)
                }
            }
        };
        let waited = started.elapsed();
        if missing == 0 || waited >= self.cfg.safemode_max_wait {
            if missing > 0 {
                tracing::warn!(
                    missing,
                    total,
                    "leaving safe mode with chunks never reported"
                );
            } else {
                tracing::info!(total, "all chunks reported; leaving safe mode");
            }
            *since = None;
            return None;
        }
        Some(format!(
            "namenode is in safe mode: {} of {total} chunks reported by datanodes; it leaves safe \
             mode when all are reported or within {} s",
            total - missing,
            self.cfg.safemode_max_wait.saturating_sub(waited).as_secs() + 1
        ))
    }

    /// A report or a received chunk may have made the last unreported
    /// chunks reported: safe mode's next check counts again.
    pub(crate) fn replicas_changed(&self) {
        *lock(&self.safe_count) = None;
    }

    pub(crate) fn writable(&self) -> Res<()> {
        match self.safe_mode() {
            Some(why) => Err(WireError::new(
                ErrorCode::SafeMode,
                format!("{why}; retry then"),
            )),
            None => Ok(()),
        }
    }

    pub(crate) fn renew(&self, file: FileId) {
        lock(&self.leases).insert(file, Instant::now() + self.cfg.lease_timeout);
    }

    /// Resolves `path` as `user`: x on every directory walked through, then
    /// `want` on the target when it exists.
    pub(crate) fn resolve(
        &self,
        user: &User,
        path: &RemotePath,
        want: u32,
    ) -> Res<Option<Resolved>> {
        let r = if user.superuser {
            self.ns.lookup(path)?
        } else {
            self.ns
                .lookup_through(path, &mut |names, inode| user.enter(names, inode))?
        };
        if let Some(r) = &r {
            if want != 0 {
                user.check(&path.to_string(), &r.inode, want)?;
            }
        }
        Ok(r)
    }

    pub(crate) fn get(&self, user: &User, path: &RemotePath, want: u32) -> Res<Resolved> {
        self.resolve(user, path, want)?
            .ok_or_else(|| crate::namespace::not_found(path))
    }

    /// The directory an entry at `path` lives in, with w+x checked on it
    /// (creating, removing or renaming an entry changes the directory).
    pub(crate) fn parent_for_change(&self, user: &User, path: &RemotePath) -> Res<Resolved> {
        let dir = if user.superuser {
            self.ns.parent_dir(path)?
        } else {
            self.ns
                .parent_dir_through(path, &mut |names, inode| user.enter(names, inode))?
        };
        let shown = path.parent().map(|p| p.to_string()).unwrap_or_default();
        user.check(&shown, &dir.inode, W | X)?;
        Ok(dir)
    }

    /// A pending file, only for the user who created it.
    pub(crate) fn pending(&self, user: &User, file: FileId) -> Res<PendingFile> {
        let p = self.ns.pending(file)?;
        if !user.superuser && p.owner != user.name {
            return Err(denied(format!(
                "permission denied: {} is being written by {}, not {}",
                p.path, p.owner, user.name
            )));
        }
        Ok(p)
    }

    pub(crate) fn node_reply(&self, commands: Vec<DatanodeCommand>) -> NodeReply {
        NodeReply {
            cluster_id: self.ns.cluster_id.clone(),
            safe_mode: self.safe_mode().is_some(),
            keys: self.tokens.keys(),
            commands,
        }
    }
}

/// Drops a file being written and frees its chunks (an abandoned write or
/// an expired lease).
pub(crate) async fn abandon(s: &State, file: FileId) -> Res<()> {
    let dropped = {
        let _w = s.writer.lock().await;
        s.ns.drop_pending(file)?
    };
    lock(&s.leases).remove(&file);
    if let Some(p) = dropped {
        tracing::info!(path = %p.path, chunks = p.allocated.len(), "dropping unfinished file");
        s.cluster().forget_chunks(p.allocated);
    }
    Ok(())
}
