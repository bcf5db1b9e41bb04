//! The language model: a Llama / Qwen2 / Mistral decoder with a KV cache and the per-layer steering hook.
//!
//! Shapes: hidden states are `[B, t, H]` (`B` sequences, usually 1; `t` new positions);
//! attention heads are `[B, heads, t, head_dim]`. Positions are absolute: RoPE uses `start .. start + t` over the whole
//! sequence, image tokens included (HF `position_ids = 0..T-1`).

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Module, Result, Storage, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use crate::config::{Activation, TextConfig};
use crate::decode_kernels::{attend_one_position, CacheView};
use crate::quant::{MatrixRef, QLinear, WeightFormat};
use crate::steering::Intervention;

/// A block's linear layer; a prompt's rows multiply as dequantize + F32 product
/// ([`QLinear::batches_in_f32`]), as the vision tower's do.
fn linear(in_dim: usize, out_dim: usize, bias: bool, format: WeightFormat, vb: VarBuilder) -> Result<QLinear> {
    Ok(QLinear::load(in_dim, out_dim, bias, format, vb)?.batches_in_f32())
}

/// RoPE tables in the HF rotate-half convention, computed in f32 as transformers does:
/// `inv_freq_i = 1 / θ^(2i/d)`, angle = `pos · inv_freq_i`.
struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    fn new(cfg: &TextConfig) -> Self {
        let d = cfg.head_dim;
        let theta = cfg.rope_theta as f32;
        let inv_freq = (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32)).collect();
        Self { inv_freq }
    }

    /// `(cos, sin)`, each `[t, d/2]`, for positions `start .. start + t`.
    fn tables(&self, start: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in start..start + t {
            for &f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((Tensor::from_vec(cos, (t, half), device)?, Tensor::from_vec(sin, (t, half), device)?))
    }
}

struct Attention {
    q_proj: QLinear,
    k_proj: QLinear,
    v_proj: QLinear,
    o_proj: QLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    /// Positions a query sees (itself included), `None` = all earlier ones.
    sliding_window: Option<usize>,
}

impl Attention {
    fn new(cfg: &TextConfig, format: WeightFormat, layer: usize, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Self {
            q_proj: linear(h, cfg.num_attention_heads * d, cfg.qkv_bias, format, vb.pp("q_proj"))?,
            k_proj: linear(h, cfg.num_key_value_heads * d, cfg.qkv_bias, format, vb.pp("k_proj"))?,
            v_proj: linear(h, cfg.num_key_value_heads * d, cfg.qkv_bias, format, vb.pp("v_proj"))?,
            o_proj: linear(cfg.num_attention_heads * d, h, cfg.o_bias, format, vb.pp("o_proj"))?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            scale: (d as f64).powf(-0.5),
            sliding_window: cfg.sliding_windows.get(layer).copied().flatten(),
        })
    }

    /// `xs` `[1, t, H]` at positions `start..start+t`; the cache holds positions `0..start`.
    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, start: usize, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let d = self.head_dim;
        let q = self.q_proj.forward(xs)?.reshape((b, t, self.num_heads, d))?.transpose(1, 2)?.contiguous()?;
        let k = self.k_proj.forward(xs)?.reshape((b, t, self.num_kv_heads, d))?.transpose(1, 2)?.contiguous()?;
        let v = self.v_proj.forward(xs)?.reshape((b, t, self.num_kv_heads, d))?.transpose(1, 2)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = cache.append(&k, &v)?;
        let total = k.dim(2)?;
        if let Some(out) = self.attend_in_cache(&q, cache, total)? {
            return self.o_proj.forward(&out);
        }
        // GQA without copying K/V: the query heads sharing a KV head are stacked along the row
        // axis, `[1, kv, rep·t, d]` against `[1, kv, T, d]`.
        let rep = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, rep * t, d))?;
        let mut scores = (q.matmul(&k.t()?)? * self.scale)?;
        if t > 1 || self.sliding_window.is_some_and(|w| total > w) {
            let mask = attention_mask(t, rep, start, total, self.sliding_window, xs.device())?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v.contiguous()?)?; // [1, kv, rep·t, d]
        let out = out.reshape((b, self.num_heads, t, d))?.transpose(1, 2)?.reshape((b, t, self.num_heads * d))?;
        self.o_proj.forward(&out)
    }
}

