//! The ring all-reduce's arithmetic: which part of the gradient each
//! worker sends and receives at each turn, and the same sum computed in
//! one process.
//!
//! The flat gradient is cut into one segment per worker. In the
//! reduce-scatter half, segment `s` starts at worker `s` and travels the
//! ring once, each worker adding its own values to what arrives, so the
//! segment's total ends at worker `s - 1` summed in the order
//! `g[s] + g[s+1] + ... + g[s-1]`. In the all-gather half the totals go
//! round once more, overwriting. Every worker sends and receives
//! `2 (n - 1) / n` of the gradient, whatever `n` is.
//!
//! The gradient goes round in buckets, as PyTorch DDP and Horovod send it:
//! the backward pass finishes the last layers first, and their bucket
//! starts round the ring while the first layers' gradients are still being
//! computed. Each bucket is one ring of its own, cut into its own segments.
//!
//! The order of the additions is fixed by the ring, not by which message
//! arrives first, and [`sum_in_ring_order`] adds in exactly that order, so
//! the one-process replay of a job equals the distributed run bit for bit
//! (IEEE addition commutes exactly; only its grouping matters).

use std::ops::Range;

/// The segments of a `len`-value vector over `n` workers: contiguous,
/// in order, sizes differing by at most one.
pub fn segments(len: usize, n: usize) -> Vec<Range<usize>> {
    let n = n.max(1);
    (0..n).map(|s| s * len / n..(s + 1) * len / n).collect()
}

/// One turn of the ring for one worker: the segment it sends to its
/// successor and the one it receives from its predecessor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    pub send: usize,
    pub recv: usize,
    /// Reduce-scatter (add what arrives) or all-gather (overwrite).
    pub add: bool,
}

/// The `2 (n - 1)` turns of worker `position` in a ring of `n`.
pub fn turns(position: usize, n: usize) -> Vec<Turn> {
    if n < 2 {
        return Vec::new();
    }
    let at = |k: usize| (position + n * n - k) % n;
    let reduce = (0..n - 1).map(|t| Turn {
        send: at(t),
        recv: at(t + 1),
        add: true,
    });
    // After reduce-scatter this worker holds the total of segment
    // `position + 1`; it passes that on first.
    let gather = (0..n - 1).map(|t| Turn {
        send: (position + 1 + n * n - t) % n,
        recv: at(t),
        add: false,
    });
    reduce.chain(gather).collect()
}

/// Takes a piece that arrived (little-endian f32, from the connection or
/// a neighbour's shared memory) into this worker's values: added in a
/// reduce-scatter turn (IEEE addition commutes exactly, so this is the
/// partial sum plus this worker's part), copied in an all-gather one.
pub fn take_arrived(mine: &mut [f32], arrived: &[u8], add: bool) {
    let arrived = arrived
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if add {
        mine.iter_mut().zip(arrived).for_each(|(m, a)| *m += a);
    } else {
        mine.iter_mut().zip(arrived).for_each(|(m, a)| *m = a);
    }
}

/// Values a bucket holds at least (1 MiB of f32), unless it is the last:
/// large enough that a turn's fixed costs do not matter, small enough that
/// the last layers start round while the first are computed.
pub const BUCKET_VALUES: usize = 1 << 18;

/// Cuts a gradient made of `params` (each a range of the flat vector,
/// which they cover) into buckets in the order the backward pass finishes
/// them: from the end of the vector, whole parameters, each bucket at
/// least `min_values` long but the last.
pub fn buckets(params: &[Range<usize>], min_values: usize) -> Vec<Range<usize>> {
    let mut starts: Vec<usize> = params.iter().map(|r| r.start).collect();
    starts.sort_unstable();
    starts.dedup();
    let end = params.iter().map(|r| r.end).max().unwrap_or(0);
    let mut out = Vec::new();
    let mut hi = end;
    for &start in starts.iter().rev() {
        if hi - start >= min_values.max(1) {
            out.push(start..hi);
            hi = start;
        }
    }
    if hi > 0 || out.is_empty() {
        out.push(0..hi);
    }
    out
}

/// Hands out a gradient's buckets in order as their parameters become
/// final, in whatever order that happens.
pub struct Outbox {
    buckets: Vec<Range<usize>>,
    /// Values of each bucket not final yet.
    left: Vec<usize>,
    next: usize,
}

impl Outbox {
    pub fn new(buckets: Vec<Range<usize>>) -> Outbox {
        let left = buckets.iter().map(|b| b.len()).collect();
        Outbox {
            buckets,
            left,
            next: 0,
        }
    }

    /// `range` of `grad` is final; `send` gets every bucket that is now
    /// complete and has no incomplete bucket before it.
    pub fn done(&mut self, range: Range<usize>, grad: &[f32], send: &mut dyn FnMut(usize, &[f32])) {
        for (b, left) in self.buckets.iter().zip(self.left.iter_mut()) {
            let lo = b.start.max(range.start);
            let hi = b.end.min(range.end);
            *left = left.saturating_sub(hi.saturating_sub(lo));
        }
        while self.next < self.buckets.len() && self.left[self.next] == 0 {
            send(self.next, &grad[self.buckets[self.next].clone()]);
            self.next += 1;
        }
    }

