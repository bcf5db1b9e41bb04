//! [`GpuDecoder`]: the Llama / Qwen2 decoder of [`TextModel`] on the wgpu kernels.
//!
//! Weights are uploaded once. A step (prefill chunk or one decode token) is one command buffer:
//! per layer RMSNorm → fused QKV matmul → RoPE + KV-cache write → causal GQA attention →
//! o_proj (+ residual) → RMSNorm → fused gate/up matmul → SiLU·up → down_proj (+ residual) →
//! steering add; then the final norm of the last row, lm_head and (optionally) argmax. Only the
//! logits, or the token, come back (plus the per-layer last-row states when asked).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::buffers::{bind_embed_rows, bind_linear, scratch, uniform, upload, EmbedOp, GpuMatrix, LinearOp};
use super::context::GpuContext;
use super::kernels::{dispatch, grid};
use super::ops::{activation_code, attention_params, step_values, AttnShape, KvLayout};
use super::storage::WeightStorage;
use crate::config::TextConfig;
use crate::quant::MatrixRef;
use crate::steering::{Intervention, Positions};
use crate::text::{DecoderOutput, ForwardOptions, LinearRef, TextModel};

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

/// Per-sequence KV cache on the GPU (`[kv_heads, capacity, head_dim]` per layer and K / V).
pub struct GpuCache {
    len: usize,
    cap: usize,
    k: Vec<wgpu::Buffer>,
    v: Vec<wgpu::Buffer>,
    rope_binds: Vec<wgpu::BindGroup>,
    attn_binds: Vec<wgpu::BindGroup>,
    _params: Vec<wgpu::Buffer>,
    owner: usize,
}

impl GpuCache {
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

/// An [`Intervention`]'s deltas uploaded once, bound to one decoder's residual stream.
pub struct GpuSteering {
    layers: BTreeMap<usize, (wgpu::Buffer, wgpu::BindGroup)>,
    _params: wgpu::Buffer,
    owner: usize,
}

/// How the decoder's matrices are stored on the GPU. `Auto`: matrices the model holds quantized
/// keep their GGML blocks (Q8_0 / Q4_0 / Q4_K kernels dequantize on the fly: the model's own
/// memory and bytes read per token); dense ones are f16 on a hardware GPU (where decode is bound
/// by memory bandwidth), f32 on a software rasterizer (where unpacking costs more than it
/// saves). `F32` / `F16`: every matrix in that storage (blocks dequantized at upload). The
/// kernels compute in f32 whatever the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuWeights {
    #[default]
    Auto,
    F32,
    F16,
}

impl std::str::FromStr for GpuWeights {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => bail!("GPU weights must be auto, f32 or f16 (got '{other}')"),
        }
    }
}

impl GpuWeights {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }

    /// The storage of dense matrices on `adapter`.
    pub fn dense_storage(self, adapter: &wgpu::AdapterInfo) -> WeightStorage {
        match self {
            Self::Auto if adapter.device_type == wgpu::DeviceType::Cpu => WeightStorage::F32,
            Self::Auto | Self::F16 => WeightStorage::F16,
            Self::F32 => WeightStorage::F32,
        }
    }

    /// Quantized matrices keep their blocks.
    pub fn keeps_blocks(self) -> bool {
        self == Self::Auto
    }
}

/// How [`GpuDecoder`] uploads one matrix: dense ones in `dense`, blocks as they are when
/// `keep_blocks` (else dequantized into `dense`).
#[derive(Clone, Copy)]
pub(super) struct Upload<'a> {
    pub ctx: &'a GpuContext,
    pub dense: WeightStorage,
    pub keep_blocks: bool,
}

