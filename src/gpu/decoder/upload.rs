//! The decoder's weights on the GPU: how matrices are stored ([`GpuWeights`]), how one is
//! uploaded ([`Upload`]: fused QKV / gate-up, blocks kept or dequantized) and the build of a
//! [`GpuDecoder`] with its scratch buffers and bindings, whole or a block at a time
//! ([`GpuDecoderBuilder`]).

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use super::{f32s, next_id, GpuDecoder, Layer, MAX_CHUNK_ROWS};
use crate::config::TextConfig;
use crate::gpu::buffers::{bind_embed_rows, bind_linear, scratch, uniform, upload, GpuMatrix, LinearIo, GEMV_ROWS};
use crate::gpu::context::GpuContext;
use crate::gpu::ops::activation_code;
use crate::gpu::params::{ActParams, ArgmaxParams, CopyRowsParams, KernelParams, RmsNormParams, Step};
use crate::gpu::storage::WeightStorage;
use crate::quant::MatrixRef;
use crate::text::{EndWeights, LayerWeights, LinearRef, TextModel};

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
pub(in crate::gpu) struct Upload<'a> {
    pub ctx: &'a GpuContext,
    pub dense: WeightStorage,
    pub keep_blocks: bool,
}

impl Upload<'_> {
    /// The rows of `parts` stacked (fused QKV, gate/up) as one `[Σ rows, k]` matrix with the
    /// biases stacked (zeros for a part without one).
    pub(in crate::gpu) fn stacked(&self, label: &str, parts: &[LinearRef], k: usize) -> Result<GpuMatrix> {
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

    pub(in crate::gpu) fn one(&self, label: &str, (matrix, bias): LinearRef, k: usize) -> Result<GpuMatrix> {
        self.stacked(label, &[(matrix, bias)], k)
    }
}

impl GpuDecoder {
    pub(super) fn build(ctx: Arc<GpuContext>, model: &TextModel, weights: GpuWeights) -> Result<Self> {
        let w = model.weights()?;
        let mut builder = GpuDecoderBuilder::new(ctx, model.config(), weights)?;
        for (l, lw) in w.layers.iter().enumerate() {
            builder.push_layer(l, lw)?;
        }
        builder.push_ends(w.ends)?;
        builder.finish(w.rope_inv_freq)
    }
}

/// A [`GpuDecoder`] uploaded a block at a time, in any order: scratch buffers first
/// ([`Self::new`], from the config alone), then each block as its weights arrive
/// ([`Self::push_layer`]; the caller may drop them right after), the embedding table, final
/// norm and lm_head likewise ([`Self::push_embed_tokens`], [`Self::push_norm`],
/// [`Self::push_lm_head`]), then [`Self::finish`]. This is how a GPU-resident load keeps no CPU
/// copy.
pub struct GpuDecoderBuilder {
    ctx: Arc<GpuContext>,
    cfg: TextConfig,
    dense: WeightStorage,
    keep_blocks: bool,
    chunk_rows: usize,
    step: wgpu::Buffer,
    rope: wgpu::Buffer,
    x: wgpu::Buffer,
    xn: wgpu::Buffer,
    qkv: wgpu::Buffer,
    attn: wgpu::Buffer,
    gu: wgpu::Buffer,
    act: wgpu::Buffer,
    capture: wgpu::Buffer,
    dummy: wgpu::Buffer,
    p_norm: wgpu::Buffer,
    p_act: wgpu::Buffer,
    layers: Vec<Option<Layer>>,
    embed: Option<Arc<GpuMatrix>>,
    lm_head: Option<Arc<GpuMatrix>>,
    final_norm: Option<wgpu::Buffer>,
}

impl GpuDecoderBuilder {
    /// Check the shapes the kernels take and allocate the scratch buffers.
    pub fn new(ctx: Arc<GpuContext>, cfg: &TextConfig, weights: GpuWeights) -> Result<Self> {
        let (h, nh, kvh, d, mi) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        if d > 256 || d % 2 != 0 {
            bail!("head_dim {d} is not supported by the GPU attention kernel (even, ≤ 256)");
        }
        if nh % kvh != 0 {
            bail!("{nh} attention heads are not a multiple of {kvh} KV heads");
        }
        let width = (nh + 2 * kvh) * d;
        let widest = [h, width, nh * d, 2 * mi].into_iter().max().unwrap_or(h) as u64 * 4;
        let chunk_rows = ((ctx.max_binding() / widest) as usize).clamp(1, MAX_CHUNK_ROWS);
        let step = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("step"),
            size: (Step::default().padded_words().len() * 4) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let norm = RmsNormParams { h: h as u32, eps: cfg.rms_norm_eps as f32, ..Default::default() };
        Ok(Self {
            dense: weights.dense_storage(&ctx.adapter_info),
            keep_blocks: weights.keeps_blocks(),
            chunk_rows,
            rope: scratch(&ctx, "rope", 2 * chunk_rows * (d / 2))?,
            x: scratch(&ctx, "x", chunk_rows * h)?,
            xn: scratch(&ctx, "xn", chunk_rows * h)?,
            qkv: scratch(&ctx, "qkv", chunk_rows * width)?,
            attn: scratch(&ctx, "attn", chunk_rows * nh * d)?,
            gu: scratch(&ctx, "gate_up", chunk_rows * 2 * mi)?,
            act: scratch(&ctx, "act", chunk_rows * mi)?,
            capture: scratch(&ctx, "capture", (cfg.num_hidden_layers + 1) * h)?,
            dummy: scratch(&ctx, "dummy", 1)?,
            p_norm: uniform(&ctx, &norm),
            p_act: uniform(&ctx, &ActParams { m: mi as u32, act: activation_code(cfg.hidden_act) }),
            layers: (0..cfg.num_hidden_layers).map(|_| None).collect(),
            embed: None,
            lm_head: None,
            final_norm: None,
            step,
            cfg: cfg.clone(),
            ctx,
        })
    }

