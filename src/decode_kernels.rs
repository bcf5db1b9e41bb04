//! Decode's CPU kernels: a few input rows times an F32 weight matrix (`y = x·Wᵀ`), and attention
//! for one new position per sequence over the KV cache as it lies.
//!
//! Decoding is bound by reading memory: every step reads each matrix once for one new position
//! per sequence. candle multiplies one row with a matrix-vector kernel, but two rows (Compare's
//! unaltered and steered answers decoded together) go through its general matrix product, which
//! packs the weights first and took 2.7× the time of one row on the 0.5B decoder: decoding the
//! pair together was slower than one after the other. [`matmul_rows`] reads each weight row once
//! for all input rows, so two rows cost little more than one (and one row is faster than candle's
//! kernel on this CPU). Attention through candle also copied the whole V cache every step
//! (`contiguous()` of the cache's view); [`attend_one_position`] reads K and V in place.
//! Natively and in the wasm threads build the work is split over threads; the inner loops are
//! written for the compiler to vectorize (AVX2 when the CPU has it, else SSE2; SIMD128 in wasm).

use candle_core::quantized::{GgmlDType, GgmlType, QTensor};
use candle_core::{Device, Result, Tensor};

/// Input rows up to which [`matmul_rows`] is used (beyond it, candle's matrix product wins).
pub const MAX_ROWS: usize = 4;

/// `[.., K]` rows (at most [`MAX_ROWS`]) times `weight` `[N, K]` (F32, contiguous, on the CPU):
/// `[.., N]`. `None` when the operands are not of that kind (the caller falls back to candle).
pub fn matmul_rows(xs: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    f32_operands(xs, weight, 1..MAX_ROWS + 1, |F32Operands { x, rows, w, n, k }| multiply(x, rows, w, n, k))
}

/// The operands of `y = x·Wᵀ` as slices: `x` `[rows, k]` (row-major) and `w` `[n, k]`.
pub(crate) struct F32Operands<'a> {
    pub x: &'a [f32],
    pub rows: usize,
    pub w: &'a [f32],
    pub n: usize,
    pub k: usize,
}

/// `multiply` on `xs` `[.., K]` and `weight` `[N, K]` when both are F32 on the CPU, the weight is
/// contiguous and the row count is in `rows`: its `[rows·N]` values as a tensor `[.., N]`.
/// `None` for anything else (the caller falls back to candle).
pub(crate) fn f32_operands(
    xs: &Tensor,
    weight: &Tensor,
    rows: std::ops::Range<usize>,
    multiply: impl FnOnce(F32Operands) -> Vec<f32>,
) -> Result<Option<Tensor>> {
    let fits = matches!(weight.device(), Device::Cpu)
        && weight.dtype() == candle_core::DType::F32
        && weight.is_contiguous()
        && weight.rank() == 2;
    if !fits {
        return Ok(None);
    }
    let (n, k) = weight.dims2()?;
    let (w_storage, w_layout) = weight.storage_and_layout();
    let candle_core::Storage::Cpu(w_cpu) = &*w_storage else { return Ok(None) };
    let w = &w_cpu.as_slice::<f32>()?[w_layout.start_offset()..w_layout.start_offset() + n * k];
    with_input_rows(xs, k, n, rows, |x, rows| multiply(F32Operands { x, rows, w, n, k }))
}