impl Attention {
    /// Decode's attention (one new position per sequence, F32 on the CPU) read straight from the
    /// cache's storage, `[B, 1, heads·d]`; `None` for anything else (candle's path).
    fn attend_in_cache(&self, q: &Tensor, cache: &KvCache, total: usize) -> Result<Option<Tensor>> {
        let (b, _, t, d) = q.dims4()?;
        let (Some(keys), Some(values)) = (cache.k_cache().all_data(), cache.v_cache().all_data()) else {
            return Ok(None);
        };
        if t != 1 || !q.device().is_cpu() || q.dtype() != DType::F32 || keys.dtype() != DType::F32 {
            return Ok(None);
        }
        let capacity = keys.dim(2)?;
        let (key_storage, key_layout) = keys.storage_and_layout();
        let (value_storage, value_layout) = values.storage_and_layout();
        let (Storage::Cpu(key_data), Storage::Cpu(value_data)) = (&*key_storage, &*value_storage) else {
            return Ok(None);
        };
        if !key_layout.is_contiguous() || !value_layout.is_contiguous() || values.dim(2)? != capacity {
            return Ok(None);
        }
        fn view<'a>(data: &'a candle_core::CpuStorage, offset: usize, like: CacheView) -> Result<CacheView<'a>> {
            Ok(CacheView { data: &data.as_slice::<f32>()?[offset..], ..like })
        }
        let like = CacheView { data: &[], kv_heads: self.num_kv_heads, capacity, head_dim: d };
        let first = self.sliding_window.map_or(0, |w| total.saturating_sub(w));
        let out = attend_one_position(
            &q.flatten_all()?.to_vec1::<f32>()?,
            b,
            self.num_heads,
            view(key_data, key_layout.start_offset(), like)?,
            view(value_data, value_layout.start_offset(), like)?,
            first,
            total,
            self.scale as f32,
        );
        Tensor::from_vec(out, (b, 1, self.num_heads * d), q.device()).map(Some)
    }
}

/// Additive mask `[rep·t, T]`: row `r·t + i` is query position `p = start + i`, which sees keys
/// `j ≤ p`, and with a sliding window `w` only `j > p − w` (transformers' sliding mask).
fn attention_mask(
    t: usize,
    rep: usize,
    start: usize,
    total: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mut mask = Vec::with_capacity(rep * t * total);
    for _ in 0..rep {
        for i in 0..t {
            let p = start + i;
            let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
            mask.extend((0..total).map(|j| if j <= p && j >= first { 0f32 } else { f32::NEG_INFINITY }));
        }
    }
    Tensor::from_vec(mask, (rep * t, total), device)
}

struct Mlp {
    gate_proj: QLinear,
    up_proj: QLinear,
    down_proj: QLinear,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &TextConfig, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(h, m, cfg.mlp_bias, format, vb.pp("gate_proj"))?,
            up_proj: linear(h, m, cfg.mlp_bias, format, vb.pp("up_proj"))?,
            down_proj: linear(m, h, cfg.mlp_bias, format, vb.pp("down_proj"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gated = (self.act.apply(&self.gate_proj.forward(xs)?)? * self.up_proj.forward(xs)?)?;
        self.down_proj.forward(&gated)
    }
}

/// One decoder block (built by [`TextModel::new`], or alone by [`TextModel::load_layer`] for a
/// load that uploads each block to the GPU and keeps no CPU copy).
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, format: WeightFormat, layer: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            input_layernorm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, format, layer, vb.pp("self_attn"))?,
            post_attention_layernorm: candle_nn::rms_norm(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp::new(cfg, format, vb.pp("mlp"))?,
        })
    }

    /// Read-only views of the block's weights as held.
    pub fn weights(&self) -> LayerWeights<'_> {
        LayerWeights {
            input_norm: self.input_layernorm.weight(),
            q_proj: self.self_attn.q_proj.linear_ref(),
            k_proj: self.self_attn.k_proj.linear_ref(),
            v_proj: self.self_attn.v_proj.linear_ref(),
            o_proj: self.self_attn.o_proj.linear_ref(),
            post_attention_norm: self.post_attention_layernorm.weight(),
            gate_proj: self.mlp.gate_proj.linear_ref(),
            up_proj: self.mlp.up_proj.linear_ref(),
            down_proj: self.mlp.down_proj.linear_ref(),
        }
    }

    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, start: usize, cache: &mut KvCache) -> Result<Tensor> {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(xs)?, cos, sin, start, cache)?;
        let xs = (xs + attn)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs + mlp
    }
}

