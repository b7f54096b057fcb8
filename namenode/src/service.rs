//! Request handling: each namenode RPC mapped onto the namespace and the
//! cluster map.

use crate::cluster::Cluster;
use crate::keys::Authority;
use crate::namespace::{Inode, Namespace, PendingFile, Resolved, StoreError};
use crate::perm::{check_datanode, denied, User, R, W, X};
pub use crate::state::NamenodeConfig;
use crate::state::{abandon, lock, State, WaitingCompletion};
use quern_proto::background::Background;
use quern_proto::msg::*;
use quern_proto::report::{PackedChunks, ReportedChunk};
use quern_proto::transport::{serve, Endpoint, Peer, ServerStream, Service, Tuning};
use quern_proto::WireError;
use quern_proto::{tls::Identity, Access, ErrorCode, FileId, NodeId, Principal, RemotePath, Role};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Res<T> = Result<T, WireError>;

fn parse(path: &str) -> Res<RemotePath> {
    RemotePath::parse(path)
}

pub struct Namenode {
    endpoint: Arc<Endpoint>,
    pub(crate) state: Arc<State>,
    tasks: Background,
    http_addr: Option<SocketAddr>,
    lifeline: crate::lifeline::Lifeline,
}

impl Namenode {
    /// Writes a new cluster id and an empty namespace into `dir` (created
    /// if missing); refuses a directory that holds one already.
    pub fn format(dir: &std::path::Path) -> Result<String, StartError> {
        std::fs::create_dir_all(dir).map_err(|e| StartError::Dir(dir.to_path_buf(), e))?;
        Ok(Namespace::format(dir)?)
    }

    /// Opens the metadata store, rebuilds the chunk map and starts serving.
    /// A directory that was never formatted is refused, never initialised.
    pub async fn start(cfg: NamenodeConfig, identity: &Identity) -> Result<Namenode, StartError> {
        match identity.principal().map(|p| p.role) {
            Ok(Role::Namenode) => {}
            Ok(other) => {
                return Err(StartError::Identity(format!(
                    "the namenode needs the namenode certificate; this one is {other}'s"
                )))
            }
            Err(e) => return Err(StartError::Identity(e.to_string())),
        }
        let ns = Namespace::open(&cfg.dir)?;
        let tokens =
            Authority::load(&ns, cfg.token_lifetime, cfg.key_rotation).map_err(StartError::Wire)?;
        // Chunks of completed files are loaded after the endpoint is up
        // (`load_chunks`); files being written are few and loaded now.
        let mut cluster = Cluster::new(cfg.dead_timeout);
        cluster.queueing = false;
        let jobs = crate::jobs::Jobs::open(&ns, cfg.job_history)?;
        let mut leases = HashMap::new();
        for (id, p) in ns.all_pending().map_err(StartError::Wire)? {
            for c in &p.allocated {
                cluster.allocate(*c, p.replication);
            }
            for c in p.chunks.values() {
                cluster.commit(c.id, c.size, c.digest, p.replication, &[]);
            }
            leases.insert(id, Instant::now() + cfg.lease_timeout);
        }
        let endpoint = Arc::new(
            Endpoint::server(identity, cfg.listen, Tuning::tuned()).map_err(StartError::Net)?,
        );
        let report_turns =
            crate::report_turns::ReportTurns::new(cfg.report_leases, crate::state::REPORT_LEASE);
        let state = Arc::new(State {
            cfg,
            ns,
            census: cluster.census(),
            cluster: parking_lot::Mutex::new(cluster),
            reporting: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            report_turns,
            leases: Mutex::new(leases),
            safe: Mutex::new(crate::state::SafeMode {
                since: Some(Instant::now()),
                manual: false,
            }),
            loaded: tokio::sync::watch::channel(false).0,
            writer: tokio::sync::Mutex::new(()),
            completing: Mutex::new(Vec::new()),
            tokens,
            endpoint: endpoint.clone(),
            reports: Mutex::new(HashMap::new()),
            jobs,
            lifeline: std::sync::OnceLock::new(),
            late_beats: Mutex::new(Vec::new()),
        });
        let addr = endpoint.local_addr().map_err(StartError::Net)?;
        let lifeline_at = state
            .cfg
            .lifeline
            .unwrap_or_else(|| SocketAddr::new(addr.ip(), 0));
        let lifeline =
            crate::lifeline::Lifeline::start(state.clone(), identity, lifeline_at, &endpoint)?;
        let _ = state.lifeline.set(lifeline.port()?);
        tracing::info!(%addr, cluster = %state.ns.cluster_id, "namenode listening; loading the chunk map");
        let service = Arc::new(NameService {
            state: state.clone(),
        });
        let mut tasks = Background::default();
        // A one-off task, not a background duty that must run forever.
        let loader = state.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let state = loader.clone();
            match tokio::task::spawn_blocking(move || load_chunks(&state)).await {
                Ok(Ok(chunks)) => {
                    tracing::info!(
                        chunks,
                        secs = started.elapsed().as_secs_f64(),
                        "chunk map loaded; safe mode until datanodes report"
                    );
                    loader.loaded.send_replace(true);
                }
                Ok(Err(e)) => {
                    tracing::error!("cannot load the chunk map, staying in safe mode: {e}")
                }
                Err(e) => tracing::error!("loading the chunk map stopped: {e}"),
            }
        });
        tasks.spawn("requests", serve(endpoint.clone(), service));
        tasks.spawn("monitor", crate::monitor::run(state.clone()));
        crate::metrics::register(&state, endpoint.registry());
        let http_addr = match &state.cfg.http {
            Some(cfg) => {
                let http = quern_web::Http::bind(cfg).await.map_err(StartError::Http)?;
                let addr = http.addr();
                tracing::info!(url = %format!("http://{addr}/"), "web UI and metrics");
                tasks.spawn(
                    "http",
                    http.serve(
                        crate::ui::router(state.clone()),
                        endpoint.registry().clone(),
                    ),
                );
                Some(addr)
            }
            None => None,
        };
        Ok(Namenode {
            endpoint,
            state,
            tasks,
            http_addr,
            lifeline,
        })
    }

    /// The fault rules of the namenode's endpoint (for tests).
    pub fn faults(&self) -> &Arc<quern_proto::fault::Faults> {
        self.endpoint.faults()
    }

    /// The fault rules of the lifeline endpoint, where heartbeats are
    /// served (for tests).
    pub fn lifeline_faults(&self) -> &Arc<quern_proto::fault::Faults> {
        self.lifeline.faults()
    }

    /// Where heartbeats are served.
    pub fn lifeline_addr(&self) -> SocketAddr {
        SocketAddr::new(
            self.addr().ip(),
            self.state.lifeline.get().copied().unwrap_or(0),
        )
    }

    pub fn cluster_id(&self) -> &str {
        &self.state.ns.cluster_id
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or_else(|_| self.state.cfg.listen)
    }

    /// Where the web UI and `/metrics` answer, when they are served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Stops serving and flushes the metadata store.
    pub async fn shutdown(self) {
        self.endpoint.close();
        drop(self.lifeline);
        self.tasks.stop();
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
    #[error("{0}")]
    Identity(String),
    #[error(transparent)]
    Http(quern_web::HttpError),
}

