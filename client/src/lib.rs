//! The quern client library: namespace calls, chunk streaming with replica
//! failover and digest checks, and file writers with atomic visibility.

mod dataset;
mod history;
mod job;
mod plan;
mod read;
mod scheduler;
mod train;
mod write;

pub use dataset::{Dataset, ImportOptions};
pub use job::{JobOptions, JobSummary, Retry};
pub use plan::{Decision, Estimate, Plan};
pub use read::ChunkSource;
pub use scheduler::{Assignment, Scheduler};
pub use train::{TrainEvent, TrainOptions, TrainOutcome, TrainSummary};
pub use write::{FileWriter, WriteOptions};

use quern_proto::config::ClientConfig;
use quern_proto::msg::*;
use quern_proto::tls::Identity;
use quern_proto::transport::{Endpoint, Tuning};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Proto(#[from] quern_proto::Error),
    #[error("{path}: chunk {index} ({chunk}) could not be read from any replica: {tried}")]
    Unreadable {
        path: String,
        index: u32,
        chunk: quern_proto::ChunkId,
        tried: String,
    },
    #[error("{path}: chunk {index} could not be stored: {tried}")]
    Unwritable {
        path: String,
        index: u32,
        tried: String,
    },
    #[error("{0}")]
    Job(String),
    #[error("{0}")]
    Dataset(String),
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
}

