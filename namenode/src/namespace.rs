//! The namespace in sled: inodes, directory entries and files being written.
//!
//! Trees: `inodes` (inode id -> [`Inode`]), `dirents` (parent id ++ name ->
//! child id), `pending` ([`FileId`] -> [`PendingFile`]), `pending_parts`
//! (file id ++ kind ++ number -> a chunk allocated to or committed for a
//! pending file) and `meta` (the cluster id written by `quern namenode
//! format`, the token keys). A file being written lives only in `pending`
//! until it completes, so nobody can see it before then. Each allocated or
//! committed chunk is one small record of its own, so writing a file of n
//! chunks costs n small writes, not n rewrites of a growing record. Every mutation that touches several trees is one sled
//! transaction, so a SIGKILL never leaves half an operation behind; callers
//! serialise mutations (one writer at a time) and flush before replying.

use quern_proto::msg::{ChunkMeta, FileKind, FileStatus};
use quern_proto::{ErrorCode, FileId, RemotePath, WireError};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

pub const ROOT: u64 = 1;
/// The group of the root directory, as in HDFS.
pub const SUPERGROUP: &str = "supergroup";

/// A file's or directory's attributes. A file's chunk list is stored after
/// them in the same record and read only by what needs it
/// ([`Namespace::file_chunks`]): `stat`, `ls` and permission checks on a
/// file of thousands of chunks decode a few dozen bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inode {
    pub kind: FileKind,
    pub mode: u32,
    pub mtime_ms: i64,
    pub replication: u8,
    pub chunk_size: u64,
    pub size: u64,
    pub owner: String,
    pub group: String,
    pub chunk_count: u32,
}

/// An inode as stored with owners and its chunk list in the middle; read,
/// never written (but by tests, to make such a store).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct InodeV2 {
    kind: FileKind,
    mode: u32,
    mtime_ms: i64,
    replication: u8,
    chunk_size: u64,
    size: u64,
    chunks: Vec<ChunkMeta>,
    owner: String,
    group: String,
}

/// An inode as stored before owners existed; read, never written.
#[derive(Deserialize)]
struct InodeV1 {
    kind: FileKind,
    mode: u32,
    mtime_ms: i64,
    replication: u8,
    chunk_size: u64,
    size: u64,
    chunks: Vec<ChunkMeta>,
}

/// Records written since owners exist start with this tag. Records
/// without it are from the release before: a V1 inode starts with its
/// `FileKind` (0 or 1), a V1 pending file with its path's length, a bincode
/// varint whose first byte is never 0xff.
const V2: &[u8] = &[0xff, 2];

fn enc_v2<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = V2.to_vec();
    out.extend(enc(v));
    out
}

/// Decodes a tagged record, or upgrades an untagged one from `Old`.
fn dec_v2<T, Old>(bytes: &[u8], what: &str, upgrade: impl FnOnce(Old) -> T) -> Result<T, StoreError>
where
    T: for<'de> Deserialize<'de>,
    Old: for<'de> Deserialize<'de>,
{
    match bytes.strip_prefix(V2) {
        Some(rest) => dec(rest, what),
        None => Ok(upgrade(dec(bytes, what)?)),
    }
}

/// Inodes written since chunk lists follow the attributes start with this
/// tag.
const V3: &[u8] = &[0xff, 3];

/// An inode record: the tag, the attributes, then the chunk list.
fn enc_inode(i: &Inode, chunks: &[ChunkMeta]) -> Vec<u8> {
    let mut head = i.clone();
    head.chunk_count = chunks.len() as u32;
    enc_inode_raw(&head, &enc(&chunks))
}

/// [`enc_inode`] with the chunk list already encoded (an update of the
/// attributes copies it as it is).
fn enc_inode_raw(i: &Inode, chunks: &[u8]) -> Vec<u8> {
    let mut out = V3.to_vec();
    out.extend(enc(i));
    out.extend_from_slice(chunks);
    out
}

fn dec_with_len<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    what: &str,
) -> Result<(T, usize), StoreError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// An inode record from any release, with its chunks.
fn dec_inode_full(bytes: &[u8]) -> Result<(Inode, Vec<ChunkMeta>), StoreError> {
    if let Some(rest) = bytes.strip_prefix(V3) {
        let (inode, used) = dec_with_len::<Inode>(rest, "inode")?;
        let chunks = dec(rest.get(used..).unwrap_or_default(), "inode's chunk list")?;
        return Ok((inode, chunks));
    }
    // Metadata from before users upgrades in place: owned by the admin.
    let v2 = dec_v2(bytes, "inode", |v1: InodeV1| InodeV2 {
        kind: v1.kind,
        mode: v1.mode,
        mtime_ms: v1.mtime_ms,
        replication: v1.replication,
        chunk_size: v1.chunk_size,
        size: v1.size,
        chunks: v1.chunks,
        owner: quern_proto::tls::ADMIN_USER.into(),
        group: SUPERGROUP.into(),
    })?;
    let inode = Inode {
        kind: v2.kind,
        mode: v2.mode,
        mtime_ms: v2.mtime_ms,
        replication: v2.replication,
        chunk_size: v2.chunk_size,
        size: v2.size,
        owner: v2.owner,
        group: v2.group,
        chunk_count: v2.chunks.len() as u32,
    };
    Ok((inode, v2.chunks))
}

/// An inode record's attributes; a current record's chunks are not read.
fn dec_inode(bytes: &[u8]) -> Result<Inode, StoreError> {
    match bytes.strip_prefix(V3) {
        Some(rest) => dec(rest, "inode"),
        None => Ok(dec_inode_full(bytes)?.0),
    }
}

/// A pending file as stored before owners existed; read, never written.
#[derive(Deserialize)]
struct PendingFileV1 {
    path: String,
    replication: u8,
    chunk_size: u64,
    mode: u32,
    overwrite: bool,
    chunks: BTreeMap<u32, ChunkMeta>,
    allocated: Vec<quern_proto::ChunkId>,
}

fn enc_pending(p: &PendingFile) -> Vec<u8> {
    enc_v2(p)
}

fn dec_pending(bytes: &[u8]) -> Result<PendingFile, StoreError> {
    // A write under way across the upgrade: the admin's.
    dec_v2(bytes, "pending file", |v1: PendingFileV1| PendingFile {
        path: v1.path,
        replication: v1.replication,
        chunk_size: v1.chunk_size,
        mode: v1.mode,
        overwrite: v1.overwrite,
        owner: quern_proto::tls::ADMIN_USER.into(),
        group: SUPERGROUP.into(),
        chunks: v1.chunks,
        allocated: v1.allocated,
    })
}