struct NameService {
    state: Arc<State>,
}

pub(crate) async fn respond<T: serde::Serialize>(mut stream: ServerStream, reply: Res<T>) {
    if let Err(e) = stream.reply(&reply).await {
        tracing::debug!(peer = %stream.peer, "could not send reply: {e}");
    }
}

/// Every completed file's chunks into the chunk map, a few files per lock,
/// while requests are already served (reports wait for it).
fn load_chunks(s: &State) -> Res<usize> {
    let mut batch: Vec<(ChunkMeta, u8)> = Vec::new();
    let flush = |batch: &mut Vec<(ChunkMeta, u8)>| {
        let mut c = s.cluster();
        for (m, target) in batch.drain(..) {
            c.commit(m.id, m.size, m.digest, target, &[]);
        }
    };
    s.ns.each_file_chunks(|chunks, target| {
        batch.extend(chunks.iter().map(|m| (*m, target)));
        if batch.len() >= 8192 {
            flush(&mut batch);
        }
    })?;
    flush(&mut batch);
    let mut c = s.cluster();
    let n = c.chunk_count();
    // Nothing to wait for reports of: changes queue from the start.
    if n == 0 {
        c.queueing = true;
    }
    Ok(n)
}

impl Service for NameService {
    type Request = NameRequest;

