//! Datanode requests: pipelined chunk writes, chunk reads, map tasks, ping.

pub use crate::node::DatanodeConfig;
use crate::node::{Node, MAX_CHUNK};
use crate::store::{ChunkInfo, ChunkStore, StoreError};
use crate::transfer::{disk_writer, read_pieces, PIECE};
use quern_proto::background::Background;
use quern_proto::msg::*;
use quern_proto::transport::{serve, Endpoint, RequestStream, ServerStream, Service};
use quern_proto::{tls::Identity, Access, ChunkToken, Digest, ErrorCode};
use quern_proto::{NodeId, Role, WireError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub struct Datanode {
    node: Arc<Node>,
    tasks: Background,
    http_addr: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("datanode directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Net(#[from] quern_proto::Error),
    #[error("{0}")]
    Identity(String),
    #[error(transparent)]
    Http(quern_web::HttpError),
}

impl Datanode {
    pub async fn start(cfg: DatanodeConfig, identity: &Identity) -> Result<Datanode, StartError> {
        let cert_id = match identity.principal().map(|p| p.role) {
            Ok(Role::Datanode(id)) => id,
            Ok(other) => {
                return Err(StartError::Identity(format!(
                    "a datanode needs a datanode certificate (with its node id); this one is \
                     {other}'s. `quern cluster up` issues one per datanode"
                )))
            }
            Err(e) => return Err(StartError::Identity(e.to_string())),
        };
        std::fs::create_dir_all(&cfg.dir).map_err(|e| StartError::Dir(cfg.dir.clone(), e))?;
        let id = node_id(&cfg.dir, cert_id)?;
        let cluster_id = read_cluster_id(&cfg.dir)?;
        let store = Arc::new(ChunkStore::open(&cfg.dir)?);
        let endpoint = Arc::new(Endpoint::server(identity, cfg.listen, cfg.tuning)?);
        let mut addr = cfg.advertise.unwrap_or(endpoint.local_addr()?);
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let jobs = Arc::new(crate::jobs::Jobs::new(cfg.job_lease, cfg.job_memory));
        let metrics = crate::metrics::DatanodeMetrics::new(endpoint.registry());
        let node = Arc::new(Node {
            id,
            addr,
            cfg,
            store,
            endpoint: endpoint.clone(),
            task_slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            jobs,
            keys: Default::default(),
            cluster_id: std::sync::Mutex::new(cluster_id),
            scrub: Default::default(),
            full: Default::default(),
            metrics,
            gflops: Default::default(),
        });
        crate::metrics::register_gauges(&node, endpoint.registry());
        tracing::info!(
            node = %id,
            %addr,
            chunks = node.store.list().len(),
            job_lease = ?node.cfg.job_lease,
            job_memory = node.cfg.job_memory,
            "datanode listening"
        );
        let mut tasks = Background::default();
        let service = Arc::new(DataService { node: node.clone() });
        let http_addr = match &node.cfg.http {
            Some(cfg) => {
                let http = quern_web::Http::bind(cfg).await.map_err(StartError::Http)?;
                let addr = http.addr();
                tasks.spawn(
                    "http",
                    http.serve(axum::Router::new(), endpoint.registry().clone()),
                );
                Some(addr)
            }
            None => None,
        };
        tasks.spawn("requests", serve(endpoint, service));
        tasks.spawn("heartbeat", crate::heartbeat::run(node.clone()));
        let timed = node.clone();
        tasks.spawn("speed", async move {
            // Some 20 ms of one core: the planner weighs nodes by it.
            if let Ok(g) = tokio::task::spawn_blocking(quern_compute::nn::quick_sgemm_gflops).await
            {
                tracing::info!(
                    gflops = format!("{g:.0}"),
                    "measured this machine's sgemm rate"
                );
                let _ = timed.gflops.set(g);
            }
        });
        tasks.spawn("scrubber", crate::scrub::run(node.clone()));
        tasks.spawn("job sweeper", crate::jobs::sweeper(node.jobs.clone()));
        Ok(Datanode {
            node,
            tasks,
            http_addr,
        })
    }

    pub fn id(&self) -> NodeId {
        self.node.id
    }

    pub fn addr(&self) -> SocketAddr {
        self.node.addr
    }

    /// Where `/metrics` answers, when it is served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn store(&self) -> &ChunkStore {
        &self.node.store
    }

    /// Whether the node has taken its registration's answer: until then it
    /// holds no token keys and refuses every chunk request, though the
    /// namenode already counts it live.
    pub fn has_token_keys(&self) -> bool {
        !self
            .node
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// The fault rules of this node's endpoint (for tests).
    pub fn faults(&self) -> &Arc<quern_proto::fault::Faults> {
        self.node.endpoint.faults()
    }

    /// Stops at once, as a crash would (no goodbye to the namenode).
    pub fn shutdown(self) {
        self.node.endpoint.close();
        self.tasks.stop();
    }

    /// The node's background tasks, by name.
    pub fn tasks(&self) -> &Background {
        &self.tasks
    }
}

/// The node id kept in `DIR/node_id`, which must be the one in the
/// certificate; a new directory takes the certificate's.
fn node_id(dir: &std::path::Path, cert_id: NodeId) -> Result<NodeId, StartError> {
    let path = dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = u64::from_str_radix(text.trim(), 16)
                .map(NodeId)
                .map_err(|_| {
                    StartError::Dir(
                        path.clone(),
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "node_id is not a hex number; restore it or remove the directory",
                        ),
                    )
                })?;
            if id != cert_id {
                return Err(StartError::Identity(format!(
                    "{} holds the chunks of {id}, but the certificate is {cert_id}'s; start it \
                     with its own certificate",
                    dir.display()
                )));
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, format!("{:016x}\n", cert_id.0))
                .map_err(|e| StartError::Dir(path.clone(), e))?;
            Ok(cert_id)
        }
        Err(e) => Err(StartError::Dir(path, e)),
    }
}