/// Per-layer KV cache of one sequence.
pub struct Cache {
    layers: Vec<KvCache>,
}

impl Cache {
    /// `capacity`: positions to pre-allocate (it grows if exceeded).
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| KvCache::new(2, capacity.max(1))).collect() }
    }

    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.layers[0].current_seq_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy the one sequence held into `n` sequences: a prompt prefix that `n` answers share.
    pub fn repeat_sequence(&mut self, n: usize) -> Result<()> {
        self.map_sequences(|t| Tensor::cat(&vec![t; n], 0))
    }

    /// Keep the sequences `rows`, in that order, and drop the others (answers that ended).
    pub fn keep_sequences(&mut self, rows: &[usize]) -> Result<()> {
        let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        self.map_sequences(|t| t.contiguous()?.index_select(&Tensor::new(index.as_slice(), t.device())?, 0))
    }

    /// Rebuild every layer's K and V (`[B, kv_heads, T, d]`) through `f`, which maps the batch axis.
    fn map_sequences(&mut self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
        for kv in &mut self.layers {
            let mut rebuilt = KvCache::new(2, kv.k_cache().max_seq_len());
            if let (Some(k), Some(v)) = (kv.k()?, kv.v()?) {
                rebuilt.append(&f(&k)?, &f(&v)?)?;
            }
            *kv = rebuilt;
        }
        Ok(())
    }
}

/// What a forward pass returns, all at the last of its positions.
pub struct DecoderOutput {
    /// `[V]` logits of the last position (absent when `logits: false` was asked).
    pub logits: Option<Tensor>,
    /// Raw (post-steering) output of every block at the last position, `[H]` each — when asked.
    pub layer_outputs: Option<Vec<Tensor>>,
    /// Final-norm output at the last position, `[H]` — with `layer_outputs`.
    pub final_norm: Option<Tensor>,
}

/// Options of one forward pass.
#[derive(Clone, Copy)]
pub struct ForwardOptions<'a> {
    pub steering: Option<&'a Intervention>,
    /// Prompt length for positional steering (`last` / `generated`).
    pub prompt_len: usize,
    pub capture_layers: bool,
    pub logits: bool,
}

/// The token embedding table: dense (F32, or F16 when the rows are not whole blocks), or
/// quantized rows dequantized on lookup — which a tied lm_head shares, so a tied quantized model
/// holds the table once.
pub enum TokenEmbedding {
    Dense(Embedding),
    Quantized { table: Arc<QTensor>, hidden: usize },
}