/// `multiply` on `xs` `[.., k]` (F32 on the CPU, a row count in `rows`) as one row-major slice and
/// its row count; its `[rows·n]` values as a tensor `[.., n]`. `None` for other inputs.
fn with_input_rows(
    xs: &Tensor,
    k: usize,
    n: usize,
    rows: std::ops::Range<usize>,
    multiply: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> Result<Option<Tensor>> {
    let dims = xs.dims();
    let row_count = xs.elem_count() / k.max(1);
    let fits = matches!(xs.device(), Device::Cpu)
        && xs.dtype() == candle_core::DType::F32
        && k > 0
        && dims.last() == Some(&k)
        && rows.contains(&row_count);
    if !fits {
        return Ok(None);
    }
    let xs = xs.contiguous()?;
    let y = {
        let (x_storage, x_layout) = xs.storage_and_layout();
        let candle_core::Storage::Cpu(x_cpu) = &*x_storage else { return Ok(None) };
        let start = x_layout.start_offset();
        multiply(&x_cpu.as_slice::<f32>()?[start..start + row_count * k], row_count)
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank ≥ 1") = n;
    Tensor::from_vec(y, out_dims, &Device::Cpu).map(Some)
}

/// [`matmul_rows_blocks`] where it is the faster: in the page's threads build, whose pool it uses
/// (candle's quantized product runs on one thread in wasm; with one thread the two measured the
/// same, and natively candle's repacked x86 kernels are faster). `None` elsewhere: candle's.
pub fn matmul_rows_quantized(xs: &Tensor, weight: &QTensor) -> Result<Option<Tensor>> {
    if cfg!(all(target_arch = "wasm32", feature = "threads")) {
        matmul_rows_blocks(xs, weight)
    } else {
        Ok(None)
    }
}

/// `[.., K]` rows (at most [`MAX_ROWS`]) times a quantized weight `[N, K]` in GGML blocks (Q8_0,
/// Q4_0, Q4_K) on the CPU: `[.., N]`, as candle computes it (each input row quantized to the
/// blocks' dot-product type, then candle's block dot products), with each weight row read once
/// for all input rows and the output rows split over [`for_each_chunk`]'s threads. `None` for
/// anything else (the caller falls back to candle).
pub fn matmul_rows_blocks(xs: &Tensor, weight: &QTensor) -> Result<Option<Tensor>> {
    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ8_0};
    match weight.dtype() {
        GgmlDType::Q8_0 => rows_times_blocks::<BlockQ8_0>(xs, weight),
        GgmlDType::Q4_0 => rows_times_blocks::<BlockQ4_0>(xs, weight),
        GgmlDType::Q4K => rows_times_blocks::<BlockQ4K>(xs, weight),
        _ => Ok(None),
    }
}

fn rows_times_blocks<T: GgmlType>(xs: &Tensor, weight: &QTensor) -> Result<Option<Tensor>> {
    let Ok((n, k)) = weight.shape().dims2() else { return Ok(None) };
    if !matches!(weight.device(), Device::Cpu) || k % T::BLCK_SIZE != 0 {
        return Ok(None);
    }
    let data = weight.data()?;
    // SAFETY: GGML blocks are plain old data (integers and f16 scales); `align_to` only yields
    // the aligned middle, and a non-empty head means this storage is not a block array.
    let (head, blocks, _) = unsafe { data.align_to::<T>() };
    let per_row = k / T::BLCK_SIZE;
    if !head.is_empty() || blocks.len() < n * per_row {
        return Ok(None);
    }
    with_input_rows(xs, k, n, 1..MAX_ROWS + 1, |x, rows| {
        let mut quantized = vec![T::VecDotType::zeros(); rows * per_row];
        for (input, out) in x.chunks_exact(k).zip(quantized.chunks_exact_mut(per_row)) {
            T::VecDotType::from_float(input, out);
        }
        // Output rows in blocks, each block's `[block, rows]` results transposed at the end.
        const BLOCK: usize = 16;
        let mut by_output = vec![0f32; n * rows];
        for_each_chunk(&mut by_output, BLOCK * rows, rows * n * k, |(block, out)| {
            for (o, out) in out.chunks_exact_mut(rows).enumerate() {
                let row = block * BLOCK + o;
                let weights = &blocks[row * per_row..(row + 1) * per_row];
                for (input, out) in quantized.chunks_exact(per_row).zip(out.iter_mut()) {
                    *out = T::vec_dot(k, weights, input);
                }
            }
        });
        transpose_to_rows(&by_output, rows, n)
    })
}

/// `[n, rows]` (one output's values for every row together) → `[rows, n]`.
fn transpose_to_rows(by_output: &[f32], rows: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * n];
    for (o, values) in by_output.chunks_exact(rows).enumerate() {
        for (r, &v) in values.iter().enumerate() {
            y[r * n + o] = v;
        }
    }
    y
}

/// Multiply-adds below which the wasm threads build runs a product on the calling thread: waking
/// the pool's Web Workers costs more than such a product takes (measured: decode of the
/// 56 M-parameter benchmark model was no faster on two threads without this bound, 1.2× with it).
#[cfg(all(target_arch = "wasm32", feature = "threads"))]
const MIN_PARALLEL_WORK: usize = 1 << 20;

