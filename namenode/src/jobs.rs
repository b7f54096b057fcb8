//! The jobs coordinators run on the cluster: registered when they start,
//! posted to as they progress, kept in the metadata store (so the history
//! survives a restart) up to a bounded number of finished jobs.
//!
//! A job's record is small and its points are stored apart (`job_points`),
//! so listing jobs, the metrics and the overview never decode curves.

pub use crate::namespace::now_ms;
use crate::namespace::{Namespace, StoreError};
use crate::perm::{denied, User};
use quern_proto::msg::{JobKind, JobNote, JobPoint, JobStart};
use quern_proto::{ErrorCode, WireError};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Points kept per job: past this, every other older point goes, so a long
/// job keeps its whole curve at a coarser grain.
const MAX_POINTS: usize = 1200;

/// A running job with no post for this long shows as silent: its
/// coordinator probably died.
pub const SILENT_AFTER_MS: i64 = 5 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Finished,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    pub kind: JobKind,
    pub user: String,
    pub model: String,
    pub dataset: String,
    pub plan: String,
    pub workers: Vec<String>,
    pub iterations: u64,
    pub steps_per_epoch: u64,
    pub started_ms: i64,
    pub updated_ms: i64,
    pub ended_ms: Option<i64>,
    pub state: JobState,
    pub result: Option<String>,
    pub error: Option<String>,
    pub lost: Vec<(String, String)>,
    /// The latest training step's point (validation points aside).
    pub last: Option<JobPoint>,
}

impl JobRecord {
    pub fn last(&self) -> Option<&JobPoint> {
        self.last.as_ref()
    }

    /// Seconds left at the recent pace, for a training job under way.
    pub fn eta_secs(&self, now_ms: i64) -> Option<f64> {
        if self.state != JobState::Running || self.iterations == 0 {
            return None;
        }
        let last = self.last.as_ref()?;
        let done = last.iteration.max(1) as f64;
        let spent = (last.at_ms - self.started_ms).max(1) as f64 / 1000.0;
        let left = self.iterations.saturating_sub(last.iteration) as f64;
        let since = (now_ms - last.at_ms).max(0) as f64 / 1000.0;
        Some((left * spent / done - since).max(0.0))
    }

    pub fn silent(&self, now_ms: i64) -> bool {
        self.state == JobState::Running && now_ms - self.updated_ms > SILENT_AFTER_MS
    }
}

pub struct Jobs {
    tree: sled::Tree,
    points: sled::Tree,
    next: AtomicU64,
    /// Finished jobs kept; older ones are dropped as new ones end.
    keep: usize,
    /// One change at a time: a post reads, changes and writes its record.
    change: Mutex<()>,
}

fn store(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Internal, format!("job history: {e}"))
}

impl Jobs {
    pub fn open(ns: &Namespace, keep: usize) -> Result<Jobs, StoreError> {
        let tree = ns.tree("jobs")?;
        let last = match tree.last()? {
            Some((k, _)) => key_id(&k),
            None => 0,
        };
        Ok(Jobs {
            tree,
            points: ns.tree("job_points")?,
            next: AtomicU64::new(last + 1),
            keep,
            change: Mutex::new(()),
        })
    }

    pub fn start(&self, user: &User, r: JobStart) -> Result<u64, WireError> {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let now = now_ms();
        let rec = JobRecord {
            id,
            kind: r.kind,
            user: user.name.clone(),
            model: r.model,
            dataset: r.dataset,
            plan: String::new(),
            workers: Vec::new(),
            iterations: 0,
            steps_per_epoch: 0,
            started_ms: now,
            updated_ms: now,
            ended_ms: None,
            state: JobState::Running,
            result: None,
            error: None,
            lost: Vec::new(),
            last: None,
        };
        self.put(&rec)?;
        tracing::info!(job = id, kind = rec.kind.name(), user = %rec.user, "job started");
        Ok(id)
    }