impl TokenEmbedding {
    /// The table from the root builder (`lm.embed_tokens.weight`), and the lm_head when it is
    /// this table ([`lm_head_is_tied`]).
    fn load(cfg: &TextConfig, format: WeightFormat, vb: VarBuilder) -> Result<(Self, Option<QLinear>)> {
        let lm = vb.pp("lm");
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let table_dtype = if format == WeightFormat::F32 { DType::F32 } else { DType::F16 };
        let load_table =
            || lm.get_with_hints_dtype((vocab, hidden), "embed_tokens.weight", Default::default(), table_dtype);
        let tied = lm_head_is_tied(cfg, &vb);
        Ok(match format.ggml_type(hidden) {
            Some(block) => {
                let table = match crate::quant::stored_blocks(&lm, "embed_tokens.weight", block, vocab, hidden)? {
                    Some(stored) => stored,
                    None => crate::quant::quantize_rows(&load_table()?, block)?,
                };
                let table = Arc::new(table);
                let head = tied.then(|| QLinear::from_qtensor(table.clone())).transpose()?;
                (Self::Quantized { table, hidden }, head)
            }
            None => {
                let table = load_table()?;
                let head = tied.then(|| QLinear::new(table.clone(), None, format)).transpose()?;
                (Self::Dense(Embedding::new(table, hidden)), head)
            }
        })
    }

    /// The table alone (`lm.embed_tokens.weight` under the root builder), held as
    /// [`TextEnds::new`] holds it.
    pub fn load_table(cfg: &TextConfig, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        Ok(Self::load(cfg, format, vb)?.0)
    }

    /// Rows `ids` as F32 `[t, H]` (ids already checked against the vocabulary).
    fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Self::Dense(e) => e.forward(&Tensor::new(ids, e.embeddings().device())?)?.to_dtype(DType::F32),
            Self::Quantized { table, hidden } => {
                let dtype = table.dtype();
                let row_bytes = hidden / dtype.block_size() * dtype.type_size();
                let data = table.data()?;
                let mut rows = Vec::with_capacity(ids.len() * row_bytes);
                for &id in ids {
                    let start = id as usize * row_bytes;
                    rows.extend_from_slice(&data[start..start + row_bytes]);
                }
                crate::quant::qtensor_from_bytes(dtype, &rows, vec![ids.len(), *hidden], &Device::Cpu)?
                    .dequantize(&Device::Cpu)
            }
        }
    }

    pub fn matrix(&self) -> MatrixRef<'_> {
        match self {
            Self::Dense(e) => MatrixRef::Dense(e.embeddings()),
            Self::Quantized { table, hidden } => MatrixRef::Blocks { blocks: table, in_dim: *hidden },
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Dense(e) => e.embeddings().elem_count() * e.embeddings().dtype().size_in_bytes(),
            Self::Quantized { table, .. } => table.storage_size_in_bytes(),
        }
    }
}

/// The decoder's two ends: the token embedding table (prompt in), the final norm and lm_head
/// (logits out).
pub struct TextEnds {
    embed_tokens: TokenEmbedding,
    norm: RmsNorm,
    lm_head: QLinear,
}

impl TextEnds {
    /// From the root builder `vb` (canonical `lm.embed_tokens`, `lm.norm`, `lm_head`).
    ///
    /// Quantized models load the embedding table straight in F16 and quantize it by rows
    /// (dequantized on lookup); a tied lm_head is that same quantized table — so a `cmrm
    /// quantize` GGUF (which stores the table in F16) loads as exactly this model. Rows that are
    /// not whole blocks stay F16, with a separate quantized lm_head.
    pub fn new(cfg: &TextConfig, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        let (embed_tokens, tied_head) = TokenEmbedding::load(cfg, format, vb.clone())?;
        let norm = candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("lm").pp("norm"))?;
        let lm_head = match tied_head {
            Some(head) => head,
            None => load_lm_head(cfg, format, vb)?,
        };
        Ok(Self { embed_tokens, norm, lm_head })
    }
}

/// Whether the model's lm_head is its embedding table: tied in the config and no lm_head in the
/// file (as the CPU model decides, [`TextEnds::new`]).
pub fn lm_head_is_tied(cfg: &TextConfig, vb: &VarBuilder) -> bool {
    cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight")
}

