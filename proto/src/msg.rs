//! Every request and its response type.
//!
//! Each request is its own struct and names its response through [`Rpc`];
//! the per-server envelope enums ([`NameRequest`], [`DataRequest`]) are what
//! travels. A response travels as `Result<Response, WireError>`.

use crate::error::WireError;
use crate::ids::{ChunkId, Digest, FileId, NodeId};
use crate::report::PackedChunks;
use crate::token::{ChunkToken, TokenKey};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::net::SocketAddr;

/// A request that has one response type.
pub trait Rpc: Serialize + DeserializeOwned + Send + 'static {
    type Response: Serialize + DeserializeOwned + Send + 'static;
    type Envelope: Envelope;
    /// The request's name, for errors, logs and fault filters.
    const KIND: &'static str;
    fn wrap(self) -> Self::Envelope;
}

/// What travels: one server's requests as one enum.
pub trait Envelope: Serialize + DeserializeOwned + Send + 'static {
    /// The name of the request inside.
    fn kind(&self) -> &'static str;
}

pub type Reply<T> = Result<T, WireError>;

macro_rules! rpcs {
    ($envelope:ident { $($variant:ident($req:ty) -> $resp:ty,)* }) => {
        #[derive(Debug, Serialize, Deserialize)]
        pub enum $envelope { $($variant($req),)* }

        impl Envelope for $envelope {
            fn kind(&self) -> &'static str {
                match self { $($envelope::$variant(_) => stringify!($variant),)* }
            }
        }

        $(impl Rpc for $req {
            type Response = $resp;
            type Envelope = $envelope;
            const KIND: &'static str = stringify!($variant);
            fn wrap(self) -> $envelope { $envelope::$variant(self) }
        })*
    };
}

// ---------------------------------------------------------------- shared types

