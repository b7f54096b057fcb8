//! Writing a file: chunks are buffered, hashed, sent down a datanode
//! pipeline and committed; the file appears only at `close`.

use crate::{Client, Error, Result};
use bytes::Bytes;
use quern_proto::msg::*;
use quern_proto::{Digest, FileId, NodeId};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    pub replication: u8,
    pub chunk_size: u64,
    pub overwrite: bool,
    pub mode: u32,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            replication: 3,
            chunk_size: 64 << 20,
            overwrite: false,
            mode: 0o644,
        }
    }
}

/// Attempts per chunk, each on a pipeline without the nodes that failed.
const CHUNK_ATTEMPTS: usize = 3;
const PIECE: usize = 1 << 20;
const MAX_INFLIGHT: usize = 2;

pub struct FileWriter {
    client: Client,
    path: String,
    file: FileId,
    chunk_size: usize,
    replication: u8,
    buf: Vec<u8>,
    index: u32,
    written: u64,
    /// Uploads under way, oldest first. Two run while the next chunk
    /// fills, so one chunk's fsync overlaps the next one's transfer.
    inflight: VecDeque<JoinHandle<Result<()>>>,
    renewer: JoinHandle<()>,
}

impl Client {
    /// Starts a file. Nothing is visible at `path` until [`FileWriter::close`].
    pub async fn create(&self, path: &str, opts: WriteOptions) -> Result<FileWriter> {
        let file = self
            .call(CreateFile {
                path: path.into(),
                replication: opts.replication,
                chunk_size: opts.chunk_size,
                mode: opts.mode,
                overwrite: opts.overwrite,
            })
            .await?;
        let renew_client = self.clone();
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if renew_client.call(RenewLease { file }).await.is_err() {
                    return;
                }
            }
        });
        Ok(FileWriter {
            client: self.clone(),
            path: path.into(),
            file,
            chunk_size: opts.chunk_size as usize,
            replication: opts.replication,
            buf: Vec::new(),
            index: 0,
            written: 0,
            inflight: VecDeque::new(),
            renewer,
        })
    }
}

impl FileWriter {
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub async fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(self.chunk_size);
            }
            let room = self.chunk_size - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            self.written += n as u64;
            if self.buf.len() == self.chunk_size {
                self.flush_chunk().await?;
            }
        }
        Ok(())
    }

    async fn flush_chunk(&mut self) -> Result<()> {
        while self.inflight.len() >= MAX_INFLIGHT {
            self.wait_oldest().await?;
        }
        let data = Bytes::from(std::mem::take(&mut self.buf));
        let client = self.client.clone();
        let path = self.path.clone();
        let (file, index, replication) = (self.file, self.index, self.replication);
        self.index += 1;
        self.inflight.push_back(tokio::spawn(async move {
            upload_chunk(&client, &path, file, index, replication, data).await
        }));
        Ok(())
    }

    async fn wait_inflight(&mut self) -> Result<()> {
        while !self.inflight.is_empty() {
            self.wait_oldest().await?;
        }
        Ok(())
    }

    async fn wait_oldest(&mut self) -> Result<()> {
        if let Some(h) = self.inflight.pop_front() {
            h.await.map_err(|e| Error::Unwritable {
                path: self.path.clone(),
                index: self.index.saturating_sub(1),
                tried: format!("upload task failed: {e}"),
            })??;
        }
        Ok(())
    }

    /// Uploads what is left and makes the file visible atomically.
    pub async fn close(mut self) -> Result<FileStatus> {
        let result = async {
            if !self.buf.is_empty() {
                self.flush_chunk().await?;
            }
            self.wait_inflight().await?;
            self.client.call(Complete { file: self.file }).await
        }
        .await;
        self.renewer.abort();
        if result.is_err() {
            let _ = self.client.call(Abandon { file: self.file }).await;
        }
        result
    }

    /// Gives the file up; nothing becomes visible and its chunks are freed.
    pub async fn abort(mut self) {
        self.renewer.abort();
        for h in self.inflight.drain(..) {
            h.abort();
        }
        let _ = self.client.call(Abandon { file: self.file }).await;
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        // Without close the lease lapses and the namenode reclaims chunks.
        self.renewer.abort();
    }
}

