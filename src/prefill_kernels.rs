//! Prefill's CPU matrix product in wasm: many input rows times an F32 weight matrix (`y = x·Wᵀ`),
//! for the prompt's positions and the vision tower's patches.
//!
//! In wasm candle multiplies through `gemm`'s SIMD128 micro-kernels, which pack the transposed
//! weight first. Both operands here already hold `K` contiguously (`x` `[M, K]`, the weight
//! `[N, K]` as checkpoints store it), so a tile of `MR` input rows × `NR` weight rows is one set of
//! `MR·NR` four-lane accumulators over `K`, with no packing, reduced across lanes at the end.
//! Measured in headless Chromium (one thread) on the decoder's and the vision tower's shapes,
//! 2 × 5 tiles were the fastest of 1×4 … 4×4, about 1.3× candle's product (see
//! docs/benchmarks.md). Natively candle's `gemm` with AVX2/FMA is faster than this kernel, so it
//! is used only in wasm; natively it runs in the tests, through the same tiling with portable
//! lanes.

use candle_core::{Result, Tensor};

use crate::decode_kernels::{f32_operands, F32Operands, MAX_ROWS};

/// Input rows from which [`matmul_many_rows`] is used (below, [`crate::decode_kernels`]).
pub const MIN_ROWS: usize = MAX_ROWS + 1;

/// `[.., K]` rows (at least [`MIN_ROWS`]) times `weight` `[N, K]` (F32, contiguous, on the CPU):
/// `[.., N]`. `None` natively and when the operands are not of that kind (candle's product).
pub fn matmul_many_rows(xs: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    if cfg!(target_arch = "wasm32") {
        matmul_tiled(xs, weight)
    } else {
        Ok(None)
    }
}

/// [`matmul_many_rows`] on every target (natively with portable lanes: the tests' entry).
pub fn matmul_tiled(xs: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    f32_operands(xs, weight, MIN_ROWS..usize::MAX, |F32Operands { x, rows, w, n, k }| {
        let mut y = vec![0f32; rows * n];
        #[cfg(target_arch = "wasm32")]
        multiply::<core::arch::wasm32::v128>(x, rows, w, n, k, &mut y);
        #[cfg(not(target_arch = "wasm32"))]
        multiply::<[f32; 4]>(x, rows, w, n, k, &mut y);
        y
    })
}

/// Four f32 lanes: SIMD128 in wasm, a plain array elsewhere.
trait Lanes: Copy {
    fn zero() -> Self;
    /// The four values at `values[0..4]`.
    fn load(values: &[f32]) -> Self;
    /// `self + a·b`, lane by lane.
    fn add_product(self, a: Self, b: Self) -> Self;
    fn sum(self) -> f32;
}

impl Lanes for [f32; 4] {
    #[inline(always)]
    fn zero() -> Self {
        [0.0; 4]
    }
    #[inline(always)]
    fn load(values: &[f32]) -> Self {
        [values[0], values[1], values[2], values[3]]
    }
    #[inline(always)]
    fn add_product(self, a: Self, b: Self) -> Self {
        std::array::from_fn(|i| self[i] + a[i] * b[i])
    }
    #[inline(always)]
    fn sum(self) -> f32 {
        (self[0] + self[1]) + (self[2] + self[3])
    }
}

#[cfg(target_arch = "wasm32")]
impl Lanes for core::arch::wasm32::v128 {
    #[inline(always)]
    fn zero() -> Self {
        core::arch::wasm32::f32x4_splat(0.0)
    }
    #[inline(always)]
    fn load(values: &[f32]) -> Self {
        assert!(values.len() >= 4);
        // SAFETY: four f32 are in bounds (checked above); v128 loads need no alignment.
        unsafe { core::arch::wasm32::v128_load(values.as_ptr() as *const core::arch::wasm32::v128) }
    }
    #[inline(always)]
    fn add_product(self, a: Self, b: Self) -> Self {
        use core::arch::wasm32::{f32x4_add, f32x4_mul};
        f32x4_add(self, f32x4_mul(a, b))
    }
    #[inline(always)]
    fn sum(self) -> f32 {
        use core::arch::wasm32::f32x4_extract_lane as lane;
        (lane::<0>(self) + lane::<1>(self)) + (lane::<2>(self) + lane::<3>(self))
    }
}

/// Input rows per block: the block's rows stay in the cache while every weight row passes.
const ROW_BLOCK: usize = 32;
/// Positions of `K` per pass: a tile's rows of both operands stay in the L1 cache over a pass.
const K_BLOCK: usize = 1024;
/// Tile: input rows × weight rows (10 accumulators of four lanes).
const MR: usize = 2;
const NR: usize = 5;

