//! Buffers: uploads, scratch, uniforms, and weight matrices split by rows so that every
//! storage binding stays within the adapter's `max_storage_buffer_binding_size`.

use anyhow::{bail, Result};

use super::context::GpuContext;
use super::kernels::MatmulKernels;
use super::params::{EmbedRowsParams, KernelParams, LinearParams};
use super::storage::WeightStorage;

/// Host bytes of one piece of a weight upload ([`GpuMatrix::from_pieces`]).
const PIECE_BYTES: u64 = 4 << 20;

pub const STORAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST).union(wgpu::BufferUsages::COPY_SRC);

/// A storage buffer holding `data` (at least 4 bytes).
pub fn upload(ctx: &GpuContext, label: &str, data: &[f32]) -> Result<wgpu::Buffer> {
    let bytes = (data.len() as u64 * 4).max(4);
    if bytes > ctx.max_binding() {
        bail!("{label}: {bytes} bytes exceed the adapter's largest storage binding ({})", ctx.max_binding());
    }
    let contents: &[u8] = if data.is_empty() { &[0u8; 4] } else { bytemuck::cast_slice(data) };
    Ok(buffer_with(ctx, label, contents, STORAGE))
}

/// A buffer holding `contents` (a multiple of 4 bytes), written through the queue. Not wgpu's
/// `create_buffer_init`: its mapped-at-creation range panics when the device is lost, where this
/// leaves an invalid buffer and the next health check reports the loss.
fn buffer_with(ctx: &GpuContext, label: &str, contents: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
    let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: contents.len() as u64,
        usage: usage | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    ctx.queue.write_buffer(&buffer, 0, contents);
    buffer
}

/// A zeroed storage buffer of `floats` f32 values (at least one).
pub fn scratch(ctx: &GpuContext, label: &str, floats: usize) -> Result<wgpu::Buffer> {
    let bytes = (floats as u64 * 4).max(4);
    if bytes > ctx.max_binding() {
        bail!("{label}: {bytes} bytes exceed the adapter's largest storage binding ({})", ctx.max_binding());
    }
    Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes,
        usage: STORAGE,
        mapped_at_creation: false,
    }))
}

/// A uniform buffer holding a kernel's parameter block.
pub fn uniform(ctx: &GpuContext, params: &impl KernelParams) -> wgpu::Buffer {
    buffer_with(ctx, "params", bytemuck::cast_slice(&params.padded_words()), wgpu::BufferUsages::UNIFORM)
}

/// A `[n, k]` weight (PyTorch `Linear` layout) stored as row chunks in one [`WeightStorage`],
/// with an optional `[n]` f32 bias.
pub struct GpuMatrix {
    pub k: usize,
    pub n: usize,
    /// `(first row, rows, buffer)`.
    pub chunks: Vec<(usize, usize, wgpu::Buffer)>,
    pub bias: Option<wgpu::Buffer>,
    pub storage: WeightStorage,
}

