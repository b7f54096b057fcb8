//! Request handling: each namenode RPC mapped onto the namespace and the
//! cluster map.

use crate::cluster::{ChunkEntry, Cluster};
use crate::namespace::{Namespace, PendingFile, StoreError};
use quern_proto::msg::*;
use quern_proto::transport::{serve, Endpoint, ServerStream, Service, Tuning};
use quern_proto::{tls::Identity, ErrorCode, FileId, RemotePath, WireError};
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
    /// One namespace mutation at a time; readers do not take it.
    pub writer: tokio::sync::Mutex<()>,
    /// Chunks with a replication in flight, so it is not scheduled twice.
    pub replicating: Mutex<HashMap<quern_proto::ChunkId, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
        let (missing, total) = self.cluster().unreported();
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

    fn writable(&self) -> Res<()> {
        match self.safe_mode() {
            Some(why) => Err(WireError::new(
                ErrorCode::SafeMode,
                format!("{why}; retry then"),
            )),
            None => Ok(()),
        }
    }

    fn renew(&self, file: FileId) {
        lock(&self.leases).insert(file, Instant::now() + self.cfg.lease_timeout);
    }
}

fn parse(path: &str) -> Res<RemotePath> {
    RemotePath::parse(path)
}

pub struct Namenode {
    endpoint: Arc<Endpoint>,
    state: Arc<State>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Namenode {
    /// Opens the metadata store, rebuilds the chunk map and starts serving.
    pub async fn start(cfg: NamenodeConfig, identity: &Identity) -> Result<Namenode, StartError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| StartError::Dir(cfg.dir.clone(), e))?;
        let ns = Namespace::open(&cfg.dir)?;
        let mut cluster = Cluster::new(cfg.dead_timeout);
        for (chunk, target) in ns.all_chunks().map_err(StartError::Wire)? {
            cluster.chunks.insert(
                chunk.id,
                ChunkEntry::committed(chunk.size, chunk.digest, target),
            );
        }
        let mut leases = HashMap::new();
        for (id, p) in ns.all_pending().map_err(StartError::Wire)? {
            for c in &p.allocated {
                cluster
                    .chunks
                    .insert(*c, ChunkEntry::allocated(p.replication));
            }
            for c in p.chunks.values() {
                cluster
                    .chunks
                    .insert(c.id, ChunkEntry::committed(c.size, c.digest, p.replication));
            }
            leases.insert(id, Instant::now() + cfg.lease_timeout);
        }
        let chunk_count = cluster.chunks.len();
        let safe_since = (chunk_count > 0).then(Instant::now);
        let endpoint = Arc::new(
            Endpoint::server(identity, cfg.listen, Tuning::tuned()).map_err(StartError::Net)?,
        );
        let state = Arc::new(State {
            cfg,
            ns,
            cluster: Mutex::new(cluster),
            leases: Mutex::new(leases),
            safe_since: Mutex::new(safe_since),
            writer: tokio::sync::Mutex::new(()),
            replicating: Mutex::new(HashMap::new()),
        });
        let addr = endpoint.local_addr().map_err(StartError::Net)?;
        tracing::info!(%addr, chunks = chunk_count, safe_mode = safe_since.is_some(), "namenode listening");
        let service = Arc::new(NameService {
            state: state.clone(),
        });
        let tasks = vec![
            tokio::spawn(serve(endpoint.clone(), service)),
            tokio::spawn(crate::monitor::run(state.clone())),
        ];
        Ok(Namenode {
            endpoint,
            state,
            tasks,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or_else(|_| self.state.cfg.listen)
    }

    /// Stops serving and flushes the metadata store.
    pub async fn shutdown(self) {
        self.endpoint.close();
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.state.ns.flush().await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create namenode directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Wire(WireError),
    #[error("{0}")]
    Net(quern_proto::Error),
}

struct NameService {
    state: Arc<State>,
}

async fn respond<T: serde::Serialize>(mut stream: ServerStream, reply: Res<T>) {
    if let Err(e) = stream.reply(&reply).await {
        tracing::debug!(peer = %stream.peer, "could not send reply: {e}");
    }
}

impl Service for NameService {
    type Request = NameRequest;

    fn role(&self) -> &'static str {
        "namenode"
    }

    async fn handle(self: Arc<Self>, req: NameRequest, stream: ServerStream) {
        let s = &self.state;
        match req {
            NameRequest::Stat(r) => respond(stream, stat(s, &r.path)).await,
            NameRequest::List(r) => respond(stream, list(s, &r.path)).await,
            NameRequest::Mkdir(r) => respond(stream, mkdir(s, r).await).await,
            NameRequest::Delete(r) => respond(stream, delete(s, r).await).await,
            NameRequest::Rename(r) => respond(stream, rename(s, r).await).await,
            NameRequest::CreateFile(r) => respond(stream, create(s, r).await).await,
            NameRequest::AllocateChunk(r) => respond(stream, allocate(s, r).await).await,
            NameRequest::CommitChunk(r) => respond(stream, commit(s, r).await).await,
            NameRequest::Complete(r) => respond(stream, complete(s, r).await).await,
            NameRequest::Abandon(r) => respond(stream, abandon(s, r.file).await).await,
            NameRequest::RenewLease(r) => respond(stream, renew(s, r.file)).await,
            NameRequest::Locate(r) => respond(stream, locate(s, &r.path)).await,
            NameRequest::ReportBadReplica(r) => respond(stream, bad_replica(s, r)).await,
            NameRequest::SetReplication(r) => respond(stream, setrep(s, r).await).await,
            NameRequest::SetAttr(r) => respond(stream, setattr(s, r).await).await,
            NameRequest::Summary(r) => respond(stream, summary(s, &r.path)).await,
            NameRequest::Fsck(r) => respond(stream, crate::monitor::fsck(s, &r.path)).await,
            NameRequest::Report(_) => respond(stream, report(s)).await,
            NameRequest::Register(r) => respond(stream, register(s, r)).await,
            NameRequest::Heartbeat(r) => respond(stream, heartbeat(s, r)).await,
            NameRequest::ChunkReport(r) => {
                let cmds = s.cluster().full_report(r.node, &r.chunks);
                respond(stream, Ok(cmds)).await
            }
            NameRequest::ChunkReceived(r) => {
                s.cluster().chunk_received(r.node, r.chunk);
                respond(stream, Ok(())).await
            }
        }
    }
}

fn stat(s: &State, path: &str) -> Res<FileStatus> {
    let path = parse(path)?;
    Ok(s.ns.get(&path)?.inode.status(&path))
}

fn list(s: &State, path: &str) -> Res<Vec<FileStatus>> {
    let path = parse(path)?;
    let r = s.ns.get(&path)?;
    if r.inode.kind == FileKind::File {
        return Ok(vec![r.inode.status(&path)]);
    }
    let mut out = Vec::new();
    for (name, _, inode) in s.ns.list(r.id)? {
        out.push(inode.status(&path.join(&name)?));
    }
    Ok(out)
}

async fn mkdir(s: &State, r: Mkdir) -> Res<()> {
    let path = parse(&r.path)?;
    s.writable()?;
    {
        let _w = s.writer.lock().await;
        if path.is_root() {
            if r.parents {
                return Ok(());
            }
            return Err(WireError::new(
                ErrorCode::AlreadyExists,
                "/: already exists",
            ));
        }
        s.ns.mkdir(&path, r.parents, 0o755)?;
    }
    s.ns.flush().await
}

async fn delete(s: &State, r: Delete) -> Res<()> {
    let path = parse(&r.path)?;
    s.writable()?;
    let freed = {
        let _w = s.writer.lock().await;
        s.ns.delete(&path, r.recursive)?
    };
    s.ns.flush().await?;
    s.cluster().forget_chunks(freed.iter().map(|c| c.id));
    Ok(())
}

async fn rename(s: &State, r: Rename) -> Res<()> {
    let src = parse(&r.src)?;
    let dst = parse(&r.dst)?;
    s.writable()?;
    let freed = {
        let _w = s.writer.lock().await;
        s.ns.rename(&src, &dst, r.replace)?
    };
    s.ns.flush().await?;
    s.cluster().forget_chunks(freed.iter().map(|c| c.id));
    Ok(())
}

pub const MAX_CHUNK_SIZE: u64 = 1 << 30;
pub const MAX_REPLICATION: u8 = 16;

async fn create(s: &State, r: CreateFile) -> Res<FileId> {
    let path = parse(&r.path)?;
    if r.replication == 0 || r.replication > MAX_REPLICATION {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "replication {} is out of range 1..={MAX_REPLICATION}",
                r.replication
            ),
        ));
    }
    if r.chunk_size == 0 || r.chunk_size > MAX_CHUNK_SIZE {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!("chunk size {} is out of range 1 B..=1 GiB", r.chunk_size),
        ));
    }
    if path.is_root() {
        return Err(WireError::new(ErrorCode::IsADirectory, "/: is a directory"));
    }
    s.writable()?;
    let id = {
        let _w = s.writer.lock().await;
        s.ns.create(
            &path,
            PendingFile {
                path: path.to_string(),
                replication: r.replication,
                chunk_size: r.chunk_size,
                mode: r.mode,
                overwrite: r.overwrite,
                chunks: Default::default(),
                allocated: Vec::new(),
            },
        )?
    };
    s.renew(id);
    Ok(id)
}

