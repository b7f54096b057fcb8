//! The kernel's requests, answered through the client library.

use crate::cache::ChunkCache;
use crate::inodes::Inodes;
use crate::{errno, MountOptions};
use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow,
};
use quern_client::{Client, FileWriter, WriteOptions};
use quern_proto::msg::{FileKind, FileLocations, FileStatus, NodeState};
use quern_proto::ChunkId;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Mode the namenode gives new directories.
const DIR_MODE: u32 = 0o755;
/// `st_blksize`: tools size their buffers by it (cp, Python's `open`), and
/// the kernel passes up to 1 MiB per request.
const BLKSIZE: u32 = 1 << 20;
const MAX_NAME: usize = 255;
/// Largest gap a write past the end may leave; it is stored as zeros.
const MAX_GAP: u64 = 1 << 30;
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// A write (or extension) at `to` of a file whose next byte is at `end`
/// is accepted: at the end, or past it by at most [`MAX_GAP`].
fn forward(end: u64, to: u64) -> bool {
    to >= end && to - end <= MAX_GAP
}

pub(crate) struct QuernFs {
    client: Client,
    rt: tokio::runtime::Handle,
    opts: MountOptions,
    /// Remote root without a trailing slash ("" for `/`).
    root: String,
    uid: u32,
    gid: u32,
    /// Local ids of the owners and groups the namenode names.
    ids: Mutex<HashMap<(bool, String), Option<u32>>>,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Files being written through this mount, by path: not yet visible in
    /// the namenode, but visible here.
    pending: Mutex<HashMap<String, Arc<Pending>>>,
    cache: Arc<ChunkCache>,
    /// What each inode's file looked like at its last open, to keep the
    /// kernel's page cache when it has not changed.
    seen: Mutex<HashMap<u64, Signature>>,
    /// Chunk locations by path, trusted as long as attributes are, so
    /// many opens of one file cost one `Locate`.
    locations: Mutex<HashMap<String, (Arc<FileLocations>, Instant)>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Signature {
    size: u64,
    mtime_ms: i64,
    first_chunk: Option<ChunkId>,
}

impl Signature {
    fn of(loc: &FileLocations) -> Signature {
        Signature {
            size: loc.status.size,
            mtime_ms: loc.status.mtime_ms,
            first_chunk: loc.chunks.first().map(|c| c.meta.id),
        }
    }
}

/// Attributes of a file being written, applied when it is completed.
struct Pending {
    attrs: Mutex<PendingAttrs>,
}

#[derive(Clone)]
struct PendingAttrs {
    size: u64,
    mode: u32,
    mtime_ms: i64,
    set_mode: bool,
    set_mtime: bool,
    /// Unlinked while being written: abandon it at close.
    unlinked: bool,
}

enum Handle {
    Read(ReadHandle),
    Write(Mutex<WriteHandle>),
    Dir(Vec<DirEntry>),
}

struct ReadHandle {
    path: String,
    loc: Arc<FileLocations>,
    /// Index + 1 of the chunk the last read touched (0: none yet).
    last_chunk: AtomicU64,
}

struct WriteHandle {
    /// Relative path at open.
    rel: String,
    /// Process that opened it: only its close completes the file.
    opener: u32,
    state: WriteState,
    /// Options for a writer started later (append, truncate).
    base: WriteOptions,
    /// Reads through a read-write descriptor before anything was written.
    reader: Option<ReadHandle>,
    pending: Option<Arc<Pending>>,
    warned: bool,
}

enum WriteState {
    /// Nothing written through this descriptor (yet, or since the last
    /// close/fsync): the file as the namenode has it.
    Idle {
        size: u64,
        exists: bool,
    },
    Writing {
        writer: FileWriter,
        pos: u64,
    },
    /// A write failed; the file is abandoned.
    Broken,
}

struct DirEntry {
    name: String,
    kind: FileKind,
    /// `None` for `.` and `..`.
    status: Option<FileStatus>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn time_of(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

fn ms_of(t: TimeOrNow) -> i64 {
    match t {
        TimeOrNow::Now => now_ms(),
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        },
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn parent_of(rel: &str) -> &str {
    rel.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

/// The id shown for owners with no local account.
const NOBODY: u32 = 65534;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State behind these locks stays consistent between statements; a
    // panicked request thread must not take the whole mount down.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl QuernFs {
    pub(crate) fn new(client: Client, rt: tokio::runtime::Handle, opts: MountOptions) -> QuernFs {
        let root = opts.remote_root.trim_end_matches('/').to_string();
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        QuernFs {
            client,
            rt,
            root,
            uid,
            gid,
            ids: Mutex::new(HashMap::new()),
            inodes: Mutex::new(Inodes::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            cache: Arc::new(ChunkCache::new(opts.cache_bytes)),
            seen: Mutex::new(HashMap::new()),
            locations: Mutex::new(HashMap::new()),
            opts,
        }
    }

    fn me(&self) -> String {
        self.client.user().unwrap_or_default().to_string()
    }

    /// The local uid and gid shown for a quern owner and group. The
    /// mount's own user (and an empty name) is the mounting user; other
    /// names are the local account or group of the same name where one
    /// exists. A group with no local namesake shows as the mounting
    /// user's group on the mount's own files (so `tar` and `cp -a` of them
    /// keep the user's group), else as nobody (65534), like other owners.
    fn local_ids(&self, owner: &str, group: &str) -> (u32, u32) {
        let mine = owner.is_empty() || Some(owner) == self.client.user();
        let uid = if mine {
            self.uid
        } else {
            self.local_id(false, owner).unwrap_or(NOBODY)
        };
        let gid = match self.local_id(true, group) {
            Some(g) => g,
            None if mine => self.gid,
            None => NOBODY,
        };
        (uid, gid)
    }

    /// The local account (or group) called `name`, if any.
    fn local_id(&self, group: bool, name: &str) -> Option<u32> {
        if name.is_empty() {
            return None;
        }
        let key = (group, name.to_string());
        // Held across the look-up: getpwnam and getgrnam are not reentrant.
        let mut ids = lock(&self.ids);
        if let Some(id) = ids.get(&key) {
            return *id;
        }
        let id = std::ffi::CString::new(name).ok().and_then(|c| {
            // SAFETY: getpwnam/getgrnam take a NUL-terminated name and
            // return a pointer into static storage, read at once.
            unsafe {
                if group {
                    let g = libc::getgrnam(c.as_ptr());
                    (!g.is_null()).then(|| (*g).gr_gid)
                } else {
                    let p = libc::getpwnam(c.as_ptr());
                    (!p.is_null()).then(|| (*p).pw_uid)
                }
            }
        });
        ids.insert(key, id);
        id
    }

    fn remote(&self, rel: &str) -> String {
        match (self.root.is_empty(), rel.is_empty()) {
            (true, true) => "/".into(),
            (true, false) => format!("/{rel}"),
            (false, true) => self.root.clone(),
            (false, false) => format!("{}/{rel}", self.root),
        }
    }

    /// Runs a cluster call from a kernel request thread, bounded by the
    /// mount's timeout times `scale`.
    fn block<T>(
        &self,
        what: &str,
        scale: u32,
        fut: impl Future<Output = Result<T, quern_client::Error>>,
    ) -> Result<T, Errno> {
        let limit = self.opts.timeout * scale.max(1);
        // The timer must be made inside the runtime.
        match self
            .rt
            .block_on(async { tokio::time::timeout(limit, fut).await })
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.fail(what, &e)),
            Err(_) => {
                tracing::warn!(
                    "{what}: no answer within {:.1} s (ETIMEDOUT); is the cluster reachable?",
                    limit.as_secs_f64()
                );
                Err(Errno::ETIMEDOUT)
            }
        }
    }

    fn fail(&self, what: &str, e: &quern_client::Error) -> Errno {
        let no = errno::of(e);
        if errno::is_expected(no) {
            tracing::debug!("{what}: {e}");
        } else if matches!(e, quern_client::Error::Unreadable { .. }) {
            tracing::error!("{what}: {e} (EIO)");
        } else {
            tracing::warn!("{what}: {e} ({no:?})");
        }
        no
    }

    fn path_of(&self, ino: INodeNo) -> Result<String, Errno> {
        lock(&self.inodes)
            .path(ino.0)
            .map(str::to_string)
            .ok_or(Errno::ENOENT)
    }

    fn child_path(&self, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        let name = name.to_str().ok_or_else(|| {
            tracing::debug!("{name:?}: quern names are UTF-8");
            Errno::EINVAL
        })?;
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG);
        }
        Ok(join(&self.path_of(parent)?, name))
    }