/// An untied lm_head from the root builder: the file's own blocks when it stores them (a `cmrm
/// quantize` GGUF, a streamed load), so no F32 copy of a 32064×4096 head (525 MB) at the peak
/// and no re-quantizing.
pub fn load_lm_head(cfg: &TextConfig, format: WeightFormat, vb: VarBuilder) -> Result<QLinear> {
    QLinear::load(cfg.hidden_size, cfg.vocab_size, false, format, vb.pp("lm_head"))
}

pub struct TextModel {
    /// The embedding table, final norm and lm_head, or none when they live on the GPU only
    /// ([`TextModel::gpu_only`]).
    ends: Option<TextEnds>,
    /// Every block, or none when they were uploaded to the GPU one by one and not kept
    /// ([`TextModel::without_layers`], [`TextModel::gpu_only`]).
    layers: Vec<DecoderLayer>,
    rope: Rope,
    cfg: TextConfig,
}

impl TextModel {
    /// `vb` is the root builder: weights live under canonical `lm.` and `lm_head.`; the linears,
    /// the embedding table and lm_head are held in `format` (quantized on load).
    pub fn new(cfg: &TextConfig, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        let mut model = Self::without_layers(cfg, format, vb.clone())?;
        model.layers =
            (0..cfg.num_hidden_layers).map(|i| Self::load_layer(cfg, format, i, vb.clone())).collect::<Result<_>>()?;
        Ok(model)
    }

    /// Block `i` from the root builder `vb` (canonical `lm.layers.{i}.`).
    pub fn load_layer(cfg: &TextConfig, format: WeightFormat, i: usize, vb: VarBuilder) -> Result<DecoderLayer> {
        DecoderLayer::new(cfg, format, i, vb.pp("lm").pp(format!("layers.{i}")))
    }

    /// The embedding table, final norm and lm_head without the blocks. A forward on it is an
    /// error that says the blocks are elsewhere.
    pub fn without_layers(cfg: &TextConfig, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        Ok(Self { ends: Some(TextEnds::new(cfg, format, vb)?), ..Self::gpu_only(cfg) })
    }

    /// No weights at all: what the CPU keeps of a decoder that lives on the GPU only (a
    /// GPU-resident load: prompts are embedded there too). Every forward and embedding on it is
    /// an error that says so.
    pub fn gpu_only(cfg: &TextConfig) -> Self {
        Self { ends: None, layers: Vec::new(), rope: Rope::new(cfg), cfg: cfg.clone() }
    }

    /// Whether the blocks are here (false after a GPU-resident load).
    pub fn has_layers(&self) -> bool {
        self.layers.len() == self.cfg.num_hidden_layers
    }

    /// Whether the embedding table, final norm and lm_head are here (false after a GPU-resident
    /// load).
    pub fn has_ends(&self) -> bool {
        self.ends.is_some()
    }

    fn check_layers(&self) -> Result<()> {
        if !self.has_layers() {
            candle_core::bail!(
                "the decoder's blocks are held on the GPU only (a GPU-resident load): the CPU cannot run them; \
                 load the model again with the CPU backend"
            );
        }
        Ok(())
    }