    fn role(&self) -> &'static str {
        "namenode"
    }

    async fn handle(self: Arc<Self>, req: NameRequest, stream: ServerStream) {
        let s = &self.state;
        let caller = stream.caller.clone();
        let c = caller.as_ref();
        match req {
            NameRequest::Register(r) => {
                s.wait_loaded().await;
                respond(stream, register(s.clone(), c, r).await).await
            }
            NameRequest::Heartbeat(r) => respond(stream, heartbeat(s.clone(), c, r).await).await,
            NameRequest::ReportTurn(r) => {
                s.wait_loaded().await;
                respond(stream, report_turn(s, c, r).await).await
            }
            NameRequest::ChunkReport(r) => {
                s.wait_loaded().await;
                respond(stream, chunk_report(s.clone(), c, r).await).await
            }
            NameRequest::ChunkReceived(r) => {
                s.wait_loaded().await;
                let reply = check_datanode(c, r.node, "ChunkReceived").map(|()| {
                    s.cluster().chunk_received(r.node, r.chunk);
                });
                respond(stream, reply).await
            }
            NameRequest::ReportBadReplica(r) => {
                s.wait_loaded().await;
                respond(stream, bad_replica(s, c, r)).await
            }
            other => {
                let user = match User::of(c, request_name(&other)) {
                    Ok(u) => u,
                    Err(e) => return respond::<()>(stream, Err(e)).await,
                };
                let u = &user;
                match other {
                    NameRequest::Stat(r) => respond(stream, stat(s, u, &r.path)).await,
                    NameRequest::List(r) => respond(stream, list(s, u, r)).await,
                    NameRequest::Mkdir(r) => respond(stream, mkdir(s, u, r).await).await,
                    NameRequest::Delete(r) => respond(stream, delete(s, u, r).await).await,
                    NameRequest::Rename(r) => respond(stream, rename(s, u, r).await).await,
                    NameRequest::CreateFile(r) => respond(stream, create(s, u, r).await).await,
                    NameRequest::AllocateChunk(r) => respond(stream, allocate(s, u, r).await).await,
                    NameRequest::CommitChunk(r) => respond(stream, commit(s, u, r).await).await,
                    NameRequest::AddTargets(r) => respond(stream, add_targets(s, u, r).await).await,
                    NameRequest::Complete(r) => respond(stream, complete(s, u, r).await).await,
                    NameRequest::Abandon(r) => {
                        let reply = match s.pending(u, r.file) {
                            Ok(_) => abandon(s, r.file).await,
                            Err(e) => Err(e),
                        };
                        respond(stream, reply).await
                    }
                    NameRequest::RenewLease(r) => respond(stream, renew(s, u, r.file)).await,
                    NameRequest::Locate(r) => respond(stream, locate(s, u, r)).await,
                    NameRequest::SetReplication(r) => respond(stream, setrep(s, u, r).await).await,
                    NameRequest::SetAttr(r) => respond(stream, setattr(s, u, r).await).await,
                    NameRequest::Summary(r) => respond(stream, summary(s, u, &r.path)).await,
                    NameRequest::Fsck(r) => {
                        let reply = match readable_tree(s, u, &r.path) {
                            // A whole tree's chunks: off the async workers.
                            Ok(()) => {
                                let st = s.clone();
                                tokio::task::spawn_blocking(move || crate::monitor::fsck(&st, r))
                                    .await
                                    .unwrap_or_else(|e| {
                                        Err(WireError::new(
                                            ErrorCode::Internal,
                                            format!("fsck failed: {e}"),
                                        ))
                                    })
                            }
                            Err(e) => Err(e),
                        };
                        respond(stream, reply).await
                    }
                    NameRequest::Report(_) => respond(stream, report(s)).await,
                    NameRequest::SafeMode(r) => respond(stream, safe_mode(s, u, r)).await,
                    NameRequest::JobStart(r) => respond(stream, s.jobs.start(u, r)).await,
                    NameRequest::JobPost(r) => {
                        let reply = s.jobs.post(u, r.job, r.note);
                        if let Ok(true) = reply {
                            // A finished job's record survives a crash.
                            let _ = s.ns.flush().await;
                        }
                        respond(stream, reply.map(|_| ())).await
                    }
                    NameRequest::Register(_)
                    | NameRequest::Heartbeat(_)
                    | NameRequest::ChunkReport(_)
                    | NameRequest::ReportTurn(_)
                    | NameRequest::ChunkReceived(_)
                    | NameRequest::ReportBadReplica(_) => {}
                }
            }
        }
    }
}

pub(crate) fn request_name(r: &NameRequest) -> &'static str {
    match r {
        NameRequest::Stat(_) => "stat",
        NameRequest::List(_) => "list",
        NameRequest::Mkdir(_) => "mkdir",
        NameRequest::Delete(_) => "delete",
        NameRequest::Rename(_) => "rename",
        NameRequest::CreateFile(_) => "create",
        NameRequest::AllocateChunk(_) => "allocate",
        NameRequest::CommitChunk(_) => "commit",
        NameRequest::Complete(_) => "complete",
        NameRequest::Abandon(_) => "abandon",
        NameRequest::RenewLease(_) => "renew lease",
        NameRequest::Locate(_) => "locate",
        NameRequest::ReportBadReplica(_) => "bad replica report",
        NameRequest::SetReplication(_) => "setrep",
        NameRequest::SetAttr(_) => "setattr",
        NameRequest::Summary(_) => "du",
        NameRequest::Fsck(_) => "fsck",
        NameRequest::Report(_) => "report",
        NameRequest::Register(_) => "register",
        NameRequest::Heartbeat(_) => "heartbeat",
        NameRequest::ChunkReport(_) => "chunk report",
        NameRequest::ChunkReceived(_) => "chunk received",
        NameRequest::AddTargets(_) => "add targets",
        NameRequest::JobStart(_) => "job start",
        NameRequest::JobPost(_) => "job post",
        NameRequest::SafeMode(_) => "safemode",
        NameRequest::ReportTurn(_) => "report turn",
    }
}

