//! A tiny counter-style generator. Initial weights and dropout masks must be
//! reproducible forever from a seed (same seed => same model, bit for bit), so
//! they cannot depend on a third-party generator whose stream may change
//! between versions.

/// SplitMix64: fast, tiny, and statistically fine for init and dropout.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// A generator for one sub-stream (e.g. one layer and one sample), so
    /// that streams do not depend on how work is split between threads or
    /// workers.
    pub fn derive(seed: u64, a: u64, b: u64) -> Self {
        let s = mix(mix(seed ^ 0x5851_f42d_4c95_7f2d).wrapping_add(a) ^ 0x9e37_79b9_7f4a_7c15)
            .wrapping_add(mix(b ^ 0x1405_7b7e_f767_814f));
        SplitMix64::new(mix(s))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// Uniform in [0, 1) with 24 bits, exactly representable in f32.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal, by Box-Muller (one draw per call: simple, and the
    /// stream stays a pure function of the call count).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Test data in [-0.5, 0.5) from a seed: a 32-bit linear congruential
/// generator, the same values on every machine.
#[cfg(test)]
pub(crate) fn test_values(seed: u32) -> impl FnMut() -> f32 {
    let mut state = seed;
    move || {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    }
}
