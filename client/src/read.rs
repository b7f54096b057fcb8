//! Reading: locate the chunks, fetch each from a live replica, verify its
//! blake3 digest, fall back to the next replica and report bad ones.

use crate::{Client, Error, Result};
use bytes::Bytes;
use quern_proto::chunk::fetch_chunk;
use quern_proto::msg::*;
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
    /// Fetches one whole chunk, verified against the namenode's digest,
    /// hedging on another replica when one stops making progress; bad
    /// replicas met on the way are reported.
    pub async fn read_chunk(
        &self,
        path: &str,
        chunk: &LocatedChunk,
    ) -> Result<(Bytes, ChunkSource)> {
        let mut order: Vec<NodeAddr> = chunk
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Live)
            .map(|r| r.node)
            .collect();
        // Dead replicas only as a last resort: the node may be back.
        order.extend(
            chunk
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Dead)
                .map(|r| r.node),
        );
        let ep = self.endpoint();
        let (fetched, failures) =
            fetch_chunk(ep, &order, &chunk.meta, Some(&chunk.token), ep.hedge()).await;
        for f in failures.iter().filter(|f| f.corrupt) {
            let _ = self
                .call(ReportBadReplica {
                    chunk: chunk.meta.id,
                    node: f.node.id,
                    reason: f.error.clone(),
                    token: Some(chunk.token.clone()),
                })
                .await;
        }
        if let Some(f) = fetched {
            return Ok((
                f.bytes,
                ChunkSource {
                    node: f.node,
                    skipped: f.skipped,
                },
            ));
        }
        let mut tried: Vec<String> = failures
            .iter()
            .map(|f| format!("{} ({}): {}", f.node.id, f.node.addr, f.error))
            .collect();
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
