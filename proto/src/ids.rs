use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{:016x}"), self.0)
            }
        }
    };
}

id_type!(
    /// A chunk, unique for the life of a cluster.
    ChunkId,
    "chunk-"
);
id_type!(
    /// A datanode; chosen at its first start and kept in its data dir.
    NodeId,
    "dn-"
);
id_type!(
    /// A file being written (its lease), before it becomes visible.
    FileId,
    "file-"
);

/// blake3 digest of a chunk's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        let mut h = blake3::Hasher::new();
        // Whole chunks are hashed on every core; small buffers are not
        // worth the thread hand-off.
        if bytes.len() >= 1 << 20 {
            h.update_rayon(bytes);
        } else {
            h.update(bytes);
        }
        Digest(*h.finalize().as_bytes())
    }

    /// The first eight bytes, as the namenode keeps a committed digest.
    pub fn check(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Digest(*h.as_bytes())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
