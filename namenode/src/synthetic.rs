//! A namespace of made-up files, for `quern bench namenode`: as many chunks
//! as a large cluster holds, written straight into a formatted metadata
//! directory in the time sled takes to store them, rather than through
//! millions of create/allocate/commit calls. Every chunk gets a fresh id
//! from the namespace's own generator (so later allocations never collide)
//! and a digest a simulated datanode can recompute from the id alone.

use crate::namespace::{Namespace, PendingFile, StoreError, SUPERGROUP};
use quern_proto::msg::ChunkMeta;
use quern_proto::{ChunkId, Digest, RemotePath, WireError};
use std::collections::BTreeMap;

/// What a simulated datanode reports for chunk `id`.
pub fn digest_of(id: ChunkId) -> Digest {
    Digest::of(&id.0.to_le_bytes())
}

#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Wire(#[from] WireError),
}

/// Writes `files` files of `chunks_per_file` chunks each (all `size`
/// bytes, replication `replication`) under `/synthetic` of the formatted
/// namespace in `dir`; returns the chunk ids in order.
pub fn populate(
    dir: &std::path::Path,
    files: u64,
    chunks_per_file: u32,
    replication: u8,
    size: u64,
) -> Result<Vec<ChunkId>, SyntheticError> {
    let ns = Namespace::open(dir)?;
    let root = RemotePath::parse("/synthetic")?;
    ns.mkdir(&root, true, 0o755, quern_proto::tls::ADMIN_USER)?;
    let mut ids = Vec::with_capacity((files * u64::from(chunks_per_file)) as usize);
    for f in 0..files {
        let path = root.join(&format!("f{f:08}"))?;
        let parent = ns.parent_dir(&path)?;
        let mut chunks = BTreeMap::new();
        let mut allocated = Vec::with_capacity(chunks_per_file as usize);
        for i in 0..chunks_per_file {
            let id = ns.new_chunk_id()?;
            chunks.insert(
                i,
                ChunkMeta {
                    id,
                    size,
                    digest: digest_of(id),
                },
            );
            allocated.push(id);
            ids.push(id);
        }
        let pending = PendingFile {
            path: path.to_string(),
            replication,
            chunk_size: size,
            mode: 0o644,
            overwrite: false,
            owner: quern_proto::tls::ADMIN_USER.into(),
            group: SUPERGROUP.into(),
            chunks,
            allocated,
        };
        let id = ns.create(&path, &parent, pending)?;
        ns.complete(id)?;
    }
    ns.flush_now()?;
    Ok(ids)
}