fn read_cluster_id(dir: &std::path::Path) -> Result<Option<String>, StartError> {
    let path = dir.join("cluster_id");
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(Some(t.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StartError::Dir(path, e)),
    }
}

struct DataService {
    node: Arc<Node>,
}

impl Service for DataService {
    type Request = DataRequest;

    fn role(&self) -> &'static str {
        "datanode"
    }

    async fn handle(self: Arc<Self>, req: DataRequest, mut stream: ServerStream) {
        let result = match req {
            DataRequest::WriteChunk(r) => {
                let reply = write_chunk(&self.node, r, &mut stream).await;
                stream.reply(&reply).await
            }
            DataRequest::ReadChunk(r) => read_chunk(&self.node, r, &mut stream).await,
            DataRequest::Ping(_) => stream.reply(&Ok(self.node.id)).await,
            DataRequest::RunTask(r) => {
                let caller = stream.caller.clone();
                let reply = crate::tasks::run_task(&self.node, &caller, r).await;
                stream.reply(&reply).await
            }
            DataRequest::TrainOpen(r) => {
                let caller = stream.caller.clone();
                let reply = crate::train::open(&self.node, &caller, r).await;
                stream.reply(&reply).await
            }
            DataRequest::TrainStep(r) => crate::train::step(&self.node, r, &mut stream).await,
            DataRequest::TrainRing(r) => {
                // The stream goes to this node's step of the same round.
                crate::train::ring_in(&self.node, r, stream).await;
                return;
            }
            DataRequest::TrainState(r) => {
                crate::train::state(&self.node, r, &mut stream).await;
                Ok(())
            }
            DataRequest::TrainClose(r) => {
                let reply = crate::train::close(&self.node, &stream.caller, r);
                stream.reply(&reply).await
            }
            DataRequest::TrainRenew(r) => {
                let reply = crate::train::renew(&self.node, &stream.caller, r);
                stream.reply(&Ok(reply)).await
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %stream.peer, "request ended early: {e}");
        }
    }
}

