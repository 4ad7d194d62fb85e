//! Register-tiled convolution kernels for x86-64: a tile of up to [`Isa::max_pixels`]
//! output pixels by one panel of [`NR`] output channels per call, accumulated in vector
//! registers over every kernel tap and input channel, then bias, activation and one store.
//!
//! The input is a padded channels-last buffer, so a pixel's receptive field is `taps`
//! rows of `cin` contiguous values starting at that pixel's origin offset: no patch matrix
//! is ever built. Weights are packed once per layer, panel by panel, as
//! `[tap][input channel][NR]`, so each step of the inner loop loads one or two full vectors
//! of weights and broadcasts one input value per pixel.

/// Output channels per weight panel.
pub(crate) const NR: usize = 32;

/// The largest tile any kernel takes.
pub(crate) const MAX_PIXELS: usize = 14;

/// What follows the bias.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Activation {
    Identity,
    Relu,
    /// `x` for positive `x`, `alpha * x` otherwise.
    Leaky(f32),
}

impl Activation {
    pub(crate) fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Identity => x,
            Activation::Relu => x.max(0.0),
            Activation::Leaky(alpha) => {
                if x < 0.0 {
                    alpha * x
                } else {
                    x
                }
            }
        }
    }
}

/// The vector instruction set a kernel is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// 512-bit vectors: tiles of up to 14 pixels by 32 channels (28 accumulators).
    Avx512,
    /// 256-bit vectors with fused multiply-add: tiles of up to 6 pixels by 16 channels,
    /// two per panel.
    Avx2Fma,
}

impl Isa {
    /// The widest instruction set this processor runs, if it has one of the kernels.
    pub(crate) fn detect() -> Option<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Some(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Some(Isa::Avx2Fma);
            }
        }
        None
    }

    /// Whether this processor runs `self`.
    #[cfg(test)]
    pub(crate) fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512 => has!("avx512f"),
                Isa::Avx2Fma => has!("avx2") && has!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// The most output pixels one call takes.
    pub(crate) fn max_pixels(self) -> usize {
        match self {
            Isa::Avx512 => 14,
            Isa::Avx2Fma => 6,
        }
    }
}

/// One call's work: `pixels.len()` output pixels by one panel of output channels.
pub(crate) struct Tile<'a> {
    /// The layer's padded channels-last input.
    pub input: &'a [f32],
    /// Offset in `input` of each pixel's receptive-field origin.
    pub pixels: &'a [usize],
    /// Offset of each kernel tap from the origin.
    pub taps: &'a [usize],
    /// Contiguous values per tap: the input channels, or a whole kernel row of them.
    pub cin: usize,
    /// This panel's weights, `[tap][cin][NR]`.
    pub weights: &'a [f32],
    /// This panel's bias, `NR` values.
    pub bias: &'a [f32],
    pub activation: Activation,
    /// Output channels of this panel that exist (the last panel may be partial).
    pub lanes: usize,
    /// Offset in the output of each pixel's first channel of this panel.
    pub out_pixels: &'a [usize],
}

/// Runs `tile` with `isa`, writing `tile.lanes` values at each of `tile.out_pixels` in
/// `out` (`out_len` values).
///
/// # Safety
/// `isa` must be available on this processor, and no other thread may write the values
/// this tile writes while it runs. Every offset is checked against the slices and
/// `out_len` before any access.
pub(crate) unsafe fn run(isa: Isa, tile: &Tile, out: *mut f32, out_len: usize) {
    let mr = tile.pixels.len();
    let k = tile.taps.len() * tile.cin;
    let reach = tile.taps.iter().max().copied().unwrap_or(0) + tile.cin;
    assert!((1..=isa.max_pixels()).contains(&mr) && tile.out_pixels.len() == mr);
    assert!(tile.lanes >= 1 && tile.lanes <= NR && tile.bias.len() >= NR);
    assert!(tile.weights.len() >= k * NR);
    assert!(tile.pixels.iter().all(|&p| p + reach <= tile.input.len()));
    assert!(tile.out_pixels.iter().all(|&p| p + tile.lanes <= out_len));
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! by_size {
            ($f:ident, $($n:literal)*) => {
                match mr {
                    $($n => x86::$f::<$n>(tile, out),)*
                    _ => unreachable!("tile size checked above"),
                }
            };
        }
        match isa {
            Isa::Avx512 => by_size!(avx512, 1 2 3 4 5 6 7 8 9 10 11 12 13 14),
            Isa::Avx2Fma => {
                by_size!(avx2, 1 2 3 4 5 6);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, out);
        unreachable!("no kernel is available on this processor");
    }
}