/// A datanode and where to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeAddr {
    pub id: NodeId,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStatus {
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    pub replication: u8,
    pub chunk_size: u64,
    pub mode: u32,
    pub owner: String,
    pub group: String,
    pub mtime_ms: i64,
    pub chunks: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMeta {
    pub id: ChunkId,
    pub size: u64,
    pub digest: Digest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    Live,
    Dead,
    Corrupt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub node: NodeAddr,
    pub state: ReplicaState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocatedChunk {
    pub index: u32,
    pub offset: u64,
    pub meta: ChunkMeta,
    /// Live replicas first (rotated by chunk index so consecutive chunks
    /// are read from different holders), then dead, then corrupt ones.
    pub replicas: Vec<ReplicaInfo>,
    /// Allows reading the chunk and running tasks on it, as the caller.
    pub token: ChunkToken,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLocations {
    pub status: FileStatus,
    pub chunks: Vec<LocatedChunk>,
    /// More chunks follow the last one (a page of a very large file).
    pub more: bool,
}

/// Health, ordered from best to worst so that `max` picks the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Health {
    Healthy,
    UnderReplicated,
    Corrupt,
    Missing,
}

impl Health {
    pub fn word(self) -> &'static str {
        match self {
            Health::Healthy => "HEALTHY",
            Health::UnderReplicated => "UNDER_REPLICATED",
            Health::Corrupt => "CORRUPT",
            Health::Missing => "MISSING",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsckFile {
    pub path: String,
    pub health: Health,
    pub size: u64,
    pub chunks: u32,
    pub replication: u8,
    /// One line per problem, naming the chunk and the replica.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsckReport {
    pub path: String,
    pub health: Health,
    /// One page of files, in walk order.
    pub files: Vec<FsckFile>,
    /// The last file of this page when more follow: ask again from it.
    pub next: Option<String>,
    pub dirs: u64,
    pub chunks: u64,
    pub under_replicated_chunks: u64,
    pub corrupt_replicas: u64,
    pub missing_chunks: u64,
    pub live_datanodes: u32,
    pub safe_mode: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Live,
    Dead,
}

/// What a datanode's scrubber has done since the node started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubStatus {
    /// When the last full pass ended (Unix milliseconds).
    pub last_pass_end_ms: Option<i64>,
    /// Chunks the last full pass verified.
    pub last_pass_chunks: u64,
    /// Chunks verified so far in the pass under way.
    pub verified_this_pass: u64,
    pub passes: u64,
    /// Bad replicas found (and reported) in all passes.
    pub errors: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatanodeReport {
    pub node: NodeAddr,
    pub state: NodeState,
    pub capacity: u64,
    pub used: u64,
    pub available: u64,
    pub chunks: u64,
    /// Chunks moved aside instead of deleted, kept for the trash time.
    pub trash_bytes: u64,
    pub scrub: ScrubStatus,
    pub full: bool,
    /// Training jobs whose records the node holds in memory, and their
    /// bytes (charged against the node's `--job-memory` budget).
    pub jobs: u64,
    pub job_bytes: u64,
    /// The node's measured sgemm rate (see [`Heartbeat::gflops`]).
    pub gflops: f64,
    pub since_heartbeat_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterReport {
    pub cluster_id: String,
    pub datanodes: Vec<DatanodeReport>,
    /// Why the namenode is in safe mode, when it is.
    pub safe_mode: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentSummary {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Bytes times each file's replication target.
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredChunk {
    pub id: ChunkId,
    pub size: u64,
    /// A node can only name the digest of a chunk it was sent, so a report
    /// cannot claim replicas the node never received.
    pub digest: Digest,
}

/// Work the namenode hands a datanode in a heartbeat reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DatanodeCommand {
    /// Remove these chunks: of deleted files, over-replicated or corrupt.
    Delete(Vec<ChunkId>),
    /// Move these chunks, which the namenode does not know, to the trash:
    /// they may belong to a namespace this namenode has lost.
    Trash(Vec<ChunkId>),
    /// Copy a chunk this node holds to the targets (pipelined).
    Replicate {
        chunk: ChunkId,
        size: u64,
        /// The committed digest's first eight bytes ([`Digest::check`]):
        /// the namenode keeps no more of it in memory. The source checks
        /// its copy against it and sends its own full digest, which the
        /// targets check the bytes against.
        check: u64,
        targets: Vec<NodeAddr>,
        token: ChunkToken,
    },
    /// The namenode does not know this node (it restarted): register again
    /// with a full chunk report.
    Reregister,
    /// Send the full chunk report now: the namenode takes a few at a time
    /// (a report lease), so a thousand nodes registering together send
    /// their lists in turn rather than all at once.
    SendReport,
}

// ---------------------------------------------------------------- namenode

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stat {
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct List {
    pub path: String,
    /// Entries after this name (the last one of the previous page).
    pub start_after: Option<String>,
    /// Most entries wanted; the namenode caps it at [`LIST_PAGE`].
    pub limit: u32,
}

/// Most entries, files or chunks in one page of a listing, fsck or
/// locate: about a megabyte of reply, far under the frame limit.
pub const LIST_PAGE: u32 = 10_000;

/// One page of a directory, in name order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub entries: Vec<FileStatus>,
    /// More entries follow the last one.
    pub more: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mkdir {
    pub path: String,
    pub parents: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delete {
    pub path: String,
    pub recursive: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rename {
    pub src: String,
    pub dst: String,
    /// Replace an existing file at `dst` (POSIX rename semantics).
    pub replace: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateFile {
    pub path: String,
    pub replication: u8,
    pub chunk_size: u64,
    pub mode: u32,
    /// Replace an existing file atomically when the new one completes.
    pub overwrite: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AllocateChunk {
    pub file: FileId,
    pub index: u32,
    /// Datanodes that failed for this chunk already.
    pub exclude: Vec<NodeId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkAllocation {
    pub chunk: ChunkId,
    /// Pipeline order: the client writes to the first.
    pub targets: Vec<NodeAddr>,
    /// Allows writing this chunk, once.
    pub token: ChunkToken,
}

/// More targets for a chunk whose pipeline lost members mid-write (HDFS's
/// replace-datanode-on-failure): new nodes for the same chunk id, with a
/// write token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddTargets {
    pub file: FileId,
    pub chunk: ChunkId,
    /// Nodes that hold the chunk already, and nodes that failed.
    pub exclude: Vec<NodeId>,
    pub count: u8,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitChunk {
    pub file: FileId,
    pub index: u32,
    pub meta: ChunkMeta,
    pub stored_on: Vec<NodeId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Complete {
    pub file: FileId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Abandon {
    pub file: FileId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewLease {
    pub file: FileId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Locate {
    pub path: String,
    /// The first chunk wanted, and at most how many (capped at
    /// [`LIST_PAGE`]).
    pub first_chunk: u32,
    pub limit: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportBadReplica {
    pub chunk: ChunkId,
    pub node: NodeId,
    pub reason: String,
    /// A client proves it read the chunk with the token it read it with;
    /// a datanode reports only its own replica and needs none.
    pub token: Option<ChunkToken>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetReplication {
    pub path: String,
    pub replication: u8,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetAttr {
    pub path: String,
    pub mode: Option<u32>,
    pub mtime_ms: Option<i64>,
    /// Only the admin may give a file away.
    pub owner: Option<String>,
    /// The owner may choose one of their own groups; the admin any.
    pub group: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fsck {
    pub path: String,
    /// Files after this path (the `next` of the previous page).
    pub start_after: Option<String>,
    pub limit: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report;

/// An operator's safe-mode command (admin certificate only for changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SafeModeAction {
    Get,
    /// Held until `Leave`, whatever the reports.
    Enter,
    /// Ends safe mode now, even with chunks not reported yet.
    Leave,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SafeModeRequest {
    pub action: SafeModeAction,
}

/// `Some(why)` while in safe mode, after the action.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SafeModeStatus {
    pub safe_mode: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Register {
    /// The cluster this datanode joined before, if any.
    pub cluster_id: Option<String>,
    pub node: NodeAddr,
    pub capacity: u64,
    pub available: u64,
    pub chunks: PackedChunks,
    /// The chunk list is long: it follows as paged [`ChunkReport`]s once
    /// a [`ReportTurn`] grants the node a turn, and `chunks` is empty.
    pub report_follows: bool,
}

/// How long a datanode waits after registering before its first
/// heartbeat: a random point within one interval. A namenode answers many
/// registrations in the same instant (when its chunk map has loaded after
/// a start); were each node then to wait one interval, they would all
/// heartbeat, and open their connections to the lifeline, in one burst,
/// every interval after. Never longer than an interval, so no node comes
/// nearer the namenode's dead timeout than it would without it.
pub fn first_heartbeat_after(interval: std::time::Duration) -> std::time::Duration {
    interval.mul_f64(rand::random_range(0.0..1.0))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: NodeId,
    pub capacity: u64,
    pub available: u64,
    pub used: u64,
    pub chunks: u64,
    pub trash_bytes: u64,
    pub scrub: ScrubStatus,
    /// The disk filled up: place no chunks here until this clears.
    pub full: bool,
    /// Training jobs held in memory and the bytes charged for them.
    pub jobs: u64,
    pub job_bytes: u64,
    /// The node's sgemm rate on all its cores, GFLOP/s, measured when it
    /// started (0 until then): what the training planner weighs it by.
    pub gflops: f32,
}

/// A datanode whose full report is due asks for a turn to send it. The
/// namenode takes a few long reports at a time (`--report-leases`): the
/// reply carries `SendReport` as soon as a turn is free, or nothing once
/// [`REPORT_TURN_WAIT`] has passed without one, and the node asks again.
/// Heartbeats go on meanwhile on their own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportTurn {
    pub node: NodeId,
}

/// Longest the namenode holds a [`ReportTurn`] before answering that no
/// turn is free yet; well inside an RPC's timeout.
pub const REPORT_TURN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkReport {
    pub node: NodeId,
    /// One page of the node's chunks; the namenode reconciles once the
    /// `last` page has arrived.
    pub chunks: PackedChunks,
    pub first: bool,
    pub last: bool,
}

impl ChunkReport {
    /// A full report as the pages that carry it, at most `page` chunks
    /// each; a node with no chunks sends one empty page.
    pub fn pages(node: NodeId, chunks: &[StoredChunk], page: usize) -> Vec<ChunkReport> {
        let pages: Vec<&[StoredChunk]> = if chunks.is_empty() {
            vec![&[]]
        } else {
            chunks.chunks(page.max(1)).collect()
        };
        let n = pages.len();
        pages
            .into_iter()
            .enumerate()
            .map(|(i, p)| ChunkReport {
                node,
                chunks: PackedChunks::pack(p),
                first: i == 0,
                last: i + 1 == n,
            })
            .collect()
    }
}

/// Chunks in one page of a datanode's report: about 1 MB of report.
pub const REPORT_PAGE: usize = 100_000;

/// Most chunks a datanode lists in its `Register` itself; a longer list
/// follows in `ChunkReport` pages once a `ReportTurn` is granted.
pub const INLINE_REPORT: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkReceived {
    pub node: NodeId,
    pub chunk: StoredChunk,
}

/// The namenode's answer to a datanode's register, heartbeat or report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReply {
    pub cluster_id: String,
    /// A namenode in safe mode orders no deletion; a datanode ignores any
    /// that such a reply carries.
    pub safe_mode: bool,
    /// The keys tokens are signed with (current and still-valid old ones).
    pub keys: Vec<TokenKey>,
    pub commands: Vec<DatanodeCommand>,
    /// The port of the namenode's lifeline endpoint (same host): heartbeats
    /// go there, served apart from every other request so that a loaded
    /// namenode still hears its datanodes in time (HDFS's lifeline RPC).
    pub lifeline: Option<u16>,
}

rpcs!(NameRequest {
    Stat(Stat) -> FileStatus,
    List(List) -> Listing,
    Mkdir(Mkdir) -> (),
    Delete(Delete) -> (),
    Rename(Rename) -> (),
    CreateFile(CreateFile) -> FileId,
    AllocateChunk(AllocateChunk) -> ChunkAllocation,
    CommitChunk(CommitChunk) -> (),
    Complete(Complete) -> FileStatus,
    Abandon(Abandon) -> (),
    RenewLease(RenewLease) -> (),
    Locate(Locate) -> FileLocations,
    ReportBadReplica(ReportBadReplica) -> (),
    SetReplication(SetReplication) -> (),
    SetAttr(SetAttr) -> (),
    Summary(Summary) -> ContentSummary,
    Fsck(Fsck) -> FsckReport,
    Report(Report) -> ClusterReport,
    Register(Register) -> NodeReply,
    Heartbeat(Heartbeat) -> NodeReply,
    ChunkReport(ChunkReport) -> NodeReply,
    ChunkReceived(ChunkReceived) -> (),
    AddTargets(AddTargets) -> ChunkAllocation,
    JobStart(JobStart) -> u64,
    JobPost(JobPost) -> (),
    SafeMode(SafeModeRequest) -> SafeModeStatus,
    ReportTurn(ReportTurn) -> NodeReply,
});

// ---------------------------------------------------------------- jobs

/// What a coordinator runs on the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    Train,
    Statistics,
    Score,
    Predict,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Train => "train",
            JobKind::Statistics => "statistics",
            JobKind::Score => "score",
            JobKind::Predict => "predict",
        }
    }
}

/// A coordinator makes its job known to the cluster; the reply is the
/// job's id in the namenode's history. The caller's user owns it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStart {
    pub kind: JobKind,
    /// The model's name (Keras's), or what the map task computes.
    pub model: String,
    pub dataset: String,
}

/// What happened to a job since its last post; only its owner posts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobPost {
    pub job: u64,
    pub note: JobNote,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobNote {
    /// Where it runs: the plan and its workers, and how many steps it has.
    Planned {
        plan: String,
        workers: Vec<String>,
        iterations: u64,
        steps_per_epoch: u64,
    },
    Progress(JobPoint),
    WorkerLost {
        worker: String,
        error: String,
    },
    /// The job ended; `result` is the coordinator's summary in words.
    Finished {
        result: String,
    },
    Failed {
        error: String,
    },
}

/// One display interval (or an epoch's end) of a training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPoint {
    /// When it was measured (Unix milliseconds).
    pub at_ms: i64,
    pub iteration: u64,
    pub epoch: u64,
    pub loss: f64,
    pub accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub samples_per_sec: f64,
    /// Each worker's compute time in the last step, in milliseconds.
    pub worker_step_ms: Vec<(String, f64)>,
    /// Bytes the job has moved between coordinator and workers so far.
    pub bytes_moved: u64,
}

// ---------------------------------------------------------------- datanode

/// Header of a chunk write; exactly `meta.size` raw bytes follow it on the
/// stream. The receiver forwards to `pipeline[0]` with the rest of the
/// pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteChunk {
    pub meta: ChunkMeta,
    pub pipeline: Vec<NodeAddr>,
    /// Write access (a client's pipeline) or replicate access (a
    /// re-replication the namenode ordered); forwarded down the pipeline.
    pub token: Option<ChunkToken>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteAck {
    /// Every node of the pipeline that stored and verified the chunk.
    pub stored_on: Vec<NodeId>,
    /// Nodes further down the pipeline that failed, with the reason.
    pub failed: Vec<(NodeAddr, String)>,
}

/// Read `len` bytes (to the end when `None`) from `offset` of a chunk. The
/// reply header is followed by exactly `ReadHeader::len` raw bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadChunk {
    pub chunk: ChunkId,
    pub offset: u64,
    pub len: Option<u64>,
    pub token: Option<ChunkToken>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadHeader {
    pub chunk_size: u64,
    pub digest: Digest,
    pub len: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ping;

/// Run a map task over one chunk. The datanode reads the chunk from its own
/// disk; only when it holds no replica does it fetch the chunk from
/// `sources` (the coordinator then counts the task as remote). `task` is an
/// encoded `quern_compute::ops::Task`: the protocol does not know operators.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunTask {
    pub chunk: ChunkMeta,
    pub sources: Vec<NodeAddr>,
    /// Task access to the chunk (it also reads a remote replica).
    pub token: Option<ChunkToken>,
    #[serde(with = "serde_bytes")]
    pub task: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskOutput {
    /// Encoded `quern_compute::ops::Partial`.
    #[serde(with = "serde_bytes")]
    pub partial: Vec<u8>,
    /// Chunk bytes read from the datanode's own disk.
    pub local_bytes: u64,
    /// Chunk bytes fetched from another datanode (a remote task).
    pub fetched_bytes: u64,
}

/// Join (or extend) a training job: load these chunks (from local disk,
/// or from `sources[i]` when this node holds no replica of chunk i), decode
/// and keep their records in memory for the job's life. `spec` is an
/// encoded `quern_compute::train::WorkerSpec`.
///
/// The job lives under a lease: the node frees it once no request of the
/// job has been in progress and none of TrainOpen, TrainStep or
/// TrainRenew has come for a whole lease (`TrainOpened::lease_ms`). A node
/// refuses (NoSpace) a job whose records do not fit its job memory budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOpen {
    pub job: u64,
    #[serde(with = "serde_bytes")]
    pub spec: Vec<u8>,
    pub chunks: Vec<ChunkMeta>,
    pub sources: Vec<Vec<NodeAddr>>,
    /// Task access to each chunk.
    pub tokens: Vec<Option<ChunkToken>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOpened {
    /// Records this node now holds for the job.
    pub records: u64,
    pub local_bytes: u64,
    pub fetched_bytes: u64,
    /// The node's job lease: the coordinator renews more often than this.
    pub lease_ms: u64,
}

/// One training round on this node's shard. `request` is an encoded
/// `quern_compute::train::StepRequest`; `params_len` raw bytes follow the
/// frame (the parameters, little-endian f32), so the large part of every
/// step is not copied through the encoder. The node answers with
/// [`TrainStepMsg`]s: when the step exchanges batch statistics, a `Sums`
/// per exchange (the caller answers each with as many summed values), then
/// `Done`.
///
/// With `ring`, the worker holds the parameters: after computing its
/// gradient sum it adds it with the other workers' around the ring
/// (`TrainRing` streams between the datanodes), keeps the total, and
/// answers `Done` without values.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainStep {
    pub job: u64,
    #[serde(with = "serde_bytes")]
    pub request: Vec<u8>,
    pub params_len: u64,
    pub ring: Option<Ring>,
}

/// The step's workers in ring order, and this worker's place in it. Every
/// attempt at a step has its own `round`, so a stream left from a failed
/// attempt never meets a new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    pub round: u64,
    pub peers: Vec<NodeAddr>,
    pub position: u32,
}

/// From one worker of a ring to the next: the partial sums of a step's
/// gradient, in the order of the ring's turns
/// (`quern_compute::ring::turns`). Only datanodes may send it. The
/// receiver answers [`RingJoined`] at once, saying whether it reads the
/// sender's shared memory; then each turn's piece follows, as raw
/// little-endian f32 values or, through shared memory, as the 8-byte
/// little-endian offset in the region where the sender wrote them. The
/// receiver sends one byte once it has read them all.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainRing {
    pub job: u64,
    pub round: u64,
    pub from: u32,
    /// The sender's region for this job's pieces, when it offers one.
    pub shared: Option<SharedRing>,
}

/// A region of memory the sender of a ring writes its pieces into, for a
/// receiver on the same host to read instead of taking them through the
/// connection: a sealed memfd, named by its `/proc/PID/fd/N` path. The
/// receiver maps it read-only and proves it is the sender's by the nonce
/// written at its start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedRing {
    pub path: String,
    pub nonce: [u8; 16],
    /// Bytes of pieces the region holds (after its header).
    pub len: u64,
}

/// A ring receiver's first answer: whether the pieces come through the
/// sender's shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingJoined {
    pub shared: bool,
}

/// The parameters and optimizer state a worker holds for a job, after
/// applying `commit` (an encoded `quern_compute::train::Commit`, or empty):
/// the job's result, its validation, or the seed for a new set of
/// workers after one was lost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub job: u64,
    #[serde(with = "serde_bytes")]
    pub commit: Vec<u8>,
}

/// `values_len` raw bytes follow: the parameters, then the optimizer's
/// state vectors, little-endian f32.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainStateHeader {
    /// Encoded `quern_compute::train::HeldHead`.
    #[serde(with = "serde_bytes")]
    pub head: Vec<u8>,
    pub values_len: u64,
}

/// A frame a datanode sends on a training step's stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TrainStepMsg {
    /// `values` little-endian f64 follow: this node's BatchNormalization
    /// sums. The caller sends back, as the next piece of the request's
    /// body, the same number of values summed over the step's workers.
    Sums { values: u64 },
    /// The result; `values_len` raw bytes follow.
    Done(TrainStepOutput),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainStepOutput {
    /// Encoded `quern_compute::train::StepResult`.
    #[serde(with = "serde_bytes")]
    pub result: Vec<u8>,
    pub values_len: u64,
}

/// Forget a training job and free its records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainClose {
    pub job: u64,
}

/// Keeps the caller's jobs on this node alive for another lease, while
/// the coordinator does something other than step them (a long step on
/// another node, validation, reopening a lost worker's share elsewhere).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainRenew {
    pub jobs: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainRenewed {
    /// Jobs of the request this node does not hold (expired, closed or
    /// never opened here, or another caller's).
    pub unknown: Vec<u64>,
}

rpcs!(DataRequest {
    WriteChunk(WriteChunk) -> WriteAck,
    ReadChunk(ReadChunk) -> ReadHeader,
    Ping(Ping) -> NodeId,
    RunTask(RunTask) -> TaskOutput,
    TrainOpen(TrainOpen) -> TrainOpened,
    TrainStep(TrainStep) -> TrainStepMsg,
    TrainClose(TrainClose) -> (),
    TrainRenew(TrainRenew) -> TrainRenewed,
    TrainRing(TrainRing) -> RingJoined,
    TrainState(TrainState) -> TrainStateHeader,
});

#[cfg(test)]
mod tests {
    use super::first_heartbeat_after;
    use std::time::Duration;

    #[test]
    fn nodes_registered_together_spread_their_first_heartbeats_over_an_interval() {
        let every = Duration::from_secs(3);
        let firsts: Vec<Duration> = (0..1000).map(|_| first_heartbeat_after(every)).collect();
        let max = firsts.iter().max().unwrap();
        // Never later than one interval: no nearer the dead timeout.
        assert!(*max < every, "{max:?}");
        // A thousand nodes answered in one instant: no tenth of the
        // interval gets more than a fifth of them.
        let mut per_tenth = [0usize; 10];
        for f in &firsts {
            per_tenth[(f.as_secs_f64() / every.as_secs_f64() * 10.0) as usize] += 1;
        }
        assert!(per_tenth.iter().all(|&n| n < 200), "{per_tenth:?}");
    }
}
