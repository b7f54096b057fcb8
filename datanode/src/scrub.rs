//! The scrubber (HDFS's block scanner): re-reads every stored chunk in the
//! background, at a bounded rate, and reports replicas whose bytes no
//! longer match their digest, so a chunk that rots is replaced before
//! anyone needs it rather than found when someone reads it.

use crate::node::Node;
use crate::transfer::read_pieces;
use quern_proto::msg::ReportBadReplica;
use quern_proto::{ChunkId, Digest};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub(crate) async fn run(node: Arc<Node>) {
    let cfg = node.cfg.scrub;
    loop {
        let started = Instant::now();
        let mut chunks: Vec<ChunkId> = node.store.list().into_iter().map(|c| c.id).collect();
        // A fresh order each pass would re-read hot spots first; the id
        // order is stable, so a pass cut short by a restart still covers
        // every chunk over time.
        chunks.sort();
        node.scrub.update(|s| s.verified_this_pass = 0);
        let mut throttle = Throttle::new(cfg.rate);
        for id in chunks {
            let ok = verify(&node, id, &mut throttle).await;
            node.scrub.update(|s| {
                s.verified_this_pass += 1;
                if !ok {
                    s.errors += 1;
                }
            });
        }
        let now = quern_proto::token::now_ms();
        node.scrub.update(|s| {
            s.last_pass_end_ms = Some(now);
            s.last_pass_chunks = s.verified_this_pass;
            s.passes += 1;
        });
        tracing::debug!(elapsed = ?started.elapsed(), "scrubber pass done");
        tokio::time::sleep(cfg.interval.saturating_sub(started.elapsed())).await;
    }
}

/// Re-hashes one chunk; false (and a report to the namenode) when its
/// bytes do not match the digest it was stored with.
async fn verify(node: &Arc<Node>, id: ChunkId, throttle: &mut Throttle) -> bool {
    let Some(info) = node.store.get(id) else {
        return true; // deleted since the pass began
    };
    let (mut pieces, _) = match read_pieces(node.store.clone(), id, 0, info.size) {
        Ok(p) => p,
        Err(e) => {
            if node.store.get(id).is_none() {
                return true;
            }
            return bad(node, id, format!("unreadable: {e}")).await;
        }
    };
    let mut hasher = blake3::Hasher::new();
    let mut read = 0u64;
    while let Some(piece) = pieces.recv().await {
        match piece {
            Ok(p) => {
                hasher.update(&p);
                read += p.len() as u64;
                throttle.spent(p.len() as u64).await;
            }
            Err(e) => {
                if node.store.get(id).is_none() {
                    return true;
                }
                return bad(node, id, format!("unreadable: {e}")).await;
            }
        }
    }
    let digest = Digest::from(hasher.finalize());
    if read != info.size || digest != info.digest {
        return bad(
            node,
            id,
            format!(
                "digest mismatch found by the scrubber: {read} bytes with digest {digest}, stored \
                 as {} bytes with {}",
                info.size, info.digest
            ),
        )
        .await;
    }
    true
}

async fn bad(node: &Arc<Node>, chunk: ChunkId, reason: String) -> bool {
    tracing::warn!(%chunk, "scrubber: local replica is bad ({reason}); reporting it");
    let report = ReportBadReplica {
        chunk,
        node: node.id,
        reason,
        token: None,
    };
    if let Err(e) = node.endpoint.call(node.namenode(), report).await {
        tracing::warn!(%chunk, "scrubber could not report a bad replica: {e}");
    }
    false
}

/// Paces reads to `rate` bytes per second over the pass.
struct Throttle {
    rate: u64,
    start: Instant,
    bytes: u64,
}

impl Throttle {
    fn new(rate: u64) -> Throttle {
        Throttle {
            rate: rate.max(1),
            start: Instant::now(),
            bytes: 0,
        }
    }

    async fn spent(&mut self, n: u64) {
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_throttle_holds_reads_to_the_rate() {
        let mut t = Throttle::new(1 << 20);
        let start = tokio::time::Instant::now();
        for _ in 0..8 {
            t.spent(1 << 19).await;
        }
        // 4 MiB at 1 MiB/s: four seconds, on tokio's paused clock.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(3900), "{took:?}");
        assert!(took <= Duration::from_millis(4100), "{took:?}");
    }
}