// Index loops over the tile's pixels: with a constant trip count they unroll into one
// register per accumulator, which is the point of the kernels.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Activation, Tile, NR};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512<const MR: usize>(t: &Tile, out: *mut f32) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let input = t.input.as_ptr();
        let mut w = t.weights.as_ptr();
        for &tap in t.taps {
            let mut src = [input; MR];
            for i in 0..MR {
                src[i] = input.add(t.pixels[i] + tap);
            }
            for c in 0..t.cin {
                let w0 = _mm512_loadu_ps(w);
                let w1 = _mm512_loadu_ps(w.add(16));
                w = w.add(NR);
                for i in 0..MR {
                    let x = _mm512_set1_ps(*src[i].add(c));
                    acc[i][0] = _mm512_fmadd_ps(x, w0, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(x, w1, acc[i][1]);
                }
            }
        }
        let bias = [_mm512_loadu_ps(t.bias.as_ptr()), _mm512_loadu_ps(t.bias.as_ptr().add(16))];
        let lanes = (1u64 << t.lanes) - 1;
        let masks = [lanes as u16, (lanes >> 16) as u16];
        let zero = _mm512_setzero_ps();
        for i in 0..MR {
            let o = out.add(t.out_pixels[i]);
            for h in 0..2 {
                if 16 * h >= t.lanes {
                    break;
                }
                let mut v = _mm512_add_ps(acc[i][h], bias[h]);
                v = match t.activation {
                    Activation::Identity => v,
                    Activation::Relu => _mm512_max_ps(v, zero),
                    Activation::Leaky(alpha) => {
                        let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, zero);
                        _mm512_mask_mul_ps(v, negative, v, _mm512_set1_ps(alpha))
                    }
                };
                _mm512_mask_storeu_ps(o.add(16 * h), masks[h], v);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<const MR: usize>(t: &Tile, out: *mut f32) {
        let input = t.input.as_ptr();
        // Two passes over the panel, 16 channels each: 12 accumulators fit the 16 registers.
        for half in 0..2 {
            if 16 * half >= t.lanes {
                break;
            }
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            let mut w = t.weights.as_ptr().add(16 * half);
            for &tap in t.taps {
                let mut src = [input; MR];
                for i in 0..MR {
                    src[i] = input.add(t.pixels[i] + tap);
                }
                for c in 0..t.cin {
                    let w0 = _mm256_loadu_ps(w);
                    let w1 = _mm256_loadu_ps(w.add(8));
                    w = w.add(NR);
                    for i in 0..MR {
                        let x = _mm256_broadcast_ss(&*src[i].add(c));
                        acc[i][0] = _mm256_fmadd_ps(x, w0, acc[i][0]);
                        acc[i][1] = _mm256_fmadd_ps(x, w1, acc[i][1]);
                    }
                }
            }
            let b = t.bias.as_ptr().add(16 * half);
            let bias = [_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8))];
            let lanes = (t.lanes - 16 * half).min(16);
            for i in 0..MR {
                let mut v = [0.0f32; 16];
                for h in 0..2 {
                    _mm256_storeu_ps(v.as_mut_ptr().add(8 * h), _mm256_add_ps(acc[i][h], bias[h]));
                }
                let o = out.add(t.out_pixels[i] + 16 * half);
                for (j, &x) in v.iter().take(lanes).enumerate() {
                    *o.add(j) = t.activation.apply(x);
                }
            }
        }
    }
}