async fn allocate(s: &State, r: AllocateChunk) -> Res<ChunkAllocation> {
    s.writable()?;
    let _w = s.writer.lock().await;
    let mut p = s.ns.pending(r.file)?;
    let chunk = s.ns.new_chunk_id()?;
    let targets = s
        .cluster()
        .choose_targets(p.replication as usize, &r.exclude, p.chunk_size);
    if targets.is_empty() {
        let live = s.cluster().live_count();
        return Err(WireError::new(
            ErrorCode::NoDatanodes,
            format!(
                "no datanode can take chunk {} of {}: {live} live datanodes{}; start datanodes \
                 or check `quern report`",
                r.index,
                p.path,
                if r.exclude.is_empty() {
                    String::new()
                } else {
                    format!(", {} failed already for this chunk", r.exclude.len())
                }
            ),
        ));
    }
    p.allocated.push(chunk);
    s.ns.put_pending(r.file, &p)?;
    s.cluster()
        .chunks
        .insert(chunk, ChunkEntry::allocated(p.replication));
    drop(_w);
    s.renew(r.file);
    Ok(ChunkAllocation { chunk, targets })
}

async fn commit(s: &State, r: CommitChunk) -> Res<()> {
    let _w = s.writer.lock().await;
    let mut p = s.ns.pending(r.file)?;
    if !p.allocated.contains(&r.meta.id) {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!("{} was not allocated to {}", r.meta.id, p.path),
        ));
    }
    if r.meta.size > p.chunk_size {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "{}: chunk {} is {} bytes, larger than the file's chunk size {}",
                p.path, r.index, r.meta.size, p.chunk_size
            ),
        ));
    }
    p.chunks.insert(r.index, r.meta);
    s.ns.put_pending(r.file, &p)?;
    drop(_w);
    {
        let mut c = s.cluster();
        let entry = c
            .chunks
            .entry(r.meta.id)
            .or_insert_with(|| ChunkEntry::allocated(p.replication));
        entry.size = Some(r.meta.size);
        entry.digest = Some(r.meta.digest);
        entry.replicas.extend(r.stored_on.iter().copied());
    }
    s.renew(r.file);
    Ok(())
}