/// Receives a chunk, forwards it down the pipeline while writing it, checks
/// the digest, commits it, and gathers the downstream acknowledgement.
async fn write_chunk(
    node: &Arc<Node>,
    req: WriteChunk,
    stream: &mut ServerStream,
) -> Result<WriteAck, WireError> {
    let meta = req.meta;
    let access = node.authorize(
        req.token.as_ref(),
        meta.id,
        &[Access::WRITE, Access::REPLICATE],
    )?;
    // Only a re-replication the namenode ordered may replace a replica
    // (this node's copy was reported corrupt); a write never does.
    if access == Access::WRITE && node.store.get(meta.id).is_some() {
        return Err(WireError::new(
            ErrorCode::AlreadyExists,
            format!(
                "{}: {} is stored already; a write never replaces a committed chunk",
                node.describe(),
                meta.id
            ),
        ));
    }
    if meta.size > MAX_CHUNK {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "{}: {} of {} bytes exceeds the {MAX_CHUNK}-byte chunk limit",
                node.describe(),
                meta.id,
                meta.size
            ),
        ));
    }
    // A node that filled up is refused before a byte is received, so the
    // writer moves on at once (the namenode's view of its space lags by
    // up to a heartbeat).
    if node.is_full() {
        let (_, available) = node.store.capacity();
        return Err(WireError::new(
            ErrorCode::NoSpace,
            format!(
                "{}: disk full ({available} bytes free, {} needs {}); free space or add datanodes",
                node.describe(),
                meta.id,
                meta.size
            ),
        ));
    }
    let mut failed = Vec::new();
    let mut downstream: Option<(NodeAddr, RequestStream)> = None;
    if let Some(next) = req.pipeline.first() {
        match open_downstream(node, meta, &req.pipeline, req.token.clone()).await {
            Ok(s) => downstream = Some((*next, s)),
            Err(e) => failed.push((*next, e.to_string())),
        }
    }
    let part = node
        .store
        .create(meta.id)
        .map_err(|e| node.store_error(&e))?;
    let (to_disk, disk) = disk_writer(part);
    let mut left = meta.size;
    let mut receive_error = None;
    // QUIC hands over packet-sized pieces; gathering them into 1 MiB
    // blocks keeps hashing, forwarding and disk writes off the per-packet
    // path (one write syscall per block, not per 1.2 KB).
    let mut block = bytes::BytesMut::with_capacity(PIECE);
    while left > 0 {
        let want = (left as usize).min(PIECE - block.len());
        match stream.recv_piece(want).await {
            Ok(Some(c)) => {
                block.extend_from_slice(&c);
                left -= c.len() as u64;
            }
            Ok(None) => {
                receive_error = Some(format!(
                    "stream ended {left} bytes before the end of {}",
                    meta.id
                ));
                break;
            }
            Err(e) => {
                receive_error = Some(format!("receiving {}: {e}", meta.id));
                break;
            }
        };
        if block.len() < PIECE && left > 0 {
            continue;
        }
        let piece = std::mem::replace(&mut block, bytes::BytesMut::with_capacity(PIECE)).freeze();
        if let Some((next, ds)) = &mut downstream {
            if let Err(e) = ds.send_piece(piece.clone()).await {
                failed.push((*next, format!("forwarding failed: {e}")));
                downstream = None;
            }
        }
        if to_disk.send(piece).await.is_err() {
            break;
        }
    }
    drop(to_disk);
    let (part, digest) = match disk.await {
        Ok(Ok(p)) => p,
        Ok(Err((p, e))) => {
            p.discard();
            return Err(node.store_error(&e));
        }
        Err(e) => {
            return Err(WireError::new(
                ErrorCode::Internal,
                format!("{}: disk writer failed: {e}", node.describe()),
            ))
        }
    };
    if let Some(why) = receive_error {
        part.discard();
        return Err(WireError::new(
            ErrorCode::Io,
            format!("{}: {why}", node.describe()),
        ));
    }
    if digest != meta.digest {
        part.discard();
        return Err(WireError::new(
            ErrorCode::ChecksumMismatch,
            format!(
                "{}: {} arrived with digest {} but the writer declared {}; the data was damaged \
                 in transit, write it again",
                node.describe(),
                meta.id,
                digest,
                meta.digest
            ),
        ));
    }
    let store = node.store.clone();
    let info = ChunkInfo {
        size: meta.size,
        digest,
    };
    tokio::task::spawn_blocking(move || store.commit(part, info))
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| node.store_error(&e))?;
    node.announce(StoredChunk {
        id: meta.id,
        size: meta.size,
        digest,
    });
    node.metrics.written_bytes.inc_by(meta.size);
    let mut stored_on = vec![node.id];
    if let Some((next, mut ds)) = downstream {
        let ack = async {
            ds.finish()?;
            ds.reply::<WriteAck>().await
        };
        match ack.await {
            Ok(a) => {
                stored_on.extend(a.stored_on);
                failed.extend(a.failed);
            }
            Err(e) => failed.push((next, e.to_string())),
        }
    }
    Ok(WriteAck { stored_on, failed })
}