    fn writable(&self) -> Result<(), Errno> {
        if self.opts.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    fn attr(&self, ino: u64, s: &FileStatus) -> FileAttr {
        let t = time_of(s.mtime_ms);
        let dir = s.kind == FileKind::Dir;
        let (uid, gid) = self.local_ids(&s.owner, &s.group);
        FileAttr {
            ino: INodeNo(ino),
            size: s.size,
            blocks: s.size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: (s.mode & 0o7777) as u16,
            nlink: if dir { 2 } else { 1 },
            uid,
            gid,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        }
    }

    fn pending_attr(&self, ino: u64, p: &PendingAttrs) -> FileAttr {
        let s = FileStatus {
            path: String::new(),
            kind: FileKind::File,
            size: p.size,
            replication: self.opts.replication,
            chunk_size: self.opts.chunk_size,
            mode: p.mode,
            owner: self.me(),
            group: String::new(),
            mtime_ms: p.mtime_ms,
            chunks: 0,
        };
        self.attr(ino, &s)
    }

    fn pending(&self, rel: &str) -> Option<Arc<Pending>> {
        lock(&self.pending).get(rel).cloned()
    }

    fn stat(&self, rel: &str) -> Result<FileStatus, Errno> {
        let path = self.remote(rel);
        self.block(&format!("stat {path}"), 1, self.client.stat(&path))
    }

    /// Attributes of `rel` as this mount sees them: a file being written
    /// here wins over the namenode's (older or missing) version.
    fn attr_of(&self, ino: u64, rel: &str) -> Result<FileAttr, Errno> {
        if let Some(p) = self.pending(rel) {
            return Ok(self.pending_attr(ino, &lock(&p.attrs)));
        }
        Ok(self.attr(ino, &self.stat(rel)?))
    }

    fn add_handle(&self, h: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Arc::new(h));
        FileHandle(fh)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        lock(&self.handles).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// An open handle and the path of its inode, for readdir(plus).
    fn dir_listing(&self, fh: FileHandle, ino: INodeNo) -> Result<(Arc<Handle>, String), Errno> {
        Ok((self.handle(fh)?, self.path_of(ino)?))
    }

    fn entry_reply(&self, reply: ReplyEntry, rel: &str, attr: impl FnOnce(u64) -> FileAttr) {
        let ino = lock(&self.inodes).lookup(rel);
        reply.entry(&self.opts.attr_ttl, &attr(ino), Generation(0));
    }

    // ------------------------------------------------------------- reading

    fn open_reader(&self, rel: &str) -> Result<ReadHandle, Errno> {
        let path = self.remote(rel);
        let cached = lock(&self.locations)
            .get(rel)
            .filter(|(_, at)| at.elapsed() < self.opts.attr_ttl)
            .map(|(l, _)| l.clone());
        let loc = match cached {
            Some(l) => l,
            None => {
                let l =
                    Arc::new(self.block(&format!("open {path}"), 1, self.client.locate(&path))?);
                let mut map = lock(&self.locations);
                if map.len() > 10_000 {
                    let ttl = self.opts.attr_ttl;
                    map.retain(|_, (_, at)| at.elapsed() < ttl);
                }
                map.insert(rel.to_string(), (l.clone(), Instant::now()));
                l
            }
        };
        if loc.status.kind == FileKind::Dir {
            return Err(Errno::EISDIR);
        }
        Ok(ReadHandle {
            path,
            loc,
            last_chunk: AtomicU64::new(0),
        })
    }

    fn read_at(&self, h: &ReadHandle, offset: u64, size: u32) -> Result<Bytes, Errno> {
        let file_size = h.loc.status.size;
        if offset >= file_size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = file_size.min(offset + u64::from(size));
        let chunks = &h.loc.chunks;
        let first = chunks.partition_point(|c| c.offset + c.meta.size <= offset);
        if first >= chunks.len() {
            tracing::warn!(
                "{}: no chunk holds offset {offset} of {file_size} bytes",
                h.path
            );
            return Err(Errno::EIO);
        }
        self.read_ahead(h, first, offset);
        let what = format!("read {} at {offset}", h.path);
        let spanned = chunks[first..]
            .iter()
            .take_while(|c| c.offset < end)
            .count() as u32;
        let limit = self.opts.timeout;
        self.block(&what, spanned + 1, async {
            let mut out: Option<Vec<u8>> = None;
            let mut pos = offset;
            let mut i = first;
            while pos < end && i < chunks.len() {
                let c = &chunks[i];
                // A replica on a node that died keeps its stream open until
                // the connection times out: past the mount's bound the chunk
                // counts as unreadable.
                let bytes = tokio::time::timeout(limit, self.cache.get(&self.client, &h.path, c))
                    .await
                    .map_err(|_| quern_client::Error::Unreadable {
                        path: h.path.clone(),
                        index: c.index,
                        chunk: c.meta.id,
                        tried: format!("no replica answered within {:.1} s", limit.as_secs_f64()),
                    })??;
                let a = (pos - c.offset) as usize;
                let b = ((end - c.offset) as usize).min(bytes.len());
                if a >= b {
                    break;
                }
                if out.is_none() && end - c.offset <= bytes.len() as u64 {
                    // The whole request is inside one chunk: no copy.
                    return Ok(bytes.slice(a..b));
                }
                out.get_or_insert_with(|| Vec::with_capacity((end - offset) as usize))
                    .extend_from_slice(&bytes[a..b]);
                pos = c.offset + b as u64;
                i += 1;
            }
            Ok(Bytes::from(out.unwrap_or_default()))
        })
    }

    /// Fetches the next chunks in the background when `h` reads forward.
    fn read_ahead(&self, h: &ReadHandle, index: usize, offset: u64) {
        let prev = h.last_chunk.swap(index as u64 + 1, Ordering::Relaxed);
        let sequential =
            (prev == 0 && offset == 0) || prev == index as u64 + 1 || prev == index as u64;
        if !sequential || self.opts.read_ahead_chunks == 0 {
            return;
        }
        let chunk_size = h.loc.status.chunk_size.max(1);
        // Never ask for more than the cache can hold next to the chunk
        // being read, or read-ahead evicts what it is reading ahead of.
        let fits = (self.cache.capacity() / chunk_size).saturating_sub(1) as usize;
        let ahead = self.opts.read_ahead_chunks.min(fits);
        for c in h.loc.chunks.iter().skip(index + 1).take(ahead) {
            if self.cache.has(c.meta.id) {
                continue;
            }
            let (cache, client, path, chunk) = (
                self.cache.clone(),
                self.client.clone(),
                h.path.clone(),
                c.clone(),
            );
            self.rt.spawn(async move {
                if let Err(e) = cache.get(&client, &path, &chunk).await {
                    tracing::debug!("read-ahead of chunk {} of {path}: {e}", chunk.index);
                }
            });
        }
    }

    // ------------------------------------------------------------- writing

    /// `rel` changed here: do not trust what was cached about it.
    fn changed(&self, rel: &str) {
        lock(&self.locations).remove(rel);
    }

    /// Paths changed wholesale (rename, remove).
    fn changed_all(&self) {
        lock(&self.locations).clear();
    }

    fn register_pending(&self, rel: &str, mode: u32) -> Arc<Pending> {
        let p = Arc::new(Pending {
            attrs: Mutex::new(PendingAttrs {
                size: 0,
                mode,
                mtime_ms: now_ms(),
                set_mode: false,
                set_mtime: false,
                unlinked: false,
            }),
        });
        lock(&self.pending).insert(rel.to_string(), p.clone());
        p
    }

    fn unregister_pending(&self, rel: &str, p: &Arc<Pending>) {
        let mut map = lock(&self.pending);
        if map.get(rel).is_some_and(|q| Arc::ptr_eq(q, p)) {
            map.remove(rel);
        }
    }

    /// Starts replacing `rel`; when `keep` > 0 its first `keep` bytes are
    /// copied into the new file first (append: quern has no in-place
    /// append, so the file is rewritten; the old version stays visible
    /// until close).
    fn start_writer(&self, w: &mut WriteHandle, keep: u64) -> Result<(), Errno> {
        let path = self.remote(&w.rel);
        let opts = WriteOptions {
            overwrite: true,
            ..w.base
        };
        let client = &self.client;
        let copy_chunks = keep.div_ceil(opts.chunk_size.max(1)) as u32;
        if keep > 0 {
            tracing::info!("appending to {path}: rewriting its {keep} bytes first");
        }
        let writer = self.block(&format!("write {path}"), 2 + copy_chunks, async {
            let mut writer = client.create(&path, opts).await?;
            if keep > 0 {
                let copied = async {
                    let loc = client.locate(&path).await?;
                    let mut next = None;
                    for (i, c) in loc.chunks.iter().enumerate() {
                        let fetch = match next.take() {
                            Some(h) => h,
                            None => spawn_read(client, &path, c),
                        };
                        if let Some(n) = loc.chunks.get(i + 1) {
                            next = Some(spawn_read(client, &path, n));
                        }
                        let bytes = fetch.await.map_err(|e| quern_client::Error::Io {
                            context: format!("reading {path} to append to it"),
                            cause: std::io::Error::other(e.to_string()),
                        })??;
                        writer.write(&bytes).await?;
                    }
                    if writer.written() != keep {
                        return Err(quern_client::Error::Io {
                            context: format!("appending to {path}"),
                            cause: std::io::Error::other(format!(
                                "it changed while being opened ({} bytes, expected {keep})",
                                writer.written()
                            )),
                        });
                    }
                    Ok(())
                }
                .await;
                if let Err(e) = copied {
                    writer.abort().await;
                    return Err(e);
                }
            }
            Ok(writer)
        })?;
        let pending = self.register_pending(&w.rel, w.base.mode);
        lock(&pending.attrs).size = keep;
        w.pending = Some(pending);
        w.state = WriteState::Writing { writer, pos: keep };
        Ok(())
    }

    fn refuse_write(&self, w: &mut WriteHandle, offset: u64, next: u64) -> Errno {
        if !w.warned {
            w.warned = true;
            tracing::warn!(
                "{}: write at offset {offset} refused (EOPNOTSUPP): quern files are written \
                 once, front to back (a gap of up to {} MiB is filled with zeros), and the \
                 next byte of this file goes at offset {next}",
                self.remote(&w.rel),
                MAX_GAP >> 20
            );
        }
        Errno::EOPNOTSUPP
    }

    /// Appends `data` at `offset` of a file being written, after zeros
    /// from where it ended (quern stores no holes; `cp` of a sparse file
    /// seeks over them).
    fn write_at_end(&self, w: &mut WriteHandle, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let path = self.remote(&w.rel);
        let WriteState::Writing { writer, pos } = &mut w.state else {
            return Err(Errno::EIO);
        };
        let start = *pos;
        let gap_chunks = (offset.saturating_sub(start) / w.base.chunk_size.max(1)) as u32;
        let r = self.block(&format!("write {path}"), 2 + gap_chunks, async {
            let mut at = start;
            while at < offset {
                let n = (offset - at).min(ZEROS.len() as u64) as usize;
                writer.write(&ZEROS[..n]).await?;
                at += n as u64;
            }
            writer.write(data).await
        });
        match r {
            Ok(()) => {
                *pos = offset + data.len() as u64;
                let pos = *pos;
                if let Some(p) = &w.pending {
                    lock(&p.attrs).size = pos;
                }
                Ok(())
            }
            Err(e) => {
                self.abandon(w);
                Err(e)
            }
        }
    }

    /// Makes what was written visible (close or fsync).
    fn finish_write(&self, w: &mut WriteHandle) -> Result<(), Errno> {
        let state = std::mem::replace(
            &mut w.state,
            WriteState::Idle {
                size: 0,
                exists: false,
            },
        );
        let WriteState::Writing { writer, pos } = state else {
            w.state = state;
            return Ok(());
        };
        let pending = w.pending.take();
        let attrs = pending.as_ref().map(|p| lock(&p.attrs).clone());
        let path = self.remote(&w.rel);
        if attrs.as_ref().is_some_and(|a| a.unlinked) {
            self.rt.block_on(writer.abort());
            if let Some(p) = &pending {
                self.unregister_pending(&w.rel, p);
            }
            return Ok(());
        }
        let result = self.block(&format!("close {path}"), 2, async {
            writer.close().await?;
            if let Some(a) = attrs.as_ref().filter(|a| a.set_mode || a.set_mtime) {
                self.client
                    .set_attr(
                        &path,
                        a.set_mode.then_some(a.mode),
                        a.set_mtime.then_some(a.mtime_ms),
                    )
                    .await?;
            }
            Ok(())
        });
        if let Some(p) = &pending {
            self.unregister_pending(&w.rel, p);
        }
        self.changed(&w.rel);
        match result {
            Ok(()) => {
                w.state = WriteState::Idle {
                    size: pos,
                    exists: true,
                };
                Ok(())
            }
            Err(e) => {
                w.state = WriteState::Broken;
                Err(e)
            }
        }
    }

    fn abandon(&self, w: &mut WriteHandle) {
        if let WriteState::Writing { writer, .. } =
            std::mem::replace(&mut w.state, WriteState::Broken)
        {
            tracing::warn!(
                "{}: closed without a successful flush; abandoned",
                self.remote(&w.rel)
            );
            let limit = self.opts.timeout;
            self.rt.block_on(async {
                let _ = tokio::time::timeout(limit, writer.abort()).await;
            });
        }
        if let Some(p) = w.pending.take() {
            self.unregister_pending(&w.rel, &p);
        }
    }

    /// Makes `rel` an empty file at once (truncate to 0 outside any open
    /// descriptor).
    fn truncate_now(&self, rel: &str, status: &FileStatus) -> Result<(), Errno> {
        let path = self.remote(rel);
        let opts = WriteOptions {
            replication: status.replication.max(1),
            chunk_size: status.chunk_size.max(1),
            overwrite: true,
            mode: status.mode,
        };
        self.block(&format!("truncate {path}"), 1, async {
            self.client.create(&path, opts).await?.close().await
        })?;
        self.changed(rel);
        Ok(())
    }

    fn write_options(&self, status: Option<&FileStatus>, mode: u32) -> WriteOptions {
        match status {
            Some(s) if s.kind == FileKind::File => WriteOptions {
                replication: s.replication.max(1),
                chunk_size: s.chunk_size.max(1),
                overwrite: true,
                mode: s.mode,
            },
            _ => WriteOptions {
                replication: self.opts.replication,
                chunk_size: self.opts.chunk_size,
                overwrite: false,
                mode,
            },
        }
    }

    // ---------------------------------------------------------- directories

    fn list_dir(&self, rel: &str) -> Result<Vec<DirEntry>, Errno> {
        let path = self.remote(rel);
        let list = self.block(&format!("list {path}"), 1, self.client.list(&path))?;
        let mut entries = vec![
            DirEntry {
                name: ".".into(),
                kind: FileKind::Dir,
                status: None,
            },
            DirEntry {
                name: "..".into(),
                kind: FileKind::Dir,
                status: None,
            },
        ];
        let mut names = std::collections::HashSet::new();
        for s in list {
            let name = s.path.rsplit('/').next().unwrap_or_default().to_string();
            if name.is_empty() {
                continue;
            }
            names.insert(name.clone());
            entries.push(DirEntry {
                name,
                kind: s.kind,
                status: Some(s),
            });
        }
        // Files being written here are not in the namenode yet.
        for (p, pend) in lock(&self.pending).iter() {
            if parent_of(p) == rel && !p.is_empty() {
                let name = p.rsplit('/').next().unwrap_or(p).to_string();
                let a = lock(&pend.attrs);
                if !names.contains(&name) && !a.unlinked {
                    entries.push(DirEntry {
                        name,
                        kind: FileKind::File,
                        status: Some(FileStatus {
                            path: self.remote(p),
                            kind: FileKind::File,
                            size: a.size,
                            replication: self.opts.replication,
                            chunk_size: self.opts.chunk_size,
                            mode: a.mode,
                            owner: self.me(),
                            group: String::new(),
                            mtime_ms: a.mtime_ms,
                            chunks: 0,
                        }),
                    });
                }
            }
        }
        Ok(entries)
    }

    fn dir_entry_ino(&self, dir: &str, e: &DirEntry) -> u64 {
        let inodes = lock(&self.inodes);
        let rel = match e.name.as_str() {
            "." => dir.to_string(),
            ".." => parent_of(dir).to_string(),
            n => join(dir, n),
        };
        // readdir's inode numbers are hints; unknown paths get a stable
        // stand-in outside the range handed out by lookups.
        inodes.ino(&rel).unwrap_or_else(|| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            rel.hash(&mut h);
            h.finish() | (1 << 63)
        })
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        self.writable()?;
        let rel = self.child_path(parent, name)?;
        let path = self.remote(&rel);
        let pending = if dir { None } else { self.pending(&rel) };
        if let Some(p) = &pending {
            lock(&p.attrs).unlinked = true;
        }
        let status = match self.stat(&rel) {
            Ok(s) => s,
            Err(e) if e == Errno::ENOENT && pending.is_some() => {
                lock(&self.inodes).detach(&rel);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match (dir, status.kind) {
            (false, FileKind::Dir) => return Err(Errno::EISDIR),
            (true, FileKind::File) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.block(
            &format!("remove {path}"),
            1,
            self.client.delete(&path, false),
        )?;
        lock(&self.inodes).detach(&rel);
        self.changed_all();
        Ok(())
    }
}

/// The process (thread group) a kernel request came from; 0 when unknown.
/// FUSE passes the calling thread's id.
fn process_of(tid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn spawn_read(
    client: &Client,
    path: &str,
    chunk: &quern_proto::msg::LocatedChunk,
) -> tokio::task::JoinHandle<Result<Bytes, quern_client::Error>> {
    let (client, path, chunk) = (client.clone(), path.to_string(), chunk.clone());
    tokio::spawn(async move { client.read_chunk(&path, &chunk).await.map(|(b, _)| b) })
}

impl fuser::Filesystem for QuernFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            // O_TRUNC reaches open, so a truncating open replaces the file
            // at close instead of emptying it at once.
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            // Attributes come with directory entries: `ls -l` of a large
            // directory is one namenode call.
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            // Drop cached pages when another client replaced a file.
            InitFlags::FUSE_AUTO_INVAL_DATA,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::info!("kernel lacks FUSE capability {flag:?}");
            }
        }
        let _ = config.set_max_readahead(self.opts.read_ahead_kb.clamp(4, 1024) * 1024);
        let _ = config.set_max_background(64);
        // The namenode keeps milliseconds.
        let _ = config.set_time_granularity(Duration::from_millis(1));
        Ok(())
    }

