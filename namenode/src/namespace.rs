//! The namespace in sled: inodes, directory entries and files being written.
//!
//! Trees: `inodes` (inode id -> [`Inode`]), `dirents` (parent id ++ name ->
//! child id) and `pending` ([`FileId`] -> [`PendingFile`]). A file being
//! written lives only in `pending` until it completes, so nobody can see it
//! before then. Every mutation that touches several trees is one sled
//! transaction, so a SIGKILL never leaves half an operation behind; callers
//! serialise mutations (one writer at a time) and flush before replying.

use quern_proto::msg::{ChunkMeta, FileKind, FileStatus};
use quern_proto::{ErrorCode, FileId, RemotePath, WireError};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

pub const ROOT: u64 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inode {
    pub kind: FileKind,
    pub mode: u32,
    pub mtime_ms: i64,
    pub replication: u8,
    pub chunk_size: u64,
    pub size: u64,
    pub chunks: Vec<ChunkMeta>,
}

impl Inode {
    fn dir(mode: u32) -> Inode {
        Inode {
            kind: FileKind::Dir,
            mode,
            mtime_ms: now_ms(),
            replication: 0,
            chunk_size: 0,
            size: 0,
            chunks: Vec::new(),
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
            mtime_ms: self.mtime_ms,
            chunks: self.chunks.len() as u32,
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
    flush_lock: tokio::sync::Mutex<()>,
    inodes: sled::Tree,
    dirents: sled::Tree,
    pending: sled::Tree,
}

impl Namespace {
    pub fn open(dir: &std::path::Path) -> Result<Namespace, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("meta"))
            .flush_every_ms(Some(1000))
            .open()?;
        let ns = Namespace {
            inodes: db.open_tree("inodes")?,
            dirents: db.open_tree("dirents")?,
            pending: db.open_tree("pending")?,
            db,
            written: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new(()),
        };
        if ns.inodes.get(ROOT.to_be_bytes())?.is_none() {
            ns.inodes
                .insert(ROOT.to_be_bytes(), enc(&Inode::dir(0o755)))?;
            ns.db.flush()?;
        }
        Ok(ns)
    }

