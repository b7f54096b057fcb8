//! The keys chunk access tokens are signed with: made and rotated here,
//! kept in the metadata store (so tokens survive a namenode restart), and
//! shared with datanodes in every reply to them.

use crate::namespace::Namespace;
use quern_proto::token::now_ms;
use quern_proto::{Access, ChunkId, ChunkToken, TokenKey, WireError};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Duration;

const STORE_KEY: &str = "token_keys";

#[derive(Clone, Serialize, Deserialize)]
struct Stored {
    key: TokenKey,
    created_ms: i64,
}

pub struct Authority {
    keys: Mutex<Vec<Stored>>,
    /// How long a token is valid.
    lifetime: Duration,
    /// How long a key signs new tokens before the next one takes over.
    rotate_every: Duration,
}

impl Authority {
    pub fn load(
        ns: &Namespace,
        lifetime: Duration,
        rotate_every: Duration,
    ) -> Result<Authority, WireError> {
        let keys = match ns.meta_get(STORE_KEY)? {
            Some(bytes) => bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                .map(|(v, _)| v)
                .unwrap_or_else(|e| {
                    tracing::warn!("token keys unreadable ({e}); making new ones");
                    Vec::new()
                }),
            None => Vec::new(),
        };
        let a = Authority {
            keys: Mutex::new(keys),
            lifetime,
            rotate_every,
        };
        a.rotate(ns)?;
        Ok(a)
    }

    /// Makes a new key when the current one is due and drops expired ones.
    pub fn rotate(&self, ns: &Namespace) -> Result<(), WireError> {
        let now = now_ms();
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let before = keys.len();
        keys.retain(|k| k.key.expires_ms > now);
        let due = keys
            .last()
            .is_none_or(|k| k.created_ms + self.rotate_every.as_millis() as i64 <= now);
        if due {
            let id = keys.last().map_or(1, |k| k.key.id.wrapping_add(1));
            let life = (self.rotate_every + self.lifetime).as_millis() as i64;
            keys.push(Stored {
                key: TokenKey {
                    id,
                    secret: rand::random(),
                    expires_ms: now + life,
                },
                created_ms: now,
            });
            tracing::info!(key = id, "new token key");
        }
        if due || keys.len() != before {
            let bytes = bincode::serde::encode_to_vec(&*keys, bincode::config::standard())
                .map_err(|e| WireError::new(quern_proto::ErrorCode::Internal, e.to_string()))?;
            ns.meta_put(STORE_KEY, &bytes)?;
        }
        Ok(())
    }

    pub fn keys(&self) -> Vec<TokenKey> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter().map(|k| k.key.clone()).collect()
    }

    /// Checks a token this namenode signed, as a datanode would.
    pub fn verify(
        &self,
        token: Option<&ChunkToken>,
        chunk: ChunkId,
        want: Access,
    ) -> Result<(), String> {
        quern_proto::KeyRing::new(&self.keys()).check(token, chunk, want, now_ms())
    }

    pub fn sign(&self, chunk: ChunkId, access: Access, user: &str) -> ChunkToken {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let expires = now_ms() + self.lifetime.as_millis() as i64;
        match keys.last() {
            Some(k) => ChunkToken::sign(&k.key, chunk, access, user, expires),
            // `load` always leaves a key; an empty ring signs nothing valid.
            None => ChunkToken {
                chunk,
                access,
                user: user.into(),
                expires_ms: 0,
                key_id: 0,
                mac: [0; 32],
            },
        }
    }
}