    fn destroy(&mut self) {
        let handles: Vec<Arc<Handle>> = lock(&self.handles).drain().map(|(_, h)| h).collect();
        for h in handles {
            if let Handle::Write(w) = &*h {
                self.abandon(&mut lock(w));
            }
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let rel = match self.child_path(parent, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        if let Some(p) = self.pending(&rel) {
            let a = lock(&p.attrs).clone();
            if !a.unlinked {
                return self.entry_reply(reply, &rel, |ino| self.pending_attr(ino, &a));
            }
        }
        match self.stat(&rel) {
            Ok(s) => self.entry_reply(reply, &rel, |ino| self.attr(ino, &s)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if lock(&self.inodes).forget(ino.0, nlookup) {
            lock(&self.seen).remove(&ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let rel = match self.path_of(ino) {
            Ok(r) => r,
            Err(e) => {
                // Unlinked but still open: answer from the open handle.
                if let Some(Ok(h)) = fh.map(|f| self.handle(f)) {
                    if let Handle::Read(r) = &*h {
                        return reply.attr(&self.opts.attr_ttl, &self.attr(ino.0, &r.loc.status));
                    }
                }
                return reply.error(e);
            }
        };
        match self.attr_of(ino.0, &rel) {
            Ok(a) => reply.attr(&self.opts.attr_ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Owners live in the namenode and change only through `quern chown`
        // (local uids mean nothing there), and access times are not stored:
        // chown and atime-only changes are accepted and ignored, so `cp -a`
        // and `rsync -a` work.
        let result = (|| {
            let rel = self.path_of(ino)?;
            if mode.is_none() && size.is_none() && mtime.is_none() {
                return self.attr_of(ino.0, &rel);
            }
            self.writable()?;
            let mode = mode.map(|m| m & 0o7777);
            let mtime_ms = mtime.map(ms_of);
            // A truncate through an open descriptor that has written
            // nothing starts the replacement there.
            if let (Some(n), Some(fh)) = (size, fh) {
                if let Ok(h) = self.handle(fh) {
                    if let Handle::Write(w) = &*h {
                        let mut w = lock(w);
                        match w.state {
                            WriteState::Idle { size: cur, .. } if n == cur => {}
                            WriteState::Idle { .. } if n == 0 => self.start_writer(&mut w, 0)?,
                            WriteState::Idle { size: cur, .. } if forward(cur, n) => {
                                self.start_writer(&mut w, cur)?;
                                self.write_at_end(&mut w, n, &[])?;
                            }
                            WriteState::Writing { pos, .. } if n == pos => {}
                            WriteState::Writing { pos, .. } if forward(pos, n) => {
                                self.write_at_end(&mut w, n, &[])?;
                            }
                            WriteState::Broken => return Err(Errno::EIO),
                            WriteState::Idle { size: cur, .. }
                            | WriteState::Writing { pos: cur, .. } => {
                                return Err(self.refuse_truncate(&rel, cur, n));
                            }
                        }
                    }
                }
            }
            if let Some(p) = self.pending(&rel) {
                let mut a = lock(&p.attrs);
                if let Some(n) = size {
                    if n != a.size {
                        return Err(self.refuse_truncate(&rel, a.size, n));
                    }
                }
                if let Some(m) = mode {
                    a.mode = m;
                    a.set_mode = true;
                }
                if let Some(t) = mtime_ms {
                    a.mtime_ms = t;
                    a.set_mtime = true;
                }
                return Ok(self.pending_attr(ino.0, &a));
            }
            let path = self.remote(&rel);
            if let Some(n) = size {
                let status = self.stat(&rel)?;
                if status.kind == FileKind::Dir {
                    return Err(Errno::EISDIR);
                }
                if n != status.size {
                    if n != 0 {
                        return Err(self.refuse_truncate(&rel, status.size, n));
                    }
                    self.truncate_now(&rel, &status)?;
                }
            }
            if mode.is_some() || mtime_ms.is_some() {
                self.changed(&rel);
                self.block(
                    &format!("setattr {path}"),
                    1,
                    self.client.set_attr(&path, mode, mtime_ms),
                )?;
            }
            Ok(self.attr(ino.0, &self.stat(&rel)?))
        })();
        match result {
            Ok(a) => reply.attr(&self.opts.attr_ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = (|| {
            self.writable()?;
            let rel = self.child_path(parent, name)?;
            let path = self.remote(&rel);
            let want = mode & !umask & 0o7777;
            self.block(&format!("mkdir {path}"), 1, async {
                self.client.mkdir(&path, false).await?;
                if want != DIR_MODE {
                    self.client.set_attr(&path, Some(want), None).await?;
                }
                Ok(())
            })?;
            Ok((rel.clone(), self.stat(&rel)?))
        })();
        match result {
            Ok((rel, s)) => self.entry_reply(reply, &rel, |ino| self.attr(ino, &s)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            self.writable()?;
            if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
                return Err(Errno::EINVAL);
            }
            let replace = !flags.contains(RenameFlags::RENAME_NOREPLACE);
            let from = self.child_path(parent, name)?;
            let to = self.child_path(newparent, newname)?;
            if self.pending(&from).is_some() {
                tracing::warn!(
                    "rename {}: the file is still being written; close it first (EBUSY)",
                    self.remote(&from)
                );
                return Err(Errno::EBUSY);
            }
            let (src, dst) = (self.remote(&from), self.remote(&to));
            let what = format!("rename {src} to {dst}");
            match self.block(&what, 1, self.client.rename(&src, &dst, replace)) {
                Ok(()) => {}
                Err(e) if e == Errno::EEXIST && replace => {
                    // The namenode says "exists" for every refused
                    // replacement; POSIX tells them apart.
                    let a = self.stat(&from)?.kind;
                    let b = self.stat(&to)?.kind;
                    return Err(match (a, b) {
                        (FileKind::Dir, FileKind::File) => Errno::ENOTDIR,
                        (FileKind::File, FileKind::Dir) => Errno::EISDIR,
                        (FileKind::Dir, FileKind::Dir) => Errno::ENOTEMPTY,
                        _ => Errno::EEXIST,
                    });
                }
                Err(e) => return Err(e),
            }
            lock(&self.inodes).rename(&from, &to);
            self.changed_all();
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opener = process_of(req.pid());
        let result = (|| {
            let rel = self.path_of(ino)?;
            if flags.acc_mode() == OpenAccMode::O_RDONLY {
                let h = self.open_reader(&rel)?;
                let sig = Signature::of(&h.loc);
                let keep = lock(&self.seen).insert(ino.0, sig) == Some(sig);
                let fh = self.add_handle(Handle::Read(h));
                return Ok((
                    fh,
                    if keep {
                        FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::empty()
                    },
                ));
            }
            self.writable()?;
            if self.pending(&rel).is_some() {
                tracing::warn!(
                    "open {} for writing: it is already being written through this mount (EBUSY)",
                    self.remote(&rel)
                );
                return Err(Errno::EBUSY);
            }
            let status = self.stat(&rel)?;
            if status.kind == FileKind::Dir {
                return Err(Errno::EISDIR);
            }
            lock(&self.seen).remove(&ino.0);
            let mut w = WriteHandle {
                rel,
                state: WriteState::Idle {
                    size: status.size,
                    exists: true,
                },
                base: self.write_options(Some(&status), status.mode),
                reader: None,
                pending: None,
                warned: false,
                opener,
            };
            if flags.0 & libc::O_TRUNC != 0 {
                self.start_writer(&mut w, 0)?;
            }
            Ok((
                self.add_handle(Handle::Write(Mutex::new(w))),
                FopenFlags::empty(),
            ))
        })();
        match result {
            Ok((fh, f)) => reply.opened(fh, f),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let opener = process_of(req.pid());
        let result = (|| {
            self.writable()?;
            let rel = self.child_path(parent, name)?;
            if self.pending(&rel).is_some() {
                return Err(if flags & libc::O_EXCL != 0 {
                    Errno::EEXIST
                } else {
                    Errno::EBUSY
                });
            }
            let mode = mode & !umask & 0o7777;
            let path = self.remote(&rel);
            let mut opts = self.write_options(None, mode);
            opts.overwrite = flags & libc::O_TRUNC != 0 && flags & libc::O_EXCL == 0;
            let writer = match self.block(
                &format!("create {path}"),
                1,
                self.client.create(&path, opts),
            ) {
                Ok(w) => w,
                Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => {
                    // Another client made it between the kernel's lookup
                    // and this create: open what is there.
                    let status = self.stat(&rel)?;
                    let w = WriteHandle {
                        rel: rel.clone(),
                        state: WriteState::Idle {
                            size: status.size,
                            exists: true,
                        },
                        base: self.write_options(Some(&status), status.mode),
                        reader: None,
                        pending: None,
                        warned: false,
                        opener,
                    };
                    let fh = self.add_handle(Handle::Write(Mutex::new(w)));
                    let ino = lock(&self.inodes).lookup(&rel);
                    return Ok((fh, self.attr(ino, &status)));
                }
                Err(e) => return Err(e),
            };
            let pending = self.register_pending(&rel, mode);
            let attrs = lock(&pending.attrs).clone();
            let w = WriteHandle {
                rel: rel.clone(),
                state: WriteState::Writing { writer, pos: 0 },
                base: WriteOptions {
                    overwrite: true,
                    ..opts
                },
                reader: None,
                pending: Some(pending),
                warned: false,
                opener,
            };
            let fh = self.add_handle(Handle::Write(Mutex::new(w)));
            let ino = lock(&self.inodes).lookup(&rel);
            Ok((fh, self.pending_attr(ino, &attrs)))
        })();
        match result {
            Ok((fh, attr)) => reply.created(
                &self.opts.attr_ttl,
                &attr,
                Generation(0),
                fh,
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let result = (|| match &*self.handle(fh)? {
            Handle::Read(h) => self.read_at(h, offset, size),
            Handle::Write(w) => {
                let mut w = lock(w);
                match w.state {
                    WriteState::Idle { exists: true, .. } => {
                        if w.reader.is_none() {
                            w.reader = Some(self.open_reader(&w.rel)?);
                        }
                        match &w.reader {
                            Some(r) => self.read_at(r, offset, size),
                            None => Err(Errno::EIO),
                        }
                    }
                    WriteState::Idle { exists: false, .. } => Ok(Bytes::new()),
                    _ => {
                        tracing::warn!(
                            "{}: read while being written refused (EOPNOTSUPP): close it first",
                            self.remote(&w.rel)
                        );
                        Err(Errno::EOPNOTSUPP)
                    }
                }
            }
            Handle::Dir(_) => Err(Errno::EISDIR),
        })();
        match result {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = (|| {
            let h = self.handle(fh)?;
            let Handle::Write(w) = &*h else {
                return Err(Errno::EBADF);
            };
            let mut w = lock(w);
            match w.state {
                WriteState::Broken => return Err(Errno::EIO),
                WriteState::Idle { size, .. } if forward(size, offset) => {
                    w.reader = None;
                    self.start_writer(&mut w, size)?;
                }
                WriteState::Idle { size, .. } => {
                    return Err(self.refuse_write(&mut w, offset, size))
                }
                WriteState::Writing { pos, .. } if !forward(pos, offset) => {
                    return Err(self.refuse_write(&mut w, offset, pos))
                }
                WriteState::Writing { .. } => {}
            }
            self.write_at_end(&mut w, offset, data)?;
            Ok(data.len() as u32)
        })();
        match result {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Every close(2) of every copy of the descriptor flushes, including
        // the close-on-exec in a child the writer spawned. Only the
        // opener's close completes the file (so a subprocess cannot publish
        // it half-written); if the opener never closes it, the final
        // release does.
        let closer = process_of(req.pid());
        let result = self.handle(fh).and_then(|h| match &*h {
            Handle::Write(w) => {
                let mut w = lock(w);
                if w.opener == closer || w.opener == 0 || closer == 0 {
                    self.finish_write(&mut w)
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.handle(fh).and_then(|h| match &*h {
            Handle::Write(w) => self.finish_write(&mut lock(w)),
            _ => Ok(()),
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let h = lock(&self.handles).remove(&fh.0);
        if let Some(h) = h {
            if let Handle::Write(w) = &*h {
                let mut w = lock(w);
                if matches!(w.state, WriteState::Writing { .. }) {
                    // The opener handed the descriptor on and closed its
                    // own copy first: the last close publishes the file.
                    // Errors were logged; nobody is left to tell.
                    let _ = self.finish_write(&mut w);
                }
                self.abandon(&mut w);
            }
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self
            .path_of(ino)
            .and_then(|rel| self.list_dir(&rel))
            .map(|entries| self.add_handle(Handle::Dir(entries)));
        match result {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (h, dir) = match self.dir_listing(fh, ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let Handle::Dir(entries) = &*h else {
            return reply.error(Errno::EBADF);
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let kind = match e.kind {
                FileKind::Dir => FileType::Directory,
                FileKind::File => FileType::RegularFile,
            };
            if reply.add(
                INodeNo(self.dir_entry_ino(&dir, e)),
                i as u64 + 1,
                kind,
                &e.name,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (h, dir) = match self.dir_listing(fh, ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let Handle::Dir(entries) = &*h else {
            return reply.error(Errno::EBADF);
        };
        let ttl = self.opts.attr_ttl;
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let next = i as u64 + 1;
            let full = match &e.status {
                // The kernel takes no reference for `.` and `..`.
                None => {
                    let ino = self.dir_entry_ino(&dir, e);
                    let s = FileStatus {
                        path: String::new(),
                        kind: FileKind::Dir,
                        size: 0,
                        replication: 0,
                        chunk_size: 0,
                        mode: DIR_MODE,
                        owner: self.me(),
                        group: String::new(),
                        mtime_ms: 0,
                        chunks: 0,
                    };
                    reply.add(
                        INodeNo(ino),
                        next,
                        &e.name,
                        &ttl,
                        &self.attr(ino, &s),
                        Generation(0),
                    )
                }
                Some(s) => {
                    let rel = join(&dir, &e.name);
                    let ino = lock(&self.inodes).lookup(&rel);
                    let full = reply.add(
                        INodeNo(ino),
                        next,
                        &e.name,
                        &ttl,
                        &self.attr(ino, s),
                        Generation(0),
                    );
                    if full {
                        // Not sent: the kernel will not count it.
                        lock(&self.inodes).forget(ino, 1);
                    }
                    full
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.handles).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Namespace changes are durable in the namenode before they return.
        reply.ok();
    }

    // Extended attributes are not stored (permissions are checked by the
    // namenode, which answers EACCES): ENOSYS tells the kernel once, and it
    // stops asking.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Not a terminal, nor anything else with ioctls (isatty asks).
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    // Not supported, answered quietly: ENOSYS makes the kernel stop asking
    // (fallocate, lseek's SEEK_DATA/SEEK_HOLE, copy_file_range fall back
    // to plain reads and writes).
    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        tracing::debug!("symlink {link_name:?}: quern has no symbolic links (EPERM)");
        reply.error(Errno::EPERM);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        tracing::debug!("link {newname:?}: quern has no hard links (EPERM)");
        reply.error(Errno::EPERM);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        tracing::debug!("mknod {name:?}: quern stores only files and directories (EPERM)");
        reply.error(Errno::EPERM);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        const BSIZE: u64 = 4096;
        match self.block("statfs", 1, self.client.report()) {
            Ok(r) => {
                let live = r.datanodes.iter().filter(|d| d.state == NodeState::Live);
                let (cap, avail) =
                    live.fold((0u64, 0u64), |(c, a), d| (c + d.capacity, a + d.available));
                reply.statfs(
                    cap / BSIZE,
                    avail / BSIZE,
                    avail / BSIZE,
                    0,
                    0,
                    BSIZE as u32,
                    MAX_NAME as u32,
                    BSIZE as u32,
                );
            }
            Err(e) => reply.error(e),
        }
    }
}

impl QuernFs {
    fn refuse_truncate(&self, rel: &str, size: u64, to: u64) -> Errno {
        tracing::warn!(
            "{}: truncate from {size} to {to} bytes refused (EOPNOTSUPP): quern files can only \
             be truncated to 0 (replaced) or extended through an open descriptor",
            self.remote(rel)
        );
        Errno::EOPNOTSUPP
    }
}