async fn complete(s: &State, r: Complete) -> Res<FileStatus> {
    let (status, freed, unused) = {
        let _w = s.writer.lock().await;
        s.ns.complete(r.file)?
    };
    s.ns.flush().await?;
    lock(&s.leases).remove(&r.file);
    let mut c = s.cluster();
    c.forget_chunks(freed.iter().map(|m| m.id).chain(unused));
    Ok(status)
}

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

fn renew(s: &State, file: FileId) -> Res<()> {
    s.ns.pending(file)?;
    s.renew(file);
    Ok(())
}

fn locate(s: &State, path: &str) -> Res<FileLocations> {
    let path = parse(path)?;
    let r = s.ns.get(&path)?;
    if r.inode.kind == FileKind::Dir {
        return Err(WireError::new(
            ErrorCode::IsADirectory,
            format!("{path}: is a directory"),
        ));
    }
    let c = s.cluster();
    let mut offset = 0;
    let chunks = r
        .inode
        .chunks
        .iter()
        .enumerate()
        .map(|(i, meta)| {
            let lc = LocatedChunk {
                index: i as u32,
                offset,
                meta: *meta,
                replicas: c.replicas(meta.id, i),
            };
            offset += meta.size;
            lc
        })
        .collect();
    Ok(FileLocations {
        status: r.inode.status(&path),
        chunks,
    })
}

