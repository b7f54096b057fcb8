//! Reading a whole chunk from its replicas: the one function behind the
//! client's reads and the datanodes' remote tasks.
//!
//! Reads are hedged (HDFS's hedged reads): when the replica being read has
//! not delivered a piece within a threshold, the next replica starts too,
//! and whichever finishes first with the right digest wins. The threshold
//! adapts to the gaps between pieces seen recently, so a stuck replica
//! costs about one read's worth of waiting, not a timeout.

use crate::error::{Error, Result};
use crate::msg::{ChunkMeta, NodeAddr, ReadChunk, ReadHeader};
use crate::token::ChunkToken;
use crate::transport::Endpoint;
use crate::Digest;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// When to start another replica of a read that is not progressing.
#[derive(Debug)]
pub struct Hedge {
    /// Smoothed gap between pieces, in microseconds.
    gap_us: AtomicU64,
    fixed: Option<Duration>,
    /// Replicas that recently made no progress: tried last for a while,
    /// so a frozen node costs one threshold per reader, not per chunk.
    suspects: std::sync::Mutex<std::collections::HashMap<crate::NodeId, Instant>>,
}

/// Bounds of the adaptive threshold: never so short that a healthy replica
/// on a busy machine (scheduling delays of tens of milliseconds) is read
/// twice, which costs far more than it saves; never so long that a stuck
/// one is waited on for more than a second. HDFS's default is 500 ms.
const MIN_HEDGE: Duration = Duration::from_millis(200);
const MAX_HEDGE: Duration = Duration::from_secs(1);
/// How long a replica that stalled is tried after the others.
const SUSPECT_FOR: Duration = Duration::from_secs(30);

impl Hedge {
    /// Adaptive, or a fixed threshold when given.
    pub fn new(fixed: Option<Duration>) -> Hedge {
        Hedge {
            // 60 ms until pieces are seen: a 480 ms first threshold.
            gap_us: AtomicU64::new(60_000),
            fixed,
            suspects: Default::default(),
        }
    }

    fn suspect(&self, node: crate::NodeId, stalled: bool) {
        let mut s = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        if stalled {
            s.insert(node, Instant::now() + SUSPECT_FOR);
        } else {
            s.remove(&node);
        }
    }

    /// `replicas` with recently stalled ones moved to the end.
    fn order(&self, replicas: &[NodeAddr]) -> Vec<NodeAddr> {
        let mut s = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.retain(|_, until| *until > now);
        let (mut ok, bad): (Vec<NodeAddr>, Vec<NodeAddr>) =
            replicas.iter().partition(|r| !s.contains_key(&r.id));
        ok.extend(bad);
        ok
    }

    pub fn threshold(&self) -> Duration {
        if let Some(f) = self.fixed {
            return f;
        }
        let gap = Duration::from_micros(self.gap_us.load(Ordering::Relaxed));
        (gap * 8).clamp(MIN_HEDGE, MAX_HEDGE)
    }

    fn observe(&self, gap: Duration) {
        let new = gap.as_micros().min(u64::MAX as u128) as u64;
        let old = self.gap_us.load(Ordering::Relaxed);
        // An exponential average over about eight pieces.
        self.gap_us
            .store(old - old / 8 + new / 8, Ordering::Relaxed);
    }
}

impl Default for Hedge {
    fn default() -> Hedge {
        Hedge::new(None)
    }
}

/// A chunk read whole and checked against its digest.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Bytes,
    pub node: NodeAddr,
    /// Replicas started (and not chosen) before the one that won.
    pub skipped: usize,
}

/// A replica that did not serve the chunk.
#[derive(Debug, Clone)]
pub struct FetchFailure {
    pub node: NodeAddr,
    pub error: String,
    /// The bytes arrived but do not match the digest: a bad replica.
    pub corrupt: bool,
}