/// fsck and du show what is below a path: the caller must be able to
/// list it (r+x), as HDFS asks of `du`.
fn readable_tree(s: &State, user: &User, path: &str) -> Res<()> {
    let path = parse(path)?;
    let r = s.get(user, &path, 0)?;
    if r.inode.kind == FileKind::Dir {
        user.check(&path.to_string(), &r.inode, R | X)?;
    }
    Ok(())
}

pub(crate) fn stat(s: &State, u: &User, path: &str) -> Res<FileStatus> {
    let path = parse(path)?;
    Ok(s.get(u, &path, 0)?.inode.status(&path))
}

pub(crate) fn list(s: &State, u: &User, r: List) -> Res<Listing> {
    let path = parse(&r.path)?;
    let found = s.get(u, &path, 0)?;
    if found.inode.kind == FileKind::File {
        let entries = match r.start_after {
            None => vec![found.inode.status(&path)],
            Some(_) => Vec::new(),
        };
        return Ok(Listing {
            entries,
            more: false,
        });
    }
    u.check(&path.to_string(), &found.inode, R | X)?;
    let limit = r.limit.clamp(1, LIST_PAGE) as usize;
    let (page, more) = s.ns.list_page(found.id, r.start_after.as_deref(), limit)?;
    let mut entries = Vec::with_capacity(page.len());
    for (name, _, inode) in page {
        entries.push(inode.status(&path.join(&name)?));
    }
    Ok(Listing { entries, more })
}

