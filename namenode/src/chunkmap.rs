//! Every chunk the namespace knows, with where its replicas are, kept small:
//! at a hundred million chunks each byte of an entry is 100 MB of RAM.
//!
//! An entry is 32 bytes: size, the committed digest's first eight bytes
//! (enough to tell a replica of another write; the full digest lives in the
//! namespace and on the datanodes), target and up to three replicas inline
//! as 4-byte node slots (the node table's index, not the 8-byte node id). Replicas beyond three (replication above 3, or a dead node's
//! replica kept while a new copy is made) and corrupt marks sit in side
//! maps, which only the rare chunks that need them pay for.

use quern_proto::{ChunkId, Digest};
use rustc_hash::FxHashMap as HashMap;

/// A datanode's index in the cluster's node table.
pub type Slot = u32;

const EMPTY: Slot = Slot::MAX;
const INLINE: usize = 3;

const COMMITTED: u8 = 1;
const HAS_CORRUPT: u8 = 2;
const HAS_MORE: u8 = 4;

struct Entry {
    size: u64,
    check: u64,
    inline: [Slot; INLINE],
    target: u8,
    flags: u8,
}

impl Entry {
    fn info(&self) -> ChunkInfo {
        let committed = self.flags & COMMITTED != 0;
        ChunkInfo {
            size: committed.then_some(self.size),
            check: committed.then_some(self.check),
            target: self.target,
        }
    }
}

/// What is known of a chunk besides its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// `None` while the chunk is allocated but not yet committed.
    pub size: Option<u64>,
    /// The committed digest's first eight bytes ([`Digest::check`]).
    pub check: Option<u64>,
    pub target: u8,
}

/// What taking one reported replica did, in one look-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    Unknown,
    /// Committed with another digest: the node never received this chunk.
    OtherDigest,
    /// The node was known to hold it already.
    Held,
    /// A new replica of a chunk without extra or corrupt replicas: its
    /// good replicas before, and its tally after.
    Added {
        good_before: usize,
        after: Tally,
    },
    /// Anything else (another size, a fourth holder, corrupt marks): the
    /// caller takes the general path.
    Other,
}

/// A chunk's replicas counted in one look-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub info: ChunkInfo,
    /// Replicas on live nodes, not marked corrupt.
    pub good: usize,
    pub corrupt: bool,
}

#[derive(Default)]
pub struct ChunkMap {
    entries: HashMap<ChunkId, Entry>,
    more: HashMap<ChunkId, Vec<Slot>>,
    corrupt: HashMap<ChunkId, Vec<(Slot, String)>>,
    corrupt_total: usize,
}

impl ChunkMap {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn contains(&self, id: ChunkId) -> bool {
        self.entries.contains_key(&id)
    }

    pub fn info(&self, id: ChunkId) -> Option<ChunkInfo> {
        self.entries.get(&id).map(Entry::info)
    }

    /// A chunk handed out for writing; an existing entry stays as it is.
    pub fn allocate(&mut self, id: ChunkId, target: u8) {
        self.entries.entry(id).or_insert(Entry {
            size: 0,
            check: 0,
            inline: [EMPTY; INLINE],
            target,
            flags: 0,
        });
    }

    /// A chunk's committed size and digest; replicas known already stay.
    pub fn commit(&mut self, id: ChunkId, size: u64, digest: Digest, target: u8) {
        self.allocate(id, target);
        if let Some(e) = self.entries.get_mut(&id) {
            e.size = size;
            e.check = digest.check();
            e.target = target;
            e.flags |= COMMITTED;
        }
    }

    pub fn set_target(&mut self, id: ChunkId, target: u8) -> bool {
        match self.entries.get_mut(&id) {
            Some(e) => {
                e.target = target;
                true
            }
            None => false,
        }
    }

    /// Forgets a chunk; returns the nodes that held it.
    pub fn remove(&mut self, id: ChunkId) -> Option<Vec<Slot>> {
        let holders = self.replicas(id);
        let e = self.entries.remove(&id)?;
        if e.flags & HAS_MORE != 0 {
            self.more.remove(&id);
        }
        if e.flags & HAS_CORRUPT != 0 {
            if let Some(marks) = self.corrupt.remove(&id) {
                self.corrupt_total -= marks.len();
            }
        }
        Some(holders)
    }