    fn ends(&self) -> Result<&TextEnds> {
        self.ends.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(
                "the decoder's embedding table and lm_head are held on the GPU only (a GPU-resident load): \
                 embed prompts with the GPU backend, or load the model again with the CPU backend"
                    .into(),
            )
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn new_cache(&self, capacity: usize) -> Cache {
        Cache::new(self.layers.len(), capacity)
    }

    /// Token embeddings `[1, t, H]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            candle_core::bail!("token id {bad} is outside the vocabulary ({})", self.cfg.vocab_size);
        }
        self.ends()?.embed_tokens.lookup(ids)?.unsqueeze(0)
    }

    /// Run the decoder over `embeds` `[1, t, H]` at positions `cache.len() ..`, appending to the
    /// cache. Steering is added to each chosen block's output before the next block sees it.
    pub fn forward(&self, embeds: &Tensor, cache: &mut Cache, opts: ForwardOptions) -> Result<DecoderOutput> {
        let steer = |layer: usize, xs: &Tensor, start: usize| match opts.steering {
            Some(steering) => steering.apply(layer, xs, start, opts.prompt_len),
            None => Ok(xs.clone()),
        };
        let (last, layer_outputs) = self.run_blocks(embeds, cache, opts.capture_layers, &steer)?;
        let ends = self.ends()?;
        let normed = ends.norm.forward(&last)?;
        let logits = if opts.logits { Some(ends.lm_head.forward(&normed)?.flatten_all()?) } else { None };
        let final_norm = layer_outputs.as_ref().map(|_| normed.flatten_all()).transpose()?;
        Ok(DecoderOutput { logits, layer_outputs, final_norm })
    }

    /// Run a batch of sequences, `embeds` `[B, t, H]`, that differ only in their steering: row `b`
    /// is steered by `steering[b]` (`prompt_len` as in [`ForwardOptions`]). Every weight is read
    /// once for the whole batch, which is what makes decoding two answers together cheaper than
    /// one after the other. Returns the last position's logits, `[B, V]`.
    pub fn forward_batch(
        &self,
        embeds: &Tensor,
        cache: &mut Cache,
        steering: &[Option<&Intervention>],
        prompt_len: usize,
    ) -> Result<Tensor> {
        if steering.len() != embeds.dim(0)? {
            candle_core::bail!("{} steering rows for a batch of {}", steering.len(), embeds.dim(0)?);
        }
        let steer = |layer: usize, xs: &Tensor, start: usize| {
            if !steering.iter().flatten().any(|s| s.steers_layer(layer)) {
                return Ok(xs.clone());
            }
            let rows = steering
                .iter()
                .enumerate()
                .map(|(b, s)| {
                    let row = xs.narrow(0, b, 1)?;
                    match s {
                        Some(s) => s.apply(layer, &row, start, prompt_len),
                        None => Ok(row),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)
        };
        let (last, _) = self.run_blocks(embeds, cache, false, &steer)?;
        let ends = self.ends()?;
        ends.lm_head.forward(&ends.norm.forward(&last)?)?.squeeze(1)
    }

    /// The blocks over `embeds` `[B, t, H]` at positions `cache.len() ..`, `steer(layer, xs,
    /// start)` after each: the last position's states `[B, 1, H]`, and with `capture` every
    /// block's (steered) output there, `[H]` each (batch 1).
    #[allow(clippy::type_complexity)]
    fn run_blocks(
        &self,
        embeds: &Tensor,
        cache: &mut Cache,
        capture: bool,
        steer: &dyn Fn(usize, &Tensor, usize) -> Result<Tensor>,
    ) -> Result<(Tensor, Option<Vec<Tensor>>)> {
        self.check_layers()?;
        let start = cache.len();
        let t = embeds.dim(1)?;
        let (cos, sin) = self.rope.tables(start, t, embeds.device())?;
        let mut xs = embeds.clone();
        let mut layer_outputs = capture.then(|| Vec::with_capacity(self.layers.len()));
        for (l, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            xs = steer(l, &layer.forward(&xs, &cos, &sin, start, kv)?, start)?;
            if let Some(outs) = layer_outputs.as_mut() {
                outs.push(xs.get(0)?.get(t - 1)?);
            }
        }
        Ok((xs.narrow(1, t - 1, 1)?, layer_outputs))
    }

    /// Full-sequence hidden states `[L+1, T, H]` and logits `[T, V]` without a cache (debugging
    /// position-dependent bugs against HF's `hidden_states_full` / `logits_full`).
    pub fn forward_full(&self, embeds: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_layers()?;
        let t = embeds.dim(1)?;
        let mut cache = self.new_cache(t);
        let (cos, sin) = self.rope.tables(0, t, embeds.device())?;
        let mut xs = embeds.clone();
        let mut states = vec![xs.get(0)?];
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            xs = layer.forward(&xs, &cos, &sin, 0, kv)?;
            states.push(xs.get(0)?);
        }
        let ends = self.ends()?;
        let normed = ends.norm.forward(&xs)?;
        *states.last_mut().expect("at least one layer") = normed.get(0)?;
        let logits = ends.lm_head.forward(&normed)?.get(0)?;
        Ok((Tensor::stack(&states, 0)?, logits))
    }

    /// Read-only views of every weight as held (F32 or quantized blocks), for other compute
    /// backends (`gpu`).
    pub fn weights(&self) -> Result<TextWeights<'_>> {
        let ends = self.ends()?;
        Ok(TextWeights {
            ends: ends.weights(),
            layers: self.layers.iter().map(DecoderLayer::weights).collect(),
            rope_inv_freq: &self.rope.inv_freq,
        })
    }

    /// RoPE `inv_freq` (`[head_dim / 2]`), exactly the values the CPU path uses.
    pub fn rope_inv_freq(&self) -> &[f32] {
        &self.rope.inv_freq
    }

    /// Bytes of the matrices one decode step reads: every linear of every block and the lm_head
    /// (the embedding contributes one row; norms are negligible).
    pub fn bytes_read_per_token(&self) -> usize {
        let linears: usize = self
            .layers
            .iter()
            .flat_map(|l| {
                [&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj, &l.self_attn.o_proj]
                    .into_iter()
                    .chain([&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj])
            })
            .map(QLinear::weight_bytes)
            .sum();
        linears + self.ends.as_ref().map_or(0, |e| e.lm_head.weight_bytes())
    }

    /// Bytes of weights held in memory (linears, lm_head, embedding table; a tied lm_head
    /// shares the table's storage, F32 or quantized).
    pub fn weight_bytes(&self) -> usize {
        let Some(ends) = &self.ends else { return self.bytes_read_per_token() };
        let shared_head = ends.lm_head.matrix().same_as(&ends.embed_tokens.matrix());
        let head = if shared_head { ends.lm_head.weight_bytes() } else { 0 };
        self.bytes_read_per_token() - head + ends.embed_tokens.bytes()
    }
}

