//! Batch statistics over the global batch when a step's batch is split
//! between workers.
//!
//! BatchNormalization in training mode normalizes with the mean and
//! variance of the whole batch. When workers each hold a share of it, every
//! BatchNormalization call exchanges small per-channel sums with the other
//! workers of the step (twice forward, once backward): a [`BatchSync`]. The
//! sums are f64 and added in worker order, so a run is the same whatever the
//! timing, and equal to its in-process replay over a [`LocalGroup`].

use std::sync::{Condvar, Mutex, MutexGuard};

/// One worker's link to the other workers of a step.
pub trait BatchSync: Sync {
    /// Replaces `sums`, this worker's per-channel sums, with their sum over
    /// every worker of the step, added in worker order. A worker that
    /// cannot reach the others keeps its own sums and reports the failure
    /// through [`failure`](Self::failure).
    fn all_reduce(&self, sums: &mut [f64]);

    /// Why an exchange failed, if one did: the step's result is then wrong
    /// and must be dropped.
    fn failure(&self) -> Option<String>;
}

/// Threads of one process playing the workers of a step (the in-process
/// replay of a distributed run, and tests).
pub struct LocalGroup {
    members: usize,
    state: Mutex<GroupState>,
    turn: Condvar,
}

#[derive(Default)]
struct GroupState {
    /// Completed exchanges.
    generation: u64,
    parts: Vec<Option<Vec<f64>>>,
    arrived: usize,
    result: Vec<f64>,
    /// Members that finished their step.
    left: usize,
    failed: Option<String>,
}

impl LocalGroup {
    pub fn new(members: usize) -> LocalGroup {
        LocalGroup {
            members,
            state: Mutex::new(GroupState {
                parts: vec![None; members],
                ..GroupState::default()
            }),
            turn: Condvar::new(),
        }
    }

    /// Worker `index`'s link; dropping it tells the others it is done.
    pub fn member(&self, index: usize) -> Member<'_> {
        Member { group: self, index }
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // A member that panicked mid-exchange leaves the sums unusable, not
        // the lock: the others see `failed` or a member that left.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One thread's link in a [`LocalGroup`]. A failed exchange fails the
/// whole group's step: every member reports it.
pub struct Member<'a> {
    group: &'a LocalGroup,
    index: usize,
}

impl Member<'_> {
    fn fail(&self, s: &mut GroupState, why: String) {
        s.failed.get_or_insert(why);
        self.group.turn.notify_all();
    }
}

impl BatchSync for Member<'_> {
    fn all_reduce(&self, sums: &mut [f64]) {
        let g = self.group;
        let mut s = g.lock();
        if s.failed.is_some() {
            return;
        }
        let generation = s.generation;
        s.parts[self.index] = Some(sums.to_vec());
        s.arrived += 1;
        if s.arrived == g.members {
            let mut total = vec![0.0f64; sums.len()];
            for (w, part) in s.parts.iter_mut().enumerate() {
                match part.take() {
                    Some(p) if p.len() == total.len() => {
                        total.iter_mut().zip(&p).for_each(|(t, v)| *t += v);
                    }
                    other => {
                        let why = format!(
                            "worker {w} exchanged {} batch sums where worker {} exchanged {}",
                            other.map_or(0, |p| p.len()),
                            self.index,
                            total.len()
                        );
                        self.fail(&mut s, why);
                        return;
                    }
                }
            }
            s.result = total;
            s.arrived = 0;
            s.generation += 1;
            g.turn.notify_all();
        } else {
            while s.generation == generation && s.failed.is_none() {
                if s.left > 0 {
                    let why = "a worker finished its step while others still exchanged batch \
                               sums (the workers run different models)"
                        .to_string();
                    self.fail(&mut s, why);
                    break;
                }
                s = g.turn.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.failed.is_some() {
                return;
            }
        }
        sums.copy_from_slice(&s.result);
    }

    fn failure(&self) -> Option<String> {
        self.group.lock().failed.clone()
    }
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        let mut s = self.group.lock();
        s.left += 1;
        self.group.turn.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_get_the_sum_in_worker_order_every_round() {
        let group = LocalGroup::new(3);
        let out: Vec<Vec<Vec<f64>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|w| {
                    let m = group.member(w);
                    s.spawn(move || {
                        (0..4)
                            .map(|round| {
                                let mut v = vec![w as f64 + round as f64, 1.0];
                                m.all_reduce(&mut v);
                                assert!(m.failure().is_none());
                                v
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for per in &out {
            for (round, v) in per.iter().enumerate() {
                assert_eq!(v, &vec![3.0 + 3.0 * round as f64, 3.0]);
            }
        }
    }

    #[test]
    fn a_member_that_leaves_early_fails_the_others_instead_of_hanging() {
        let group = LocalGroup::new(2);
        let failure = std::thread::scope(|s| {
            let waiting = s.spawn(|| {
                let m = group.member(0);
                let mut v = vec![1.0];
                m.all_reduce(&mut v);
                m.failure()
            });
            s.spawn(|| drop(group.member(1)));
            waiting.join().unwrap()
        });
        let why = failure.expect("the exchange failed");
        assert!(why.contains("finished its step"), "{why}");
    }
}