    /// Counts a chunk's good replicas (`live` says which nodes are).
    pub fn tally(&self, id: ChunkId, live: impl Fn(Slot) -> bool) -> Option<Tally> {
        let e = self.entries.get(&id)?;
        let marks = if e.flags & HAS_CORRUPT != 0 {
            self.corrupt.get(&id).map(|m| m.as_slice()).unwrap_or(&[])
        } else {
            &[]
        };
        let good_one = |s: Slot| s != EMPTY && live(s) && !marks.iter().any(|(m, _)| *m == s);
        let mut good = e.inline.iter().filter(|s| good_one(**s)).count();
        if e.flags & HAS_MORE != 0 {
            good += self
                .more
                .get(&id)
                .into_iter()
                .flatten()
                .filter(|s| good_one(**s))
                .count();
        }
        Some(Tally {
            info: e.info(),
            good,
            corrupt: !marks.is_empty(),
        })
    }

    /// Takes a replica a node reports, when that is simple (the common
    /// case of a full report), with a single look-up of the chunk.
    pub fn add_reported(
        &mut self,
        id: ChunkId,
        slot: Slot,
        size: u64,
        check: u64,
        live: impl Fn(Slot) -> bool,
    ) -> Reported {
        let Some(e) = self.entries.get_mut(&id) else {
            return Reported::Unknown;
        };
        let committed = e.flags & COMMITTED != 0;
        if committed && e.check != check {
            return Reported::OtherDigest;
        }
        if committed && e.size != size {
            return Reported::Other;
        }
        if e.inline.contains(&slot) {
            return Reported::Held;
        }
        if e.flags & (HAS_MORE | HAS_CORRUPT) != 0 {
            return Reported::Other;
        }
        let Some(free) = e.inline.iter().position(|s| *s == EMPTY) else {
            return Reported::Other;
        };
        let good_before = e
            .inline
            .iter()
            .filter(|s| **s != EMPTY && live(**s))
            .count();
        e.inline[free] = slot;
        Reported::Added {
            good_before,
            after: Tally {
                info: e.info(),
                good: good_before + usize::from(live(slot)),
                corrupt: false,
            },
        }
    }

    /// The nodes holding a chunk, in no particular order.
    pub fn replicas(&self, id: ChunkId) -> Vec<Slot> {
        let mut out = Vec::with_capacity(INLINE);
        self.each_replica(id, |s| out.push(s));
        out
    }

