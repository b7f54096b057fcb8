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
    /// Where heartbeats are served, apart from every other request;
    /// `None`: the main address's IP, any free port.
    pub lifeline: Option<SocketAddr>,
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
            lifeline: None,
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
    /// The map's counts that safe mode reads, without its lock.
    pub census: Arc<crate::cluster::Census>,
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
    /// The lifeline endpoint's port, told to datanodes in every reply.
    pub lifeline: std::sync::OnceLock<u16>,
    /// Heartbeats that came while the cluster map was held longer than a
    /// heartbeat waits ([`HEARTBEAT_WAIT`]), with when they came; whoever
    /// takes the map next applies them.
    pub late_beats: Mutex<Vec<(Instant, Heartbeat)>>,
}

/// Longest a heartbeat waits for the cluster map. Reports hand it on every
/// few hundred chunks, but declaring a node dead or live again settles all
/// its chunks in one hold (tens of milliseconds at 30,000 chunks): a
/// heartbeat that came meanwhile is answered at once, without commands,
/// and counted when the map is free.
pub const HEARTBEAT_WAIT: Duration = Duration::from_millis(5);

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
        let mut c = self.cluster.lock();
        self.apply_late_beats(&mut c);
        c
    }

    fn apply_late_beats(&self, c: &mut Cluster) {
        let late = std::mem::take(&mut *lock(&self.late_beats));
        for (came, hb) in late {
            c.late_heartbeat(hb, came);
        }
    }

    /// Records a heartbeat if the map is free this instant: its commands
    /// (`Reregister` for a node it does not know); the heartbeat back if
    /// the map is taken.
    pub fn heartbeat_if_free(&self, hb: Heartbeat) -> Result<Vec<DatanodeCommand>, Heartbeat> {
        match self.cluster.try_lock() {
            Some(mut c) => Ok(self.beat(&mut c, hb)),
            None => Err(hb),
        }
    }

    /// A heartbeat taken with the map held, after those that came late.
    fn beat(&self, c: &mut Cluster, hb: Heartbeat) -> Vec<DatanodeCommand> {
        self.apply_late_beats(c);
        c.heartbeat(hb)
            .unwrap_or_else(|| vec![DatanodeCommand::Reregister])
    }

    /// Records a heartbeat: its commands, or (`None`) none if the map was
    /// busy for longer than [`HEARTBEAT_WAIT`], the heartbeat then counted
    /// by the next holder; `Some(Reregister)` for a node it does not know.
    pub fn heartbeat(&self, hb: Heartbeat) -> Option<Vec<DatanodeCommand>> {
        let came = Instant::now();
        match self.cluster.try_lock_for(HEARTBEAT_WAIT) {
            Some(mut c) => Some(self.beat(&mut c, hb)),
            None => {
                lock(&self.late_beats).push((came, hb));
                None
            }
        }
    }

    /// One step of a long job on the cluster map (a batch of a report, a
    /// node declared dead), then the lock handed fairly to whoever waits,
    /// so heartbeats are never held up by more than one step.
    pub fn cluster_step<R>(&self, step: impl FnOnce(&mut Cluster) -> R) -> R {
        let mut c = self.cluster();
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
                self.census.unreported().1
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
        let (missing, total) = self.census.unreported();
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
        self.reply(self.safe_mode().is_some(), commands)
    }

    /// The answer to a heartbeat the map was too busy to take: no
    /// commands, and safe mode as last decided (deciding it anew reads
    /// the map).
    pub(crate) fn busy_reply(&self) -> NodeReply {
        let safe = !*self.loaded.borrow() || lock(&self.safe).since.is_some();
        self.reply(safe, Vec::new())
    }

    fn reply(&self, safe_mode: bool, commands: Vec<DatanodeCommand>) -> NodeReply {
        NodeReply {
            cluster_id: self.ns.cluster_id.clone(),
            safe_mode,
            keys: self.tokens.keys(),
            commands,
            lifeline: self.lifeline.get().copied(),
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

#[cfg(test)]
mod tests {
    use crate::service::{heartbeat, Namenode, NamenodeConfig};
    use quern_proto::msg::NodeAddr;
    use quern_proto::{NodeId, Principal, Role};
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_heartbeat_is_answered_while_the_chunk_map_is_held_and_counted_after() {
        let dir = tempfile::tempdir().unwrap();
        let files = quern_proto::tls::init_cluster_dir(&dir.path().join("tls")).unwrap();
        Namenode::format(&dir.path().join("nn")).unwrap();
        let cfg = NamenodeConfig::new(dir.path().join("nn"), "127.0.0.1:0".parse().unwrap());
        let nn = Namenode::start(cfg, &files.namenode_identity().unwrap())
            .await
            .unwrap();
        let s = nn.state.clone();
        let node = NodeId(7);
        let addr = "127.0.0.1:9".parse().unwrap();
        s.cluster()
            .join(NodeAddr { id: node, addr }, 1 << 40, 1 << 39, &[], false);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // A long job holds the map for a second (a node of many chunks
        // declared dead, say).
        let (held, holding) = std::sync::mpsc::channel();
        let job = {
            let s = s.clone();
            std::thread::spawn(move || {
                let _map = s.cluster.lock();
                held.send(()).unwrap();
                std::thread::sleep(Duration::from_secs(1));
            })
        };
        holding.recv().unwrap();
        let beat = crate::replication::tests::beat(node.0);
        let t = Instant::now();
        let reply = heartbeat(s.clone(), &Principal::new(Role::Datanode(node)), beat)
            .await
            .unwrap();
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "answered without waiting for the map: {took:?}"
        );
        assert!(reply.commands.is_empty(), "{:?}", reply.commands);
        // Every reply to a datanode says whether safe mode is on; deciding
        // it reads published counts, not the map the job holds.
        let t = Instant::now();
        assert_eq!(s.safe_mode(), None, "no chunks: nothing to wait for");
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "safe mode decided without waiting for the map: {took:?}"
        );
        tokio::task::spawn_blocking(move || job.join().unwrap())
            .await
            .unwrap();
        // Counted with the time it came (1.5 s after joining), not lost:
        // without it the node would have been silent 2.5 s.
        let report = s.cluster().report();
        let since = report[0].since_heartbeat_secs;
        assert!(since < 1.4, "last heard {since} s ago");
    }
}