impl GpuMatrix {
    /// Upload `w` (`n·k` values, row-major) in f32.
    pub fn new(ctx: &GpuContext, label: &str, w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Result<Self> {
        Self::dense(ctx, label, w, (n, k), bias, WeightStorage::F32, usize::MAX)
    }

    /// Upload dense values `w` (`n·k`, row-major) in `storage` (f32 or f16), at most `max_rows`
    /// rows per chunk (tests use it to exercise the split path on small matrices) and at most the
    /// adapter's largest storage binding.
    pub fn dense(
        ctx: &GpuContext,
        label: &str,
        w: &[f32],
        (n, k): (usize, usize),
        bias: Option<&[f32]>,
        storage: WeightStorage,
        max_rows: usize,
    ) -> Result<Self> {
        if w.len() != n * k {
            bail!("{label}: {} values for a {n}×{k} matrix", w.len());
        }
        Self::from_pieces(ctx, label, (n, k), bias, storage, max_rows, |r0, rows| {
            storage.pack_dense(&w[r0 * k..(r0 + rows) * k])
        })
    }

    /// Upload GGML blocks (`data`: `n` rows of `k` values padded to whole blocks, as candle's
    /// `QTensor::data`) in their quantized `storage`.
    pub fn blocks(
        ctx: &GpuContext,
        label: &str,
        data: &[u8],
        (n, k): (usize, usize),
        bias: Option<&[f32]>,
        storage: WeightStorage,
        max_rows: usize,
    ) -> Result<Self> {
        let Some(dtype) = storage.ggml() else { bail!("{label}: {} is not a block format", storage.name()) };
        let row_bytes = k.div_ceil(dtype.block_size()) * dtype.type_size();
        if data.len() != n * row_bytes {
            bail!("{label}: {} bytes of {} blocks for {n} rows of {k} values", data.len(), storage.name());
        }
        Self::from_pieces(ctx, label, (n, k), bias, storage, max_rows, |r0, rows| {
            storage.pack_blocks(&data[r0 * row_bytes..(r0 + rows) * row_bytes], rows, k)
        })
    }

    /// Upload an `[n, k]` matrix in `storage`, in chunks of at most `max_rows` rows and the
    /// adapter's largest storage binding, each written a piece of rows at a time:
    /// `piece(first_row, rows)` gives those rows in `storage`'s layout (an even number of rows
    /// per piece but the last, so that pieces start on whole words). Only one piece is held on
    /// the host at a time (in the browser, wasm memory keeps its high-water mark).
    pub fn from_pieces(
        ctx: &GpuContext,
        label: &str,
        (n, k): (usize, usize),
        bias: Option<&[f32]>,
        storage: WeightStorage,
        max_rows: usize,
        piece: impl Fn(usize, usize) -> Result<Vec<u32>>,
    ) -> Result<Self> {
        let row_bytes = storage.row_bytes(k).max(1);
        let rows_per_chunk = ((ctx.max_binding().saturating_sub(4) / row_bytes) as usize).min(max_rows);
        if rows_per_chunk == 0 {
            bail!("{label}: one row of {k} values exceeds the adapter's largest storage binding");
        }
        let piece_rows = ((PIECE_BYTES / row_bytes) as usize).max(2) & !1;
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < n {
            let rows = rows_per_chunk.min(n - r0);
            let bytes = (rows as u64 * row_bytes).div_ceil(4).max(1) * 4;
            let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: STORAGE,
                mapped_at_creation: false,
            });
            let mut done = 0;
            while done < rows {
                let count = piece_rows.min(rows - done);
                let words = piece(r0 + done, count)?;
                let offset = done as u64 * row_bytes;
                if !offset.is_multiple_of(4) || words.len() as u64 != (count as u64 * row_bytes).div_ceil(4) {
                    bail!("{label}: rows {done}..{} came as {} words, not their layout's", done + count, words.len());
                }
                ctx.queue.write_buffer(&buffer, offset, bytemuck::cast_slice(&words));
                done += count;
            }
            // Natively, writes are staged until the next submission: flush them chunk by chunk.
            ctx.queue.submit([]);
            chunks.push((r0, rows, buffer));
            r0 += rows;
        }
        let bias = bias.map(|b| upload(ctx, label, b)).transpose()?;
        Ok(Self { k, n, chunks, bias, storage })
    }

    /// Bytes of weights (and bias) one pass over this matrix reads.
    pub fn bytes(&self) -> u64 {
        let weights: u64 = self.chunks.iter().map(|(_, _, b)| b.size()).sum();
        weights + if self.bias.is_some() { self.n as u64 * 4 } else { 0 }
    }
}

/// Most rows the GEMV kernels take (`ROWS` in gemv.wgsl and gemv_rows.wgsl): a batched decode
/// step, one row a sequence, reads each weight once for all of them.
pub const GEMV_ROWS: usize = 4;

/// One chunk of a linear layer bound to its input and output: both kernels (tiled matmul for
/// many rows, GEMV for up to [`GEMV_ROWS`]) with their parameter blocks.
pub struct LinearOp {
    pub rows: usize,
    pub n: usize,
    /// The weights' storage (which kernels read them).
    pub storage: WeightStorage,
    pub tiled: wgpu::BindGroup,
    pub gemv: wgpu::BindGroup,
    pub gemv_rows: wgpu::BindGroup,
    _params: wgpu::Buffer,
}

/// Flags of the matmul kernels.
pub const BIAS: u32 = 1;
pub const ACCUMULATE: u32 = 2;

/// Where a linear reads and writes: rows of `x` (row stride `k`, from element `x_off`), `rows`
/// of them (0: the step's row count), into `out` (row stride `out_stride`, from element
/// `out_off`), written — or added, with `accumulate` (a residual: `out += x·Wᵀ + b`).
#[derive(Clone, Copy)]
pub struct LinearIo<'a> {
    pub x: &'a wgpu::Buffer,
    pub x_off: usize,
    pub rows: usize,
    pub out: &'a wgpu::Buffer,
    pub out_stride: usize,
    pub out_off: usize,
    pub accumulate: bool,
}

impl<'a> LinearIo<'a> {
    /// The step's rows of `x` into `out`, overwritten.
    pub fn new(x: &'a wgpu::Buffer, out: &'a wgpu::Buffer, out_stride: usize) -> Self {
        Self { x, x_off: 0, rows: 0, out, out_stride, out_off: 0, accumulate: false }
    }

    /// Reading `x` from element `x_off`.
    pub fn from(self, x_off: usize) -> Self {
        Self { x_off, ..self }
    }

    /// Writing `out` from element `out_off`.
    pub fn at(self, out_off: usize) -> Self {
        Self { out_off, ..self }
    }