/// `run` on each `size`-long chunk of `out`, with its index: on rayon's pool natively, and in the
/// wasm threads build (feature `threads`) when the job is at least [`MIN_PARALLEL_WORK`]
/// multiply-adds (`work`); one after the other otherwise.
pub(crate) fn for_each_chunk<F>(out: &mut [f32], size: usize, work: usize, run: F)
where
    F: Fn((usize, &mut [f32])) + Send + Sync,
{
    #[cfg(not(target_arch = "wasm32"))]
    let parallel = true;
    #[cfg(all(target_arch = "wasm32", feature = "threads"))]
    let parallel = work >= MIN_PARALLEL_WORK;
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    if parallel {
        use rayon::prelude::*;
        out.par_chunks_mut(size).enumerate().for_each(run);
        return;
    }
    let _ = work;
    out.chunks_mut(size).enumerate().for_each(run);
}

/// `x` `[rows, k]` times `w` `[n, k]`: `[rows, n]`.
fn multiply(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    // Output rows in blocks: each block's `[block, rows]` results, transposed at the end.
    const BLOCK: usize = 64;
    let mut by_output = vec![0f32; n * rows];
    let run = |(block, out): (usize, &mut [f32])| {
        let first = block * BLOCK;
        let count = out.len() / rows;
        kernel(x, rows, &w[first * k..(first + count) * k], k, out);
    };
    for_each_chunk(&mut by_output, BLOCK * rows, rows * n * k, run);
    transpose_to_rows(&by_output, rows, n)
}

/// Dispatch on the row count (a constant inside, so the accumulators live in registers) and, on
/// x86-64, on AVX2.
fn kernel(x: &[f32], rows: usize, w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { kernel_avx2(x, rows, w, k, out) };
        return;
    }
    kernel_portable(x, rows, w, k, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn kernel_avx2(x: &[f32], rows: usize, w: &[f32], k: usize, out: &mut [f32]) {
    kernel_portable(x, rows, w, k, out)
}

/// `out[o·rows + r] = Σ_j w[o·k + j] · x[r·k + j]` for every weight row `o` of `w`. One
/// weight row at a time, dotted with each input row in turn: the row comes from memory for the
/// first and from the L1/L2 cache for the others. (A loop over the inputs inside the lanes loop
/// kept its accumulators on the stack and ran 4× slower per input row; hand-written AVX2 and
/// SIMD128 versions that load each weight once for two rows measured the same as this.)
#[inline(always)]
fn kernel_portable(x: &[f32], rows: usize, w: &[f32], k: usize, out: &mut [f32]) {
    for (weights, out) in w.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
        for (input, out) in x.chunks_exact(k).zip(out.iter_mut()) {
            *out = dot(weights, input);
        }
    }
}

/// Lanes of the accumulator: two AVX registers, four SIMD128 ones.
const LANES: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a_lanes, a_tail) = a.as_chunks::<LANES>();
    let (b_lanes, b_tail) = b.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (a, b) in a_lanes.iter().zip(b_lanes) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(a, b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}

/// Where one layer's cached keys or values lie: a contiguous `[B, kv_heads, capacity, d]`
/// buffer (candle's KV cache storage) of which positions `0..len` hold data.
#[derive(Clone, Copy)]
pub struct CacheView<'a> {
    pub data: &'a [f32],
    pub kv_heads: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

impl CacheView<'_> {
    /// The `head_dim` values of sequence `b`, head `h`, position `pos`.
    fn at(&self, b: usize, h: usize, pos: usize) -> &[f32] {
        let start = ((b * self.kv_heads + h) * self.capacity + pos) * self.head_dim;
        &self.data[start..start + self.head_dim]
    }
}