/// `y` `[m, n]` = `x` `[m, k]` · `w` `[n, k]`ᵀ; blocks of rows on the thread pool where there is
/// one (the wasm threads build).
fn multiply<L: Lanes>(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, y: &mut [f32]) {
    let block = |(index, y): (usize, &mut [f32])| {
        let first_row = index * ROW_BLOCK;
        let rows = y.len() / n;
        let x = &x[first_row * k..(first_row + rows) * k];
        for k_start in (0..k).step_by(K_BLOCK) {
            let part = Part { x, w, n, k, k_start, k_end: (k_start + K_BLOCK).min(k), accumulate: k_start > 0 };
            part.rows::<L>(rows, y);
        }
    };
    debug_assert_eq!(y.len(), m * n);
    crate::decode_kernels::for_each_chunk(y, ROW_BLOCK * n, m * n * k, block);
}

/// One pass over positions `k_start..k_end` of `K`.
struct Part<'a> {
    x: &'a [f32],
    w: &'a [f32],
    n: usize,
    k: usize,
    k_start: usize,
    k_end: usize,
    /// Add to `y` (a later pass) rather than set it.
    accumulate: bool,
}

impl Part<'_> {
    /// This pass for the `rows` rows of `x` into `y` `[rows, n]`: tiles of `MR × NR`, then the
    /// rows and weight rows left over.
    fn rows<L: Lanes>(&self, rows: usize, y: &mut [f32]) {
        let n = self.n;
        let mut col = 0;
        while col + NR <= n {
            let mut row = 0;
            while row + MR <= rows {
                self.tile::<L, MR, NR>(row, col, y);
                row += MR;
            }
            if row < rows {
                self.tile::<L, 1, NR>(row, col, y);
            }
            col += NR;
        }
        for col in col..n {
            let mut row = 0;
            while row + MR <= rows {
                self.tile::<L, MR, 1>(row, col, y);
                row += MR;
            }
            if row < rows {
                self.tile::<L, 1, 1>(row, col, y);
            }
        }
    }

    /// `y[row + r, col + c] (+)= x[row + r] · w[col + c]` over this pass, for `r < R`, `c < C`.
    #[inline(always)]
    fn tile<L: Lanes, const R: usize, const C: usize>(&self, row: usize, col: usize, y: &mut [f32]) {
        let (k, start, end) = (self.k, self.k_start, self.k_end);
        let inputs: [&[f32]; R] = std::array::from_fn(|r| &self.x[(row + r) * k + start..(row + r) * k + end]);
        let weights: [&[f32]; C] = std::array::from_fn(|c| &self.w[(col + c) * k + start..(col + c) * k + end]);
        let mut acc = [[L::zero(); C]; R];
        let len = end - start;
        let whole = len - len % 4;
        let mut j = 0;
        while j < whole {
            let a: [L; R] = std::array::from_fn(|r| L::load(&inputs[r][j..]));
            let b: [L; C] = std::array::from_fn(|c| L::load(&weights[c][j..]));
            for r in 0..R {
                for c in 0..C {
                    acc[r][c] = acc[r][c].add_product(a[r], b[c]);
                }
            }
            j += 4;
        }
        for r in 0..R {
            for c in 0..C {
                let tail: f32 = inputs[r][whole..].iter().zip(&weights[c][whole..]).map(|(a, b)| a * b).sum();
                let value = acc[r][c].sum() + tail;
                let out = &mut y[(row + r) * self.n + col + c];
                *out = if self.accumulate { *out + value } else { value };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against candle's matmul on shapes with every kind of remainder: rows not a whole tile or
    /// block, weight rows not a whole tile, `K` not a multiple of the lanes; 2-D and 3-D inputs.
    #[test]
    fn equals_candle_on_odd_shapes() {
        let cpu = &Device::Cpu;
        for (m, n, k) in [(5, 1, 1), (6, 5, 4), (7, 11, 3), (33, 17, 70), (65, 64, 64), (40, 129, 257), (131, 12, 1100)]
        {
            let w = Tensor::randn(0f32, 1f32, (n, k), cpu).unwrap();
            for x in
                [Tensor::randn(0f32, 1f32, (m, k), cpu).unwrap(), Tensor::randn(0f32, 1f32, (1, m, k), cpu).unwrap()]
            {
                let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                let got = matmul_tiled(&x, &w).unwrap().expect("fits");
                assert_eq!(got.dims(), want.dims());
                let diff: f32 =
                    (got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
                assert!(diff <= 1e-4 * (k as f32).sqrt(), "{m}×{k} · {n}×{k}: max diff {diff}");
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let cpu = &Device::Cpu;
        let w = Tensor::zeros((8, 16), candle_core::DType::F32, cpu).unwrap();
        let few = Tensor::zeros((MAX_ROWS, 16), candle_core::DType::F32, cpu).unwrap();
        assert!(matmul_tiled(&few, &w).unwrap().is_none(), "decode's few rows");
        let wrong_k = Tensor::zeros((MIN_ROWS, 15), candle_core::DType::F32, cpu).unwrap();
        assert!(matmul_tiled(&wrong_k, &w).unwrap().is_none(), "K differs");
        let transposed = Tensor::zeros((16, 8), candle_core::DType::F32, cpu).unwrap().t().unwrap();
        let many = Tensor::zeros((MIN_ROWS, 16), candle_core::DType::F32, cpu).unwrap();
        assert!(matmul_tiled(&many, &transposed).unwrap().is_none(), "weight not contiguous");
    }
}
