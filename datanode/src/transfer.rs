//! Moving chunk bytes between disk and QUIC streams without holding a whole
//! chunk in memory: a blocking thread does the file I/O, the async side the
//! network, joined by a small bounded channel.

use crate::store::{ChunkInfo, ChunkStore, PartialChunk, StoreError};
use bytes::{Bytes, BytesMut};
use quern_proto::msg::{ChunkMeta, NodeAddr, WriteAck, WriteChunk};
use quern_proto::transport::Endpoint;
use quern_proto::{ChunkId, ChunkToken, Digest, Error};
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use tokio::sync::mpsc;

pub const PIECE: usize = 1 << 20;

/// Reads `len` bytes from `offset` of a stored chunk as a stream of pieces.
pub fn read_pieces(
    store: Arc<ChunkStore>,
    id: ChunkId,
    offset: u64,
    len: u64,
) -> Result<(mpsc::Receiver<Result<Bytes, StoreError>>, ChunkInfo), StoreError> {
    let (mut file, info) = store.open_chunk(id)?;
    let path = store.data_path(id);
    // Chunks are written with O_DIRECT and so are usually not cached: read
    // them the same way when the range allows it, which spares the page
    // cache's allocation and copy. Anything unusual falls back to `file`.
    let mut direct = if offset.is_multiple_of(ALIGN as u64) {
        open_direct(&path)
    } else {
        None
    };
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let fail = |what, cause| StoreError::Io {
            what,
            path: path.clone(),
            cause,
        };
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(PIECE as u64) as usize;
            let piece = match direct.as_mut().map(|d| read_direct(d, pos, n)) {
                Some(Ok(p)) => Ok(p),
                other => {
                    if let Some(Err(e)) = other {
                        tracing::debug!(
                            "direct read of {} failed, reading buffered: {e}",
                            path.display()
                        );
                    }
                    direct = None;
                    read_buffered(&mut file, pos, n)
                }
            };
            let piece = match piece {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.blocking_send(Err(fail("reading", e)));
                    return;
                }
            };
            pos += n as u64;
            if tx.blocking_send(Ok(piece)).is_err() {
                return;
            }
        }
    });
    Ok((rx, info))
}

/// Alignment O_DIRECT needs for buffers, offsets and lengths.
const ALIGN: usize = 4096;

fn open_direct(path: &std::path::Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Reads `n` bytes at aligned `pos` into an aligned window of a fresh
/// buffer and hands the window out without copying it.
fn read_direct(file: &mut std::fs::File, pos: u64, n: usize) -> std::io::Result<Bytes> {
    use std::os::unix::fs::FileExt;
    let want = n.div_ceil(ALIGN) * ALIGN;
    let mut buf = vec![0u8; want + ALIGN];
    let start = buf.as_ptr().align_offset(ALIGN);
    if start + want > buf.len() {
        return Err(std::io::Error::other("no aligned window in the buffer"));
    }
    // One read: at the end of the file it returns the short tail; a short
    // read anywhere else is handed to the buffered path.
    let got = file.read_at(&mut buf[start..start + want], pos)?;
    if got < n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("direct read returned {got} of {n} bytes"),
        ));
    }
    Ok(Bytes::from(buf).slice(start..start + n))
}

fn read_buffered(file: &mut std::fs::File, pos: u64, n: usize) -> std::io::Result<Bytes> {
    file.seek(SeekFrom::Start(pos))?;
    let mut buf = BytesMut::zeroed(n);
    file.read_exact(&mut buf)?;
    Ok(buf.freeze())
}

/// The disk writer's outcome: the written partial chunk and the digest of
/// everything written, or the chunk with the error that stopped the
/// writing (so the caller can discard it).
pub type DiskWrite =
    tokio::task::JoinHandle<Result<(PartialChunk, Digest), (PartialChunk, StoreError)>>;

/// Writes pieces to a partial chunk on a blocking thread, hashing them on
/// the way (off the thread that receives them from the network); the
/// handle returns once the sender is dropped.
pub fn disk_writer(mut part: PartialChunk) -> (mpsc::Sender<Bytes>, DiskWrite) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let handle = tokio::task::spawn_blocking(move || {
        let mut hasher = blake3::Hasher::new();
        while let Some(piece) = rx.blocking_recv() {
            hasher.update(&piece);
            if let Err(e) = part.write(&piece) {
                return Err((part, e));
            }
        }
        Ok((part, Digest::from(hasher.finalize())))
    });
    (tx, handle)
}

/// Sends a stored chunk to `targets` as a pipelined write (re-replication)
/// if the local copy is the one committed: `size` bytes with a digest
/// starting with `check`.
pub async fn push_chunk(
    endpoint: &Endpoint,
    store: Arc<ChunkStore>,
    (id, size, check): (ChunkId, u64, u64),
    targets: &[NodeAddr],
    token: ChunkToken,
) -> Result<WriteAck, Error> {
    let Some(first) = targets.first() else {
        return Ok(WriteAck {
            stored_on: Vec::new(),
            failed: Vec::new(),
        });
    };
    let (mut pieces, info) =
        read_pieces(store, id, 0, size).map_err(|e| Error::Malformed(e.to_string()))?;
    if info.size != size || info.digest.check() != check {
        return Err(Error::Malformed(format!(
            "{id}: the local copy ({} bytes, digest {}) is not the one committed",
            info.size,
            info.digest.to_hex()
        )));
    }
    let chunk = ChunkMeta {
        id,
        size,
        digest: info.digest,
    };
    let mut s = endpoint
        .request(
            *first,
            WriteChunk {
                meta: chunk,
                pipeline: targets[1..].to_vec(),
                token: Some(token),
            },
        )
        .await?;
    let mut hasher = blake3::Hasher::new();
    while let Some(piece) = pieces.recv().await {
        let piece = piece.map_err(|e| Error::Malformed(e.to_string()))?;
        hasher.update(&piece);
        s.send_piece(piece).await?;
    }
    if Digest::from(hasher.finalize()) != chunk.digest {
        return Err(Error::Malformed(format!(
            "{}: local replica is corrupt; not replicating it",
            chunk.id
        )));
    }
    s.finish()?;
    s.reply::<WriteAck>().await
}
