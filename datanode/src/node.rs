//! What every part of a datanode shares: its settings, its identity, its
//! store and endpoint, token keys, the job table and progress figures. The
//! request handlers (`service`, `tasks`, `train`) and the background tasks
//! (heartbeat, scrubber, job sweeper) are each handed a `Node` (or the part
//! of it they need); this module depends only on the store and the job
//! table, never on the code that uses it.

use crate::store::{ChunkStore, StoreError};
use quern_proto::msg::*;
use quern_proto::transport::{Endpoint, Peer, Tuning};
use quern_proto::{Access, ChunkId, ChunkToken, ErrorCode, KeyRing, NodeId, WireError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often and how fast to scrub.
#[derive(Debug, Clone, Copy)]
pub struct ScrubConfig {
    /// A full pass starts this long after the previous one started (or
    /// right after it ends, when a pass takes longer).
    pub interval: Duration,
    /// Bytes per second read at most, so the scrubber never competes with
    /// clients for the disk.
    pub rate: u64,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        // HDFS scans every block once in three weeks; a daily pass at
        // 16 MiB/s (a few percent of a disk) finds rot sooner and still
        // covers about 1.3 TiB a day.
        ScrubConfig {
            interval: Duration::from_secs(24 * 3600),
            rate: 16 << 20,
        }
    }
}

/// Progress shared with heartbeats.
#[derive(Default)]
pub(crate) struct ScrubState {
    status: Mutex<ScrubStatus>,
}

impl ScrubState {
    pub fn status(&self) -> ScrubStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut ScrubStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Largest chunk a datanode accepts; checked before anything is allocated.
pub const MAX_CHUNK: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct DatanodeConfig {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    /// Address others use to reach this node; the listen address when unset
    /// (with 127.0.0.1 for an unspecified IP).
    pub advertise: Option<SocketAddr>,
    pub namenode: SocketAddr,
    pub heartbeat: Duration,
    /// How often the full chunk report is sent besides registration.
    pub report_interval: Duration,
    /// How long chunks moved to the trash are kept.
    pub trash_ttl: Duration,
    pub scrub: ScrubConfig,
    /// A training job neither stepped nor renewed for this long is freed
    /// (its coordinator is gone).
    pub job_lease: Duration,
    /// Most bytes of decoded records all training jobs together may hold;
    /// a TrainOpen beyond it is refused.
    pub job_memory: u64,
    /// Transport settings (piece idle deadline, hedging).
    pub tuning: Tuning,
    /// Chunks per page of a chunk report.
    pub report_page: usize,
    /// Where `/metrics` is served; `None`: not at all.
    pub http: Option<quern_web::HttpConfig>,
    /// Whether ring pieces between training workers on this host go
    /// through shared memory (offered and accepted) rather than the
    /// connection.
    pub ring_shared_memory: bool,
}

impl DatanodeConfig {
    pub fn new(dir: PathBuf, listen: SocketAddr, namenode: SocketAddr) -> DatanodeConfig {
        DatanodeConfig {
            dir,
            listen,
            advertise: None,
            namenode,
            heartbeat: Duration::from_secs(3),
            report_interval: Duration::from_secs(6 * 3600),
            trash_ttl: Duration::from_secs(24 * 3600),
            scrub: Default::default(),
            job_lease: Duration::from_secs(60),
            job_memory: crate::jobs::default_job_memory(),
            tuning: Tuning::tuned(),
            report_page: quern_proto::msg::REPORT_PAGE,
            http: None,
            ring_shared_memory: true,
        }
    }
}

pub(crate) struct Node {
    pub id: NodeId,
    pub addr: SocketAddr,
    pub cfg: DatanodeConfig,
    pub store: Arc<ChunkStore>,
    pub endpoint: Arc<Endpoint>,
    /// Map and gradient tasks running at once: one per core.
    pub task_slots: tokio::sync::Semaphore,
    pub jobs: Arc<crate::jobs::Jobs>,
    /// The namenode's token keys, as of its last reply.
    pub keys: std::sync::RwLock<KeyRing>,
    /// The cluster this node belongs to (kept in `DIR/cluster_id`).
    pub cluster_id: std::sync::Mutex<Option<String>>,
    pub scrub: ScrubState,
    /// Set when the disk ran out of space; cleared by a heartbeat that
    /// finds room again. A full node takes no new chunks.
    pub full: std::sync::atomic::AtomicBool,
    pub metrics: crate::metrics::DatanodeMetrics,
    /// This machine's sgemm rate, GFLOP/s, measured once at start.
    pub gflops: std::sync::OnceLock<f64>,
}

/// Space a full node must have free again before it takes chunks: a
/// default chunk, or a quarter of a small disk.
pub(crate) fn room_again(capacity: u64) -> u64 {
    (64u64 << 20).min(capacity / 4)
}

impl Node {
    pub(crate) fn is_full(&self) -> bool {
        self.full.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set_full(&self, full: bool) {
        let was = self.full.swap(full, std::sync::atomic::Ordering::Relaxed);
        if was != full {
            if full {
                tracing::warn!(
                    "{}: disk full; taking no new chunks until space returns",
                    self.describe()
                );
            } else {
                tracing::info!("{}: space is back; taking chunks again", self.describe());
            }
        }
    }

    pub(crate) fn namenode(&self) -> Peer {
        Peer::namenode(self.cfg.namenode)
    }

    /// Checks that `token` grants one of `wants` on `chunk`; returns the
    /// access it was accepted for.
    pub(crate) fn authorize(
        &self,
        token: Option<&ChunkToken>,
        chunk: ChunkId,
        wants: &[Access],
    ) -> Result<Access, WireError> {
        let ring = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let now = quern_proto::token::now_ms();
        let mut why = String::new();
        for want in wants {
            match ring.check(token, chunk, *want, now) {
                Ok(()) => return Ok(*want),
                // A token that claims this access failed for a reason of
                // its own (signature, expiry): that is the answer.
                Err(e) if token.is_some_and(|t| t.access.allows(*want)) => {
                    why = e;
                    break;
                }
                Err(e) => why = e,
            }
        }
        Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!("permission denied by {}: {why}", self.describe()),
        ))
    }

    pub(crate) fn describe(&self) -> String {
        format!("datanode {} ({})", self.id, self.addr)
    }

    pub(crate) fn store_error(&self, e: &StoreError) -> WireError {
        if e.is_disk_full() {
            self.set_full(true);
            WireError::new(
                ErrorCode::NoSpace,
                format!(
                    "{}: disk full ({e}); free space or add datanodes",
                    self.describe()
                ),
            )
        } else if let StoreError::Missing(_) = e {
            WireError::new(ErrorCode::NotFound, format!("{}: {e}", self.describe()))
        } else {
            WireError::new(ErrorCode::Io, format!("{}: {e}", self.describe()))
        }
    }

    /// Tells the namenode a replica arrived, so it is readable at once.
    pub fn announce(self: &Arc<Self>, chunk: StoredChunk) {
        let node = self.clone();
        tokio::spawn(async move {
            let req = ChunkReceived {
                node: node.id,
                chunk,
            };
            if let Err(e) = node.endpoint.call(node.namenode(), req).await {
                tracing::debug!("could not announce {}: {e}", chunk.id);
            }
        });
    }
}

/// Keeps the cluster id beside `node_id` at the first registration.
pub(crate) fn write_cluster_id(dir: &std::path::Path, id: &str) -> std::io::Result<()> {
    let path = dir.join("cluster_id");
    let tmp = dir.join("cluster_id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, &path)
}