    pub fn each_replica(&self, id: ChunkId, mut f: impl FnMut(Slot)) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        for s in e.inline {
            if s != EMPTY {
                f(s);
            }
        }
        if e.flags & HAS_MORE != 0 {
            for s in self.more.get(&id).into_iter().flatten() {
                f(*s);
            }
        }
    }

    pub fn has_replica(&self, id: ChunkId, slot: Slot) -> bool {
        let mut found = false;
        self.each_replica(id, |s| found |= s == slot);
        found
    }

    /// Records a replica; false when the chunk is unknown or the node
    /// already holds it.
    pub fn add_replica(&mut self, id: ChunkId, slot: Slot) -> bool {
        if !self.contains(id) || self.has_replica(id, slot) {
            return false;
        }
        let Some(e) = self.entries.get_mut(&id) else {
            return false;
        };
        if let Some(free) = e.inline.iter_mut().find(|s| **s == EMPTY) {
            *free = slot;
        } else {
            e.flags |= HAS_MORE;
            self.more.entry(id).or_default().push(slot);
        }
        true
    }

    /// Drops a replica and any corrupt mark on it; false when there was none.
    pub fn remove_replica(&mut self, id: ChunkId, slot: Slot) -> bool {
        let Some(e) = self.entries.get_mut(&id) else {
            return false;
        };
        let mut removed = false;
        if let Some(s) = e.inline.iter_mut().find(|s| **s == slot) {
            *s = EMPTY;
            removed = true;
        } else if e.flags & HAS_MORE != 0 {
            if let Some(more) = self.more.get_mut(&id) {
                if let Some(i) = more.iter().position(|s| *s == slot) {
                    more.swap_remove(i);
                    removed = true;
                }
                if more.is_empty() {
                    self.more.remove(&id);
                    e.flags &= !HAS_MORE;
                }
            }
        }
        if removed {
            self.clear_corrupt(id, slot);
        }
        removed
    }

    /// Marks a held replica corrupt; false when the node does not hold it.
    pub fn mark_corrupt(&mut self, id: ChunkId, slot: Slot, reason: String) -> bool {
        if !self.has_replica(id, slot) {
            return false;
        }
        let marks = self.corrupt.entry(id).or_default();
        match marks.iter_mut().find(|(s, _)| *s == slot) {
            Some(m) => m.1 = reason,
            None => {
                marks.push((slot, reason));
                self.corrupt_total += 1;
            }
        }
        if let Some(e) = self.entries.get_mut(&id) {
            e.flags |= HAS_CORRUPT;
        }
        true
    }

    pub fn clear_corrupt(&mut self, id: ChunkId, slot: Slot) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        if e.flags & HAS_CORRUPT == 0 {
            return;
        }
        if let Some(marks) = self.corrupt.get_mut(&id) {
            let before = marks.len();
            marks.retain(|(s, _)| *s != slot);
            self.corrupt_total -= before - marks.len();
            if marks.is_empty() {
                self.corrupt.remove(&id);
                e.flags &= !HAS_CORRUPT;
            }
        }
    }

    pub fn corrupt_reason(&self, id: ChunkId, slot: Slot) -> Option<&str> {
        let e = self.entries.get(&id)?;
        if e.flags & HAS_CORRUPT == 0 {
            return None;
        }
        self.corrupt
            .get(&id)?
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, why)| why.as_str())
    }

    pub fn is_corrupt(&self, id: ChunkId, slot: Slot) -> bool {
        self.corrupt_reason(id, slot).is_some()
    }

    pub fn corrupt_slots(&self, id: ChunkId) -> Vec<Slot> {
        self.corrupt
            .get(&id)
            .map(|m| m.iter().map(|(s, _)| *s).collect())
            .unwrap_or_default()
    }

    /// Bytes the tables hold (entries by capacity, side maps roughly).
    pub fn memory_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(ChunkId, Entry)>() + 1;
        let more: usize = self.more.values().map(|v| 32 + v.capacity() * 4).sum();
        let corrupt: usize = self
            .corrupt
            .values()
            .flatten()
            .map(|(_, why)| 48 + why.capacity())
            .sum();
        self.entries.capacity() * slot + more + corrupt
    }

    /// Corrupt replicas over all chunks.
    pub fn corrupt_total(&self) -> usize {
        self.corrupt_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_stays_small() {
        assert!(std::mem::size_of::<Entry>() <= 32);
    }

    #[test]
    fn replicas_beyond_three_and_corrupt_marks_come_and_go() {
        let mut m = ChunkMap::default();
        let id = ChunkId(7);
        assert!(!m.add_replica(id, 1), "unknown chunk");
        m.allocate(id, 5);
        for s in 0..5 {
            assert!(m.add_replica(id, s));
        }
        assert!(!m.add_replica(id, 4), "held already");
        let mut r = m.replicas(id);
        r.sort();
        assert_eq!(r, vec![0, 1, 2, 3, 4]);
        assert!(m.mark_corrupt(id, 4, "bad".into()));
        assert!(!m.mark_corrupt(id, 9, "not held".into()));
        assert_eq!(m.corrupt_total(), 1);
        assert_eq!(m.corrupt_reason(id, 4), Some("bad"));
        assert!(m.remove_replica(id, 4));
        assert_eq!(m.corrupt_total(), 0);
        assert!(m.remove_replica(id, 0));
        assert!(m.remove_replica(id, 3));
        let mut r = m.replicas(id);
        r.sort();
        assert_eq!(r, vec![1, 2]);
        assert!(m.more.is_empty(), "no side entry left behind");
        m.commit(id, 10, Digest([1; 32]), 3);
        assert_eq!(m.info(id).and_then(|i| i.size), Some(10));
        assert_eq!(m.replicas(id).len(), 2, "commit keeps replicas");
        assert_eq!(m.remove(id).map(|h| h.len()), Some(2));
        assert_eq!(m.len(), 0);
    }
}
