//! Named background tasks of a server (the request loop, heartbeats, the
//! replication monitor, the scrubber, the job sweeper): each is handed
//! what it needs when it starts, is logged by name if it ever stops, and
//! is stopped with the server.

use std::future::Future;
use tokio::task::JoinHandle;

#[derive(Default)]
pub struct Background {
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Background {
    /// Runs `work` as the task called `name`. These tasks are meant to run
    /// for the server's life: one that ends on its own is logged.
    pub fn spawn(&mut self, name: &'static str, work: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(async move {
            tracing::debug!(task = name, "started");
            work.await;
            tracing::warn!(task = name, "background task ended");
        });
        self.tasks.push((name, handle));
    }

    /// The tasks' names, in the order they started.
    pub fn names(&self) -> Vec<&'static str> {
        self.tasks.iter().map(|(n, _)| *n).collect()
    }

    /// Names of tasks that are no longer running.
    pub fn finished(&self) -> Vec<&'static str> {
        self.tasks
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(n, _)| *n)
            .collect()
    }

    pub fn stop(&self) {
        for (_, h) in &self.tasks {
            h.abort();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}