async fn mkdir(s: &State, u: &User, r: Mkdir) -> Res<()> {
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
        if !u.superuser {
            // w+x on the deepest directory that exists (the one that gains
            // an entry); -p creates the rest below it as this user.
            // With -p, an existing directory needs no change at all.
            let mut deepest = path.clone();
            if r.parents {
                if let Ok(Some(found)) = s.resolve(u, &path, 0) {
                    if found.inode.kind == FileKind::Dir {
                        return Ok(());
                    }
                }
            }
            while let Some(parent) = deepest.parent() {
                match s.resolve(u, &parent, 0) {
                    Ok(Some(found)) => {
                        if found.inode.kind == FileKind::Dir {
                            u.check(&parent.to_string(), &found.inode, W | X)?;
                        }
                        break;
                    }
                    // With -p a missing parent is made too: look higher.
                    Ok(None) if r.parents => deepest = parent,
                    Err(e) if r.parents && e.code == ErrorCode::NotFound => deepest = parent,
                    Ok(None) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        s.ns.mkdir(&path, r.parents, 0o755, &u.name)?;
    }
    s.ns.flush().await
}

/// What removing the entry at `path` needs: w+x on its directory, the
/// sticky rule, and for a directory tree w+x on every non-empty directory
/// in it (HDFS asks the same).
fn check_removable(s: &State, u: &User, path: &RemotePath) -> Res<()> {
    if u.superuser {
        return Ok(());
    }
    let parent = s.parent_for_change(u, path)?;
    let target = s.get(u, path, 0)?;
    u.check_sticky(&parent.inode, &path.to_string(), &target.inode)?;
    if target.inode.kind == FileKind::Dir {
        let mut stack = vec![(path.clone(), target)];
        while let Some((p, dir)) = stack.pop() {
            let children = s.ns.list(dir.id)?;
            if !children.is_empty() {
                u.check(&p.to_string(), &dir.inode, W | X)?;
            }
            for (name, id, inode) in children {
                if inode.kind == FileKind::Dir {
                    stack.push((p.join(&name)?, Resolved { id, inode }));
                }
            }
        }
    }
    Ok(())
}

async fn delete(s: &State, u: &User, r: Delete) -> Res<()> {
    let path = parse(&r.path)?;
    s.writable()?;
    let freed = {
        let _w = s.writer.lock().await;
        if !path.is_root() {
            check_removable(s, u, &path)?;
        }
        s.ns.delete(&path, r.recursive)?
    };
    s.ns.flush().await?;
    s.cluster().forget_chunks(freed.iter().map(|c| c.id));
    Ok(())
}

async fn rename(s: &State, u: &User, r: Rename) -> Res<()> {
    let src = parse(&r.src)?;
    let dst = parse(&r.dst)?;
    s.writable()?;
    let freed = {
        let _w = s.writer.lock().await;
        if !u.superuser && !src.is_root() && !dst.is_root() {
            let from = s.parent_for_change(u, &src)?;
            let moved = s.get(u, &src, 0)?;
            u.check_sticky(&from.inode, &src.to_string(), &moved.inode)?;
            let to = s.parent_for_change(u, &dst)?;
            if let Some(existing) = s.resolve(u, &dst, 0)? {
                u.check_sticky(&to.inode, &dst.to_string(), &existing.inode)?;
            }
        }
        s.ns.rename(&src, &dst, r.replace)?
    };
    s.ns.flush().await?;
    s.cluster().forget_chunks(freed.iter().map(|c| c.id));
    Ok(())
}

pub const MAX_CHUNK_SIZE: u64 = 1 << 30;
pub const MAX_REPLICATION: u8 = 16;

async fn create(s: &State, u: &User, r: CreateFile) -> Res<FileId> {
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
        let dir = s.parent_for_change(u, &path)?;
        if r.overwrite && !u.superuser {
            if let Some(existing) = s.ns.lookup(&path)? {
                if existing.inode.kind == FileKind::File {
                    u.check(&path.to_string(), &existing.inode, W)?;
                    u.check_sticky(&dir.inode, &path.to_string(), &existing.inode)?;
                }
            }
        }
        s.ns.create(
            &path,
            &dir,
            PendingFile {
                path: path.to_string(),
                replication: r.replication,
                chunk_size: r.chunk_size,
                mode: r.mode & 0o7777,
                overwrite: r.overwrite,
                owner: u.name.clone(),
                group: dir.inode.group.clone(),
                chunks: Default::default(),
                allocated: Vec::new(),
            },
        )?
    };
    s.renew(id);
    Ok(id)
}

async fn allocate(s: &State, u: &User, r: AllocateChunk) -> Res<ChunkAllocation> {
    s.writable()?;
    let _w = s.writer.lock().await;
    let p = s.pending(u, r.file)?;
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
    s.ns.add_allocated(r.file, chunk)?;
    s.cluster().allocate(chunk, p.replication);
    drop(_w);
    s.renew(r.file);
    let token = s.tokens.sign(chunk, Access::WRITE, &u.name);
    Ok(ChunkAllocation {
        chunk,
        targets,
        token,
    })
}

async fn add_targets(s: &State, u: &User, r: AddTargets) -> Res<ChunkAllocation> {
    s.writable()?;
    let p = {
        let _w = s.writer.lock().await;
        s.pending(u, r.file)?
    };
    if !s.ns.is_allocated(r.file, &p, r.chunk)? {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!("{} was not allocated to {}", r.chunk, p.path),
        ));
    }
    let count = (r.count as usize).min(p.replication as usize);
    let targets = s.cluster().choose_targets(count, &r.exclude, p.chunk_size);
    if targets.is_empty() {
        return Err(WireError::new(
            ErrorCode::NoDatanodes,
            format!(
                "no other datanode can take {} of {} ({} excluded); it stays under-replicated \
                 until the replication monitor copies it",
                r.chunk,
                p.path,
                r.exclude.len()
            ),
        ));
    }
    s.renew(r.file);
    let token = s.tokens.sign(r.chunk, Access::WRITE, &u.name);
    Ok(ChunkAllocation {
        chunk: r.chunk,
        targets,
        token,
    })
}