impl Inode {
    fn dir(mode: u32, owner: &str, group: &str) -> Inode {
        Inode {
            kind: FileKind::Dir,
            mode,
            mtime_ms: now_ms(),
            replication: 0,
            chunk_size: 0,
            size: 0,
            owner: owner.into(),
            group: group.into(),
            chunk_count: 0,
        }
    }

    pub fn status(&self, path: &RemotePath) -> FileStatus {
        FileStatus {
            path: path.to_string(),
            kind: self.kind,
            size: self.size,
            replication: self.replication,
            chunk_size: self.chunk_size,
            mode: self.mode,
            owner: self.owner.clone(),
            group: self.group.clone(),
            mtime_ms: self.mtime_ms,
            chunks: self.chunk_count,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingFile {
    pub path: String,
    pub replication: u8,
    pub chunk_size: u64,
    pub mode: u32,
    pub overwrite: bool,
    /// The user creating it: only they may add chunks or complete it.
    pub owner: String,
    pub group: String,
    /// Committed chunks by index.
    pub chunks: BTreeMap<u32, ChunkMeta>,
    /// Every chunk id handed out for this file, committed or not, so that
    /// abandoning the file can reclaim them all.
    pub allocated: Vec<quern_proto::ChunkId>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata store: {0}")]
    Sled(#[from] sled::Error),
    #[error("metadata store holds an unreadable record: {0}")]
    Corrupt(String),
    #[error(
        "namenode directory {0} was never formatted: run `quern namenode format --dir {0}` to \
         make a new, empty cluster, or point --dir at the existing metadata"
    )]
    NotFormatted(String),
    #[error("namenode directory {0} is formatted already (cluster {1}); nothing was changed")]
    AlreadyFormatted(String, String),
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> WireError {
        WireError::new(ErrorCode::Internal, e.to_string())
    }
}

/// Turns sled's errors into wire errors (orphan rules forbid `From`).
trait Sled<T> {
    fn st(self) -> Result<T, WireError>;
}

impl<T> Sled<T> for Result<T, sled::Error> {
    fn st(self) -> Result<T, WireError> {
        self.map_err(|e| StoreError::from(e).into())
    }
}

impl<T> Sled<T> for Result<T, sled::transaction::TransactionError<()>> {
    fn st(self) -> Result<T, WireError> {
        self.map_err(|e| match e {
            sled::transaction::TransactionError::Storage(s) => StoreError::from(s).into(),
            sled::transaction::TransactionError::Abort(()) => {
                WireError::new(ErrorCode::Internal, "metadata transaction aborted")
            }
        })
    }
}

type TxResult = sled::transaction::ConflictableTransactionResult<(), ()>;

type Res<T> = Result<T, WireError>;

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding our own in-memory types cannot fail: no maps with
    // non-string keys, no unsupported types.
    bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap_or_default()
}

fn dec<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn dirent_key(parent: u64, name: &str) -> Vec<u8> {
    let mut k = parent.to_be_bytes().to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn err(code: ErrorCode, msg: String) -> WireError {
    WireError::new(code, msg)
}

pub fn not_found(path: &RemotePath) -> WireError {
    err(
        ErrorCode::NotFound,
        format!("{path}: no such file or directory"),
    )
}

/// A completed file's status, the chunks of the file it replaced, and the
/// chunk ids allocated to it but never committed.
pub type Completed = (FileStatus, Vec<ChunkMeta>, Vec<quern_proto::ChunkId>);

/// The writes that complete one pending file.
struct Completion {
    file: FileId,
    new_id: u64,
    key: Vec<u8>,
    record: Vec<u8>,
    replaced: Option<u64>,
    parts: Vec<sled::IVec>,
    result: Completed,
}

/// Where a path resolved to.
pub struct Resolved {
    pub id: u64,
    pub inode: Inode,
}

pub struct Namespace {
    db: sled::Db,
    /// Mutations that asked to be durable, and how many of them are.
    written: AtomicU64,
    flushed: AtomicU64,
    /// When the last flush ended and how many mutations it made durable.
    flush_lock: tokio::sync::Mutex<(std::time::Instant, u64)>,
    inodes: sled::Tree,
    dirents: sled::Tree,
    pending: sled::Tree,
    pending_parts: sled::Tree,
    meta: sled::Tree,
    pub cluster_id: String,
}

const PART_ALLOCATED: u8 = 0;
const PART_COMMITTED: u8 = 1;

fn part_key(file: FileId, kind: u8, n: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..8].copy_from_slice(&file.0.to_be_bytes());
    k[8] = kind;
    k[9..].copy_from_slice(&n.to_be_bytes());
    k
}

const CLUSTER_ID: &[u8] = b"cluster_id";

/// The metadata store's page cache.
const META_CACHE: u64 = 128 << 20;

/// The least time between two flushes shared by concurrent writers. Each
/// flush seals sled's log buffer, writes it and syncs the file: in perf
/// that was about a quarter of the namenode's CPU under create load at
/// 2 ms. At 5 ms a create+complete cost 95-104 µs of its CPU against
/// 113-132 at 2 ms; at 10 ms the CPU fell no further and the clients,
/// waiting longer, completed fewer.
const GROUP_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

impl Namespace {
    fn open_db(dir: &std::path::Path) -> Result<sled::Db, StoreError> {
        let config = sled::Config::new()
            .path(dir.join("meta"))
            // sled caches up to 1 GiB by default; the chunk map, not the
            // page cache, is what must stay in memory.
            .cache_capacity(META_CACHE)
            .flush_every_ms(Some(1000));
        // sled's flusher thread lets go of the file lock a moment after a
        // Db is dropped: a store just formatted in this process may still
        // be locked for a few milliseconds.
        let mut tries = 0;
        loop {
            match config.open() {
                Ok(db) => return Ok(db),
                Err(e) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes a new cluster id and an empty namespace into `dir`, which
    /// must not hold one already. Returns the cluster id.
    pub fn format(dir: &std::path::Path) -> Result<String, StoreError> {
        let shown = dir.display().to_string();
        let db = Self::open_db(dir)?;
        let meta = db.open_tree("meta")?;
        let inodes = db.open_tree("inodes")?;
        if let Some(id) = meta.get(CLUSTER_ID)? {
            return Err(StoreError::AlreadyFormatted(
                shown,
                String::from_utf8_lossy(&id).into_owned(),
            ));
        }
        if inodes.get(ROOT.to_be_bytes())?.is_some() {
            return Err(StoreError::AlreadyFormatted(
                shown,
                "from an older release".into(),
            ));
        }
        let id = new_cluster_id();
        inodes.insert(
            ROOT.to_be_bytes(),
            enc_inode(
                &Inode::dir(0o755, quern_proto::tls::ADMIN_USER, SUPERGROUP),
                &[],
            ),
        )?;
        meta.insert(CLUSTER_ID, id.as_bytes())?;
        db.flush()?;
        Ok(id)
    }

    /// Opens a formatted namespace; never makes one.
    pub fn open(dir: &std::path::Path) -> Result<Namespace, StoreError> {
        let shown = dir.display().to_string();
        if !dir.join("meta").exists() {
            return Err(StoreError::NotFormatted(shown));
        }
        let db = Self::open_db(dir)?;
        let meta = db.open_tree("meta")?;
        let inodes = db.open_tree("inodes")?;
        let cluster_id = match meta.get(CLUSTER_ID)? {
            Some(id) => String::from_utf8_lossy(&id).into_owned(),
            None if inodes.get(ROOT.to_be_bytes())?.is_some() => {
                // Metadata from before cluster ids: it is a namespace, so
                // it gets an id instead of being refused.
                let id = new_cluster_id();
                meta.insert(CLUSTER_ID, id.as_bytes())?;
                db.flush()?;
                tracing::warn!(cluster = %id, dir = %shown, "metadata had no cluster id; gave it one");
                id
            }
            None => return Err(StoreError::NotFormatted(shown)),
        };
        Ok(Namespace {
            inodes,
            dirents: db.open_tree("dirents")?,
            pending: db.open_tree("pending")?,
            pending_parts: db.open_tree("pending_parts")?,
            meta,
            cluster_id,
            db,
            written: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new((std::time::Instant::now(), 0)),
        })
    }

    /// A tree of the metadata store beside the namespace's own (the job
    /// history).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// A value of the `meta` tree (token keys and the like).
    pub fn meta_get(&self, key: &str) -> Res<Option<Vec<u8>>> {
        Ok(self.meta.get(key).st()?.map(|v| v.to_vec()))
    }

    pub fn meta_put(&self, key: &str, value: &[u8]) -> Res<()> {
        self.meta.insert(key, value).st()?;
        self.db.flush().st()?;
        Ok(())
    }

    /// [`Namespace::flush`] for callers outside the runtime (an offline
    /// loader).
    pub fn flush_now(&self) -> Res<()> {
        self.db.flush().st()?;
        Ok(())
    }

    /// Makes every mutation so far survive a crash of this process.
    ///
    /// Group commit: sled's flush fsyncs, so concurrent callers share one
    /// flush instead of queueing one each, and it runs on a blocking thread
    /// so the async workers keep serving.
    ///
    /// Under concurrent writers (the last flush covered more than one
    /// mutation), a flush waits until [`GROUP_WINDOW`] after the last one
    /// so that more mutations share it: each flush writes and syncs a log
    /// buffer, and back-to-back flushes of two or three mutations each
    /// spent more CPU syncing than serving. A lone writer never waits.
    pub async fn flush(&self) -> Res<()> {
        let mine = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut turn = self.flush_lock.lock().await;
        if self.flushed.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        let (last_end, last_covered) = *turn;
        if last_covered > 1 {
            if let Some(wait) = GROUP_WINDOW.checked_sub(last_end.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let upto = self.written.load(Ordering::SeqCst);
        let before = self.flushed.load(Ordering::SeqCst);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("metadata flush: {e}")))?
            .st()?;
        self.flushed.store(upto, Ordering::SeqCst);
        *turn = (std::time::Instant::now(), upto - before);
        Ok(())
    }

    fn new_id(&self) -> Res<u64> {
        // generate_id starts at 0; ids 0 and 1 are taken (none, root).
        Ok(self.db.generate_id().st()? + 2)
    }

    pub fn new_file_id(&self) -> Res<FileId> {
        Ok(FileId(self.new_id()?))
    }

    pub fn new_chunk_id(&self) -> Res<quern_proto::ChunkId> {
        Ok(quern_proto::ChunkId(self.new_id()?))
    }

    pub fn inode(&self, id: u64) -> Res<Option<Inode>> {
        match self.inodes.get(id.to_be_bytes()).st()? {
            Some(v) => Ok(Some(dec_inode(&v)?)),
            None => Ok(None),
        }
    }

    /// A file's chunks in order (none for a directory or a missing id).
    pub fn file_chunks(&self, id: u64) -> Res<Vec<ChunkMeta>> {
        match self.inodes.get(id.to_be_bytes()).st()? {
            Some(v) => Ok(dec_inode_full(&v)?.1),
            None => Ok(Vec::new()),
        }
    }

    fn child(&self, parent: u64, name: &str) -> Res<Option<u64>> {
        Ok(self
            .dirents
            .get(dirent_key(parent, name))
            .st()?
            .map(|v| id_from(&v)))
    }

    /// Resolves a path; `Ok(None)` when its last name does not exist, an
    /// error when a parent is missing or is a file.
    pub fn lookup(&self, path: &RemotePath) -> Res<Option<Resolved>> {
        self.lookup_through(path, &mut |_, _| Ok(()))
    }

    /// [`Namespace::lookup`] that shows `through` every directory it walks
    /// through (with the names leading to it), so permission checks cost no
    /// second walk.
    pub fn lookup_through(
        &self,
        path: &RemotePath,
        through: &mut dyn FnMut(&[&str], &Inode) -> Res<()>,
    ) -> Res<Option<Resolved>> {
        let mut id = ROOT;
        let mut inode = self
            .inode(ROOT)?
            .ok_or_else(|| err(ErrorCode::Internal, "root inode missing".into()))?;
        let names: Vec<&str> = path.components().collect();
        for (i, name) in names.iter().enumerate() {
            if inode.kind == FileKind::Dir {
                through(&names[..i], &inode)?;
            }
            if inode.kind != FileKind::Dir {
                let so_far = format!("/{}", names[..i].join("/"));
                return Err(err(
                    ErrorCode::NotADirectory,
                    format!("{path}: {so_far} is a file, not a directory"),
                ));
            }
            match self.child(id, name)? {
                Some(c) => {
                    id = c;
                    inode = self.inode(c)?.ok_or_else(|| {
                        err(ErrorCode::Internal, format!("dangling entry for {path}"))
                    })?;
                }
                None if i + 1 == names.len() => return Ok(None),
                None => {
                    let missing = format!("/{}", names[..=i].join("/"));
                    return Err(err(
                        ErrorCode::NotFound,
                        format!("{path}: parent directory {missing} does not exist"),
                    ));
                }
            }
        }
        Ok(Some(Resolved { id, inode }))
    }

    pub fn get(&self, path: &RemotePath) -> Res<Resolved> {
        self.lookup(path)?.ok_or_else(|| not_found(path))
    }

    /// The directory a new entry `path` would go in.
    pub fn parent_dir(&self, path: &RemotePath) -> Res<Resolved> {
        self.parent_dir_through(path, &mut |_, _| Ok(()))
    }

    /// [`Namespace::parent_dir`] with a [`Namespace::lookup_through`] hook.
    pub fn parent_dir_through(
        &self,
        path: &RemotePath,
        through: &mut dyn FnMut(&[&str], &Inode) -> Res<()>,
    ) -> Res<Resolved> {
        let parent = path.parent().ok_or_else(|| {
            err(
                ErrorCode::AlreadyExists,
                "/ is the root directory".to_string(),
            )
        })?;
        match self.lookup_through(&parent, through)? {
            Some(r) if r.inode.kind == FileKind::Dir => Ok(r),
            Some(_) => Err(err(
                ErrorCode::NotADirectory,
                format!("{path}: parent {parent} is a file, not a directory"),
            )),
            None => Err(err(
                ErrorCode::NotFound,
                format!("{path}: parent directory {parent} does not exist"),
            )),
        }
    }

    pub fn list(&self, dir: u64) -> Res<Vec<(String, u64, Inode)>> {
        Ok(self.list_page(dir, None, usize::MAX)?.0)
    }

    /// At most `limit` entries of `dir` after the name `start_after`, in
    /// name order, and whether more follow. Costs the page, not the
    /// directory.
    #[allow(clippy::type_complexity)]
    pub fn list_page(
        &self,
        dir: u64,
        start_after: Option<&str>,
        limit: usize,
    ) -> Res<(Vec<(String, u64, Inode)>, bool)> {
        let prefix = dir.to_be_bytes();
        let scan = match start_after {
            Some(name) => self.dirents.range((
                std::ops::Bound::Excluded(dirent_key(dir, name)),
                std::ops::Bound::Unbounded,
            )),
            None => self.dirents.range(prefix.to_vec()..),
        };
        let mut out = Vec::new();
        for item in scan {
            let (k, v) = item.st()?;
            if !k.starts_with(&prefix) {
                break;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            let name = String::from_utf8_lossy(&k[8..]).into_owned();
            let id = id_from(&v);
            if let Some(inode) = self.inode(id)? {
                out.push((name, id, inode));
            }
        }
        Ok((out, false))
    }

    /// Makes a directory owned by `owner`, in its parent's group (as HDFS).
    pub fn mkdir(&self, path: &RemotePath, parents: bool, mode: u32, owner: &str) -> Res<()> {
        if parents {
            let mut cur = RemotePath::root();
            for name in path.components() {
                cur = cur.join(name)?;
                match self.lookup(&cur)? {
                    Some(r) if r.inode.kind == FileKind::Dir => continue,
                    Some(_) => {
                        return Err(err(
                            ErrorCode::NotADirectory,
                            format!("{path}: {cur} is a file, not a directory"),
                        ))
                    }
                    None => self.mkdir(&cur, false, mode, owner)?,
                }
            }
            return Ok(());
        }
        let parent = self.parent_dir(path)?;
        let name = path.name().unwrap_or_default();
        if self.child(parent.id, name)?.is_some() {
            return Err(err(
                ErrorCode::AlreadyExists,
                format!("{path}: already exists"),
            ));
        }
        let id = self.new_id()?;
        let inode = Inode::dir(mode, owner, &parent.inode.group);
        (&self.inodes, &self.dirents)
            .transaction(|(inodes, dirents)| {
                inodes.insert(&id.to_be_bytes(), enc_inode(&inode, &[]))?;
                dirents.insert(dirent_key(parent.id, name), &id.to_be_bytes())?;
                TxResult::Ok(())
            })
            .st()?;
        Ok(())
    }

    /// Removes a path and returns the chunks that no file owns any more.
    pub fn delete(&self, path: &RemotePath, recursive: bool) -> Res<Vec<ChunkMeta>> {
        if path.is_root() {
            return Err(err(
                ErrorCode::InvalidArgument,
                "refusing to remove the root directory /".into(),
            ));
        }
        let target = self.get(path)?;
        let parent = self.parent_dir(path)?;
        let name = path.name().unwrap_or_default().to_string();
        // Collect the subtree first: sled transactions cannot scan.
        let mut doomed_inodes = vec![target.id];
        let mut doomed_dirents = vec![dirent_key(parent.id, &name)];
        let mut freed = self.file_chunks(target.id)?;
        if target.inode.kind == FileKind::Dir {
            let mut stack = vec![target.id];
            let mut first = true;
            while let Some(dir) = stack.pop() {
                let children = self.list(dir)?;
                if first && !children.is_empty() && !recursive {
                    return Err(err(
                        ErrorCode::NotEmpty,
                        format!(
                            "{path}: directory not empty (use -r to remove it and its contents)"
                        ),
                    ));
                }
                first = false;
                for (cname, cid, cinode) in children {
                    doomed_dirents.push(dirent_key(dir, &cname));
                    doomed_inodes.push(cid);
                    if cinode.kind == FileKind::Dir {
                        stack.push(cid);
                    } else {
                        freed.extend(self.file_chunks(cid)?);
                    }
                }
            }
        }
        (&self.inodes, &self.dirents)
            .transaction(|(inodes, dirents)| {
                for k in &doomed_dirents {
                    dirents.remove(k.as_slice())?;
                }
                for id in &doomed_inodes {
                    inodes.remove(&id.to_be_bytes())?;
                }
                TxResult::Ok(())
            })
            .st()?;
        Ok(freed)
    }

    /// Renames `src` to exactly `dst`. With `replace`, an existing file at
    /// `dst` is replaced (its chunks are returned); an existing directory
    /// is replaced only if empty and `src` is a directory too.
    pub fn rename(&self, src: &RemotePath, dst: &RemotePath, replace: bool) -> Res<Vec<ChunkMeta>> {
        if src.is_root() || dst.is_root() {
            return Err(err(
                ErrorCode::InvalidArgument,
                "cannot rename the root directory /".into(),
            ));
        }
        let source = self.get(src)?;
        if src == dst {
            return Ok(Vec::new());
        }
        if source.inode.kind == FileKind::Dir && dst.starts_with(src) {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("cannot move {src} into its own subdirectory {dst}"),
            ));
        }
        let src_parent = self.parent_dir(src)?;
        let dst_parent = self.parent_dir(dst)?;
        let dst_name = dst.name().unwrap_or_default();
        let mut freed = Vec::new();
        let mut displaced = None;
        if let Some(existing) = self.child(dst_parent.id, dst_name)? {
            let ex = self
                .inode(existing)?
                .ok_or_else(|| err(ErrorCode::Internal, format!("dangling entry {dst}")))?;
            let allowed = replace
                && match (source.inode.kind, ex.kind) {
                    (FileKind::File, FileKind::File) => true,
                    (FileKind::Dir, FileKind::Dir) => self.list(existing)?.is_empty(),
                    _ => false,
                };
            if !allowed {
                let what = match ex.kind {
                    FileKind::Dir => "a directory",
                    FileKind::File => "a file",
                };
                return Err(err(
                    ErrorCode::AlreadyExists,
                    format!("cannot move {src} to {dst}: {dst} already exists ({what})"),
                ));
            }
            freed = self.file_chunks(existing)?;
            displaced = Some(existing);
        }
        let src_key = dirent_key(src_parent.id, src.name().unwrap_or_default());
        let dst_key = dirent_key(dst_parent.id, dst_name);
        (&self.inodes, &self.dirents)
            .transaction(|(inodes, dirents)| {
                dirents.remove(src_key.as_slice())?;
                dirents.insert(dst_key.as_slice(), &source.id.to_be_bytes())?;
                if let Some(old) = displaced {
                    inodes.remove(&old.to_be_bytes())?;
                }
                TxResult::Ok(())
            })
            .st()?;
        Ok(freed)
    }

    /// Checks a file may be created at `path` (in `parent`, resolved by the
    /// caller) and records it as pending.
    pub fn create(
        &self,
        path: &RemotePath,
        parent: &Resolved,
        pending: PendingFile,
    ) -> Res<FileId> {
        self.check_creatable_in(path, parent, pending.overwrite)?;
        let id = self.new_file_id()?;
        self.pending
            .insert(id.0.to_be_bytes(), enc_pending(&pending))
            .st()?;
        Ok(id)
    }

    fn check_creatable_in(
        &self,
        path: &RemotePath,
        parent: &Resolved,
        overwrite: bool,
    ) -> Res<Option<u64>> {
        match self.child(parent.id, path.name().unwrap_or_default())? {
            None => Ok(None),
            Some(existing) => {
                let ex = self
                    .inode(existing)?
                    .ok_or_else(|| err(ErrorCode::Internal, format!("dangling entry {path}")))?;
                match ex.kind {
                    FileKind::Dir => Err(err(
                        ErrorCode::IsADirectory,
                        format!("{path}: is a directory"),
                    )),
                    FileKind::File if overwrite => Ok(Some(existing)),
                    FileKind::File => Err(err(
                        ErrorCode::AlreadyExists,
                        format!("{path}: already exists (use --force to overwrite)"),
                    )),
                }
            }
        }
    }

    /// A pending file's record without its chunks: what checking who
    /// writes it needs.
    pub fn pending_head(&self, id: FileId) -> Res<PendingFile> {
        match self.pending.get(id.0.to_be_bytes()).st()? {
            Some(v) => Ok(dec_pending(&v)?),
            None => Err(err(
                ErrorCode::LeaseExpired,
                format!("{id}: no file is being written under this id (its lease expired or it was completed); write it again"),
            )),
        }
    }

    /// A pending file with every chunk allocated to and committed for it.
    pub fn pending(&self, id: FileId) -> Res<PendingFile> {
        let mut p = self.pending_head(id)?;
        self.load_parts(id, &mut p)?;
        Ok(p)
    }

    /// Adds a pending file's allocated and committed chunks to its record;
    /// returns their keys.
    fn load_parts(&self, id: FileId, p: &mut PendingFile) -> Res<Vec<sled::IVec>> {
        let mut keys = Vec::new();
        for item in self.pending_parts.scan_prefix(id.0.to_be_bytes()) {
            let (k, v) = item.st()?;
            let n = id_from(k.get(9..).unwrap_or_default());
            match k.get(8).copied() {
                Some(PART_ALLOCATED) => p.allocated.push(quern_proto::ChunkId(n)),
                Some(PART_COMMITTED) => {
                    p.chunks.insert(n as u32, dec(&v, "committed chunk")?);
                }
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "pending part of {id} with an unknown kind"
                    ))
                    .into())
                }
            }
            keys.push(k);
        }
        Ok(keys)
    }

    /// Records a chunk id handed out for a pending file.
    pub fn add_allocated(&self, id: FileId, chunk: quern_proto::ChunkId) -> Res<()> {
        self.pending_parts
            .insert(part_key(id, PART_ALLOCATED, chunk.0), &[])
            .st()?;
        Ok(())
    }

    /// Whether a chunk id was handed out for this pending file.
    pub fn is_allocated(
        &self,
        id: FileId,
        head: &PendingFile,
        chunk: quern_proto::ChunkId,
    ) -> Res<bool> {
        Ok(head.allocated.contains(&chunk)
            || self
                .pending_parts
                .contains_key(part_key(id, PART_ALLOCATED, chunk.0))
                .st()?)
    }

    /// Records chunk `index` of a pending file as written.
    pub fn commit_part(&self, id: FileId, index: u32, meta: &ChunkMeta) -> Res<()> {
        self.pending_parts
            .insert(part_key(id, PART_COMMITTED, index as u64), enc(meta))
            .st()?;
        Ok(())
    }

    pub fn all_pending(&self) -> Res<Vec<(FileId, PendingFile)>> {
        let mut out = Vec::new();
        for item in self.pending.iter() {
            let (k, v) = item.st()?;
            let id = FileId(id_from(&k));
            let mut p = dec_pending(&v)?;
            self.load_parts(id, &mut p)?;
            out.push((id, p));
        }
        Ok(out)
    }

    pub fn drop_pending(&self, id: FileId) -> Res<Option<PendingFile>> {
        let p = match self.pending(id) {
            Ok(p) => p,
            Err(e) if e.code == ErrorCode::LeaseExpired => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut batch = sled::Batch::default();
        for item in self.pending_parts.scan_prefix(id.0.to_be_bytes()).keys() {
            batch.remove(item.st()?);
        }
        self.pending_parts.apply_batch(batch).st()?;
        self.pending.remove(id.0.to_be_bytes()).st()?;
        Ok(Some(p))
    }

    /// Makes a pending file visible. Returns its status, the chunks of a
    /// file it replaced, and the chunk ids allocated but never committed.
    pub fn complete(&self, id: FileId) -> Res<Completed> {
        self.complete_many(&[id])
            .pop()
            .unwrap_or_else(|| Err(err(ErrorCode::Internal, format!("{id}: not completed"))))
    }

    /// Completes many pending files in one transaction, with a result for
    /// each in order. sled rolls its log buffer to disk for every
    /// transaction, so completing files one transaction each cost a disk
    /// write apiece; a batch costs one. Files whose directory entry another
    /// file of the batch takes go in a later transaction, so the second of
    /// two completions of one path sees the first, as it would one by one.
    pub fn complete_many(&self, ids: &[FileId]) -> Vec<Res<Completed>> {
        let mut out: Vec<Option<Res<Completed>>> = ids.iter().map(|_| None).collect();
        let mut todo: Vec<usize> = (0..ids.len()).collect();
        while !todo.is_empty() {
            let mut keys = std::collections::HashSet::new();
            let mut later = Vec::new();
            let mut ready = Vec::new();
            for i in todo {
                match self.prepare_completion(ids[i]) {
                    Err(e) => out[i] = Some(Err(e)),
                    Ok(p) if !keys.insert(p.key.clone()) => later.push(i),
                    Ok(p) => ready.push((i, p)),
                }
            }
            if ready.is_empty() {
                break;
            }
            let applied = (
                &self.inodes,
                &self.dirents,
                &self.pending,
                &self.pending_parts,
            )
                .transaction(|(inodes, dirents, pending, pending_parts)| {
                    for (_, p) in &ready {
                        inodes.insert(&p.new_id.to_be_bytes(), p.record.as_slice())?;
                        dirents.insert(p.key.as_slice(), &p.new_id.to_be_bytes())?;
                        if let Some(old) = p.replaced {
                            inodes.remove(&old.to_be_bytes())?;
                        }
                        pending.remove(&p.file.0.to_be_bytes())?;
                        for k in &p.parts {
                            pending_parts.remove(k)?;
                        }
                    }
                    TxResult::Ok(())
                })
                .st();
            for (i, p) in ready {
                out[i] = Some(match &applied {
                    Ok(()) => Ok(p.result),
                    Err(e) => Err(e.clone()),
                });
            }
            todo = later;
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(err(ErrorCode::Internal, "not completed".into()))))
            .collect()
    }

    /// Everything completing `id` will write, checked against the store
    /// as it is.
    fn prepare_completion(&self, id: FileId) -> Res<Completion> {
        let mut p = self.pending_head(id)?;
        let parts = self.load_parts(id, &mut p)?;
        let path = RemotePath::parse(&p.path)?;
        let chunks: Vec<ChunkMeta> = p.chunks.values().copied().collect();
        for (expect, idx) in p.chunks.keys().enumerate() {
            if *idx as usize != expect {
                return Err(err(
                    ErrorCode::InvalidArgument,
                    format!("{path}: chunk {expect} was never committed; write the file again"),
                ));
            }
        }
        let parent = self.parent_dir(&path)?;
        let replaced = self.check_creatable_in(&path, &parent, p.overwrite)?;
        let mut freed = Vec::new();
        if let Some(old) = replaced {
            freed = self.file_chunks(old)?;
        }
        let inode = Inode {
            kind: FileKind::File,
            mode: p.mode,
            mtime_ms: now_ms(),
            replication: p.replication,
            chunk_size: p.chunk_size,
            size: chunks.iter().map(|c| c.size).sum(),
            owner: p.owner.clone(),
            group: p.group.clone(),
            chunk_count: chunks.len() as u32,
        };
        let committed: std::collections::HashSet<_> = chunks.iter().map(|c| c.id).collect();
        let unused = p
            .allocated
            .into_iter()
            .filter(|c| !committed.contains(c))
            .collect();
        Ok(Completion {
            file: id,
            new_id: self.new_id()?,
            key: dirent_key(parent.id, path.name().unwrap_or_default()),
            record: enc_inode(&inode, &chunks),
            replaced,
            parts,
            result: (inode.status(&path), freed, unused),
        })
    }

    /// Changes an inode's attributes; its chunks stay as they are.
    pub fn update_inode(&self, id: u64, f: impl FnOnce(&mut Inode)) -> Res<Inode> {
        let bytes = self
            .inodes
            .get(id.to_be_bytes())
            .st()?
            .ok_or_else(|| err(ErrorCode::NotFound, format!("inode {id} vanished")))?;
        // A current record's chunk list is copied as it is encoded.
        let (mut inode, chunks) = match bytes.strip_prefix(V3) {
            Some(rest) => {
                let (inode, used) = dec_with_len::<Inode>(rest, "inode")?;
                (inode, rest.get(used..).unwrap_or_default().to_vec())
            }
            None => {
                let (inode, chunks) = dec_inode_full(&bytes)?;
                (inode, enc(&chunks))
            }
        };
        f(&mut inode);
        self.inodes
            .insert(id.to_be_bytes(), enc_inode_raw(&inode, &chunks))
            .st()?;
        Ok(inode)
    }

    /// Every file below (or at) `path` with its inode id, depth first,
    /// and the number of directories seen.
    #[allow(clippy::type_complexity)]
    pub fn walk(&self, path: &RemotePath) -> Res<(Vec<(RemotePath, u64, Inode)>, u64)> {
        let top = self.get(path)?;
        let mut files = Vec::new();
        let mut dirs = 0;
        let mut stack = vec![(path.clone(), top.id, top.inode)];
        while let Some((p, id, inode)) = stack.pop() {
            match inode.kind {
                FileKind::File => files.push((p, id, inode)),
                FileKind::Dir => {
                    dirs += 1;
                    let mut children = self.list(id)?;
                    children.reverse();
                    for (name, cid, cinode) in children {
                        stack.push((p.join(&name)?, cid, cinode));
                    }
                }
            }
        }
        Ok((files, dirs))
    }

    /// Every file's chunks with the file's replication, a file at a time.
    pub fn each_file_chunks(&self, mut f: impl FnMut(&[ChunkMeta], u8)) -> Res<()> {
        for item in self.inodes.iter() {
            let (_, v) = item.st()?;
            let (inode, chunks) = dec_inode_full(&v)?;
            if !chunks.is_empty() {
                f(&chunks, inode.replication);
            }
        }
        Ok(())
    }
}