impl Error {
    /// The namenode's error code, when the namenode refused the request.
    pub fn code(&self) -> Option<quern_proto::ErrorCode> {
        match self {
            Error::Proto(p) => p.code(),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A connection to a cluster. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    namenode: SocketAddr,
    /// Who this client is, from its certificate.
    principal: Option<quern_proto::Principal>,
}

impl Client {
    pub fn new(identity: &Identity, namenode: SocketAddr, rpc_timeout: Duration) -> Result<Client> {
        Client::with_tuning(identity, namenode, rpc_timeout, Tuning::tuned())
    }

    /// A client with its own transport settings (idle deadline, hedging).
    pub fn with_tuning(
        identity: &Identity,
        namenode: SocketAddr,
        rpc_timeout: Duration,
        tuning: Tuning,
    ) -> Result<Client> {
        let endpoint = Endpoint::client(identity, tuning)?.with_rpc_timeout(rpc_timeout);
        Ok(Client {
            inner: Arc::new(Inner {
                endpoint,
                namenode,
                principal: identity.principal().ok(),
            }),
        })
    }

    pub fn from_config(cfg: &ClientConfig) -> Result<Client> {
        let timeout = Duration::from_secs(cfg.rpc_timeout_secs.unwrap_or(30));
        Client::with_tuning(&cfg.identity()?, cfg.namenode, timeout, cfg.tuning())
    }

    /// The fault rules of this client's endpoint (for tests).
    pub fn faults(&self) -> &Arc<quern_proto::fault::Faults> {
        self.inner.endpoint.faults()
    }

    /// The user this client acts as (from its certificate), if a user.
    pub fn user(&self) -> Option<&str> {
        self.inner.principal.as_ref().and_then(|p| p.role.user())
    }

    pub fn namenode(&self) -> SocketAddr {
        self.inner.namenode
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// One namenode RPC; a failure to reach it names the namenode.
    pub async fn call<R: Rpc<Envelope = NameRequest>>(&self, req: R) -> Result<R::Response> {
        self.inner
            .endpoint
            .call(
                quern_proto::transport::Peer::namenode(self.inner.namenode),
                req,
            )
            .await
            .map_err(|e| match e {
                quern_proto::Error::Connect { peer, reason } => quern_proto::Error::Connect {
                    peer: format!("namenode {peer}"),
                    reason,
                }
                .into(),
                quern_proto::Error::Timeout { peer, what, secs } => quern_proto::Error::Timeout {
                    peer: format!("namenode {peer}"),
                    what,
                    secs,
                }
                .into(),
                other => other.into(),
            })
    }

    pub async fn stat(&self, path: &str) -> Result<FileStatus> {
        self.call(Stat { path: path.into() }).await
    }

    /// `None` when the path does not exist.
    pub async fn try_stat(&self, path: &str) -> Result<Option<FileStatus>> {
        match self.stat(path).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.code() == Some(quern_proto::ErrorCode::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every entry of a directory (or the file itself), in name order.
    pub async fn list(&self, path: &str) -> Result<Vec<FileStatus>> {
        let mut all = Vec::new();
        self.list_pages(path, |page| all.extend(page)).await?;
        Ok(all)
    }

    /// A directory page by page, in name order, handing each page to
    /// `each` as it arrives (a directory of millions lists in bounded
    /// memory).
    pub async fn list_pages(
        &self,
        path: &str,
        mut each: impl FnMut(Vec<FileStatus>),
    ) -> Result<()> {
        let mut start_after: Option<String> = None;
        loop {
            let page = self
                .call(List {
                    path: path.into(),
                    start_after: start_after.clone(),
                    limit: LIST_PAGE,
                })
                .await?;
            start_after = page
                .entries
                .last()
                .and_then(|e| e.path.rsplit('/').next())
                .map(str::to_string);
            let more = page.more && start_after.is_some();
            each(page.entries);
            if !more {
                return Ok(());
            }
        }
    }

    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<()> {
        self.call(Mkdir {
            path: path.into(),
            parents,
        })
        .await
    }

    pub async fn delete(&self, path: &str, recursive: bool) -> Result<()> {
        self.call(Delete {
            path: path.into(),
            recursive,
        })
        .await
    }

    pub async fn rename(&self, src: &str, dst: &str, replace: bool) -> Result<()> {
        self.call(Rename {
            src: src.into(),
            dst: dst.into(),
            replace,
        })
        .await
    }

    pub async fn set_replication(&self, path: &str, replication: u8) -> Result<()> {
        self.call(SetReplication {
            path: path.into(),
            replication,
        })
        .await
    }

    pub async fn set_attr(
        &self,
        path: &str,
        mode: Option<u32>,
        mtime_ms: Option<i64>,
    ) -> Result<()> {
        self.call(SetAttr {
            path: path.into(),
            mode,
            mtime_ms,
            owner: None,
            group: None,
        })
        .await
    }

    /// Changes a path's owner (the admin only) and/or group.
    pub async fn set_owner(
        &self,
        path: &str,
        owner: Option<String>,
        group: Option<String>,
    ) -> Result<()> {
        self.call(SetAttr {
            path: path.into(),
            mode: None,
            mtime_ms: None,
            owner,
            group,
        })
        .await
    }

    pub async fn summary(&self, path: &str) -> Result<ContentSummary> {
        self.call(Summary { path: path.into() }).await
    }

    /// Every chunk of a file with its replicas and a token for each,
    /// fetched a page at a time.
    pub async fn locate(&self, path: &str) -> Result<FileLocations> {
        let mut loc = self
            .call(Locate {
                path: path.into(),
                first_chunk: 0,
                limit: LIST_PAGE,
            })
            .await?;
        while loc.more {
            let page = self
                .call(Locate {
                    path: path.into(),
                    first_chunk: loc.chunks.len() as u32,
                    limit: LIST_PAGE,
                })
                .await?;
            loc.more = page.more && !page.chunks.is_empty();
            loc.chunks.extend(page.chunks);
        }
        Ok(loc)
    }

    /// The health of every file below `path`, fetched a page at a time.
    pub async fn fsck(&self, path: &str) -> Result<FsckReport> {
        let mut report = self
            .call(Fsck {
                path: path.into(),
                start_after: None,
                limit: LIST_PAGE,
            })
            .await?;
        while let Some(after) = report.next.take() {
            let page = self
                .call(Fsck {
                    path: path.into(),
                    start_after: Some(after),
                    limit: LIST_PAGE,
                })
                .await?;
            report.next = page.next;
            report.files.extend(page.files);
        }
        Ok(report)
    }

    /// The datanodes the namenode considers live, in its order.
    pub async fn live_datanodes(&self) -> Result<Vec<NodeAddr>> {
        Ok(self
            .report()
            .await?
            .datanodes
            .iter()
            .filter(|d| d.state == NodeState::Live)
            .map(|d| d.node)
            .collect())
    }

    pub async fn report(&self) -> Result<ClusterReport> {
        self.call(Report).await
    }

    /// Safe mode after `action`: `Some(why)` while in it. Entering and
    /// leaving need the admin certificate.
    pub async fn safe_mode(&self, action: SafeModeAction) -> Result<Option<String>> {
        Ok(self.call(SafeModeRequest { action }).await?.safe_mode)
    }
}