    /// Sends the buckets not sent yet, whatever is final.
    pub fn flush(&mut self, grad: &[f32], send: &mut dyn FnMut(usize, &[f32])) {
        while self.next < self.buckets.len() {
            send(self.next, &grad[self.buckets[self.next].clone()]);
            self.next += 1;
        }
    }
}

/// [`sum_in_ring_order`] bucket by bucket, as the workers add them.
pub fn sum_in_buckets(parts: &[&[f32]], buckets: &[Range<usize>]) -> Vec<f32> {
    let len = parts.first().map_or(0, |p| p.len());
    let mut total = vec![0.0f32; len];
    for b in buckets {
        let slices: Vec<&[f32]> = parts.iter().map(|p| &p[b.clone()]).collect();
        total[b.clone()].copy_from_slice(&sum_in_ring_order(&slices));
    }
    total
}

/// The ring's total of `parts` (one per worker, equal lengths), computed in
/// one process in the ring's order.
pub fn sum_in_ring_order(parts: &[&[f32]]) -> Vec<f32> {
    let Some(first) = parts.first() else {
        return Vec::new();
    };
    let n = parts.len();
    let mut total = vec![0.0f32; first.len()];
    for (s, seg) in segments(first.len(), n).into_iter().enumerate() {
        let out = &mut total[seg.clone()];
        out.copy_from_slice(&parts[s][seg.clone()]);
        for k in 1..n {
            let mine = &parts[(s + k) % n][seg.clone()];
            // The partial sum arrives at worker s + k, which adds its own.
            for (o, m) in out.iter_mut().zip(mine) {
                *o += *m;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the ring turn by turn with every worker's buffer, as the
    /// datanodes do over the network.
    fn play(parts: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let n = parts.len();
        let segs = segments(parts[0].len(), n);
        let mut bufs = parts.to_vec();
        let plans: Vec<Vec<Turn>> = (0..n).map(|p| turns(p, n)).collect();
        for t in 0..2 * (n - 1) {
            // Everyone sends before anyone's buffer changes.
            let sent: Vec<Vec<f32>> = (0..n)
                .map(|p| bufs[p][segs[plans[p][t].send].clone()].to_vec())
                .collect();
            for p in 0..n {
                let turn = plans[p][t];
                let from = (p + n - 1) % n;
                assert_eq!(plans[from][t].send, turn.recv, "worker {p} turn {t}");
                let seg = segs[turn.recv].clone();
                let arrived = crate::train::f32s_to_le(&sent[from]);
                take_arrived(&mut bufs[p][seg], &arrived, turn.add);
            }
        }
        bufs
    }

    #[test]
    fn every_worker_ends_with_the_one_process_sum_bit_for_bit() {
        for n in 2..=5 {
            // Values whose sum depends on the grouping.
            let parts: Vec<Vec<f32>> = (0..n)
                .map(|w| {
                    (0..37)
                        .map(|j| ((w * 37 + j) as f32).sin() * 10f32.powi(j % 7 - 3))
                        .collect()
                })
                .collect();
            let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
            let want = sum_in_ring_order(&refs);
            for (p, got) in play(&parts).iter().enumerate() {
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{n} workers: worker {p} differs");
            }
        }
    }

    #[test]
    fn segments_cover_the_vector_once() {
        for (len, n) in [(0, 3), (2, 3), (10, 3), (1_662_752, 3), (7, 1)] {
            let s = segments(len, n);
            assert_eq!(s.len(), n);
            assert_eq!(s[0].start, 0);
            assert_eq!(s[n - 1].end, len);
            assert!(s.windows(2).all(|w| w[0].end == w[1].start));
        }
    }

    #[test]
    fn buckets_are_whole_parameters_from_the_end() {
        let params = [0..10, 10..12, 12..40, 40..41];
        assert_eq!(buckets(&params, 5), vec![12..41, 0..12]);
        assert_eq!(buckets(&params, 100), vec![0..41]);
        assert_eq!(buckets(&params, 1), vec![40..41, 12..40, 10..12, 0..10]);
        assert_eq!(buckets(&[], 4), vec![0..0]);
    }

    #[test]
    fn the_outbox_sends_buckets_in_order_once_complete() {
        let grad: Vec<f32> = (0..41).map(|v| v as f32).collect();
        let mut out = Outbox::new(buckets(&[0..10, 10..12, 12..40, 40..41], 5));
        let sent = std::cell::RefCell::new(Vec::new());
        let mut send = |b: usize, v: &[f32]| sent.borrow_mut().push((b, v.len()));
        // The second bucket completes first: it waits for the first.
        out.done(0..10, &grad, &mut send);
        out.done(10..12, &grad, &mut send);
        assert!(sent.borrow().is_empty());
        out.done(40..41, &grad, &mut send);
        out.done(12..40, &grad, &mut send);
        assert_eq!(*sent.borrow(), vec![(0, 29), (1, 12)]);
        let mut again = Vec::new();
        out.flush(&grad, &mut |b, _| again.push(b));
        assert!(again.is_empty(), "nothing is sent twice");
    }

    #[test]
    fn one_worker_has_no_turns() {
        assert!(turns(0, 1).is_empty());
        assert_eq!(turns(1, 3).len(), 4);
    }
}
