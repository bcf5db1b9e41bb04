//! [`GpuDecoder`]: the Llama / Qwen2 decoder of [`TextModel`] on the wgpu kernels.
//!
//! Weights are uploaded once. A step (prefill chunk or one decode token) is one command buffer:
//! per layer RMSNorm → fused QKV matmul → RoPE + KV-cache write → causal GQA attention →
//! o_proj (+ residual) → RMSNorm → fused gate/up matmul → SiLU·up → down_proj (+ residual) →
//! steering add; then the final norm of the last row, lm_head and (optionally) argmax. Only the
//! logits, or the token, come back (plus the per-layer last-row states when asked).
//!
//! The stages: `upload.rs` (how matrices are stored, the weights' upload and the decoder's build),
//! `cache.rs` (the per-sequence KV cache), `steering.rs` (an intervention's deltas); the step
//! itself (`forward`, `record`) is here.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::context::GpuContext;
use crate::config::TextConfig;
use crate::gpu::buffers::{EmbedOp, GpuMatrix, LinearOp, GEMV_ROWS};
use crate::gpu::kernels::{dispatch, grid};
use crate::gpu::params::{KernelParams, Step};
use crate::gpu::storage::WeightStorage;
use crate::text::{DecoderOutput, ForwardOptions, TextModel};

mod cache;
mod steering;
mod upload;

pub use cache::GpuCache;
pub use steering::GpuSteering;
pub(in crate::gpu) use upload::Upload;
pub use upload::{GpuDecoderBuilder, GpuWeights};

/// Most rows one submission processes (prefill is split into chunks of this many rows).
const MAX_CHUNK_ROWS: usize = 256;

pub(super) fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

struct Layer {
    // Weights (kept alive; the bind groups reference them).
    _norm1: wgpu::Buffer,
    _norm2: wgpu::Buffer,
    qkv: GpuMatrix,
    o: GpuMatrix,
    gate_up: GpuMatrix,
    down: GpuMatrix,
    // Bound dispatches.
    norm1_bind: wgpu::BindGroup,
    qkv_ops: Vec<LinearOp>,
    o_ops: Vec<LinearOp>,
    norm2_bind: wgpu::BindGroup,
    gate_up_ops: Vec<LinearOp>,
    act_bind: wgpu::BindGroup,
    down_ops: Vec<LinearOp>,
    capture_bind: wgpu::BindGroup,
    _params: Vec<wgpu::Buffer>,
}

/// What a forward pass reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readback {
    /// The last position's logits `[V]`.
    Logits,
    /// Only the argmax of the last position's logits (greedy decoding): 4 bytes.
    Argmax,
    /// Nothing (e.g. a prefill whose logits are not needed).
    Nothing,
}

/// What a step records after the blocks.
#[derive(Clone, Copy)]
enum Tail {
    /// Nothing (a prefill chunk before the last).
    Nothing,
    /// The final norm of the last row, its captures and `readback`.
    LastRow { capture: bool, readback: Readback },
    /// The final norm of every row (one a sequence: a batched step) and `readback` for each.
    EveryRow(Readback),
}

/// The rows a forward pass appends.
pub enum GpuInput<'a> {
    /// `[t·H]` embeddings (image features already merged).
    Embeds(&'a [f32]),
    /// Token ids, embedded on the GPU.
    Tokens(&'a [u32]),
}

#[derive(Clone, Copy)]
pub struct GpuForwardOptions<'a> {
    pub steering: Option<&'a GpuSteering>,
    /// Prompt length for positional steering (`last` / `generated`).
    pub prompt_len: usize,
    pub capture_layers: bool,
    pub readback: Readback,
}

/// What came back from one forward pass (all at its last position).
#[derive(Debug, Clone, Default)]
pub struct GpuOutput {
    pub logits: Option<Vec<f32>>,
    pub token: Option<u32>,
    /// `[L][H]`, post-steering block outputs (with `capture_layers`).
    pub layer_outputs: Option<Vec<Vec<f32>>>,
    /// `[H]` final-norm output (with `capture_layers`).
    pub final_norm: Option<Vec<f32>>,
}

