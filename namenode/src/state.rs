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
    /// Safe mode ends once this share of committed chunks has a live
    /// replica (HDFS's 0.999).
    pub safemode_threshold: f64,
    /// Leave safe mode after this long even if fewer chunks were reported
    /// (the rest then show as MISSING); `None`: only the share or an
    /// operator ends it.
    pub safemode_max_wait: Option<Duration>,
    pub replication_interval: Duration,
    /// Copies a datanode takes part in (as source or target) per pass.
    pub replication_per_node: usize,
    /// Datanodes sending a full report in pages at the same time.
    pub report_leases: usize,
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
            safemode_threshold: 0.999,
            safemode_max_wait: None,
            replication_interval: Duration::from_secs(3),
            replication_per_node: 8,
            report_leases: 16,
            token_lifetime: Duration::from_secs(10 * 3600),
            key_rotation: Duration::from_secs(10 * 3600),
            job_history: 200,
            http: None,
        }
    }
}

/// A completion handed to the next completion that takes the writer.
pub(crate) struct WaitingCompletion {
    pub file: quern_proto::FileId,
    pub done: tokio::sync::oneshot::Sender<Res<crate::namespace::Completed>>,
}

pub(crate) struct State {
    pub cfg: NamenodeConfig,
    pub ns: Namespace,
    /// Fair on demand: a long report hands the lock to waiting
    /// heartbeats between its batches.
    pub cluster: parking_lot::Mutex<Cluster>,
    /// One report reconciled at a time, off the async workers: a storm of
    /// reports queues here instead of taking every thread.
    pub reporting: tokio::sync::Mutex<()>,
    /// Expiry of each pending file's lease.
    pub leases: Mutex<HashMap<FileId, Instant>>,
    pub safe: Mutex<SafeMode>,
    /// Set once every completed file's chunks are in the chunk map.
    pub loaded: tokio::sync::watch::Sender<bool>,
    pub started: Instant,
    /// Turns to send a long full report.
    pub report_turns: crate::report_turns::ReportTurns,
    /// One namespace mutation at a time; readers do not take it.
    pub writer: tokio::sync::Mutex<()>,
    /// Completions waiting for the writer; the next completion to take it
    /// completes them all in one transaction.
    pub completing: Mutex<Vec<WaitingCompletion>>,
    pub tokens: Authority,
    /// For probing a datanode's old address when it registers anew.
    pub endpoint: Arc<Endpoint>,
    /// Pages of chunk reports received so far, per node.
    pub reports: Mutex<HashMap<quern_proto::NodeId, Vec<quern_proto::report::ReportedChunk>>>,
    /// The jobs coordinators ran and run.
    pub jobs: crate::jobs::Jobs,
}

/// Safe mode: no namespace changes and no replication while chunk
/// locations are rebuilt from reports after a start, or while an operator
/// holds the namenode in it.
#[derive(Debug, Default)]
pub struct SafeMode {
    /// Since when, while in it.
    pub since: Option<Instant>,
    /// Entered by an operator: only an operator ends it.
    pub manual: bool,
}

/// How long a datanode given a turn to send its full report has to finish it.
pub(crate) const REPORT_LEASE: Duration = Duration::from_secs(120);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    pub fn cluster(&self) -> parking_lot::MutexGuard<'_, Cluster> {
        self.cluster.lock()
    }

    /// One step of a long job on the cluster map (a batch of a report, a
    /// node declared dead), then the lock handed fairly to whoever waits,
    /// so heartbeats are never held up by more than one step.
    pub fn cluster_step<R>(&self, step: impl FnOnce(&mut Cluster) -> R) -> R {
        let mut c = self.cluster.lock();
        let r = step(&mut c);
        parking_lot::MutexGuard::unlock_fair(c);
        r
    }

    /// `Some(reason)` while in safe mode. After a start it is left once
    /// the configured share of chunks has a live replica (kept as a count,
    /// so this costs no scan), or when the optional longest wait is over.
    pub fn safe_mode(&self) -> Option<String> {
        let mut safe = lock(&self.safe);
        if !*self.loaded.borrow() {
            return Some(format!(
                "namenode is in safe mode: loading its chunk map ({} chunks so far)",
                self.cluster().chunk_count()
            ));
        }
        let started = safe.since?;
        if safe.manual {
            return Some(
                "namenode is in safe mode, entered by an operator; `quern safemode leave` \
                 ends it"
                    .into(),
            );
        }
        let (missing, total) = self.cluster().unreported();
        let reported = total - missing;
        let share = if total == 0 {
            1.0
        } else {
            reported as f64 / total as f64
        };
        let waited = started.elapsed();
        let gave_up = self.cfg.safemode_max_wait.is_some_and(|w| waited >= w);
        if share >= self.cfg.safemode_threshold || gave_up {
            if missing > 0 {
                tracing::warn!(
                    missing,
                    total,
                    waited_s = waited.as_secs_f64(),
                    "leaving safe mode with chunks not reported by any live datanode"
                );
            } else {
                tracing::info!(
                    total,
                    waited_s = waited.as_secs_f64(),
                    "all chunks reported; leaving safe mode"
                );
            }
            safe.since = None;
            return None;
        }
        Some(format!(
            "namenode is in safe mode: {reported} of {total} chunks have a live replica ({:.2}%); \
             it leaves at {:.2}%{}, or by `quern safemode leave`",
            share * 100.0,
            self.cfg.safemode_threshold * 100.0,
            match self.cfg.safemode_max_wait {
                Some(w) => format!(" or within {} s", w.saturating_sub(waited).as_secs() + 1),
                None => String::new(),
            }
        ))
    }

    /// Waits until the chunk map is loaded: a report or a received chunk
    /// taken before would find its chunks unknown.
    pub(crate) async fn wait_loaded(&self) {
        let mut rx = self.loaded.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// An operator's `quern safemode enter|leave`.
    pub(crate) fn set_safe_mode(&self, on: bool) {
        let mut safe = lock(&self.safe);
        if on {
            safe.since = Some(safe.since.unwrap_or_else(Instant::now));
            safe.manual = true;
            tracing::warn!("safe mode entered by an operator");
        } else {
            if safe.since.is_some() {
                tracing::warn!("safe mode left by an operator");
            }
            *safe = SafeMode::default();
        }
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

    /// A pending file's record (without its chunks), only for the user
    /// who created it.
    pub(crate) fn pending(&self, user: &User, file: FileId) -> Res<PendingFile> {
        let p = self.ns.pending_head(file)?;
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