async fn upload_chunk(
    client: &Client,
    path: &str,
    file: FileId,
    index: u32,
    replication: u8,
    data: Bytes,
) -> Result<()> {
    let hashed = data.clone();
    let digest = tokio::task::spawn_blocking(move || Digest::of(&hashed))
        .await
        .map_err(|e| Error::Unwritable {
            path: path.into(),
            index,
            tried: format!("hashing failed: {e}"),
        })?;
    let mut exclude: Vec<NodeId> = Vec::new();
    let mut tried = Vec::new();
    for _ in 0..CHUNK_ATTEMPTS {
        let alloc = client
            .call(AllocateChunk {
                file,
                index,
                exclude: exclude.clone(),
            })
            .await?;
        let meta = ChunkMeta {
            id: alloc.chunk,
            size: data.len() as u64,
            digest,
        };
        match send_pipeline(client, meta, &alloc.targets, alloc.token, data.clone()).await {
            Ok(ack) => {
                for (node, why) in &ack.failed {
                    tracing::warn!(node = %node.id, addr = %node.addr, "replica not written: {why}");
                }
                let ack = replace_failed(client, path, file, replication, meta, ack, &data).await;
                client
                    .call(CommitChunk {
                        file,
                        index,
                        meta,
                        stored_on: ack.stored_on,
                    })
                    .await?;
                return Ok(());
            }
            Err(e) => {
                let first = alloc.targets[0];
                tracing::warn!(node = %first.id, addr = %first.addr, "chunk {index} of {path}: {e}; retrying on other datanodes");
                tried.push(format!("{} ({}): {e}", first.id, first.addr));
                exclude.push(first.id);
            }
        }
    }
    Err(Error::Unwritable {
        path: path.into(),
        index,
        tried: tried.join("; "),
    })
}

/// HDFS's replace-datanode-on-failure: members of the pipeline that died
/// or stalled are replaced by new nodes that take the chunk from this
/// writer (it still holds it), so the put ends with its full replication
/// instead of waiting for the replication monitor. What cannot be
/// replaced is left to the monitor.
async fn replace_failed(
    client: &Client,
    path: &str,
    file: FileId,
    replication: u8,
    meta: ChunkMeta,
    mut ack: WriteAck,
    data: &Bytes,
) -> WriteAck {
    let mut failed: Vec<NodeId> = ack.failed.iter().map(|(n, _)| n.id).collect();
    for _ in 0..CHUNK_ATTEMPTS {
        let missing = (replication as usize).saturating_sub(ack.stored_on.len());
        if missing == 0 || failed.is_empty() {
            break;
        }
        let mut exclude = ack.stored_on.clone();
        exclude.extend(&failed);
        let more = match client
            .call(AddTargets {
                file,
                chunk: meta.id,
                exclude,
                count: missing as u8,
            })
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("{path}: {} stays under-replicated for now: {e}", meta.id);
                break;
            }
        };
        match send_pipeline(client, meta, &more.targets, more.token, data.clone()).await {
            Ok(extra) => {
                tracing::info!(chunk = %meta.id, nodes = extra.stored_on.len(), "replaced failed pipeline members");
                ack.stored_on.extend(extra.stored_on);
                failed.extend(extra.failed.iter().map(|(n, _)| n.id));
                ack.failed.extend(extra.failed);
            }
            Err(e) => {
                tracing::warn!(chunk = %meta.id, node = %more.targets[0].id, "replacement failed: {e}");
                failed.push(more.targets[0].id);
            }
        }
    }
    ack
}

async fn send_pipeline(
    client: &Client,
    meta: ChunkMeta,
    targets: &[NodeAddr],
    token: quern_proto::ChunkToken,
    data: Bytes,
) -> Result<WriteAck, quern_proto::Error> {
    let first = targets[0];
    let ep = client.endpoint();
    // Each hop may wait out a stuck next hop for one piece's idle time
    // before acknowledging without it: the answer is allowed that much
    // per hop beyond the usual deadline.
    let patience = ep.rpc_timeout() + ep.piece_idle() * targets.len() as u32;
    let mut s = ep
        .request_within(
            first,
            WriteChunk {
                meta,
                pipeline: targets[1..].to_vec(),
                token: Some(token),
            },
            patience,
        )
        .await?;
    let mut off = 0;
    while off < data.len() {
        let end = (off + PIECE).min(data.len());
        if let Err(sending) = s.send_piece(data.slice(off..end)).await {
            // A datanode that refuses the chunk (disk full, bad token)
            // answers and stops reading: its answer says why, the failed
            // send only that it stopped.
            let answer = tokio::time::timeout(Duration::from_millis(500), s.reply::<WriteAck>());
            return Err(match answer.await {
                Ok(Err(refused @ quern_proto::Error::Remote(_))) => refused,
                _ => sending,
            });
        }
        off = end;
    }
    s.finish()?;
    s.reply::<WriteAck>().await
}