    /// Applies a post from the job's owner; returns whether the job ended.
    pub fn post(&self, user: &User, job: u64, note: JobNote) -> Result<bool, WireError> {
        let _one = self.change.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = self.get(job)?.ok_or_else(|| {
            WireError::new(
                ErrorCode::NotFound,
                format!("job {job} is not in the namenode's history (dropped, or never started)"),
            )
        })?;
        if rec.user != user.name {
            return Err(denied(format!(
                "permission denied: job {job} is {}'s; only its coordinator posts to it",
                rec.user
            )));
        }
        if rec.state != JobState::Running {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!("job {job} has ended; nothing more is recorded for it"),
            ));
        }
        let now = now_ms();
        rec.updated_ms = now;
        let mut ended = false;
        match note {
            JobNote::Planned {
                plan,
                workers,
                iterations,
                steps_per_epoch,
            } => {
                rec.plan = plan;
                rec.workers = workers;
                rec.iterations = iterations;
                rec.steps_per_epoch = steps_per_epoch;
            }
            JobNote::Progress(p) => {
                if p.val_loss.is_none() && p.val_accuracy.is_none() {
                    rec.last = Some(p.clone());
                }
                let mut points = self.points(job)?;
                points.push(p);
                if points.len() > MAX_POINTS {
                    thin(&mut points);
                }
                let bytes = bincode::serde::encode_to_vec(&points, bincode::config::standard())
                    .map_err(store)?;
                self.points
                    .insert(job.to_be_bytes(), bytes)
                    .map_err(store)?;
            }
            JobNote::WorkerLost { worker, error } => {
                rec.workers.retain(|w| *w != worker);
                rec.lost.push((worker, error));
            }
            JobNote::Finished { result } => {
                rec.state = JobState::Finished;
                rec.result = Some(result);
                rec.ended_ms = Some(now);
                ended = true;
            }
            JobNote::Failed { error } => {
                rec.state = JobState::Failed;
                rec.error = Some(error);
                rec.ended_ms = Some(now);
                ended = true;
            }
        }
        self.put(&rec)?;
        if ended {
            self.retire()?;
            tracing::info!(job, state = ?rec.state, "job ended");
        }
        Ok(ended)
    }

    pub fn get(&self, job: u64) -> Result<Option<JobRecord>, WireError> {
        match self.tree.get(job.to_be_bytes()).map_err(store)? {
            Some(v) => decode(&v).map(Some),
            None => Ok(None),
        }
    }

    /// A job's points, oldest first.
    pub fn points(&self, job: u64) -> Result<Vec<JobPoint>, WireError> {
        match self.points.get(job.to_be_bytes()).map_err(store)? {
            Some(v) => bincode::serde::decode_from_slice(&v, bincode::config::standard())
                .map(|(p, _)| p)
                .map_err(store),
            None => Ok(Vec::new()),
        }
    }

    /// Every job kept, newest first.
    pub fn all(&self) -> Result<Vec<JobRecord>, WireError> {
        let mut out = Vec::new();
        for kv in self.tree.iter().rev() {
            let (_, v) = kv.map_err(store)?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    fn put(&self, rec: &JobRecord) -> Result<(), WireError> {
        let bytes =
            bincode::serde::encode_to_vec(rec, bincode::config::standard()).map_err(store)?;
        self.tree
            .insert(rec.id.to_be_bytes(), bytes)
            .map_err(store)?;
        Ok(())
    }

    /// Drops the oldest finished jobs beyond the number kept.
    fn retire(&self) -> Result<(), WireError> {
        let mut ended = Vec::new();
        for kv in self.tree.iter() {
            let (k, v) = kv.map_err(store)?;
            if decode(&v)?.state != JobState::Running {
                ended.push(k);
            }
        }
        let extra = ended.len().saturating_sub(self.keep);
        for k in ended.into_iter().take(extra) {
            self.points.remove(&k).map_err(store)?;
            self.tree.remove(k).map_err(store)?;
        }
        Ok(())
    }
}

fn key_id(k: &[u8]) -> u64 {
    k.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

fn decode(v: &[u8]) -> Result<JobRecord, WireError> {
    bincode::serde::decode_from_slice(v, bincode::config::standard())
        .map(|(r, _)| r)
        .map_err(store)
}

/// Halves the points, keeping every epoch's (validated) point and the
/// latest half untouched.
fn thin(points: &mut Vec<JobPoint>) {
    let keep_tail = points.len() / 2;
    let head = points.len() - keep_tail;
    let mut i = 0;
    points.retain(|p| {
        let k = i >= head || i % 2 == 0 || p.val_loss.is_some();
        i += 1;
        k
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(i: u64, val: bool) -> JobPoint {
        JobPoint {
            at_ms: i as i64,
            iteration: i,
            epoch: 0,
            loss: 1.0,
            accuracy: 0.5,
            val_loss: val.then_some(0.9),
            val_accuracy: None,
            samples_per_sec: 1.0,
            worker_step_ms: Vec::new(),
            bytes_moved: 0,
        }
    }

    fn user(name: &str) -> User {
        User {
            name: name.into(),
            groups: Vec::new(),
            superuser: false,
        }
    }

    fn start(jobs: &Jobs, who: &User) -> u64 {
        jobs.start(
            who,
            JobStart {
                kind: JobKind::Train,
                model: "m".into(),
                dataset: "/d".into(),
            },
        )
        .unwrap()
    }

    #[test]
    fn the_history_keeps_the_newest_finished_jobs_and_every_running_one() {
        let dir = tempfile::tempdir().unwrap();
        Namespace::format(dir.path()).unwrap();
        let ns = Namespace::open(dir.path()).unwrap();
        let jobs = Jobs::open(&ns, 2).unwrap();
        let ann = user("ann");
        let running = start(&jobs, &ann);
        let mut ended = Vec::new();
        for i in 0..4 {
            let id = start(&jobs, &ann);
            jobs.post(&ann, id, JobNote::Progress(point(i, false)))
                .unwrap();
            let done = jobs
                .post(
                    &ann,
                    id,
                    JobNote::Finished {
                        result: format!("run {i}"),
                    },
                )
                .unwrap();
            assert!(done);
            ended.push(id);
        }
        let kept: Vec<u64> = jobs.all().unwrap().iter().map(|j| j.id).collect();
        assert_eq!(kept, vec![ended[3], ended[2], running]);
        assert!(jobs.points(ended[0]).unwrap().is_empty(), "points go too");
        assert_eq!(jobs.points(ended[3]).unwrap().len(), 1);
        // Ids keep counting after a reopen: a new job never takes an old id.
        drop(jobs);
        let jobs = Jobs::open(&ns, 2).unwrap();
        assert_eq!(start(&jobs, &ann), ended[3] + 1);
        let e = jobs
            .post(&user("bob"), running, JobNote::Failed { error: "x".into() })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        let e = jobs
            .post(&ann, ended[3], JobNote::Failed { error: "x".into() })
            .unwrap_err();
        assert!(e.message.contains("has ended"), "{e}");
    }

    #[test]
    fn thinning_keeps_the_ends_and_every_epoch() {
        let mut pts: Vec<_> = (0..100).map(|i| point(i, i == 7)).collect();
        thin(&mut pts);
        assert!(pts.len() < 80);
        assert_eq!(pts.first().unwrap().iteration, 0);
        assert_eq!(pts.last().unwrap().iteration, 99);
        assert!(pts.iter().any(|p| p.iteration == 7));
        assert!(pts.windows(2).all(|w| w[0].iteration < w[1].iteration));
    }
}