impl Upload<'_> {
    /// The rows of `parts` stacked (fused QKV, gate/up) as one `[Σ rows, k]` matrix with the
    /// biases stacked (zeros for a part without one).
    pub(super) fn stacked(&self, label: &str, parts: &[LinearRef], k: usize) -> Result<GpuMatrix> {
        let mut rows = 0;
        let any_bias = parts.iter().any(|(_, b)| b.is_some());
        let mut bias = Vec::new();
        for (matrix, b) in parts {
            let n = matrix.rows()?;
            rows += n;
            match b {
                Some(b) => bias.extend(f32s(b)?),
                None => bias.extend(std::iter::repeat_n(0f32, n)),
            }
        }
        let bias = any_bias.then_some(bias.as_slice());
        // Blocks of one type stack row-wise as bytes; anything else goes dense.
        let block_storage = |m: &MatrixRef| match m {
            MatrixRef::Blocks { blocks, in_dim } if *in_dim == k => WeightStorage::from_ggml(blocks.dtype()),
            _ => None,
        };
        let first = block_storage(&parts[0].0);
        let keep_blocks = self.keep_blocks && first.is_some() && parts.iter().all(|(m, _)| block_storage(m) == first);
        let storage = if keep_blocks { first.unwrap_or(self.dense) } else { self.dense };
        enum Part<'a> {
            /// GGML blocks, rows of `cols` values (padded).
            Blocks {
                data: std::borrow::Cow<'a, [u8]>,
                dtype: candle_core::quantized::GgmlDType,
                cols: usize,
            },
            Dense(Tensor),
        }
        let mut sources = Vec::with_capacity(parts.len());
        for (m, _) in parts {
            sources.push(match m {
                MatrixRef::Blocks { blocks, .. } => {
                    let (_, cols) = blocks.shape().dims2()?;
                    (Part::Blocks { data: blocks.data()?, dtype: blocks.dtype(), cols }, m.rows()?)
                }
                // (dense copies of quantized layers may carry zero padding columns)
                MatrixRef::Dense(t) if t.dim(1)? >= k => (Part::Dense(t.narrow(1, 0, k)?), m.rows()?),
                MatrixRef::Dense(t) => bail!("{label}: a {:?} matrix where {k} inputs are needed", t.dims()),
            });
        }
        // Rows r0 .. r0 + n of the stack, in `storage`'s layout (blocks dequantized a piece at a
        // time when the storage is dense: never a whole F32 copy of, say, the embedding table).
        let piece = |r0: usize, n: usize| -> Result<Vec<u32>> {
            let (mut bytes, mut values) = (Vec::new(), Vec::new());
            let mut start = 0;
            for (part, part_rows) in &sources {
                let (a, b) = (r0.max(start), (r0 + n).min(start + part_rows));
                if a < b {
                    match part {
                        Part::Blocks { data, dtype, cols } => {
                            let row = data.len() / part_rows;
                            let rows = &data[(a - start) * row..(b - start) * row];
                            if keep_blocks {
                                bytes.extend_from_slice(rows);
                            } else {
                                let cpu = &Device::Cpu;
                                let q = crate::quant::qtensor_from_bytes(*dtype, rows, vec![b - a, *cols], cpu)?;
                                values.extend(f32s(&q.dequantize(cpu)?.narrow(1, 0, k)?)?);
                            }
                        }
                        Part::Dense(t) => values.extend(f32s(&t.narrow(0, a - start, b - a)?)?),
                    }
                }
                start += part_rows;
            }
            if keep_blocks {
                storage.pack_blocks(&bytes, n, k)
            } else {
                storage.pack_dense(&values)
            }
        };
        GpuMatrix::from_pieces(self.ctx, label, (rows, k), bias, storage, usize::MAX, piece)
    }

    pub(super) fn one(&self, label: &str, (matrix, bias): LinearRef, k: usize) -> Result<GpuMatrix> {
        self.stacked(label, &[(matrix, bias)], k)
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

    fn build(ctx: Arc<GpuContext>, model: &TextModel, weights: GpuWeights) -> Result<Self> {
        let upload_as =
            Upload { ctx: &ctx, dense: weights.dense_storage(&ctx.adapter_info), keep_blocks: weights.keeps_blocks() };
        let cfg = model.config().clone();
        let w = model.weights();
        let (h, nh, kvh, d, mi, vocab) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        if d > 256 || d % 2 != 0 {
            bail!("head_dim {d} is not supported by the GPU attention kernel (even, ≤ 256)");
        }
        if nh % kvh != 0 {
            bail!("{nh} attention heads are not a multiple of {kvh} KV heads");
        }
        let act_code = activation_code(cfg.hidden_act);
        let width = (nh + 2 * kvh) * d;
        let widest = [h, width, nh * d, 2 * mi].into_iter().max().unwrap_or(h) as u64 * 4;
        let chunk_rows = ((ctx.max_binding() / widest) as usize).clamp(1, MAX_CHUNK_ROWS);
        let half = d / 2;

        let step = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("step"),
            size: 16,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let rope = scratch(&ctx, "rope", 2 * chunk_rows * half)?;
        let x = scratch(&ctx, "x", chunk_rows * h)?;
        let xn = scratch(&ctx, "xn", chunk_rows * h)?;
        let qkv = scratch(&ctx, "qkv", chunk_rows * width)?;
        let attn = scratch(&ctx, "attn", chunk_rows * nh * d)?;
        let gu = scratch(&ctx, "gate_up", chunk_rows * 2 * mi)?;
        let act = scratch(&ctx, "act", chunk_rows * mi)?;
        let normed_last = scratch(&ctx, "normed_last", h)?;
        let logits = scratch(&ctx, "logits", vocab)?;
        let token = scratch(&ctx, "token", 1)?;
        let n_layers = w.layers.len();
        let capture = scratch(&ctx, "capture", (n_layers + 1) * h)?;
        let dummy = scratch(&ctx, "dummy", 1)?;

        let ids = scratch(&ctx, "token_ids", chunk_rows)?;
        let embed = Arc::new(upload_as.one("embed_tokens", (w.embed_tokens, None), h)?);
        let lm_head = if w.lm_head.same_as(&w.embed_tokens) {
            embed.clone()
        } else {
            Arc::new(upload_as.one("lm_head", (w.lm_head, None), h)?)
        };
        let embed_op = bind_embed_rows(&ctx, &step, &embed, &ids, &x);
        let k = &ctx.kernels;
        let dev = &ctx.device;
        let eps = (cfg.rms_norm_eps as f32).to_bits();
        let p_norm = uniform(&ctx, &[h as u32, eps, 0, 0]);
        let p_norm_last = uniform(&ctx, &[h as u32, eps, 1, 0]);
        let p_act = uniform(&ctx, &[mi as u32, act_code, 0, 0]);
        let mut layers = Vec::with_capacity(n_layers);
        for (l, lw) in w.layers.iter().enumerate() {
            let norm1 = upload(&ctx, "input_layernorm", &f32s(lw.input_norm)?)?;
            let norm2 = upload(&ctx, "post_attention_layernorm", &f32s(lw.post_attention_norm)?)?;
            let qkv_m = upload_as.stacked("qkv_proj", &[lw.q_proj, lw.k_proj, lw.v_proj], h)?;
            let o_m = upload_as.one("o_proj", lw.o_proj, nh * d)?;
            let gu_m = upload_as.stacked("gate_up_proj", &[lw.gate_proj, lw.up_proj], h)?;
            let down_m = upload_as.one("down_proj", lw.down_proj, mi)?;
            let p_capture = uniform(&ctx, &[h as u32, (l * h) as u32, 0, 0]);
            layers.push(Layer {
                norm1_bind: k.rmsnorm.bind(dev, &[&step, &p_norm, &x, &norm1, &xn]),
                qkv_ops: bind_linear(&ctx, &step, &qkv_m, &xn, 0, 0, &qkv, width, 0, false, &dummy),
                o_ops: bind_linear(&ctx, &step, &o_m, &attn, 0, 0, &x, h, 0, true, &dummy),
                norm2_bind: k.rmsnorm.bind(dev, &[&step, &p_norm, &x, &norm2, &xn]),
                gate_up_ops: bind_linear(&ctx, &step, &gu_m, &xn, 0, 0, &gu, 2 * mi, 0, false, &dummy),
                act_bind: k.act_mul.bind(dev, &[&step, &p_act, &gu, &act]),
                down_ops: bind_linear(&ctx, &step, &down_m, &act, 0, 0, &x, h, 0, true, &dummy),
                capture_bind: k.copy_row.bind(dev, &[&step, &p_capture, &x, &capture]),
                _norm1: norm1,
                _norm2: norm2,
                qkv: qkv_m,
                o: o_m,
                gate_up: gu_m,
                down: down_m,
                _params: vec![p_capture],
            });
        }
        let final_norm = upload(&ctx, "norm", &f32s(w.norm)?)?;
        let final_norm_bind = k.rmsnorm.bind(dev, &[&step, &p_norm_last, &x, &final_norm, &normed_last]);
        let p_final_capture = uniform(&ctx, &[h as u32, (n_layers * h) as u32, 1, 0]);
        let final_capture_bind = k.copy_row.bind(dev, &[&step, &p_final_capture, &normed_last, &capture]);
        let lm_head_ops = bind_linear(&ctx, &step, &lm_head, &normed_last, 0, 1, &logits, vocab, 0, false, &dummy);
        let p_argmax = uniform(&ctx, &[vocab as u32, 0, 0, 0]);
        let argmax_bind = k.argmax.bind(dev, &[&p_argmax, &logits, &token]);

        Ok(Self {
            id: next_id(),
            h,
            nh,
            kvh,
            d,
            mi,
            vocab,
            chunk_rows,
            inv_freq: w.rope_inv_freq.to_vec(),
            step,
            rope,
            x,
            _xn: xn,
            qkv,
            attn,
            _gu: gu,
            _act: act,
            _normed_last: normed_last,
            logits,
            token,
            capture,
            _embed: embed,
            lm_head,
            layers,
            _final_norm: final_norm,
            final_norm_bind,
            final_capture_bind,
            lm_head_ops,
            argmax_bind,
            _params: vec![p_norm, p_norm_last, p_act, p_final_capture, p_argmax],
            _dummy: dummy,
            in_flight: std::sync::atomic::AtomicBool::new(false),
            embed_op,
            ids,
            cfg,
            ctx,
        })
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

    /// A KV cache for `capacity` positions (it grows when exceeded).
    pub fn new_cache(&self, capacity: usize) -> Result<GpuCache> {
        let mut cache = GpuCache {
            len: 0,
            cap: 0,
            k: vec![],
            v: vec![],
            rope_binds: vec![],
            attn_binds: vec![],
            _params: vec![],
            owner: self.id,
        };
        self.allocate_cache(&mut cache, capacity.max(1), None)?;
        Ok(cache)
    }

    fn allocate_cache(
        &self,
        cache: &mut GpuCache,
        cap: usize,
        encoder: Option<&mut wgpu::CommandEncoder>,
    ) -> Result<()> {
        let per_layer = (self.kvh * cap * self.d) as u64 * 4;
        if per_layer > self.ctx.max_binding() {
            bail!(
                "a KV cache of {cap} positions needs {per_layer} bytes per layer, over this adapter's largest storage binding ({} bytes)",
                self.ctx.max_binding()
            );
        }
        let k: Vec<wgpu::Buffer> = (0..self.layers.len())
            .map(|_| scratch(&self.ctx, "k_cache", self.kvh * cap * self.d))
            .collect::<Result<_>>()?;
        let v: Vec<wgpu::Buffer> = (0..self.layers.len())
            .map(|_| scratch(&self.ctx, "v_cache", self.kvh * cap * self.d))
            .collect::<Result<_>>()?;
        if let Some(enc) = encoder {
            let row = (self.d * 4) as u64;
            for (old, new) in cache.k.iter().zip(&k).chain(cache.v.iter().zip(&v)) {
                for head in 0..self.kvh {
                    let src = (head * cache.cap) as u64 * row;
                    let dst = (head * cap) as u64 * row;
                    enc.copy_buffer_to_buffer(old, src, new, dst, cache.len as u64 * row);
                }
            }
        }
        let shape = AttnShape { nh: self.nh, kvh: self.kvh, d: self.d };
        let p_rope = uniform(
            &self.ctx,
            &[self.nh as u32, self.kvh as u32, self.d as u32, cap as u32, self.chunk_rows as u32, 0, 0, 0],
        );
        // One attention uniform per layer: layers differ in their sliding window (0 = none).
        let p_att: Vec<_> = self
            .config()
            .sliding_windows
            .iter()
            .map(|window| {
                let window = window.map_or(0, |w| w.min(u32::MAX as usize) as u32);
                uniform(&self.ctx, &attention_params(shape, window, None, KvLayout::cache(cap, self.d)))
            })
            .collect();
        let kern = &self.ctx.kernels;
        let dev = &self.ctx.device;
        cache.rope_binds = (0..self.layers.len())
            .map(|l| kern.rope_kv.bind(dev, &[&self.step, &p_rope, &self.qkv, &self.rope, &k[l], &v[l]]))
            .collect();
        cache.attn_binds = (0..self.layers.len())
            .map(|l| kern.attention.bind(dev, &[&self.step, &p_att[l], &self.qkv, &k[l], &v[l], &self.attn]))
            .collect();
        cache.k = k;
        cache.v = v;
        cache.cap = cap;
        cache._params = std::iter::once(p_rope).chain(p_att).collect();
        Ok(())
    }

    /// Upload an intervention's deltas (once per generation, not per step).
    pub fn prepare_steering(&self, steering: &Intervention) -> Result<GpuSteering> {
        let mode = super::ops::steer_mode(steering.positions);
        // `apply` on a zero row that the positions rule selects gives exactly `delta_l`.
        let prompt_len = if steering.positions == Positions::Last { 1 } else { 0 };
        let zeros = Tensor::zeros((1, 1, self.h), DType::F32, &Device::Cpu)?;
        let params = uniform(&self.ctx, &[self.h as u32, mode, 0, 0]);
        let mut layers = BTreeMap::new();
        for l in steering.layers() {
            if l >= self.layers.len() {
                bail!("steering names layer {l}, the model has {} layers", self.layers.len());
            }
            let delta = f32s(&steering.apply(l, &zeros, 0, prompt_len)?)?;
            let buf = upload(&self.ctx, "steering", &delta)?;
            let bind = self.ctx.kernels.steer.bind(&self.ctx.device, &[&self.step, &params, &self.x, &buf]);
            layers.insert(l, (buf, bind));
        }
        Ok(GpuSteering { layers, _params: params, owner: self.id })
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

    /// Run the decoder over new rows at positions `cache.len() ..`, appending to the cache.
    pub async fn forward(
        &self,
        input: GpuInput<'_>,
        cache: &mut GpuCache,
        opts: &GpuForwardOptions<'_>,
    ) -> Result<GpuOutput> {
        self.ctx.check_health()?;
        let _in_flight = InFlight::enter(&self.in_flight, "another forward is running on this GPU decoder")?;
        if cache.owner != self.id {
            bail!("this KV cache belongs to another GPU decoder");
        }
        if let Some(s) = opts.steering {
            if s.owner != self.id {
                bail!("these steering deltas were prepared for another GPU decoder");
            }
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
        let needed = cache.len + t;
        if needed > cache.cap {
            let new_cap = needed.max(cache.cap * 2).max(16);
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.allocate_cache(cache, new_cap, Some(&mut enc))?;
            self.ctx.submit(enc);
        }
        let n_chunks = t.div_ceil(self.chunk_rows);
        for c in 0..n_chunks {
            let r0 = c * self.chunk_rows;
            let rows = self.chunk_rows.min(t - r0);
            let start = cache.len;
            let last = c + 1 == n_chunks;
            let q = &self.ctx.queue;
            q.write_buffer(&self.step, 0, bytemuck::cast_slice(&step_values(start, rows, opts.prompt_len)));
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
            self.record(&mut enc, cache, rows, last, opts);
            cache.len += rows;
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

    fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        cache: &GpuCache,
        t: usize,
        last: bool,
        opts: &GpuForwardOptions<'_>,
    ) {
        let k = &self.ctx.kernels;
        let ctx = &*self.ctx;
        let half = self.d / 2;
        let heads = self.nh + 2 * self.kvh;
        let mut pass =
            enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("decoder"), timestamp_writes: None });
        let row_groups = grid(t as u32);
        let elems = |n: usize| grid(n.div_ceil(64) as u32);
        for (l, layer) in self.layers.iter().enumerate() {
            dispatch(&mut pass, &k.rmsnorm, &layer.norm1_bind, row_groups);
            layer.qkv_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            dispatch(&mut pass, &k.rope_kv, &cache.rope_binds[l], elems(t * heads * half));
            dispatch(&mut pass, &k.attention, &cache.attn_binds[l], grid((t * self.nh) as u32));
            layer.o_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            dispatch(&mut pass, &k.rmsnorm, &layer.norm2_bind, row_groups);
            layer.gate_up_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            dispatch(&mut pass, &k.act_mul, &layer.act_bind, elems(t * self.mi));
            layer.down_ops.iter().for_each(|op| op.record(ctx, &mut pass, t));
            if let Some((_, bind)) = opts.steering.and_then(|s| s.layers.get(&l)) {
                dispatch(&mut pass, &k.steer, bind, elems(t * self.h));
            }
            if last && opts.capture_layers {
                dispatch(&mut pass, &k.copy_row, &layer.capture_bind, elems(self.h));
            }
        }
        if last {
            dispatch(&mut pass, &k.rmsnorm, &self.final_norm_bind, (1, 1));
            if opts.capture_layers {
                dispatch(&mut pass, &k.copy_row, &self.final_capture_bind, elems(self.h));
            }
            if opts.readback != Readback::Nothing {
                self.lm_head_ops.iter().for_each(|op| op.record(ctx, &mut pass, 1));
            }
            if opts.readback == Readback::Argmax {
                dispatch(&mut pass, &k.argmax, &self.argmax_bind, (1, 1));
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