/// Reads `meta` from `replicas` in order, hedging stuck ones; returns the
/// first copy with the right digest (if any) and every failure met.
pub async fn fetch_chunk(
    ep: &Endpoint,
    replicas: &[NodeAddr],
    meta: &ChunkMeta,
    token: Option<&ChunkToken>,
    hedge: &Hedge,
) -> (Option<Fetched>, Vec<FetchFailure>) {
    let start = Instant::now();
    let replicas = &hedge.order(replicas)[..];
    let mut failures = Vec::new();
    let mut running = FuturesUnordered::new();
    let mut progress: Vec<Arc<AtomicU64>> = Vec::new();
    let mut next = 0;
    loop {
        if running.is_empty() {
            if next >= replicas.len() {
                return (None, failures);
            }
            progress.push(Arc::new(AtomicU64::new(micros(start))));
            running.push(attempt(
                ep,
                next,
                replicas[next],
                meta,
                token,
                progress[next].clone(),
                start,
                hedge,
            ));
            next += 1;
            continue;
        }
        let newest = progress[next - 1].load(Ordering::Relaxed);
        let stuck_at = start + Duration::from_micros(newest) + hedge.threshold();
        tokio::select! {
            Some((i, result)) = running.next() => match result {
                Ok(bytes) => {
                    hedge.suspect(replicas[i].id, false);
                    return (Some(Fetched { bytes, node: replicas[i], skipped: next - 1 }), failures);
                }
                Err((error, corrupt)) => {
                    tracing::warn!(chunk = %meta.id, node = %replicas[i].id, addr = %replicas[i].addr, "{error}; trying another replica");
                    failures.push(FetchFailure { node: replicas[i], error, corrupt });
                }
            },
            _ = tokio::time::sleep_until(stuck_at), if next < replicas.len() => {
                // Pieces may have arrived while waiting: only a read that
                // is still silent a whole threshold later is hedged.
                let latest = progress[next - 1].load(Ordering::Relaxed);
                if start + Duration::from_micros(latest) + hedge.threshold() > Instant::now() {
                    continue;
                }
                tracing::info!(chunk = %meta.id, node = %replicas[next - 1].id, "no progress within {:?}; hedging on another replica", hedge.threshold());
                hedge.suspect(replicas[next - 1].id, true);
                progress.push(Arc::new(AtomicU64::new(micros(start))));
                running.push(attempt(ep, next, replicas[next], meta, token, progress[next].clone(), start, hedge));
                next += 1;
            }
        }
    }
}

fn micros(start: Instant) -> u64 {
    start.elapsed().as_micros().min(u64::MAX as u128) as u64
}

type Attempt = std::result::Result<Bytes, (String, bool)>;

#[allow(clippy::too_many_arguments)]
async fn attempt(
    ep: &Endpoint,
    index: usize,
    node: NodeAddr,
    meta: &ChunkMeta,
    token: Option<&ChunkToken>,
    progress: Arc<AtomicU64>,
    start: Instant,
    hedge: &Hedge,
) -> (usize, Attempt) {
    let result = read_whole(ep, node, meta, token, &progress, start, hedge).await;
    let bytes = match result {
        Ok(b) => b,
        Err(e) => return (index, Err((e.to_string(), false))),
    };
    let hashed = bytes.clone();
    let digest = match tokio::task::spawn_blocking(move || Digest::of(&hashed)).await {
        Ok(d) => d,
        Err(e) => return (index, Err((format!("hashing failed: {e}"), false))),
    };
    if digest != meta.digest || bytes.len() as u64 != meta.size {
        let why = format!(
            "digest mismatch: read {} bytes with digest {digest}, expected {} bytes with {}",
            bytes.len(),
            meta.size,
            meta.digest
        );
        return (index, Err((why, true)));
    }
    (index, Ok(bytes))
}

async fn read_whole(
    ep: &Endpoint,
    node: NodeAddr,
    meta: &ChunkMeta,
    token: Option<&ChunkToken>,
    progress: &AtomicU64,
    start: Instant,
    hedge: &Hedge,
) -> Result<Bytes> {
    let mut s = ep
        .request(
            node,
            ReadChunk {
                chunk: meta.id,
                offset: 0,
                len: None,
                token: token.cloned(),
            },
        )
        .await?;
    s.finish()?;
    let header: ReadHeader = s.reply().await?;
    progress.store(micros(start), Ordering::Relaxed);
    if header.len != meta.size {
        return Err(Error::Malformed(format!(
            "replica holds {} bytes, expected {}",
            header.len, meta.size
        )));
    }
    s.recv_body_watched(header.len, &|_| {
        let now = micros(start);
        let last = progress.swap(now, Ordering::Relaxed);
        hedge.observe(Duration::from_micros(now.saturating_sub(last)));
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_follows_piece_gaps_within_bounds() {
        let h = Hedge::default();
        assert_eq!(h.threshold(), Duration::from_millis(480));
        for _ in 0..100 {
            h.observe(Duration::from_millis(2));
        }
        assert_eq!(h.threshold(), MIN_HEDGE);
        for _ in 0..100 {
            h.observe(Duration::from_millis(50));
        }
        let t = h.threshold();
        assert!(t > MIN_HEDGE && t < MAX_HEDGE, "{t:?}");
        for _ in 0..100 {
            h.observe(Duration::from_secs(5));
        }
        assert_eq!(h.threshold(), MAX_HEDGE);
        let fixed = Hedge::new(Some(Duration::from_millis(7)));
        assert_eq!(fixed.threshold(), Duration::from_millis(7));
    }

    #[test]
    fn replicas_that_stalled_are_tried_last() {
        let h = Hedge::default();
        let node = |i: u64| NodeAddr {
            id: crate::NodeId(i),
            addr: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
        };
        let all = [node(1), node(2), node(3)];
        assert_eq!(h.order(&all), all.to_vec());
        h.suspect(crate::NodeId(1), true);
        let ids: Vec<u64> = h.order(&all).iter().map(|n| n.id.0).collect();
        assert_eq!(ids, vec![2, 3, 1]);
        h.suspect(crate::NodeId(1), false);
        assert_eq!(h.order(&all), all.to_vec());
    }
}