impl GpuOutput {
    /// The CPU path's [`DecoderOutput`] (tensors on the CPU).
    pub fn into_decoder_output(self) -> Result<DecoderOutput> {
        let vec = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &Device::Cpu);
        Ok(DecoderOutput {
            logits: self.logits.map(vec).transpose()?,
            layer_outputs: self
                .layer_outputs
                .map(|ls| ls.into_iter().map(vec).collect::<candle_core::Result<Vec<_>>>())
                .transpose()?,
            final_norm: self.final_norm.map(vec).transpose()?,
        })
    }
}

pub struct GpuDecoder {
    ctx: Arc<GpuContext>,
    cfg: TextConfig,
    id: usize,
    h: usize,
    nh: usize,
    kvh: usize,
    d: usize,
    mi: usize,
    vocab: usize,
    chunk_rows: usize,
    inv_freq: Vec<f32>,
    step: wgpu::Buffer,
    rope: wgpu::Buffer,
    x: wgpu::Buffer,
    _xn: wgpu::Buffer,
    qkv: wgpu::Buffer,
    attn: wgpu::Buffer,
    _gu: wgpu::Buffer,
    _act: wgpu::Buffer,
    _normed_last: wgpu::Buffer,
    logits: wgpu::Buffer,
    token: wgpu::Buffer,
    capture: wgpu::Buffer,
    _embed: Arc<GpuMatrix>,
    lm_head: Arc<GpuMatrix>,
    layers: Vec<Layer>,
    _final_norm: wgpu::Buffer,
    final_norm_bind: wgpu::BindGroup,
    final_capture_bind: wgpu::BindGroup,
    lm_head_ops: Vec<LinearOp>,
    /// A batched step's final norm and lm_head: every row (one a sequence) into `[n, H]` and
    /// `[n, V]`.
    final_norm_rows_bind: wgpu::BindGroup,
    lm_head_rows_ops: Vec<LinearOp>,
    argmax_bind: wgpu::BindGroup,
    _params: Vec<wgpu::Buffer>,
    _dummy: wgpu::Buffer,
    /// A forward is running: the scratch buffers are shared by every sequence (KV caches are
    /// not), so sequences take turns — one forward at a time, awaited to the end.
    in_flight: std::sync::atomic::AtomicBool,
    /// Token embedding from `ids` into `x` (the table in its own storage; shared with a tied
    /// lm_head).
    embed_op: EmbedOp,
    ids: wgpu::Buffer,
}

