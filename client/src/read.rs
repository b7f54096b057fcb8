//! Reading: locate the chunks, fetch each from a live replica, verify its
//! blake3 digest, fall back to the next replica and report bad ones.

use crate::{Client, Error, Result};
use bytes::Bytes;
use quern_proto::msg::*;
use quern_proto::Digest;
use std::collections::VecDeque;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Chunks fetched ahead of the one being written out.
const READ_AHEAD: usize = 2;

/// Where a chunk's bytes came from.
#[derive(Debug, Clone, Copy)]
pub struct ChunkSource {
    pub node: NodeAddr,
    /// Replicas tried and skipped before this one.
    pub skipped: usize,
}

impl Client {
    /// Fetches one whole chunk, verified against the namenode's digest.
    pub async fn read_chunk(
        &self,
        path: &str,
        chunk: &LocatedChunk,
    ) -> Result<(Bytes, ChunkSource)> {
        let mut tried = Vec::new();
        let mut order: Vec<&ReplicaInfo> = chunk
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Live)
            .collect();
        // Dead replicas only as a last resort: the node may be back.
        order.extend(
            chunk
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Dead),
        );
        for (skipped, replica) in order.into_iter().enumerate() {
            let node = replica.node;
            match self.fetch(node, chunk).await {
                Ok(bytes) => {
                    let hashed = bytes.clone();
                    let got = tokio::task::spawn_blocking(move || Digest::of(&hashed))
                        .await
                        .map_err(|e| Error::Io {
                            context: format!("verifying chunk {} of {path}", chunk.index),
                            cause: std::io::Error::other(e.to_string()),
                        })?;
                    if got == chunk.meta.digest && bytes.len() as u64 == chunk.meta.size {
                        return Ok((bytes, ChunkSource { node, skipped }));
                    }
                    let reason = format!(
                        "digest mismatch: read {} bytes with digest {got}, expected {} bytes with {}",
                        bytes.len(),
                        chunk.meta.size,
                        chunk.meta.digest
                    );
                    tracing::warn!(chunk = %chunk.meta.id, node = %node.id, addr = %node.addr, "{reason}; trying another replica");
                    let _ = self
                        .call(ReportBadReplica {
                            chunk: chunk.meta.id,
                            node: node.id,
                            reason: reason.clone(),
                            token: Some(chunk.token.clone()),
                        })
                        .await;
                    tried.push(format!("{} ({}): {reason}", node.id, node.addr));
                }
                Err(e) => {
                    tracing::warn!(chunk = %chunk.meta.id, node = %node.id, addr = %node.addr, "{e}; trying another replica");
                    tried.push(format!("{} ({}): {e}", node.id, node.addr));
                }
            }
        }
        if tried.is_empty() {
            tried.push("no live replica is known (see `quern fsck`)".into());
        }
        Err(Error::Unreadable {
            path: path.into(),
            index: chunk.index,
            chunk: chunk.meta.id,
            tried: tried.join("; "),
        })
    }

    async fn fetch(
        &self,
        node: NodeAddr,
        chunk: &LocatedChunk,
    ) -> Result<Bytes, quern_proto::Error> {
        let mut s = self.endpoint().open(node).await?;
        s.send(&DataRequest::ReadChunk(ReadChunk {
            chunk: chunk.meta.id,
            offset: 0,
            len: None,
            token: Some(chunk.token.clone()),
        }))
        .await?;
        s.finish()?;
        let header: ReadHeader = s.reply().await?;
        if header.len != chunk.meta.size {
            return Err(quern_proto::Error::Malformed(format!(
                "replica holds {} bytes, expected {}",
                header.len, chunk.meta.size
            )));
        }
        quern_proto::transport::read_raw(&mut s.recv, header.len, node.addr).await
    }

    /// Streams a whole file to `out`, fetching ahead; `progress` gets the
    /// bytes written so far. Returns the file size.
    pub async fn read_to<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        out: &mut W,
        mut progress: impl FnMut(u64),
    ) -> Result<u64> {
        let loc = self.locate(path).await?;
        let mut pending = VecDeque::new();
        let mut next = 0;
        let mut done = 0u64;
        while next < loc.chunks.len() || !pending.is_empty() {
            while pending.len() < READ_AHEAD && next < loc.chunks.len() {
                let client = self.clone();
                let chunk = loc.chunks[next].clone();
                let p = path.to_string();
                pending.push_back(tokio::spawn(
                    async move { client.read_chunk(&p, &chunk).await },
                ));
                next += 1;
            }
            if let Some(h) = pending.pop_front() {
                let (bytes, _) = h.await.map_err(|e| Error::Io {
                    context: format!("reading {path}"),
                    cause: std::io::Error::other(e.to_string()),
                })??;
                out.write_all(&bytes).await.map_err(|e| Error::Io {
                    context: format!("writing {path} out"),
                    cause: e,
                })?;
                done += bytes.len() as u64;
                progress(done);
            }
        }
        out.flush().await.map_err(|e| Error::Io {
            context: format!("writing {path} out"),
            cause: e,
        })?;
        Ok(done)
    }

    /// Reads a whole (small) file into memory.
    pub async fn read_all(&self, path: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_to(path, &mut out, |_| {}).await?;
        Ok(out)
    }
}