async fn commit(s: &State, u: &User, r: CommitChunk) -> Res<()> {
    let _w = s.writer.lock().await;
    let p = s.pending(u, r.file)?;
    if !s.ns.is_allocated(r.file, &p, r.meta.id)? {
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
    s.ns.commit_part(r.file, r.index, &r.meta)?;
    drop(_w);
    s.cluster().commit(
        r.meta.id,
        r.meta.size,
        r.meta.digest,
        p.replication,
        &r.stored_on,
    );
    s.renew(r.file);
    Ok(())
}

async fn complete(s: &State, u: &User, r: Complete) -> Res<FileStatus> {
    s.pending(u, r.file)?;
    let (done, finished) = tokio::sync::oneshot::channel();
    lock(&s.completing).push(WaitingCompletion { file: r.file, done });
    {
        // Completions queue up while another holds the writer; the next
        // holder completes them all at once, this one among them unless an
        // earlier holder already did.
        let _w = s.writer.lock().await;
        let batch = std::mem::take(&mut *lock(&s.completing));
        if !batch.is_empty() {
            let files: Vec<FileId> = batch.iter().map(|w| w.file).collect();
            for (w, result) in batch.into_iter().zip(s.ns.complete_many(&files)) {
                let _ = w.done.send(result);
            }
        }
    }
    let (status, freed, unused) = finished.await.map_err(|_| {
        WireError::new(
            ErrorCode::Internal,
            format!("completing {}: the namenode dropped the request", r.file),
        )
    })??;
    s.ns.flush().await?;
    lock(&s.leases).remove(&r.file);
    let mut c = s.cluster();
    c.forget_chunks(freed.iter().map(|m| m.id).chain(unused));
    Ok(status)
}

fn renew(s: &State, u: &User, file: FileId) -> Res<()> {
    s.pending(u, file)?;
    s.renew(file);
    Ok(())
}

pub(crate) fn locate(s: &State, u: &User, r: Locate) -> Res<FileLocations> {
    let (first, limit) = (r.first_chunk as usize, r.limit.clamp(1, LIST_PAGE) as usize);
    let path = parse(&r.path)?;
    let found = s.get(u, &path, 0)?;
    if found.inode.kind == FileKind::Dir {
        return Err(WireError::new(
            ErrorCode::IsADirectory,
            format!("{path}: is a directory"),
        ));
    }
    u.check(&path.to_string(), &found.inode, R)?;
    let access = Access::READ.union(Access::TASK);
    let all = &s.ns.file_chunks(found.id)?;
    let page = first.min(all.len())..(first.saturating_add(limit)).min(all.len());
    let tokens: Vec<_> = all[page.clone()]
        .iter()
        .map(|m| s.tokens.sign(m.id, access, &u.name))
        .collect();
    let c = s.cluster();
    let mut offset: u64 = all[..page.start].iter().map(|m| m.size).sum();
    let chunks = all[page.clone()]
        .iter()
        .enumerate()
        .map(|(i, m)| (i + page.start, m))
        .zip(tokens)
        .map(|((i, meta), token)| {
            let lc = LocatedChunk {
                index: i as u32,
                offset,
                meta: *meta,
                replicas: c.replicas(meta.id, i),
                token,
            };
            offset += meta.size;
            lc
        })
        .collect();
    Ok(FileLocations {
        status: found.inode.status(&path),
        chunks,
        more: page.end < all.len(),
    })
}

fn bad_replica(s: &State, caller: &Principal, r: ReportBadReplica) -> Res<()> {
    match &caller.role {
        Role::Datanode(id) if *id == r.node => {}
        Role::Datanode(id) => {
            return Err(denied(format!(
                "permission denied: datanode {id} may report only its own replicas, not {}'s",
                r.node
            )))
        }
        // A client proves it read the chunk: no marking replicas it never saw.
        Role::Admin(_) | Role::User(_) => s
            .tokens
            .verify(r.token.as_ref(), r.chunk, Access::READ)
            .map_err(|why| denied(format!("permission denied: bad replica report: {why}")))?,
        Role::Namenode => {
            return Err(denied(
                "permission denied: the namenode reports no replicas".into(),
            ))
        }
    }
    if s.cluster().mark_corrupt(r.chunk, r.node, r.reason.clone()) {
        tracing::warn!(chunk = %r.chunk, node = %r.node, reason = %r.reason, "corrupt replica reported");
    }
    Ok(())
}

async fn setrep(s: &State, u: &User, r: SetReplication) -> Res<()> {
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
        s.get(u, &path, 0)?;
        let (files, _) = s.ns.walk(&path)?;
        for (fpath, _, inode) in &files {
            u.check(&fpath.to_string(), inode, W)?;
        }
        for (_, id, _) in files {
            s.ns.update_inode(id, |i| i.replication = r.replication)?;
            changed.extend(s.ns.file_chunks(id)?.iter().map(|c| c.id));
        }
    }
    s.ns.flush().await?;
    let mut c = s.cluster();
    for id in changed {
        c.set_target(id, r.replication);
    }
    Ok(())
}

async fn setattr(s: &State, u: &User, r: SetAttr) -> Res<()> {
    let path = parse(&r.path)?;
    s.writable()?;
    if let Some(owner) = &r.owner {
        quern_proto::identity::valid_name(owner)
            .map_err(|e| WireError::new(ErrorCode::InvalidArgument, e.to_string()))?;
    }
    if let Some(group) = &r.group {
        quern_proto::identity::valid_name(group)
            .map_err(|e| WireError::new(ErrorCode::InvalidArgument, e.to_string()))?;
    }
    {
        let _w = s.writer.lock().await;
        let found = s.get(u, &path, 0)?;
        check_setattr(u, &path, &found.inode, &r)?;
        s.ns.update_inode(found.id, |i| {
            if let Some(m) = r.mode {
                i.mode = m & 0o7777;
            }
            if let Some(t) = r.mtime_ms {
                i.mtime_ms = t;
            }
            if let Some(o) = &r.owner {
                i.owner = o.clone();
            }
            if let Some(g) = &r.group {
                i.group = g.clone();
            }
        })?;
    }
    s.ns.flush().await
}