    fn upload_as(&self) -> Upload<'_> {
        Upload { ctx: &self.ctx, dense: self.dense, keep_blocks: self.keep_blocks }
    }

    /// Upload block `l`.
    pub fn push_layer(&mut self, l: usize, lw: &LayerWeights) -> Result<()> {
        let cfg = &self.cfg;
        let (h, nh, kvh, d, mi) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let width = (nh + 2 * kvh) * d;
        match self.layers.get(l) {
            None => bail!("block {l} of a decoder with {} blocks", self.layers.len()),
            Some(Some(_)) => bail!("block {l} was uploaded twice"),
            Some(None) => {}
        }
        let (ctx, step, dummy) = (&self.ctx, &self.step, &self.dummy);
        let up = self.upload_as();
        let norm1 = upload(ctx, "input_layernorm", &f32s(lw.input_norm)?)?;
        let norm2 = upload(ctx, "post_attention_layernorm", &f32s(lw.post_attention_norm)?)?;
        let qkv_m = up.stacked("qkv_proj", &[lw.q_proj, lw.k_proj, lw.v_proj], h)?;
        let o_m = up.one("o_proj", lw.o_proj, nh * d)?;
        let gu_m = up.stacked("gate_up_proj", &[lw.gate_proj, lw.up_proj], h)?;
        let down_m = up.one("down_proj", lw.down_proj, mi)?;
        let p_capture = uniform(ctx, &CopyRowsParams::one_row(h, l * h, false));
        let (k, dev) = (&ctx.kernels, &ctx.device);
        let layer = Layer {
            norm1_bind: k.rmsnorm.bind(dev, &[step, &self.p_norm, &self.x, &norm1, &self.xn]),
            qkv_ops: bind_linear(ctx, step, &qkv_m, LinearIo::new(&self.xn, &self.qkv, width), dummy),
            o_ops: bind_linear(ctx, step, &o_m, LinearIo::new(&self.attn, &self.x, h).accumulate(), dummy),
            norm2_bind: k.rmsnorm.bind(dev, &[step, &self.p_norm, &self.x, &norm2, &self.xn]),
            gate_up_ops: bind_linear(ctx, step, &gu_m, LinearIo::new(&self.xn, &self.gu, 2 * mi), dummy),
            act_bind: k.act_mul.bind(dev, &[step, &self.p_act, &self.gu, &self.act]),
            down_ops: bind_linear(ctx, step, &down_m, LinearIo::new(&self.act, &self.x, h).accumulate(), dummy),
            capture_bind: k.copy_rows.bind(dev, &[step, &p_capture, &self.x, &self.capture]),
            _norm1: norm1,
            _norm2: norm2,
            qkv: qkv_m,
            o: o_m,
            gate_up: gu_m,
            down: down_m,
            _params: vec![p_capture],
        };
        self.layers[l] = Some(layer);
        Ok(())
    }

    /// Blocks not uploaded yet.
    pub fn missing_layers(&self) -> Vec<usize> {
        (0..self.layers.len()).filter(|&l| self.layers[l].is_none()).collect()
    }

    /// Upload the token embedding table `[V, H]` (also the lm_head of a tied model that has
    /// none of its own: [`crate::text::lm_head_is_tied`]).
    pub fn push_embed_tokens(&mut self, table: MatrixRef) -> Result<()> {
        if self.embed.is_some() {
            bail!("the embedding table was uploaded twice");
        }
        self.embed = Some(Arc::new(self.upload_as().one("embed_tokens", (table, None), self.cfg.hidden_size)?));
        Ok(())
    }

    /// Upload an lm_head `[V, H]` of its own.
    pub fn push_lm_head(&mut self, head: MatrixRef) -> Result<()> {
        if self.lm_head.is_some() {
            bail!("the lm_head was uploaded twice");
        }
        self.lm_head = Some(Arc::new(self.upload_as().one("lm_head", (head, None), self.cfg.hidden_size)?));
        Ok(())
    }

    /// Upload the final norm's weight `[H]`.
    pub fn push_norm(&mut self, norm: &Tensor) -> Result<()> {
        self.final_norm = Some(upload(&self.ctx, "norm", &f32s(norm)?)?);
        Ok(())
    }

    /// The table, norm and head of a CPU model (a tied head shares the table's upload).
    pub fn push_ends(&mut self, ends: EndWeights) -> Result<()> {
        self.push_embed_tokens(ends.embed_tokens)?;
        if !ends.lm_head.same_as(&ends.embed_tokens) {
            self.push_lm_head(ends.lm_head)?;
        }
        self.push_norm(ends.norm)
    }

    pub fn has_embed_tokens(&self) -> bool {
        self.embed.is_some()
    }

    pub fn has_lm_head(&self) -> bool {
        self.lm_head.is_some()
    }

    pub fn has_norm(&self) -> bool {
        self.final_norm.is_some()
    }

    /// The decoder, once every block, the table and the norm are in; the lm_head is the table
    /// when none was pushed and the config ties them. `rope_inv_freq` as the CPU computes it.
    pub fn finish(self, rope_inv_freq: &[f32]) -> Result<GpuDecoder> {
        let missing = self.missing_layers();
        if !missing.is_empty() {
            bail!("decoder blocks {missing:?} never arrived (the weight file lacks them)");
        }
        let Self {
            ctx,
            cfg,
            chunk_rows,
            step,
            rope,
            x,
            xn,
            qkv,
            attn,
            gu,
            act,
            capture,
            dummy,
            p_norm,
            p_act,
            layers,
            embed,
            lm_head,
            final_norm,
            ..
        } = self;
        let Some(embed) = embed else { bail!("the embedding table never arrived") };
        let lm_head = match (lm_head, cfg.tie_word_embeddings) {
            (Some(head), _) => head,
            (None, true) => embed.clone(),
            (None, false) => bail!("lm_head.weight never arrived (the model's embeddings are not tied)"),
        };
        let Some(final_norm) = final_norm else { bail!("the final norm never arrived") };
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let n_layers = cfg.num_hidden_layers;
        // Room for a batched step's rows (one a sequence).
        let normed_last = scratch(&ctx, "normed_last", GEMV_ROWS * h)?;
        let logits = scratch(&ctx, "logits", GEMV_ROWS * vocab)?;
        let token = scratch(&ctx, "token", GEMV_ROWS)?;
        let ids = scratch(&ctx, "token_ids", chunk_rows)?;
        let embed_op = bind_embed_rows(&ctx, &step, &embed, &ids, &x);
        let k = &ctx.kernels;
        let dev = &ctx.device;
        let norm = RmsNormParams { h: h as u32, eps: cfg.rms_norm_eps as f32, ..Default::default() };
        let p_norm_last = uniform(&ctx, &RmsNormParams { last_only: 1, ..norm });
        let p_norm_rows = uniform(&ctx, &norm);
        let final_norm_bind = k.rmsnorm.bind(dev, &[&step, &p_norm_last, &x, &final_norm, &normed_last]);
        let p_final_capture = uniform(&ctx, &CopyRowsParams::one_row(h, n_layers * h, true));
        let final_capture_bind = k.copy_rows.bind(dev, &[&step, &p_final_capture, &normed_last, &capture]);
        let lm_head_ops =
            bind_linear(&ctx, &step, &lm_head, LinearIo::new(&normed_last, &logits, vocab).rows(1), &dummy);
        let final_norm_rows_bind = k.rmsnorm.bind(dev, &[&step, &p_norm_rows, &x, &final_norm, &normed_last]);
        let lm_head_rows_ops = bind_linear(&ctx, &step, &lm_head, LinearIo::new(&normed_last, &logits, vocab), &dummy);
        let p_argmax = uniform(&ctx, &ArgmaxParams { n: vocab as u32 });
        let argmax_bind = k.argmax.bind(dev, &[&p_argmax, &logits, &token]);
        let layers = layers.into_iter().flatten().collect();

        Ok(GpuDecoder {
            id: next_id(),
            h,
            nh: cfg.num_attention_heads,
            kvh: cfg.num_key_value_heads,
            d: cfg.head_dim,
            mi: cfg.intermediate_size,
            vocab,
            chunk_rows,
            inv_freq: rope_inv_freq.to_vec(),
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
            final_norm_rows_bind,
            lm_head_rows_ops,
            argmax_bind,
            _params: vec![p_norm, p_norm_last, p_norm_rows, p_act, p_final_capture, p_argmax],
            _dummy: dummy,
            in_flight: std::sync::atomic::AtomicBool::new(false),
            embed_op,
            ids,
            cfg,
            ctx,
        })
    }
}