impl TextEnds {
    /// Read-only views of the table, norm and head as held.
    pub fn weights(&self) -> EndWeights<'_> {
        EndWeights {
            embed_tokens: self.embed_tokens.matrix(),
            norm: self.norm.weight(),
            lm_head: self.lm_head.matrix(),
        }
    }
}

/// A linear layer's `([out, in]` weight, optional `[out]` bias).
pub type LinearRef<'a> = (MatrixRef<'a>, Option<&'a Tensor>);

/// Read-only references to one decoder block's weights.
pub struct LayerWeights<'a> {
    pub input_norm: &'a Tensor,
    pub q_proj: LinearRef<'a>,
    pub k_proj: LinearRef<'a>,
    pub v_proj: LinearRef<'a>,
    pub o_proj: LinearRef<'a>,
    pub post_attention_norm: &'a Tensor,
    pub gate_proj: LinearRef<'a>,
    pub up_proj: LinearRef<'a>,
    pub down_proj: LinearRef<'a>,
}

/// Read-only references to the decoder's ends ([`TextEnds::weights`]).
#[derive(Clone, Copy)]
pub struct EndWeights<'a> {
    /// `[V, H]`.
    pub embed_tokens: MatrixRef<'a>,
    pub norm: &'a Tensor,
    /// `[V, H]` (the embedding itself when tied: [`MatrixRef::same_as`]).
    pub lm_head: MatrixRef<'a>,
}

/// Read-only references to the whole decoder's weights ([`TextModel::weights`]).
pub struct TextWeights<'a> {
    pub ends: EndWeights<'a>,
    pub layers: Vec<LayerWeights<'a>>,
    /// RoPE `inv_freq` (`[head_dim / 2]`), exactly the values the CPU path uses.
    pub rope_inv_freq: &'a [f32],
}

/// Index of the first maximal logit (torch's `argmax` tie rule).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Last-dim helper for tests: `[.., V]` → Vec.
pub fn to_vec_last(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}