/// HDFS's rules: chmod by the owner; chown only by the superuser; chgrp by
/// the owner to one of their groups; times by the owner or a writer.
fn check_setattr(u: &User, path: &RemotePath, inode: &Inode, r: &SetAttr) -> Res<()> {
    if u.superuser {
        return Ok(());
    }
    let owner = inode.owner == u.name;
    let refuse = |what: &str| {
        Err(denied(format!(
            "permission denied: {path} (owner {}, mode {:04o}): {what}",
            inode.owner, inode.mode
        )))
    };
    if r.owner.as_ref().is_some_and(|o| *o != inode.owner) {
        return refuse("only the admin may change a file's owner");
    }
    if r.mode.is_some() && !owner {
        return refuse(&format!(
            "only its owner may change its mode, not {}",
            u.name
        ));
    }
    if let Some(g) = &r.group {
        if !owner || !u.groups.contains(g) {
            return refuse(&format!(
                "only its owner may change its group, and only to a group they are in ({} is \
                 not in {g})",
                u.name
            ));
        }
    }
    if r.mtime_ms.is_some() && !owner && !u.may(inode, W) {
        return refuse(&format!("{} may not change its times", u.name));
    }
    Ok(())
}

fn summary(s: &State, u: &User, path: &str) -> Res<ContentSummary> {
    readable_tree(s, u, path)?;
    let path = parse(path)?;
    let (files, dirs) = s.ns.walk(&path)?;
    let bytes = files.iter().map(|(_, _, i)| i.size).sum();
    let stored_bytes = files
        .iter()
        .map(|(_, _, i)| i.size * i.replication as u64)
        .sum();
    Ok(ContentSummary {
        files: files.len() as u64,
        dirs,
        bytes,
        stored_bytes,
    })
}

pub(crate) fn report(s: &State) -> Res<ClusterReport> {
    let safe_mode = s.safe_mode();
    Ok(ClusterReport {
        cluster_id: s.ns.cluster_id.clone(),
        datanodes: s.cluster().report(),
        safe_mode,
    })
}

fn safe_mode(s: &State, u: &User, r: SafeModeRequest) -> Res<SafeModeStatus> {
    match r.action {
        SafeModeAction::Get => {}
        _ if !u.superuser => {
            return Err(denied(format!(
                "permission denied: only the admin certificate changes safe mode, not {}",
                u.name
            )))
        }
        SafeModeAction::Enter => s.set_safe_mode(true),
        SafeModeAction::Leave => s.set_safe_mode(false),
    }
    Ok(SafeModeStatus {
        safe_mode: s.safe_mode(),
    })
}

async fn register(s: Arc<State>, caller: &Principal, r: Register) -> Res<NodeReply> {
    check_datanode(caller, r.node.id, "register")?;
    if let Some(theirs) = &r.cluster_id {
        if *theirs != s.ns.cluster_id {
            tracing::warn!(node = %r.node.id, addr = %r.node.addr, theirs = %theirs, "refused a datanode of another cluster");
            return Err(WireError::new(
                ErrorCode::WrongCluster,
                format!(
                    "datanode {} belongs to another cluster ({theirs}) than this namenode ({}, \
                     cluster {}); refused",
                    r.node.id,
                    s.cfg.dir.display(),
                    s.ns.cluster_id
                ),
            ));
        }
    }
    // The same certificate from a new address: a restarted node, unless
    // the old address still answers as that node (a copied certificate).
    let elsewhere = s
        .cluster()
        .live_elsewhere(r.node)
        .filter(|old| *old != r.node.addr);
    if let Some(old) = elsewhere {
        let probe = s.endpoint.call(
            Peer {
                addr: old,
                expect: quern_proto::Expect::Datanode(r.node.id),
            },
            Ping,
        );
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), probe).await {
            return Err(denied(format!(
                "permission denied: {} is live at {old}; a second process with its certificate \
                 at {} is refused",
                r.node.id, r.node.addr
            )));
        }
        tracing::info!(node = %r.node.id, %old, new = %r.node.addr, "datanode moved to a new address");
    }
    let chunks = unpack(&r.chunks, r.node.id)?;
    let reported = chunks.len();
    let cmds = if r.report_follows {
        // The list follows once the node is given a turn (`ReportTurn`).
        s.cluster().join(r.node, r.capacity, r.available, &[], true);
        Vec::new()
    } else {
        s.cluster()
            .join(r.node, r.capacity, r.available, &chunks, false);
        take_report(s.clone(), r.node.id, chunks).await
    };
    tracing::info!(node = %r.node.id, addr = %r.node.addr, chunks = reported, "datanode registered");
    Ok(s.node_reply(cmds))
}

