//! Chunk access tokens, the shape of HDFS block access tokens.
//!
//! The namenode signs a short-lived token for each chunk it hands out
//! (allocate, locate, replication commands): chunk id, what it allows, the
//! user it was issued to, and its expiry, with a keyed blake3 MAC. It shares
//! its keys with datanodes when they register and in every heartbeat reply,
//! and rotates them; a datanode checks a token before every read, write,
//! replica push and task. Only the namenode and datanodes know the keys.

use crate::ids::ChunkId;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;

/// What a token allows, as a set of bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access(pub u8);

impl Access {
    pub const READ: Access = Access(1);
    pub const WRITE: Access = Access(2);
    pub const REPLICATE: Access = Access(4);
    pub const TASK: Access = Access(8);

    pub fn union(self, other: Access) -> Access {
        Access(self.0 | other.0)
    }

    pub fn allows(self, want: Access) -> bool {
        self.0 & want.0 == want.0
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (Access::READ, "read"),
            (Access::WRITE, "write"),
            (Access::REPLICATE, "replicate"),
            (Access::TASK, "task"),
        ]
        .iter()
        .filter(|(a, _)| self.allows(*a))
        .map(|(_, n)| *n)
        .collect();
        if names.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&names.join("+"))
        }
    }
}

/// A signing key; datanodes hold the same ones.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenKey {
    pub id: u32,
    pub secret: [u8; 32],
    /// Unix milliseconds after which no token signed with it is valid.
    pub expires_ms: i64,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenKey({}, expires {})", self.id, self.expires_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkToken {
    pub chunk: ChunkId,
    pub access: Access,
    pub user: String,
    pub expires_ms: i64,
    pub key_id: u32,
    pub mac: [u8; 32],
}

fn mac(key: &TokenKey, chunk: ChunkId, access: Access, user: &str, expires_ms: i64) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&key.secret);
    h.update(&chunk.0.to_le_bytes());
    h.update(&[access.0]);
    h.update(&expires_ms.to_le_bytes());
    h.update(&key.id.to_le_bytes());
    h.update(user.as_bytes());
    *h.finalize().as_bytes()
}

impl ChunkToken {
    pub fn sign(
        key: &TokenKey,
        chunk: ChunkId,
        access: Access,
        user: &str,
        expires_ms: i64,
    ) -> ChunkToken {
        let expires_ms = expires_ms.min(key.expires_ms);
        ChunkToken {
            chunk,
            access,
            user: user.to_string(),
            expires_ms,
            key_id: key.id,
            mac: mac(key, chunk, access, user, expires_ms),
        }
    }
}

/// The keys a datanode checks tokens with.
#[derive(Debug, Default, Clone)]
pub struct KeyRing {
    keys: HashMap<u32, TokenKey>,
}

impl KeyRing {
    pub fn new(keys: &[TokenKey]) -> KeyRing {
        KeyRing {
            keys: keys.iter().map(|k| (k.id, k.clone())).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `Ok` when `token` allows `want` on `chunk` at `now_ms`; otherwise
    /// why not, in words for the error the caller gets.
    pub fn check(
        &self,
        token: Option<&ChunkToken>,
        chunk: ChunkId,
        want: Access,
        now_ms: i64,
    ) -> Result<(), String> {
        let Some(t) = token else {
            return Err(format!(
                "no access token for {chunk}; ask the namenode (locate or allocate) for one"
            ));
        };
        if t.chunk != chunk {
            return Err(format!("the access token is for {}, not {chunk}", t.chunk));
        }
        if !t.access.allows(want) {
            return Err(format!(
                "the access token for {chunk} allows {}, not {want}",
                t.access
            ));
        }
        let Some(key) = self.keys.get(&t.key_id) else {
            return Err(if self.keys.is_empty() {
                "this datanode has no token keys yet (it has not registered with the namenode)"
                    .to_string()
            } else {
                format!(
                    "the access token for {chunk} was signed with key {}, which this datanode \
                     does not know (expired or from another namenode); locate the file again",
                    t.key_id
                )
            });
        };
        if mac(key, t.chunk, t.access, &t.user, t.expires_ms) != t.mac {
            return Err(format!("the access token for {chunk} has a bad signature"));
        }
        if t.expires_ms < now_ms {
            return Err(format!(
                "the access token for {chunk} expired {} s ago; locate the file again",
                (now_ms - t.expires_ms) / 1000
            ));
        }
        Ok(())
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u32) -> TokenKey {
        TokenKey {
            id,
            secret: [id as u8; 32],
            expires_ms: 10_000,
        }
    }

    #[test]
    fn tokens_check_chunk_access_expiry_and_signature() {
        let ring = KeyRing::new(&[key(1)]);
        let c = ChunkId(5);
        let t = ChunkToken::sign(&key(1), c, Access::READ.union(Access::TASK), "alice", 5_000);
        assert!(ring.check(Some(&t), c, Access::READ, 1_000).is_ok());
        assert!(ring.check(Some(&t), c, Access::TASK, 1_000).is_ok());
        let no = |r: Result<(), String>, what: &str| {
            let e = r.unwrap_err();
            assert!(e.contains(what), "{e}");
        };
        no(ring.check(None, c, Access::READ, 1_000), "no access token");
        no(
            ring.check(Some(&t), ChunkId(6), Access::READ, 1_000),
            "not chunk-",
        );
        no(
            ring.check(Some(&t), c, Access::WRITE, 1_000),
            "allows read+task, not write",
        );
        no(ring.check(Some(&t), c, Access::READ, 6_000), "expired");
        let mut forged = t.clone();
        forged.access = Access::WRITE;
        no(
            ring.check(Some(&forged), c, Access::WRITE, 1_000),
            "bad signature",
        );
        let other = ChunkToken::sign(&key(2), c, Access::READ, "alice", 5_000);
        no(
            ring.check(Some(&other), c, Access::READ, 1_000),
            "does not know",
        );
        // A token never outlives its key.
        let long = ChunkToken::sign(&key(1), c, Access::READ, "alice", 99_999);
        assert_eq!(long.expires_ms, 10_000);
    }
}
