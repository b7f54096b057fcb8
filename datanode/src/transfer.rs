//! Moving chunk bytes between disk and QUIC streams without holding a whole
//! chunk in memory: a blocking thread does the file I/O, the async side the
//! network, joined by a small bounded channel.

use crate::store::{ChunkInfo, ChunkStore, PartialChunk, StoreError};
use bytes::{Bytes, BytesMut};
use quern_proto::msg::{ChunkMeta, DataRequest, NodeAddr, WriteAck, WriteChunk};
use quern_proto::transport::Endpoint;
use quern_proto::{ChunkId, Digest, Error};
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
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        if offset > 0 {
            if let Err(e) = file.seek(SeekFrom::Start(offset)) {
                let _ = tx.blocking_send(Err(StoreError::Io {
                    what: "seeking in",
                    path,
                    cause: e,
                }));
                return;
            }
        }
        let mut left = len;
        while left > 0 {
            let n = left.min(PIECE as u64) as usize;
            let mut buf = BytesMut::zeroed(n);
            if let Err(e) = file.read_exact(&mut buf) {
                let _ = tx.blocking_send(Err(StoreError::Io {
                    what: "reading",
                    path: path.clone(),
                    cause: e,
                }));
                return;
            }
            left -= n as u64;
            if tx.blocking_send(Ok(buf.freeze())).is_err() {
                return;
            }
        }
    });
    Ok((rx, info))
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

/// Sends a stored chunk to `targets` as a pipelined write (re-replication).
pub async fn push_chunk(
    endpoint: &Endpoint,
    store: Arc<ChunkStore>,
    chunk: ChunkMeta,
    targets: &[NodeAddr],
) -> Result<WriteAck, Error> {
    let Some(first) = targets.first() else {
        return Ok(WriteAck {
            stored_on: Vec::new(),
            failed: Vec::new(),
        });
    };
    let (mut pieces, info) =
        read_pieces(store, chunk.id, 0, chunk.size).map_err(|e| Error::Malformed(e.to_string()))?;
    if info.digest != chunk.digest {
        return Err(Error::Malformed(format!(
            "{}: local digest differs from the namenode's",
            chunk.id
        )));
    }
    let mut s = endpoint.open(first.addr).await?;
    s.send(&DataRequest::WriteChunk(WriteChunk {
        meta: chunk,
        pipeline: targets[1..].to_vec(),
    }))
    .await?;
    let mut hasher = blake3::Hasher::new();
    while let Some(piece) = pieces.recv().await {
        let piece = piece.map_err(|e| Error::Malformed(e.to_string()))?;
        hasher.update(&piece);
        s.send.write_chunk(piece).await.map_err(|e| Error::Stream {
            peer: first.addr.to_string(),
            reason: e.to_string(),
        })?;
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