fn new_cluster_id() -> String {
    format!("qc-{:032x}", rand::random::<u128>())
}

fn id_from(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_refuses_an_unformatted_directory_and_format_refuses_twice() {
        let dir = tempfile::tempdir().unwrap();
        let e = Namespace::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("never formatted") && e.contains("quern namenode format"),
            "{e}"
        );
        assert!(
            !dir.path().join("meta").exists(),
            "open must create nothing"
        );
        let id = Namespace::format(dir.path()).unwrap();
        let e = Namespace::format(dir.path()).err().unwrap().to_string();
        assert!(e.contains(&id), "{e}");
        let ns = Namespace::open(dir.path()).unwrap();
        assert_eq!(ns.cluster_id, id);
        let root = ns.inode(ROOT).unwrap().unwrap();
        assert_eq!((root.owner.as_str(), root.mode), ("admin", 0o755));
    }

    #[test]
    fn files_stored_with_their_chunks_in_the_middle_keep_them() {
        let dir = tempfile::tempdir().unwrap();
        Namespace::format(dir.path()).unwrap();
        let ns = Namespace::open(dir.path()).unwrap();
        let chunks: Vec<ChunkMeta> = (0..3)
            .map(|i| ChunkMeta {
                id: quern_proto::ChunkId(100 + i),
                size: 10,
                digest: quern_proto::Digest::of(&[i as u8]),
            })
            .collect();
        let old = InodeV2 {
            kind: FileKind::File,
            mode: 0o640,
            mtime_ms: 1,
            replication: 2,
            chunk_size: 10,
            size: 30,
            chunks: chunks.clone(),
            owner: "alice".into(),
            group: "staff".into(),
        };
        let id = 500u64;
        ns.inodes.insert(id.to_be_bytes(), enc_v2(&old)).unwrap();
        ns.dirents
            .insert(dirent_key(ROOT, "old"), &id.to_be_bytes())
            .unwrap();
        let path = RemotePath::parse("/old").unwrap();
        let found = ns.get(&path).unwrap();
        assert_eq!(found.inode.chunk_count, 3);
        assert_eq!(found.inode.status(&path).chunks, 3);
        assert_eq!(found.inode.owner, "alice");
        assert_eq!(ns.file_chunks(id).unwrap(), chunks);
        // A change of attributes writes the current layout and keeps the
        // chunks; so does a second one, which copies them as they are.
        ns.update_inode(id, |i| i.replication = 3).unwrap();
        assert!(ns
            .inodes
            .get(id.to_be_bytes())
            .unwrap()
            .unwrap()
            .starts_with(V3));
        ns.update_inode(id, |i| i.mode = 0o600).unwrap();
        let now = ns.inode(id).unwrap().unwrap();
        assert_eq!((now.replication, now.mode, now.chunk_count), (3, 0o600, 3));
        assert_eq!(ns.file_chunks(id).unwrap(), chunks);
    }

    #[test]
    fn inodes_from_before_owners_read_as_the_admins() {
        #[derive(Serialize)]
        struct Old {
            kind: FileKind,
            mode: u32,
            mtime_ms: i64,
            replication: u8,
            chunk_size: u64,
            size: u64,
            chunks: Vec<ChunkMeta>,
        }
        let dir = tempfile::tempdir().unwrap();
        {
            // A store as the previous release wrote it: no meta tree, V1 inodes.
            let db = Namespace::open_db(dir.path()).unwrap();
            let inodes = db.open_tree("inodes").unwrap();
            let old = Old {
                kind: FileKind::Dir,
                mode: 0o750,
                mtime_ms: 1,
                replication: 0,
                chunk_size: 0,
                size: 0,
                chunks: Vec::new(),
            };
            inodes.insert(ROOT.to_be_bytes(), enc(&old)).unwrap();
            db.flush().unwrap();
        }
        {
            // And a file that was being written across the upgrade.
            #[derive(Serialize)]
            struct OldPending {
                path: String,
                replication: u8,
                chunk_size: u64,
                mode: u32,
                overwrite: bool,
                chunks: BTreeMap<u32, ChunkMeta>,
                allocated: Vec<quern_proto::ChunkId>,
            }
            let db = Namespace::open_db(dir.path()).unwrap();
            let old = OldPending {
                path: "/p".into(),
                replication: 2,
                chunk_size: 10,
                mode: 0o600,
                overwrite: false,
                chunks: BTreeMap::new(),
                allocated: vec![quern_proto::ChunkId(5)],
            };
            let pending = db.open_tree("pending").unwrap();
            pending.insert(9u64.to_be_bytes(), enc(&old)).unwrap();
            db.flush().unwrap();
        }
        let ns = Namespace::open(dir.path()).unwrap();
        assert!(ns.cluster_id.starts_with("qc-"));
        let p = ns.all_pending().unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].1.owner.as_str(), p[0].1.mode), ("admin", 0o600));
        assert_eq!(p[0].1.allocated, vec![quern_proto::ChunkId(5)]);
        let root = ns.inode(ROOT).unwrap().unwrap();
        assert_eq!(root.owner, "admin");
        assert_eq!(root.group, SUPERGROUP);
        assert_eq!(root.mode, 0o750);
        ns.mkdir(&RemotePath::parse("/a").unwrap(), false, 0o755, "alice")
            .unwrap();
        let a = ns.get(&RemotePath::parse("/a").unwrap()).unwrap().inode;
        assert_eq!((a.owner.as_str(), a.group.as_str()), ("alice", SUPERGROUP));
    }

    #[test]
    fn a_directory_of_a_million_entries_lists_in_pages() {
        let dir = tempfile::tempdir().unwrap();
        Namespace::format(dir.path()).unwrap();
        let ns = Namespace::open(dir.path()).unwrap();
        const N: u64 = 1_000_000;
        // Made in bulk underneath the namespace: a million mkdirs through
        // transactions would cost minutes and prove nothing more here.
        // Every entry names one shared inode, so the store holds a million
        // directory entries and not a million copies of the same inode.
        let id = 1_000u64;
        ns.inodes
            .insert(
                id.to_be_bytes(),
                enc_inode(&Inode::dir(0o755, "admin", SUPERGROUP), &[]),
            )
            .unwrap();
        let mut dirents = sled::Batch::default();
        for i in 0..N {
            dirents.insert(dirent_key(ROOT, &format!("e{i:07}")), &id.to_be_bytes());
        }
        ns.dirents.apply_batch(dirents).unwrap();
        let mut after: Option<String> = None;
        let mut seen = 0u64;
        let mut pages = 0;
        loop {
            let (page, more) = ns.list_page(ROOT, after.as_deref(), 10_000).unwrap();
            for (name, _, _) in &page {
                assert_eq!(*name, format!("e{seen:07}"));
                seen += 1;
            }
            pages += 1;
            after = page.last().map(|(n, _, _)| n.clone());
            if !more {
                break;
            }
        }
        assert_eq!(seen, N);
        assert_eq!(pages, 100);
    }

    /// A pending file at `path` with one committed chunk of id `chunk`
    /// (and `skip` leaving index 0 uncommitted instead).
    fn pending_with_chunk(
        ns: &Namespace,
        path: &str,
        chunk: u64,
        overwrite: bool,
        skip: bool,
    ) -> FileId {
        let path = RemotePath::parse(path).unwrap();
        let parent = ns.parent_dir(&path).unwrap();
        let pending = PendingFile {
            path: path.to_string(),
            replication: 1,
            chunk_size: 10,
            mode: 0o644,
            overwrite,
            owner: "admin".into(),
            group: SUPERGROUP.into(),
            chunks: BTreeMap::new(),
            allocated: Vec::new(),
        };
        let id = ns.create(&path, &parent, pending).unwrap();
        let meta = ChunkMeta {
            id: quern_proto::ChunkId(chunk),
            size: 10,
            digest: quern_proto::Digest([chunk as u8; 32]),
        };
        ns.add_allocated(id, meta.id).unwrap();
        ns.commit_part(id, u32::from(skip), &meta).unwrap();
        id
    }

    #[test]
    fn files_completed_together_end_as_if_completed_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        Namespace::format(dir.path()).unwrap();
        let ns = Namespace::open(dir.path()).unwrap();
        let a = pending_with_chunk(&ns, "/a", 1, false, false);
        let b = pending_with_chunk(&ns, "/b", 2, false, false);
        // Three writers of /same: the second overwrites the first, the
        // third may not overwrite and finds it taken.
        let first = pending_with_chunk(&ns, "/same", 3, false, false);
        let second = pending_with_chunk(&ns, "/same", 4, true, false);
        let third = pending_with_chunk(&ns, "/same", 5, false, false);
        let gap = pending_with_chunk(&ns, "/gap", 6, false, true);
        let results = ns.complete_many(&[a, first, second, gap, third, b, a]);
        let ok: Vec<bool> = results.iter().map(|r| r.is_ok()).collect();
        assert_eq!(ok, [true, true, true, false, false, true, false]);
        let second_freed = &results[2].as_ref().unwrap().1;
        assert_eq!(second_freed.iter().map(|c| c.id.0).collect::<Vec<_>>(), [3]);
        let codes: Vec<_> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.code))
            .collect();
        assert_eq!(
            codes,
            [
                ErrorCode::InvalidArgument,
                ErrorCode::AlreadyExists,
                ErrorCode::LeaseExpired
            ]
        );
        let same = ns.get(&RemotePath::parse("/same").unwrap()).unwrap();
        assert_eq!(ns.file_chunks(same.id).unwrap()[0].id.0, 4);
        for (path, chunk) in [("/a", 1), ("/b", 2)] {
            let f = ns.get(&RemotePath::parse(path).unwrap()).unwrap();
            assert_eq!(f.inode.chunk_count, 1);
            assert_eq!(ns.file_chunks(f.id).unwrap()[0].id.0, chunk);
        }
        // The failed ones are still pending, to be written again or expire.
        let mut left: Vec<u64> = ns
            .all_pending()
            .unwrap()
            .iter()
            .map(|(id, _)| id.0)
            .collect();
        left.sort();
        let mut want = vec![third.0, gap.0];
        want.sort();
        assert_eq!(left, want);
        assert!(ns
            .lookup(&RemotePath::parse("/gap").unwrap())
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_file_of_many_chunks_is_written_one_small_record_per_chunk() {
        let dir = tempfile::tempdir().unwrap();
        Namespace::format(dir.path()).unwrap();
        let path = RemotePath::parse("/big").unwrap();
        let id = {
            let ns = Namespace::open(dir.path()).unwrap();
            let parent = ns.parent_dir(&path).unwrap();
            let id = ns
                .create(
                    &path,
                    &parent,
                    PendingFile {
                        path: "/big".into(),
                        replication: 3,
                        chunk_size: 10,
                        mode: 0o644,
                        overwrite: false,
                        owner: "admin".into(),
                        group: SUPERGROUP.into(),
                        chunks: BTreeMap::new(),
                        allocated: Vec::new(),
                    },
                )
                .unwrap();
            let record = ns.pending.get(id.0.to_be_bytes()).unwrap().unwrap().len();
            for i in 0..2000u32 {
                let chunk = ns.new_chunk_id().unwrap();
                ns.add_allocated(id, chunk).unwrap();
                let head = ns.pending_head(id).unwrap();
                assert!(ns.is_allocated(id, &head, chunk).unwrap());
                let meta = ChunkMeta {
                    id: chunk,
                    size: 10,
                    digest: quern_proto::Digest([i as u8; 32]),
                };
                ns.commit_part(id, i, &meta).unwrap();
            }
            // The file's own record never grew.
            let now = ns.pending.get(id.0.to_be_bytes()).unwrap().unwrap().len();
            assert_eq!(now, record);
            ns.flush_now().unwrap();
            id
        };
        // Across a restart the parts are read back with their file.
        let ns = Namespace::open(dir.path()).unwrap();
        let all = ns.all_pending().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.chunks.len(), 2000);
        assert_eq!(all[0].1.allocated.len(), 2000);
        assert!(!ns
            .is_allocated(id, &all[0].1, quern_proto::ChunkId(u64::MAX))
            .unwrap());
        let (status, _, unused) = ns.complete(id).unwrap();
        assert_eq!(status.size, 20_000);
        assert!(unused.is_empty());
        assert_eq!(
            ns.pending_parts.len(),
            0,
            "completing leaves no parts behind"
        );
        let id = ns.get(&path).unwrap().id;
        assert_eq!(ns.file_chunks(id).unwrap().len(), 2000);
    }
}
