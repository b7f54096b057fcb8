//! Whole verified chunks in memory, least recently used out first.
//!
//! Chunk ids are never reused and a chunk's bytes never change, so cached
//! chunks need no invalidation: a replaced file simply has new chunk ids.
//! Readers asking for a chunk that is already being fetched wait for that
//! fetch instead of starting another.

use bytes::Bytes;
use quern_client::{Client, Result};
use quern_proto::msg::LocatedChunk;
use quern_proto::ChunkId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::OnceCell;

pub(crate) struct ChunkCache {
    capacity: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    chunks: HashMap<ChunkId, (Bytes, u64)>,
    bytes: u64,
    tick: u64,
    fetching: HashMap<ChunkId, Arc<OnceCell<Bytes>>>,
}

impl ChunkCache {
    pub(crate) fn new(capacity: u64) -> ChunkCache {
        ChunkCache {
            capacity,
            state: Mutex::new(State::default()),
        }
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the map half-updated in a way
        // that matters: at worst a chunk is fetched again.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hit(&self, id: ChunkId) -> Option<Bytes> {
        let mut st = self.lock();
        st.tick += 1;
        let tick = st.tick;
        st.chunks.get_mut(&id).map(|(b, used)| {
            *used = tick;
            b.clone()
        })
    }

    /// True when the chunk is cached or a fetch for it is under way.
    pub(crate) fn has(&self, id: ChunkId) -> bool {
        let st = self.lock();
        st.chunks.contains_key(&id) || st.fetching.contains_key(&id)
    }

    /// The chunk's bytes, verified against its digest, from memory or from
    /// a replica.
    pub(crate) async fn get(
        &self,
        client: &Client,
        path: &str,
        chunk: &LocatedChunk,
    ) -> Result<Bytes> {
        let id = chunk.meta.id;
        if let Some(b) = self.hit(id) {
            return Ok(b);
        }
        let cell = self.lock().fetching.entry(id).or_default().clone();
        let got = cell
            .get_or_try_init(|| async {
                let (bytes, _) = client.read_chunk(path, chunk).await?;
                self.insert(id, bytes.clone());
                Ok::<_, quern_client::Error>(bytes)
            })
            .await
            .cloned();
        let mut st = self.lock();
        if st.fetching.get(&id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            st.fetching.remove(&id);
        }
        got
    }

    fn insert(&self, id: ChunkId, bytes: Bytes) {
        let len = bytes.len() as u64;
        if len > self.capacity {
            return;
        }
        let mut st = self.lock();
        st.tick += 1;
        let tick = st.tick;
        if let Some((old, _)) = st.chunks.insert(id, (bytes, tick)) {
            st.bytes -= old.len() as u64;
        }
        st.bytes += len;
        while st.bytes > self.capacity {
            let Some((&victim, _)) = st.chunks.iter().min_by_key(|(_, (_, used))| *used) else {
                break;
            };
            if let Some((b, _)) = st.chunks.remove(&victim) {
                st.bytes -= b.len() as u64;
            }
        }
    }

    #[cfg(test)]
    fn cached(&self) -> Vec<ChunkId> {
        let mut v: Vec<ChunkId> = self.lock().chunks.keys().copied().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_goes_first_and_memory_stays_bounded() {
        let c = ChunkCache::new(3 * 10);
        for i in 1..=3 {
            c.insert(ChunkId(i), Bytes::from(vec![0u8; 10]));
        }
        assert!(c.hit(ChunkId(1)).is_some());
        c.insert(ChunkId(4), Bytes::from(vec![0u8; 10]));
        assert_eq!(c.cached(), vec![ChunkId(1), ChunkId(3), ChunkId(4)]);
        c.insert(ChunkId(5), Bytes::from(vec![0u8; 25]));
        assert_eq!(c.cached(), vec![ChunkId(5)]);
        c.insert(ChunkId(6), Bytes::from(vec![0u8; 31]));
        assert_eq!(c.cached(), vec![ChunkId(5)]);
        assert_eq!(c.lock().bytes, 25);
    }
}