    /// A fixed number of rows instead of the step's.
    pub fn rows(self, rows: usize) -> Self {
        Self { rows, ..self }
    }

    /// Added to `out` instead of overwriting it.
    pub fn accumulate(self) -> Self {
        Self { accumulate: true, ..self }
    }
}

/// Bind `matrix` to `io` (one [`LinearOp`] per row chunk of the matrix). Every linear kernel binds
/// `step, params, x, w, bias, out` in that order; `dummy` stands in for a
/// missing bias.
pub fn bind_linear(
    ctx: &GpuContext,
    step: &wgpu::Buffer,
    matrix: &GpuMatrix,
    io: LinearIo,
    dummy: &wgpu::Buffer,
) -> Vec<LinearOp> {
    let LinearIo { x, x_off, rows: m, out, out_stride, out_off, accumulate } = io;
    let k = &ctx.kernels;
    matrix
        .chunks
        .iter()
        .map(|(r0, rows, w)| {
            let flags = if matrix.bias.is_some() { BIAS } else { 0 } | if accumulate { ACCUMULATE } else { 0 };
            let params = uniform(
                ctx,
                &LinearParams {
                    m: m as u32,
                    k: matrix.k as u32,
                    n: *rows as u32,
                    x_off: x_off as u32,
                    out_stride: out_stride as u32,
                    out_off: (out_off + r0) as u32,
                    flags,
                    bias_off: *r0 as u32,
                },
            );
            let bias = matrix.bias.as_ref().unwrap_or(dummy);
            let kernels = k.matmul_kernels(matrix.storage);
            LinearOp {
                rows: m,
                n: *rows,
                storage: matrix.storage,
                tiled: kernels.matmul.bind(&ctx.device, &[step, &params, x, w, bias, out]),
                gemv: kernels.gemv.bind(&ctx.device, &[step, &params, x, w, bias, out]),
                gemv_rows: kernels.gemv_rows.bind(&ctx.device, &[step, &params, x, w, bias, out]),
                _params: params,
            }
        })
        .collect()
}

impl LinearOp {
    /// Record the dispatch for `t` step rows (or the fixed row count given at binding).
    pub fn record(&self, ctx: &GpuContext, pass: &mut wgpu::ComputePass<'_>, t: usize) {
        let rows = if self.rows == 0 { t } else { self.rows };
        let k = &ctx.kernels;
        let MatmulKernels { matmul, gemv, gemv_rows, .. } = k.matmul_kernels(self.storage);
        if rows <= GEMV_ROWS && k.rows_per_invocation {
            super::kernels::dispatch(
                pass,
                gemv_rows,
                &self.gemv_rows,
                super::kernels::grid(self.n.div_ceil(64) as u32),
            );
        } else if rows <= GEMV_ROWS {
            super::kernels::dispatch(pass, gemv, &self.gemv, super::kernels::grid(self.n.div_ceil(8) as u32));
        } else {
            pass.set_pipeline(&matmul.pipeline);
            pass.set_bind_group(0, &self.tiled, &[]);
            pass.dispatch_workgroups(self.n.div_ceil(64) as u32, rows.div_ceil(64) as u32, 1);
        }
    }
}

/// The token-embedding kernel bound to every chunk of a table `matrix` (any storage): the step's
/// token ids from `ids`, their rows written to `out` (`[t, k]`).
pub struct EmbedOp {
    k: usize,
    storage: WeightStorage,
    binds: Vec<wgpu::BindGroup>,
    _params: Vec<wgpu::Buffer>,
}

pub fn bind_embed_rows(
    ctx: &GpuContext,
    step: &wgpu::Buffer,
    matrix: &GpuMatrix,
    ids: &wgpu::Buffer,
    out: &wgpu::Buffer,
) -> EmbedOp {
    let kernel = &ctx.kernels.matmul_kernels(matrix.storage).embed_rows;
    let (binds, params) = matrix
        .chunks
        .iter()
        .map(|(r0, rows, table)| {
            let p = uniform(ctx, &EmbedRowsParams { k: matrix.k as u32, n: *rows as u32, r0: *r0 as u32 });
            (kernel.bind(&ctx.device, &[step, &p, ids, table, out]), p)
        })
        .unzip();
    EmbedOp { k: matrix.k, storage: matrix.storage, binds, _params: params }
}

impl EmbedOp {
    /// Record the dispatches for `t` tokens (each chunk writes the rows of its tokens).
    pub fn record(&self, ctx: &GpuContext, pass: &mut wgpu::ComputePass<'_>, t: usize) {
        let kernel = &ctx.kernels.matmul_kernels(self.storage).embed_rows;
        for bind in &self.binds {
            super::kernels::dispatch(pass, kernel, bind, super::kernels::grid((t * self.k).div_ceil(64) as u32));
        }
    }
}
