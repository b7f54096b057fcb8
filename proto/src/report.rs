//! A datanode's chunk list as it travels in a full report. The namenode
//! reconciles each replica by its id, its size and the first eight bytes
//! of its digest, so that is all a report carries, laid out to be small
//! on the wire and cheap to decode: ids sorted and sent as the gaps
//! between them (one or two varint bytes each on a node holding a share of
//! a cluster's chunks), sizes as runs (nearly every chunk is full-size),
//! and the eight-byte checks as one byte string. A whole `StoredChunk`
//! list cost about 42 bytes a chunk, most of it the 32-byte digest decoded
//! byte by byte; this costs about ten.

use crate::error::Error;
use crate::ids::ChunkId;
use crate::msg::StoredChunk;
use serde::{Deserialize, Serialize};

/// One replica as a report names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedChunk {
    pub id: ChunkId,
    pub size: u64,
    /// The replica's digest's first eight bytes ([`Digest::check`]).
    pub check: u64,
}

impl From<&StoredChunk> for ReportedChunk {
    fn from(c: &StoredChunk) -> Self {
        ReportedChunk {
            id: c.id,
            size: c.size,
            check: c.digest.check(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedChunks {
    /// Ids in ascending order, each as its distance from the one before
    /// (the first from zero).
    gaps: Vec<u64>,
    /// Sizes in the same order, as runs of (count, size).
    sizes: Vec<(u64, u64)>,
    /// Eight bytes per chunk, little-endian checks in the same order.
    #[serde(with = "serde_bytes")]
    checks: Vec<u8>,
}

impl PackedChunks {
    pub fn pack(chunks: &[StoredChunk]) -> PackedChunks {
        let mut sorted: Vec<ReportedChunk> = chunks.iter().map(ReportedChunk::from).collect();
        sorted.sort_unstable_by_key(|c| c.id);
        let mut packed = PackedChunks {
            gaps: Vec::with_capacity(sorted.len()),
            sizes: Vec::new(),
            checks: Vec::with_capacity(sorted.len() * 8),
        };
        let mut prev = 0u64;
        for c in &sorted {
            packed.gaps.push(c.id.0 - prev);
            prev = c.id.0;
            match packed.sizes.last_mut() {
                Some((n, size)) if *size == c.size => *n += 1,
                _ => packed.sizes.push((1, c.size)),
            }
            packed.checks.extend_from_slice(&c.check.to_le_bytes());
        }
        packed
    }

    pub fn len(&self) -> usize {
        self.gaps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gaps.is_empty()
    }

    /// The replicas, in id order; a list whose parts disagree in length or
    /// whose ids overflow is refused whole, naming what is wrong.
    pub fn unpack(&self) -> Result<Vec<ReportedChunk>, Error> {
        let n = self.gaps.len();
        if self.checks.len() != n * 8 {
            return Err(Error::Malformed(format!(
                "chunk report lists {n} chunks but {} bytes of digest checks (8 a chunk)",
                self.checks.len()
            )));
        }
        let sized = self
            .sizes
            .iter()
            .try_fold(0u64, |sum, (count, _)| sum.checked_add(*count));
        if sized != Some(n as u64) {
            return Err(Error::Malformed(format!(
                "chunk report lists {n} chunks but its size runs cover {}",
                sized.map_or_else(|| "more than 2^64".to_string(), |s| s.to_string())
            )));
        }
        let mut sizes = self
            .sizes
            .iter()
            .flat_map(|(count, size)| std::iter::repeat_n(*size, *count as usize));
        let mut out = Vec::with_capacity(n);
        let mut id = 0u64;
        for (gap, check) in self.gaps.iter().zip(self.checks.chunks_exact(8)) {
            id = id.checked_add(*gap).ok_or_else(|| {
                Error::Malformed("chunk report's ids run past the largest chunk id".into())
            })?;
            let mut b = [0u8; 8];
            b.copy_from_slice(check);
            out.push(ReportedChunk {
                id: ChunkId(id),
                // Runs were checked to cover every chunk above.
                size: sizes.next().unwrap_or_default(),
                check: u64::from_le_bytes(b),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Digest;

    fn chunk(id: u64, size: u64) -> StoredChunk {
        StoredChunk {
            id: ChunkId(id),
            size,
            digest: Digest(*blake3::hash(&id.to_le_bytes()).as_bytes()),
        }
    }

    #[test]
    fn a_packed_list_unpacks_to_the_same_replicas_in_id_order() {
        let chunks: Vec<StoredChunk> = [907u64, 3, 1 << 40, 4, 88]
            .iter()
            .map(|&id| chunk(id, if id == 88 { 17 } else { 64 << 20 }))
            .collect();
        let packed = PackedChunks::pack(&chunks);
        let mut want: Vec<ReportedChunk> = chunks.iter().map(ReportedChunk::from).collect();
        want.sort_by_key(|c| c.id);
        assert_eq!(packed.unpack().expect("unpacks"), want);
        assert_eq!(packed.len(), 5);
        assert!(PackedChunks::pack(&[]).unpack().expect("empty").is_empty());
    }

    #[test]
    fn a_report_of_thirty_thousand_chunks_is_a_quarter_of_the_stored_list() {
        // A node holding every 33rd chunk, as 1,000 nodes at replication 3 do.
        let chunks: Vec<StoredChunk> = (0..30_000u64).map(|i| chunk(i * 33, 64 << 20)).collect();
        let packed = crate::frame::encode(&PackedChunks::pack(&chunks)).expect("encodes");
        let whole = crate::frame::encode(&chunks).expect("encodes");
        assert!(
            packed.len() * 4 <= whole.len(),
            "{} bytes packed against {} stored",
            packed.len(),
            whole.len()
        );
        // `encode` puts the frame's length first.
        let back: PackedChunks = crate::frame::decode(&packed[4..]).expect("decodes");
        assert_eq!(back.unpack().expect("unpacks").len(), 30_000);
    }

    #[test]
    fn lists_whose_parts_disagree_are_refused_with_what_is_wrong() {
        let mut p = PackedChunks::pack(&[chunk(1, 10), chunk(2, 10)]);
        p.checks.pop();
        let e = p.unpack().expect_err("short checks").to_string();
        assert!(e.contains("2 chunks") && e.contains("15 bytes"), "{e}");

        let mut p = PackedChunks::pack(&[chunk(1, 10), chunk(2, 10)]);
        p.sizes = vec![(1, 10)];
        let e = p.unpack().expect_err("short sizes").to_string();
        assert!(e.contains("size runs cover 1"), "{e}");
        p.sizes = vec![(u64::MAX, 10), (2, 10)];
        let e = p.unpack().expect_err("overflowing sizes").to_string();
        assert!(e.contains("more than 2^64"), "{e}");

        let mut p = PackedChunks::pack(&[chunk(1, 10), chunk(2, 10)]);
        p.gaps = vec![u64::MAX, 1];
        let e = p.unpack().expect_err("overflowing ids").to_string();
        assert!(e.contains("largest chunk id"), "{e}");
    }
}