fn bad_replica(s: &State, r: ReportBadReplica) -> Res<()> {
    if s.cluster().mark_corrupt(r.chunk, r.node, r.reason.clone()) {
        tracing::warn!(chunk = %r.chunk, node = %r.node, reason = %r.reason, "corrupt replica reported");
    }
    Ok(())
}

async fn setrep(s: &State, r: SetReplication) -> Res<()> {
    let path = parse(&r.path)?;
    if r.replication == 0 || r.replication > MAX_REPLICATION {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "replication {} is out of range 1..={MAX_REPLICATION}",
                r.replication
            ),
        ));
    }
    s.writable()?;
    let mut changed = Vec::new();
    {
        let _w = s.writer.lock().await;
        let (files, _) = s.ns.walk(&path)?;
        for (fpath, _) in files {
            let id = s.ns.get(&fpath)?.id;
            let ino = s.ns.update_inode(id, |i| i.replication = r.replication)?;
            changed.extend(ino.chunks.iter().map(|c| c.id));
        }
    }
    s.ns.flush().await?;
    let mut c = s.cluster();
    for id in changed {
        if let Some(e) = c.chunks.get_mut(&id) {
            e.target = r.replication;
        }
    }
    Ok(())
}

async fn setattr(s: &State, r: SetAttr) -> Res<()> {
    let path = parse(&r.path)?;
    s.writable()?;
    {
        let _w = s.writer.lock().await;
        let id = s.ns.get(&path)?.id;
        s.ns.update_inode(id, |i| {
            if let Some(m) = r.mode {
                i.mode = m & 0o7777;
            }
            if let Some(t) = r.mtime_ms {
                i.mtime_ms = t;
            }
        })?;
    }
    s.ns.flush().await
}

fn summary(s: &State, path: &str) -> Res<ContentSummary> {
    let path = parse(path)?;
    let (files, dirs) = s.ns.walk(&path)?;
    let bytes = files.iter().map(|(_, i)| i.size).sum();
    let stored_bytes = files
        .iter()
        .map(|(_, i)| i.size * i.replication as u64)
        .sum();
    Ok(ContentSummary {
        files: files.len() as u64,
        dirs,
        bytes,
        stored_bytes,
    })
}

fn report(s: &State) -> Res<ClusterReport> {
    let safe_mode = s.safe_mode();
    Ok(ClusterReport {
        datanodes: s.cluster().report(),
        safe_mode,
    })
}

fn register(s: &State, r: Register) -> Res<Vec<DatanodeCommand>> {
    tracing::info!(node = %r.node.id, addr = %r.node.addr, chunks = r.chunks.len(), "datanode registered");
    Ok(s.cluster()
        .register(r.node, r.capacity, r.available, &r.chunks))
}

fn heartbeat(s: &State, r: Heartbeat) -> Res<Vec<DatanodeCommand>> {
    Ok(s.cluster()
        .heartbeat(r.node, r.capacity, r.available, r.used, r.chunks)
        .unwrap_or_else(|| vec![DatanodeCommand::Reregister]))
}