/// Attention of one query position per sequence, `q` `[B, heads, d]` (RoPE applied), over cached
/// positions `first..len` (`first > 0` under a sliding window): `softmax(scale · q·kᵀ)·v` per
/// head, query head `h` reading KV head `h / (heads / kv_heads)`. Returns `[B, heads·d]`.
#[allow(clippy::too_many_arguments)]
pub fn attend_one_position(
    q: &[f32],
    batch: usize,
    heads: usize,
    keys: CacheView,
    values: CacheView,
    first: usize,
    len: usize,
    scale: f32,
) -> Vec<f32> {
    let d = keys.head_dim;
    let group = heads / keys.kv_heads;
    let mut out = vec![0f32; batch * heads * d];
    let run = |(bh, out): (usize, &mut [f32])| {
        let (b, h) = (bh / heads, bh % heads);
        let query = &q[bh * d..(bh + 1) * d];
        let scores: Vec<f32> = (first..len).map(|pos| dot(query, keys.at(b, h / group, pos)) * scale).collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        for (pos, weight) in (first..len).zip(&weights) {
            let p = weight / total;
            for (o, v) in out.iter_mut().zip(values.at(b, h / group, pos)) {
                *o += p * v;
            }
        }
    };
    for_each_chunk(&mut out, d, 2 * batch * heads * (len - first) * d, run);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against candle's matmul on odd shapes (tails shorter than the lanes, blocks not whole),
    /// for every row count, with 3-D inputs as the decoder passes them.
    #[test]
    fn equals_candle_on_odd_shapes() {
        let cpu = &Device::Cpu;
        for (n, k) in [(1, 1), (5, 17), (130, 33), (64, 64), (257, 100)] {
            let w = Tensor::randn(0f32, 1f32, (n, k), cpu).unwrap();
            for rows in 1..=MAX_ROWS {
                let x = Tensor::randn(0f32, 1f32, (rows, 1, k), cpu).unwrap();
                let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                let got = matmul_rows(&x, &w).unwrap().expect("fits");
                assert_eq!(got.dims(), want.dims());
                let diff = (got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let diff: f32 = diff.to_scalar().unwrap();
                assert!(diff <= 1e-4 * (k as f32).sqrt(), "{rows}×{k} · {n}×{k}: max diff {diff}");
            }
        }
    }

    /// The quantized path against candle's own quantized product (the same block dot products,
    /// so equal up to the order of the sums), for every block type it takes and row count.
    #[test]
    fn quantized_rows_equal_candle() {
        use candle_core::quantized::{QMatMul, QTensor};
        use candle_core::Module;
        let cpu = &Device::Cpu;
        for (dtype, n, k) in [(GgmlDType::Q8_0, 37, 96), (GgmlDType::Q4_0, 19, 64), (GgmlDType::Q4K, 33, 512)] {
            let w = Tensor::randn(0f32, 1f32, (n, k), cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            for rows in 1..=MAX_ROWS {
                let x = Tensor::randn(0f32, 1f32, (rows, 1, k), cpu).unwrap();
                let want = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap().forward(&x).unwrap();
                let got = matmul_rows_blocks(&x, &q).unwrap().expect("fits");
                assert_eq!(got.dims(), want.dims());
                let diff: f32 =
                    (got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
                assert!(diff <= 1e-3, "{dtype:?} {rows}×{k} · {n}×{k}: max diff {diff}");
            }
            let five = Tensor::zeros((MAX_ROWS + 1, k), candle_core::DType::F32, cpu).unwrap();
            assert!(matmul_rows_blocks(&five, &q).unwrap().is_none(), "too many rows");
        }
        let f16 =
            QTensor::quantize(&Tensor::zeros((4, 32), candle_core::DType::F32, cpu).unwrap(), GgmlDType::F16).unwrap();
        let x = Tensor::zeros((1, 32), candle_core::DType::F32, cpu).unwrap();
        assert!(matmul_rows_blocks(&x, &f16).unwrap().is_none(), "F16 blocks are candle's");
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let cpu = &Device::Cpu;
        let w = Tensor::zeros((8, 16), candle_core::DType::F32, cpu).unwrap();
        let many = Tensor::zeros((MAX_ROWS + 1, 16), candle_core::DType::F32, cpu).unwrap();
        assert!(matmul_rows(&many, &w).unwrap().is_none(), "too many rows");
        let f16 = Tensor::zeros((1, 16), candle_core::DType::F16, cpu).unwrap();
        assert!(matmul_rows(&f16, &w).unwrap().is_none(), "F16 input");
        let transposed = Tensor::zeros((16, 8), candle_core::DType::F32, cpu).unwrap().t().unwrap();
        assert!(matmul_rows(&Tensor::zeros((1, 16), candle_core::DType::F32, cpu).unwrap(), &transposed)
            .unwrap()
            .is_none());
    }
}