/// Marks a forward (or an image encode) as running on shared scratch buffers; clears the flag
/// however it ends (error, early return, dropped future).
pub(super) struct InFlight<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> InFlight<'a> {
    /// Take `flag`, or fail with `busy` when another call holds it.
    pub(super) fn enter(flag: &'a std::sync::atomic::AtomicBool, busy: &str) -> Result<Self> {
        if flag.swap(true, std::sync::atomic::Ordering::Acquire) {
            bail!("{busy}: await it first");
        }
        Ok(Self(flag))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

fn next_id() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl GpuDecoder {
    /// Upload `model`'s weights in f32. Errors (never panics or hangs) when the adapter cannot
    /// hold them.
    pub async fn new(ctx: Arc<GpuContext>, model: &TextModel) -> Result<Self> {
        Self::new_with(ctx, model, GpuWeights::F32).await
    }

    /// [`Self::new`] with the matrices stored as `weights`.
    pub async fn new_with(ctx: Arc<GpuContext>, model: &TextModel, weights: GpuWeights) -> Result<Self> {
        // Validation: the kernels of the weights' storages compile here, on first use.
        ctx.clone().scoped_build("the decoder weights", || Self::build(ctx, model, weights)).await
    }

    /// How the matrices are stored: the storages of the layer matrices and the lm_head, largest
    /// share first (`"q4_0+q4k"` for a Q4 model whose MLP down projection is Q4_K).
    pub fn weights_name(&self) -> String {
        let mut bytes: Vec<(WeightStorage, u64)> = Vec::new();
        let all = self.layers.iter().flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down]).chain([&*self.lm_head]);
        for m in all {
            match bytes.iter_mut().find(|(s, _)| *s == m.storage) {
                Some((_, b)) => *b += m.bytes(),
                None => bytes.push((m.storage, m.bytes())),
            }
        }
        bytes.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
        bytes.iter().map(|(s, _)| s.name()).collect::<Vec<_>>().join("+")
    }

    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Rows per submission during prefill.
    pub fn chunk_rows(&self) -> usize {
        self.chunk_rows
    }

    /// Bytes of weights one decode step reads: every layer matrix, the norms and lm_head.
    pub fn weight_bytes_per_token(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes() + 2 * self.h as u64 * 4)
            .sum();
        layers + self.lm_head.bytes() + self.h as u64 * 4
    }

    fn rope_table(&self, start: usize, t: usize) -> Vec<f32> {
        let half = self.inv_freq.len();
        let mut table = vec![0f32; 2 * self.chunk_rows * half];
        for i in 0..t {
            let pos = start + i;
            for (j, &f) in self.inv_freq.iter().enumerate() {
                let angle = pos as f32 * f;
                table[i * half + j] = angle.cos();
                table[self.chunk_rows * half + i * half + j] = angle.sin();
            }
        }
        table.truncate(self.chunk_rows * half + t * half);
        table
    }

    /// Token embeddings of `ids`, `[t·H]` row-major (what [`GpuInput::Tokens`] feeds the
    /// blocks), read back: the prompt's rows, embedded from the GPU's copy of the table (a
    /// GPU-resident model has no other).
    pub async fn embed_tokens(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.ctx.check_health()?;
        let _in_flight = InFlight::enter(&self.in_flight, "another forward is running on this GPU decoder")?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            bail!("token id {bad} is outside the vocabulary ({})", self.vocab);
        }
        let mut rows = Vec::with_capacity(ids.len() * self.h);
        for chunk in ids.chunks(self.chunk_rows) {
            let q = &self.ctx.queue;
            let n = chunk.len();
            q.write_buffer(&self.step, 0, bytemuck::cast_slice(&Step::new(0, n, n).padded_words()));
            q.write_buffer(&self.ids, 0, bytemuck::cast_slice(chunk));
            let mut enc =
                self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("embed tokens") });
            self.embed_op.record(&self.ctx, &mut enc.begin_compute_pass(&Default::default()), n);
            let bytes = self.ctx.submit_and_read(enc, &self.x, (n * self.h * 4) as u64).await?;
            rows.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        Ok(rows)
    }

    /// Run the decoder over new rows at positions `cache.len() ..`, appending to the cache (its
    /// first sequence).
    pub async fn forward(
        &self,
        input: GpuInput<'_>,
        cache: &mut GpuCache,
        opts: &GpuForwardOptions<'_>,
    ) -> Result<GpuOutput> {
        self.forward_sequence(0, input, cache, opts).await
    }

    /// Checks that `cache` and `steerings` were made by this decoder, for sequences of the cache.
    fn check_owned(&self, cache: &GpuCache, steerings: &[&GpuSteering]) -> Result<()> {
        if cache.owner != self.id {
            bail!("this KV cache belongs to another GPU decoder");
        }
        for s in steerings {
            if s.owner != self.id {
                bail!("these steering deltas were prepared for another GPU decoder");
            }
            if s.seq >= cache.sequences() {
                bail!("steering for sequence {} of a cache of {} sequences", s.seq, cache.sequences());
            }
        }
        Ok(())
    }

    /// Grow `cache` to hold `needed` positions a sequence.
    fn reserve(&self, cache: &mut GpuCache, needed: usize) -> Result<()> {
        if needed > cache.cap {
            let new_cap = needed.max(cache.cap * 2).max(16);
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.allocate_cache(cache, new_cap, Some(&mut enc))?;
            self.ctx.submit(enc);
        }
        Ok(())
    }

    /// [`Self::forward`] for the cache's sequence `seq` (its steering, if any, prepared for it).
    pub async fn forward_sequence(
        &self,
        seq: usize,
        input: GpuInput<'_>,
        cache: &mut GpuCache,
        opts: &GpuForwardOptions<'_>,
    ) -> Result<GpuOutput> {
        self.ctx.check_health()?;
        let _in_flight = InFlight::enter(&self.in_flight, "another forward is running on this GPU decoder")?;
        let steerings: Vec<&GpuSteering> = opts.steering.into_iter().collect();
        self.check_owned(cache, &steerings)?;
        if seq >= cache.sequences() {
            bail!("sequence {seq} of a KV cache of {} sequences", cache.sequences());
        }
        if let Some(s) = steerings.iter().find(|s| s.seq != seq) {
            bail!("steering prepared for sequence {} used on sequence {seq}", s.seq);
        }
        let t = match input {
            GpuInput::Embeds(e) => {
                if e.len() % self.h != 0 || e.is_empty() {
                    bail!("embeddings of {} values are not a whole number of {}-wide rows", e.len(), self.h);
                }
                e.len() / self.h
            }
            GpuInput::Tokens(ids) => {
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
                    bail!("token id {bad} is outside the vocabulary ({})", self.vocab);
                }
                ids.len()
            }
        };
        if t == 0 {
            bail!("a forward pass needs at least one position");
        }
        self.reserve(cache, cache.lens[seq] + t)?;
        let n_chunks = t.div_ceil(self.chunk_rows);
        for c in 0..n_chunks {
            let r0 = c * self.chunk_rows;
            let rows = self.chunk_rows.min(t - r0);
            let start = cache.lens[seq];
            let last = c + 1 == n_chunks;
            let q = &self.ctx.queue;
            q.write_buffer(
                &self.step,
                0,
                bytemuck::cast_slice(&Step::of_sequence(seq, start, rows, opts.prompt_len).padded_words()),
            );
            q.write_buffer(&self.rope, 0, bytemuck::cast_slice(&self.rope_table(start, rows)));
            let mut enc =
                self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("decoder step") });
            match input {
                GpuInput::Embeds(e) => {
                    q.write_buffer(&self.x, 0, bytemuck::cast_slice(&e[r0 * self.h..(r0 + rows) * self.h]))
                }
                GpuInput::Tokens(ids) => {
                    q.write_buffer(&self.ids, 0, bytemuck::cast_slice(&ids[r0..r0 + rows]));
                    self.embed_op.record(&self.ctx, &mut enc.begin_compute_pass(&Default::default()), rows);
                }
            }
            let tail = if last {
                Tail::LastRow { capture: opts.capture_layers, readback: opts.readback }
            } else {
                Tail::Nothing
            };
            self.record(&mut enc, cache, (1, rows), &steerings, tail);
            cache.lens[seq] += rows;
            if !last {
                self.ctx.submit(enc);
                continue;
            }
            let capture_bytes = ((self.layers.len() + 1) * self.h * 4) as u64;
            let mut srcs: Vec<(&wgpu::Buffer, u64)> = Vec::new();
            match opts.readback {
                Readback::Logits => srcs.push((&self.logits, (self.vocab * 4) as u64)),
                Readback::Argmax => srcs.push((&self.token, 4)),
                Readback::Nothing => {}
            }
            if opts.capture_layers {
                srcs.push((&self.capture, capture_bytes));
            }
            if srcs.is_empty() {
                self.ctx.submit(enc);
                self.ctx.check_health()?;
                return Ok(GpuOutput::default());
            }
            let parts = self.ctx.submit_and_read_many(enc, &srcs).await.context("GPU decoder step")?;
            let mut parts = parts.into_iter();
            let mut out = GpuOutput::default();
            match opts.readback {
                Readback::Logits => out.logits = Some(bytemuck::cast_slice(&parts.next().unwrap_or_default()).to_vec()),
                Readback::Argmax => {
                    let b = parts.next().unwrap_or_default();
                    out.token = Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
                Readback::Nothing => {}
            }
            if opts.capture_layers {
                let all: Vec<f32> = bytemuck::cast_slice(&parts.next().unwrap_or_default()).to_vec();
                let mut rows: Vec<Vec<f32>> = all.chunks(self.h).map(<[f32]>::to_vec).collect();
                out.final_norm = rows.pop();
                out.layer_outputs = Some(rows);
            }
            return Ok(out);
        }
        unreachable!("at least one chunk")
    }

    /// One decode step for the cache's sequences `seq0 .. seq0 + ids.len()`, all of the same
    /// length: `ids[s]` appended to sequence `seq0 + s`, one row each, as one batch (every
    /// weight read once for all of them; at most [`GEMV_ROWS`] sequences). `steerings`: each
    /// prepared for its sequence ([`Self::prepare_steering_for`]). One output a sequence (its
    /// logits or its argmax).
    pub async fn forward_batch(
        &self,
        ids: &[u32],
        cache: &mut GpuCache,
        seq0: usize,
        steerings: &[&GpuSteering],
        prompt_len: usize,
        readback: Readback,
    ) -> Result<Vec<GpuOutput>> {
        self.ctx.check_health()?;
        let _in_flight = InFlight::enter(&self.in_flight, "another forward is running on this GPU decoder")?;
        self.check_owned(cache, steerings)?;
        let n = ids.len();
        if n == 0 || n > GEMV_ROWS.min(self.chunk_rows) || seq0 + n > cache.sequences() {
            bail!(
                "a batched step takes 1 to {} of the cache's {} sequences (got {seq0} + {n})",
                GEMV_ROWS.min(self.chunk_rows),
                cache.sequences()
            );
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            bail!("token id {bad} is outside the vocabulary ({})", self.vocab);
        }
        let start = cache.lens[seq0];
        if cache.lens[seq0..seq0 + n].iter().any(|&len| len != start) {
            bail!("a batched step needs sequences of one length (they hold {:?})", &cache.lens[seq0..seq0 + n]);
        }
        if let Some(s) = steerings.iter().find(|s| s.seq < seq0 || s.seq >= seq0 + n) {
            bail!("steering for sequence {} in a step of sequences {seq0}..{}", s.seq, seq0 + n);
        }
        self.reserve(cache, start + 1)?;
        let q = &self.ctx.queue;
        q.write_buffer(&self.step, 0, bytemuck::cast_slice(&Step::batch(seq0, n, start, prompt_len).padded_words()));
        q.write_buffer(&self.rope, 0, bytemuck::cast_slice(&self.rope_table(start, 1)));
        q.write_buffer(&self.ids, 0, bytemuck::cast_slice(ids));
        let mut enc =
            self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("batched step") });
        self.embed_op.record(&self.ctx, &mut enc.begin_compute_pass(&Default::default()), n);
        self.record(&mut enc, cache, (n, 1), steerings, Tail::EveryRow(readback));
        for len in &mut cache.lens[seq0..seq0 + n] {
            *len += 1;
        }
        let (src, width) = match readback {
            Readback::Logits => (&self.logits, self.vocab),
            Readback::Argmax => (&self.token, 1),
            Readback::Nothing => {
                self.ctx.submit(enc);
                self.ctx.check_health()?;
                return Ok(vec![GpuOutput::default(); n]);
            }
        };
        let bytes = self.ctx.submit_and_read(enc, src, (n * width * 4) as u64).await.context("GPU batched step")?;
        let values: &[u32] = bytemuck::cast_slice(&bytes);
        Ok(values
            .chunks(width)
            .map(|row| match readback {
                Readback::Argmax => GpuOutput { token: Some(row[0]), ..Default::default() },
                _ => GpuOutput { logits: Some(bytemuck::cast_slice(row).to_vec()), ..Default::default() },
            })
            .collect())
    }

    /// Record the blocks over the step's rows — `layout`: (sequences, rows a sequence) — each
    /// steering added to its sequence's rows, then `tail`.
    fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        cache: &GpuCache,
        layout: (usize, usize),
        steerings: &[&GpuSteering],
        tail: Tail,
    ) {
        let k = &self.ctx.kernels;
        let ctx = &*self.ctx;
        let half = self.d / 2;
        let heads = self.nh + 2 * self.kvh;
        let (seqs, seq_rows) = layout;
        let t = seqs * seq_rows;
        let capture = matches!(tail, Tail::LastRow { capture: true, .. });
        let mut pass =
            enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("decoder"), timestamp_writes: None });
        let row_groups = grid(t as u32);
        let elems = |n: usize| grid(n.div_ceil(64) as u32);
        for (l, layer) in self.layers.iter().enumerate() {
            dispatch(&mut pass, &k.rmsnorm, &layer.norm1_bind, row_groups);
            layer.qkv_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            dispatch(&mut pass, &k.rope_kv, &cache.rope_binds[l], elems(t * heads * half));
            let attention_groups = crate::gpu::ops::attention_groups(seqs, seq_rows, self.nh);
            dispatch(&mut pass, &k.attention, &cache.attn_binds[l], attention_groups);
            layer.o_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            dispatch(&mut pass, &k.rmsnorm, &layer.norm2_bind, row_groups);
            layer.gate_up_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            dispatch(&mut pass, &k.act_mul, &layer.act_bind, elems(t * self.mi));
            layer.down_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            for steering in steerings {
                if let Some((_, bind)) = steering.layers.get(&l) {
                    dispatch(&mut pass, &k.steer, bind, elems(t * self.h));
                }
            }
            if capture {
                dispatch(&mut pass, &k.copy_rows, &layer.capture_bind, elems(self.h));
            }
        }
        match tail {
            Tail::Nothing => {}
            Tail::LastRow { capture, readback } => {
                dispatch(&mut pass, &k.rmsnorm, &self.final_norm_bind, (1, 1));
                if capture {
                    dispatch(&mut pass, &k.copy_rows, &self.final_capture_bind, elems(self.h));
                }
                if readback != Readback::Nothing {
                    self.lm_head_ops.iter().for_each(|op| op.record(ctx, &mut pass, 1));
                }
                if readback == Readback::Argmax {
                    dispatch(&mut pass, &k.argmax, &self.argmax_bind, (1, 1));
                }
            }
            Tail::EveryRow(readback) => {
                if readback != Readback::Nothing {
                    dispatch(&mut pass, &k.rmsnorm, &self.final_norm_rows_bind, row_groups);
                    self.lm_head_rows_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
                }
                if readback == Readback::Argmax {
                    dispatch(&mut pass, &k.argmax, &self.argmax_bind, (t as u32, 1));
                }
            }
        }
    }

    /// [`TextModel::forward`]'s contract: `embeds` `[1, t, H]`, the same options, a
    /// [`DecoderOutput`] with tensors on the CPU. Steering deltas are uploaded for this call.
    pub async fn forward_like_cpu(
        &self,
        embeds: &Tensor,
        cache: &mut GpuCache,
        opts: ForwardOptions<'_>,
    ) -> Result<DecoderOutput> {
        let steering = opts.steering.map(|s| self.prepare_steering(s)).transpose()?;
        let data = f32s(embeds)?;
        let gopts = GpuForwardOptions {
            steering: steering.as_ref(),
            prompt_len: opts.prompt_len,
            capture_layers: opts.capture_layers,
            readback: if opts.logits { Readback::Logits } else { Readback::Nothing },
        };
        self.forward(GpuInput::Embeds(&data), cache, &gopts).await?.into_decoder_output()
    }

    /// Blocking [`Self::new`] (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking(ctx: Arc<GpuContext>, model: &TextModel) -> Result<Self> {
        pollster::block_on(Self::new(ctx, model))
    }

    /// Blocking [`Self::forward`] (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_blocking(
        &self,
        input: GpuInput<'_>,
        cache: &mut GpuCache,
        opts: &GpuForwardOptions<'_>,
    ) -> Result<GpuOutput> {
        pollster::block_on(self.forward(input, cache, opts))
    }

    /// Blocking [`Self::forward_like_cpu`] (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_like_cpu_blocking(
        &self,
        embeds: &Tensor,
        cache: &mut GpuCache,
        opts: ForwardOptions<'_>,
    ) -> Result<DecoderOutput> {
        pollster::block_on(self.forward_like_cpu(embeds, cache, opts))
    }
}