/// Takes a heartbeat at once when the map is free, else on a blocking
/// thread: waiting there for the map's lock (which reports hold for most
/// of a cold start) leaves the thread reading packets (the lifeline's only
/// one) free to answer other nodes and finish their handshakes meanwhile.
pub(crate) async fn heartbeat(s: Arc<State>, caller: &Principal, r: Heartbeat) -> Res<NodeReply> {
    check_datanode(caller, r.node, "heartbeat")?;
    let r = match s.heartbeat_if_free(r) {
        Ok(cmds) => return Ok(s.node_reply(cmds)),
        Err(r) => r,
    };
    let node = r.node;
    let waited = tokio::task::spawn_blocking(move || match s.heartbeat(r) {
        Some(cmds) => s.node_reply(cmds),
        None => s.busy_reply(),
    });
    waited.await.map_err(|e| {
        WireError::new(
            ErrorCode::Internal,
            format!(
                "the namenode failed taking the heartbeat of {node} ({e}); its next heartbeat \
                 is taken as usual"
            ),
        )
    })
}

/// Answers `SendReport` once the node has a turn to send its full report,
/// or nothing after `REPORT_TURN_WAIT` without one (the node asks again).
async fn report_turn(s: &State, caller: &Principal, r: ReportTurn) -> Res<NodeReply> {
    check_datanode(caller, r.node, "report turn")?;
    if !s.report_turns.take(r.node, REPORT_TURN_WAIT).await {
        return Ok(s.node_reply(Vec::new()));
    }
    // Checked once a turn is granted, not at every ask: a thousand nodes
    // asking again and again would each wait on the cluster lock while
    // reports hold it.
    if s.cluster().slot(r.node).is_none() {
        s.report_turns.done(r.node);
        return Ok(s.node_reply(vec![DatanodeCommand::Reregister]));
    }
    Ok(s.node_reply(vec![DatanodeCommand::SendReport]))
}

/// A report's chunk list, or an error naming the node whose list is unreadable.
fn unpack(chunks: &PackedChunks, node: NodeId) -> Res<Vec<ReportedChunk>> {
    chunks.unpack().map_err(|e| {
        WireError::new(
            ErrorCode::Protocol,
            format!("chunk report of {node}: {e}; the datanode must send its report again"),
        )
    })
}

/// A report arrives in pages; it is reconciled whole, at its last page, so
/// the cost of a report is that node's chunks and nothing is dropped for
/// being on a later page.
async fn chunk_report(s: Arc<State>, caller: &Principal, r: ChunkReport) -> Res<NodeReply> {
    check_datanode(caller, r.node, "chunk report")?;
    let page = unpack(&r.chunks, r.node)?;
    let chunks = {
        let mut partial = lock(&s.reports);
        let acc = partial.entry(r.node).or_default();
        if r.first {
            acc.clear();
        }
        acc.extend(page);
        if !r.last {
            return Ok(s.node_reply(Vec::new()));
        }
        partial.remove(&r.node).unwrap_or_default()
    };
    let cmds = take_report(s.clone(), r.node, chunks).await;
    s.report_turns.done(r.node);
    Ok(s.node_reply(cmds))
}

/// Reconciles a full report on a blocking thread, one report at a time,
/// handing the lock fairly to whoever waits between batches, so that
/// heartbeats and client calls are answered while reports pile up.
async fn take_report(
    s: Arc<State>,
    node: NodeId,
    chunks: Vec<ReportedChunk>,
) -> Vec<DatanodeCommand> {
    let _turn = s.reporting.lock().await;
    let state = s.clone();
    let work = tokio::task::spawn_blocking(move || {
        let mut progress = crate::cluster::ReportProgress::default();
        for batch in chunks.chunks(crate::cluster::LOCK_BATCH) {
            if !state.cluster_step(|c| c.report_batch(node, batch, &mut progress)) {
                return vec![DatanodeCommand::Reregister];
            }
        }
        let safe = state.safe_mode().is_some();
        state.cluster().finish_report(node, progress, safe)
    });
    match work.await {
        Ok(cmds) => cmds,
        Err(e) => {
            tracing::error!(%node, "reconciling a chunk report failed: {e}");
            Vec::new()
        }
    }
}