async fn open_downstream(
    node: &Node,
    meta: ChunkMeta,
    pipeline: &[NodeAddr],
    token: Option<ChunkToken>,
) -> Result<RequestStream, quern_proto::Error> {
    node.endpoint
        .request(
            pipeline[0],
            WriteChunk {
                meta,
                pipeline: pipeline[1..].to_vec(),
                token,
            },
        )
        .await
}

/// Streams a chunk (or a range of it) back. A whole-chunk read is hashed as
/// it goes; a mismatch is reported to the namenode as a corrupt replica.
async fn read_chunk(
    node: &Arc<Node>,
    req: ReadChunk,
    stream: &mut ServerStream,
) -> Result<(), quern_proto::Error> {
    if let Err(e) = node.authorize(req.token.as_ref(), req.chunk, &[Access::READ]) {
        return stream.reply::<ReadHeader>(&Err(e)).await;
    }
    let Some(info) = node.store.get(req.chunk) else {
        let err = node.store_error(&StoreError::Missing(req.chunk));
        return stream.reply::<ReadHeader>(&Err(err)).await;
    };
    if req.offset > info.size {
        let err = WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "offset {} is past the end of {} ({} bytes)",
                req.offset, req.chunk, info.size
            ),
        );
        return stream.reply::<ReadHeader>(&Err(err)).await;
    }
    let len = req.len.unwrap_or(u64::MAX).min(info.size - req.offset);
    let (mut pieces, info) = match read_pieces(node.store.clone(), req.chunk, req.offset, len) {
        Ok(p) => p,
        Err(e) => return stream.reply::<ReadHeader>(&Err(node.store_error(&e))).await,
    };
    stream
        .reply_header(&Ok(ReadHeader {
            chunk_size: info.size,
            digest: info.digest,
            len,
        }))
        .await?;
    let whole = req.offset == 0 && len == info.size;
    let mut hasher = whole.then(blake3::Hasher::new);
    while let Some(piece) = pieces.recv().await {
        let piece = match piece {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("{}: {e}", node.describe());
                stream.reset();
                return Ok(());
            }
        };
        if let Some(h) = hasher.as_mut() {
            h.update(&piece);
        }
        let n = piece.len() as u64;
        stream.send_piece(piece).await?;
        node.metrics.read_bytes.inc_by(n);
    }
    stream.finish();
    if let Some(h) = hasher {
        if Digest::from(h.finalize()) != info.digest {
            tracing::warn!(chunk = %req.chunk, "local replica fails its digest check");
            let node = node.clone();
            let chunk = req.chunk;
            tokio::spawn(async move {
                let report = ReportBadReplica {
                    chunk,
                    node: node.id,
                    reason: "digest mismatch found by the datanode while serving a read".into(),
                    token: None,
                };
                let _ = node.endpoint.call(node.namenode(), report).await;
            });
        }
    }
    Ok(())
}
