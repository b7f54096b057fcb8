//! Large activation and gradient buffers kept from one training step for
//! the next.
//!
//! A step allocates the same shapes every time. Allocated afresh, each
//! buffer is zero-filled by one thread before the kernel that overwrites
//! it runs (the seed CNN's first convolution spent 0.9 of its 2 ms forward
//! pass there). Layers hand back the buffers they are done with; a layer
//! that writes every value of its output takes one of the same length,
//! with whatever it held, and one that needs zeros fills each block in
//! parallel, right before writing it.

use std::sync::Mutex;

/// Buffers shorter than this are left to the allocator: zeroing them costs
/// little, and the pool stays short.
const SMALLEST: usize = 1 << 14;

/// Most buffers kept, and most values in them, per element type: a few
/// steps' worth of the largest layers, not a second copy of a model's
/// activations.
const MOST_BUFFERS: usize = 64;
const MOST_VALUES: usize = 1 << 25;

static VALUES: Pool<f32> = Pool(Mutex::new(Vec::new()));
static INDICES: Pool<u32> = Pool(Mutex::new(Vec::new()));

/// A buffer of `len` values whose every value the caller writes before
/// reading it: one handed back earlier (holding its old values) or, if
/// none fits, a new zeroed one.
pub(crate) fn overwritten(len: usize) -> Vec<f32> {
    VALUES.take(len)
}

/// [`overwritten`] set to zero, for a caller that adds into it.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    let mut b = VALUES.take(len);
    b.fill(0.0);
    b
}

/// A copy of `x` in a kept buffer; [`recycle`] it when done.
pub fn copied(x: &[f32]) -> Vec<f32> {
    let mut b = VALUES.take(x.len());
    b.copy_from_slice(x);
    b
}

/// Hands back a buffer no longer used, for [`overwritten`] to give out.
pub(crate) fn hand_back(buf: Vec<f32>) {
    VALUES.keep(buf)
}

/// Hands a step's gradient (or any large vector done with) to the next
/// step, which would otherwise allocate and zero a new one.
pub fn recycle(buf: Vec<f32>) {
    hand_back(buf)
}

/// [`overwritten`] for indices (max pooling's argmax).
pub(crate) fn overwritten_indices(len: usize) -> Vec<u32> {
    INDICES.take(len)
}

/// Hands back indices from [`overwritten_indices`].
pub(crate) fn hand_back_indices(buf: Vec<u32>) {
    INDICES.keep(buf)
}

thread_local! {
    /// Each thread's two scratch buffers (im2col column blocks, Winograd
    /// transforms), kept between calls: they run to megabytes and are
    /// needed again every step.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> =
        const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Runs `f` with this thread's two scratch buffers (fresh ones if they are
/// in use further up the stack). They hold whatever the last caller left.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            let [a, b] = &mut *bufs;
            f(a, b)
        }
        Err(_) => f(&mut Vec::new(), &mut Vec::new()),
    })
}

struct Pool<T>(Mutex<Vec<Vec<T>>>);

impl<T: Copy + Default> Pool<T> {
    /// The newest buffer of `len` values, else the tightest one that
    /// holds `len` in at most twice that (a worker's share of a batch
    /// changes from step to step), else a new one.
    fn take(&self, len: usize) -> Vec<T> {
        if len >= SMALLEST {
            if let Ok(mut pool) = self.0.lock() {
                let fits = |b: &Vec<T>| b.capacity() >= len && b.capacity() / 2 <= len;
                let found = pool.iter().rposition(|b| b.len() == len).or_else(|| {
                    (0..pool.len())
                        .filter(|&i| fits(&pool[i]))
                        .min_by_key(|&i| pool[i].capacity())
                });
                if let Some(i) = found {
                    let mut b = pool.swap_remove(i);
                    b.resize(len, T::default());
                    return b;
                }
            }
        }
        vec![T::default(); len]
    }

    /// Keeps `buf`, dropping the oldest buffers to stay within bounds.
    fn keep(&self, buf: Vec<T>) {
        if buf.len() < SMALLEST || buf.capacity() > MOST_VALUES {
            return;
        }
        let Ok(mut pool) = self.0.lock() else { return };
        let mut held: usize = pool.iter().map(Vec::capacity).sum();
        while !pool.is_empty()
            && (pool.len() >= MOST_BUFFERS || held + buf.capacity() > MOST_VALUES)
        {
            held -= pool.remove(0).capacity();
        }
        pool.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_handed_back_is_given_out_again_for_its_length_only() {
        let pool: Pool<f32> = Pool(Mutex::new(Vec::new()));
        let len = SMALLEST + 5;
        let mut b = pool.take(len);
        assert!(b.iter().all(|&v| v == 0.0), "a new buffer is zeroed");
        b[7] = 3.5;
        let at = b.as_ptr();
        pool.keep(b);
        assert_eq!(pool.take(len + 1).len(), len + 1);
        let again = pool.take(len);
        assert_eq!(again.as_ptr(), at, "the same memory, not a new allocation");
        assert_eq!(again[7], 3.5, "its old values, not zeroed");
        assert!(pool.take(len).iter().all(|&v| v == 0.0), "given out once");
        pool.keep(vec![1.0; 10]);
        assert!(
            pool.take(10).iter().all(|&v| v == 0.0),
            "small ones are not kept"
        );
    }

    #[test]
    fn a_shorter_request_takes_the_tightest_buffer_that_holds_it() {
        let pool: Pool<f32> = Pool(Mutex::new(Vec::new()));
        let (big, bigger) = (vec![1.0f32; 3 * SMALLEST], vec![2.0f32; 4 * SMALLEST]);
        let (at_big, at_bigger) = (big.as_ptr(), bigger.as_ptr());
        pool.keep(bigger);
        pool.keep(big);
        let b = pool.take(3 * SMALLEST - 7);
        assert_eq!(b.len(), 3 * SMALLEST - 7);
        assert_eq!(b.as_ptr(), at_big, "the tightest fit");
        let small = pool.take(SMALLEST + 1);
        assert_ne!(small.as_ptr(), at_bigger, "not one more than twice as long");
        let mut c = pool.take(3 * SMALLEST + 2);
        assert_eq!(c.as_ptr(), at_bigger);
        assert_eq!(c.len(), 3 * SMALLEST + 2);
        c.truncate(10);
        pool.keep(c);
        assert!(
            pool.0.lock().map_or(true, |p| p.is_empty()),
            "short by length, not kept"
        );
    }

    #[test]
    fn the_pool_keeps_the_newest_within_its_bounds() {
        let pool: Pool<f32> = Pool(Mutex::new(Vec::new()));
        for i in 0..MOST_BUFFERS + 3 {
            pool.keep(vec![i as f32; SMALLEST]);
        }
        let held = pool
            .0
            .lock()
            .map(|p| p.iter().map(|b| b[0] as usize).collect::<Vec<_>>());
        assert_eq!(held.ok(), Some((3..MOST_BUFFERS + 3).collect::<Vec<_>>()));
        pool.keep(vec![0.0; MOST_VALUES - SMALLEST]);
        let values: usize = pool.0.lock().map_or(0, |p| p.iter().map(Vec::len).sum());
        assert!(values <= MOST_VALUES, "{values} values held");
    }
}