    /// Makes every mutation so far survive a crash of this process.
    ///
    /// Group commit: sled's flush fsyncs, so concurrent callers share one
    /// flush instead of queueing one each, and it runs on a blocking thread
    /// so the async workers keep serving.
    pub async fn flush(&self) -> Res<()> {
        let mine = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let _turn = self.flush_lock.lock().await;
        if self.flushed.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        let upto = self.written.load(Ordering::SeqCst);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("metadata flush: {e}")))?
            .st()?;
        self.flushed.store(upto, Ordering::SeqCst);
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
            Some(v) => Ok(Some(dec(&v, "inode")?)),
            None => Ok(None),
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
        let mut id = ROOT;
        let mut inode = self
            .inode(ROOT)?
            .ok_or_else(|| err(ErrorCode::Internal, "root inode missing".into()))?;
        let names: Vec<&str> = path.components().collect();
        for (i, name) in names.iter().enumerate() {
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
    fn parent_dir(&self, path: &RemotePath) -> Res<Resolved> {
        let parent = path.parent().ok_or_else(|| {
            err(
                ErrorCode::AlreadyExists,
                "/ is the root directory".to_string(),
            )
        })?;
        match self.lookup(&parent)? {
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
        let mut out = Vec::new();
        for item in self.dirents.scan_prefix(dir.to_be_bytes()) {
            let (k, v) = item.st()?;
            let name = String::from_utf8_lossy(&k[8..]).into_owned();
            let id = id_from(&v);
            if let Some(inode) = self.inode(id)? {
                out.push((name, id, inode));
            }
        }
        Ok(out)
    }

    pub fn mkdir(&self, path: &RemotePath, parents: bool, mode: u32) -> Res<()> {
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
                    None => self.mkdir(&cur, false, mode)?,
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
        (&self.inodes, &self.dirents)
            .transaction(|(inodes, dirents)| {
                inodes.insert(&id.to_be_bytes(), enc(&Inode::dir(mode)))?;
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
        let mut freed = target.inode.chunks.clone();
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
                        freed.extend(cinode.chunks);
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
            freed = ex.chunks;
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

    /// Checks a file may be created at `path` and records it as pending.
    pub fn create(&self, path: &RemotePath, pending: PendingFile) -> Res<FileId> {
        self.check_creatable(path, pending.overwrite)?;
        let id = self.new_file_id()?;
        self.pending
            .insert(id.0.to_be_bytes(), enc(&pending))
            .st()?;
        Ok(id)
    }

    fn check_creatable(&self, path: &RemotePath, overwrite: bool) -> Res<Option<u64>> {
        let parent = self.parent_dir(path)?;
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

    pub fn pending(&self, id: FileId) -> Res<PendingFile> {
        match self.pending.get(id.0.to_be_bytes()).st()? {
            Some(v) => Ok(dec(&v, "pending file")?),
            None => Err(err(
                ErrorCode::LeaseExpired,
                format!("{id}: no file is being written under this id (its lease expired or it was completed); write it again"),
            )),
        }
    }

    pub fn put_pending(&self, id: FileId, p: &PendingFile) -> Res<()> {
        self.pending.insert(id.0.to_be_bytes(), enc(p)).st()?;
        Ok(())
    }

    pub fn all_pending(&self) -> Res<Vec<(FileId, PendingFile)>> {
        let mut out = Vec::new();
        for item in self.pending.iter() {
            let (k, v) = item.st()?;
            out.push((FileId(id_from(&k)), dec(&v, "pending file")?));
        }
        Ok(out)
    }

    pub fn drop_pending(&self, id: FileId) -> Res<Option<PendingFile>> {
        match self.pending.remove(id.0.to_be_bytes()).st()? {
            Some(v) => Ok(Some(dec(&v, "pending file")?)),
            None => Ok(None),
        }
    }

    /// Makes a pending file visible. Returns its status, the chunks of a
    /// file it replaced, and the chunk ids allocated but never committed.
    #[allow(clippy::type_complexity)]
    pub fn complete(
        &self,
        id: FileId,
    ) -> Res<(FileStatus, Vec<ChunkMeta>, Vec<quern_proto::ChunkId>)> {
        let p = self.pending(id)?;
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
        let replaced = self.check_creatable(&path, p.overwrite)?;
        let parent = self.parent_dir(&path)?;
        let mut freed = Vec::new();
        if let Some(old) = replaced {
            if let Some(ino) = self.inode(old)? {
                freed = ino.chunks;
            }
        }
        let inode = Inode {
            kind: FileKind::File,
            mode: p.mode,
            mtime_ms: now_ms(),
            replication: p.replication,
            chunk_size: p.chunk_size,
            size: chunks.iter().map(|c| c.size).sum(),
            chunks,
        };
        let new_id = self.new_id()?;
        let key = dirent_key(parent.id, path.name().unwrap_or_default());
        (&self.inodes, &self.dirents, &self.pending)
            .transaction(|(inodes, dirents, pending)| {
                inodes.insert(&new_id.to_be_bytes(), enc(&inode))?;
                dirents.insert(key.as_slice(), &new_id.to_be_bytes())?;
                if let Some(old) = replaced {
                    inodes.remove(&old.to_be_bytes())?;
                }
                pending.remove(&id.0.to_be_bytes())?;
                TxResult::Ok(())
            })
            .st()?;
        let committed: std::collections::HashSet<_> = inode.chunks.iter().map(|c| c.id).collect();
        let unused = p
            .allocated
            .into_iter()
            .filter(|c| !committed.contains(c))
            .collect();
        Ok((inode.status(&path), freed, unused))
    }

    pub fn update_inode(&self, id: u64, f: impl FnOnce(&mut Inode)) -> Res<Inode> {
        let mut inode = self
            .inode(id)?
            .ok_or_else(|| err(ErrorCode::NotFound, format!("inode {id} vanished")))?;
        f(&mut inode);
        self.inodes.insert(id.to_be_bytes(), enc(&inode)).st()?;
        Ok(inode)
    }

    /// Every file below (or at) `path`, depth first, and the number of
    /// directories seen.
    pub fn walk(&self, path: &RemotePath) -> Res<(Vec<(RemotePath, Inode)>, u64)> {
        let top = self.get(path)?;
        let mut files = Vec::new();
        let mut dirs = 0;
        let mut stack = vec![(path.clone(), top.id, top.inode)];
        while let Some((p, id, inode)) = stack.pop() {
            match inode.kind {
                FileKind::File => files.push((p, inode)),
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

    /// Every chunk of every completed file, with its replication target.
    pub fn all_chunks(&self) -> Res<Vec<(ChunkMeta, u8)>> {
        let mut out = Vec::new();
        for item in self.inodes.iter() {
            let (_, v) = item.st()?;
            let inode: Inode = dec(&v, "inode")?;
            for c in inode.chunks {
                out.push((c, inode.replication));
            }
        }
        Ok(out)
    }
}

fn id_from(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(b)
}
