//! Makes each job known to the cluster: registered with the namenode when
//! it starts, posted to as it progresses, closed with its result. The
//! namenode's web UI and job history read what arrives here.
//!
//! Posting never slows or fails a job: notes go through a channel to a
//! background task, and a namenode that cannot take them (an older one, a
//! refused post) costs one log line.

use crate::train::TrainEvent;
use crate::Client;
use quern_proto::msg::{JobKind, JobNote, JobPoint, JobPost, JobStart};
use quern_proto::token::now_ms;
use std::time::Duration;
use tokio::sync::mpsc;

/// Longest wait for the last notes at the end of a job (a namenode that
/// went away must not hold a finished job's caller).
const DRAIN: Duration = Duration::from_secs(5);

pub(crate) struct Reporter {
    tx: Option<mpsc::UnboundedSender<JobNote>>,
    task: Option<tokio::task::JoinHandle<()>>,
    plan: String,
}

/// The name a Keras model was given (`model.name`), else its class.
pub(crate) fn model_name(model_json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(model_json).unwrap_or_default();
    v["config"]["name"]
        .as_str()
        .or_else(|| v["class_name"].as_str())
        .unwrap_or("model")
        .to_string()
}

impl Reporter {
    pub fn start(client: &Client, kind: JobKind, model: String, dataset: String) -> Reporter {
        let (tx, mut rx) = mpsc::unbounded_channel::<JobNote>();
        let client = client.clone();
        let task = tokio::spawn(async move {
            let id = match client
                .call(JobStart {
                    kind,
                    model,
                    dataset,
                })
                .await
            {
                Ok(id) => id,
                Err(e) => {
                    tracing::info!("the job is not in the cluster's history: {e}");
                    return;
                }
            };
            while let Some(note) = rx.recv().await {
                if let Err(e) = client.call(JobPost { job: id, note }).await {
                    tracing::info!(
                        job = id,
                        "the cluster's job history stopped taking notes: {e}"
                    );
                    return;
                }
            }
        });
        Reporter {
            tx: Some(tx),
            task: Some(task),
            plan: String::new(),
        }
    }

    pub fn note(&self, note: JobNote) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(note);
        }
    }

    /// Turns a training event into what the history keeps.
    pub fn train_event(&mut self, e: &TrainEvent) {
        match e {
            TrainEvent::Planned(d) => self.plan = d.plan.to_string(),
            TrainEvent::Started {
                workers,
                iterations,
                steps_per_epoch,
                ..
            } => self.note(JobNote::Planned {
                plan: self.plan.clone(),
                workers: workers.iter().map(|(w, _)| w.clone()).collect(),
                iterations: *iterations,
                steps_per_epoch: *steps_per_epoch,
            }),
            TrainEvent::Step {
                iteration,
                epoch,
                loss,
                accuracy,
                samples_per_sec,
                worker_ms,
                bytes_moved,
            } => self.note(JobNote::Progress(JobPoint {
                at_ms: now_ms(),
                iteration: *iteration,
                epoch: epoch.saturating_sub(1),
                loss: *loss,
                accuracy: *accuracy,
                val_loss: None,
                val_accuracy: None,
                samples_per_sec: *samples_per_sec,
                worker_step_ms: worker_ms.clone(),
                bytes_moved: *bytes_moved,
            })),
            TrainEvent::Epoch {
                epoch,
                iterations,
                loss,
                accuracy,
                val_loss,
                val_accuracy,
                ..
            } => {
                // Only a validated epoch adds a point: the training figures
                // are already on the curve from the steps.
                if val_loss.is_some() || val_accuracy.is_some() {
                    self.note(JobNote::Progress(JobPoint {
                        at_ms: now_ms(),
                        iteration: *iterations,
                        epoch: epoch.saturating_sub(1),
                        loss: *loss,
                        accuracy: *accuracy,
                        val_loss: *val_loss,
                        val_accuracy: *val_accuracy,
                        samples_per_sec: 0.0,
                        worker_step_ms: Vec::new(),
                        bytes_moved: 0,
                    }))
                }
            }
            TrainEvent::WorkerLost { worker, error, .. } => self.note(JobNote::WorkerLost {
                worker: worker.clone(),
                error: error.clone(),
            }),
        }
    }

    /// Posts the job's end and waits (briefly) for the notes to arrive.
    pub async fn finish<T, E: std::fmt::Display>(
        mut self,
        outcome: &Result<T, E>,
        result: impl FnOnce(&T) -> String,
    ) {
        self.note(match outcome {
            Ok(v) => JobNote::Finished { result: result(v) },
            Err(e) => JobNote::Failed {
                error: e.to_string(),
            },
        });
        self.tx = None;
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(DRAIN, task).await;
        }
    }
}

impl Client {
    /// Runs `work` as a job in the cluster's history: registered before,
    /// closed with `result`'s summary of its outcome (or its error) after.
    pub(crate) async fn as_job<T>(
        &self,
        kind: JobKind,
        model: String,
        dataset: &str,
        work: impl std::future::Future<Output = crate::Result<T>>,
        result: impl FnOnce(&T) -> String,
    ) -> crate::Result<T> {
        let report = Reporter::start(self, kind, model, dataset.to_string());
        let outcome = work.await;
        report.finish(&outcome, result).await;
        outcome
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        // Dropped without `finish` (the caller's future was cancelled):
        // the job ends as failed rather than running forever in the UI.
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(JobNote::Failed {
                error: "cancelled by its caller".into(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_named_as_keras_named_it() {
        assert_eq!(
            model_name(r#"{"class_name":"Sequential","config":{"name":"seed_cnn"}}"#),
            "seed_cnn"
        );
        assert_eq!(model_name(r#"{"class_name":"Functional"}"#), "Functional");
        assert_eq!(model_name("not json"), "model");
    }
}
