//! CLIP and SigLIP vision towers: `pixel_values` `[B, 3, S, S]` → encoder hidden states.
//!
//! Hidden state `k` follows HF `output_hidden_states`: 0 is the encoder input (CLIP: after
//! `pre_layrnorm`), k is the output of encoder layer k. LLaVA never applies `post_layernorm` to the
//! features it uses, so this tower does not load it.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use crate::config::{Activation, VisionConfig, VisionKind};
use crate::quant::{QLinear, WeightFormat};
use crate::text::LinearRef;

fn linear(in_dim: usize, out_dim: usize, format: WeightFormat, vb: VarBuilder) -> Result<QLinear> {
    Ok(QLinear::load(in_dim, out_dim, true, format, vb)?.batches_in_f32())
}

struct VisionAttention {
    q_proj: QLinear,
    k_proj: QLinear,
    v_proj: QLinear,
    out_proj: QLinear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl VisionAttention {
    fn new(cfg: &VisionConfig, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(h, h, format, vb.pp("q_proj"))?,
            k_proj: linear(h, h, format, vb.pp("k_proj"))?,
            v_proj: linear(h, h, format, vb.pp("v_proj"))?,
            out_proj: linear(h, h, format, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            scale: (cfg.head_dim() as f64).powf(-0.5),
        })
    }

    /// Full (non-causal) attention over all positions. `xs`: `[B, N, H]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let heads = |t: Tensor| t.reshape((b, n, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous();
        let q = heads(self.q_proj.forward(xs)?)?;
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, self.num_heads * self.head_dim))?;
        self.out_proj.forward(&out)
    }
}

struct VisionMlp {
    fc1: QLinear,
    fc2: QLinear,
    act: Activation,
}

impl VisionMlp {
    fn new(cfg: &VisionConfig, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(cfg.hidden_size, cfg.intermediate_size, format, vb.pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, cfg.hidden_size, format, vb.pp("fc2"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.apply(&self.fc1.forward(xs)?)?)
    }
}

/// One encoder layer (see [`VisionTower::load_layer`]).
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: VisionAttention,
    layer_norm2: LayerNorm,
    mlp: VisionMlp,
}

impl EncoderLayer {
    fn new(cfg: &VisionConfig, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            layer_norm1: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: VisionAttention::new(cfg, format, vb.pp("self_attn"))?,
            layer_norm2: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: VisionMlp::new(cfg, format, vb.pp("mlp"))?,
        })
    }

    /// Read-only views of the layer's weights as held.
    pub fn weights(&self) -> VisionLayerWeights<'_> {
        VisionLayerWeights {
            layer_norm1: &self.layer_norm1,
            q_proj: self.self_attn.q_proj.linear_ref(),
            k_proj: self.self_attn.k_proj.linear_ref(),
            v_proj: self.self_attn.v_proj.linear_ref(),
            out_proj: self.self_attn.out_proj.linear_ref(),
            layer_norm2: &self.layer_norm2,
            fc1: self.mlp.fc1.linear_ref(),
            fc2: self.mlp.fc2.linear_ref(),
            act: self.mlp.act,
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?)?)?;
        &xs + self.mlp.forward(&self.layer_norm2.forward(&xs)?)?
    }
}

/// Patch and position embeddings (+ CLIP's CLS and pre-norm): what makes hidden state 0.
pub struct VisionEmbeddings {
    /// Patch conv weight flattened to `[3·p·p, H]` (conv with kernel = stride = patch is a matmul).
    patch_weight_t: Tensor,
    patch_bias: Option<Tensor>,
    class_embedding: Option<Tensor>,
    position_embedding: Tensor,
    pre_layrnorm: Option<LayerNorm>,
}

impl VisionEmbeddings {
    /// `vb` points at the canonical `vision.` prefix (`embeddings.*`, `pre_layrnorm.*`).
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (h, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let emb = vb.pp("embeddings");
        let patch_weight = emb.get((h, c, p, p), "patch_embedding.weight")?;
        let patch_weight_t = patch_weight.reshape((h, c * p * p))?.t()?.contiguous()?;
        let is_clip = cfg.kind == VisionKind::Clip;
        let patch_bias = if is_clip { None } else { Some(emb.get(h, "patch_embedding.bias")?) };
        let class_embedding = if is_clip { Some(emb.get(h, "class_embedding")?) } else { None };
        let position_embedding = emb.get((cfg.num_positions(), h), "position_embedding.weight")?;
        let pre_layrnorm = if is_clip { Some(layer_norm(h, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?) } else { None };
        Ok(Self { patch_weight_t, patch_bias, class_embedding, position_embedding, pre_layrnorm })
    }

    /// Read-only references to the embeddings' weights (for the GPU tower).
    pub fn weights(&self) -> VisionEmbeddingWeights<'_> {
        VisionEmbeddingWeights {
            patch_weight_t: &self.patch_weight_t,
            patch_bias: self.patch_bias.as_ref(),
            class_embedding: self.class_embedding.as_ref(),
            position_embedding: &self.position_embedding,
            pre_layrnorm: self.pre_layrnorm.as_ref(),
        }
    }
}

pub struct VisionTower {
    /// The embeddings, or none when they live on the GPU only ([`VisionTower::gpu_only`]).
    embeddings: Option<VisionEmbeddings>,
    /// Every layer, or none when they live on the GPU only ([`VisionTower::without_layers`]).
    layers: Vec<EncoderLayer>,
    cfg: VisionConfig,
}

impl VisionTower {
    /// `vb` points at the canonical `vision.` prefix.
    pub fn new(cfg: &VisionConfig, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        let mut tower = Self::without_layers(cfg, vb.clone())?;
        tower.layers =
            (0..cfg.num_hidden_layers).map(|i| Self::load_layer(cfg, format, i, vb.clone())).collect::<Result<_>>()?;
        Ok(tower)
    }

    /// Encoder layer `i` (`vb` at the canonical `vision.` prefix).
    pub fn load_layer(cfg: &VisionConfig, format: WeightFormat, i: usize, vb: VarBuilder) -> Result<EncoderLayer> {
        EncoderLayer::new(cfg, format, vb.pp(format!("encoder.layers.{i}")))
    }

    /// The embeddings (and CLIP's pre-norm) without the encoder layers.
    pub fn without_layers(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self { embeddings: Some(VisionEmbeddings::new(cfg, vb)?), ..Self::gpu_only(cfg) })
    }

    /// No weights at all: what the CPU keeps of a tower that lives on the GPU only (it cuts
    /// patches, which needs the config alone; the encode is the GPU's).
    pub fn gpu_only(cfg: &VisionConfig) -> Self {
        Self { embeddings: None, layers: Vec::new(), cfg: cfg.clone() }
    }

    /// `pixel_values` `[B, 3, S, S]` as patches `[B, g², 3·p·p]` in raster order, each flattened
    /// like the conv kernel (the patch embedding is then a matmul with `[3·p·p, H]`).
    pub fn patches(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, s, s2) = pixel_values.dims4()?;
        let p = self.cfg.patch_size;
        if s != self.cfg.image_size || s2 != s || c != self.cfg.num_channels {
            candle_core::bail!(
                "pixel_values are {:?}, the vision tower expects [B, 3, {}, {}]",
                pixel_values.dims(),
                self.cfg.image_size,
                self.cfg.image_size
            );
        }
        let g = s / p;
        // Valid padding: pixels past the last whole patch are not seen.
        let pixel_values =
            if g * p == s { pixel_values.clone() } else { pixel_values.narrow(2, 0, g * p)?.narrow(3, 0, g * p)? };
        // [B, C, g, p, g, p] → [B, g, g, C, p, p]
        pixel_values.reshape((b, c, g, p, g, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, g * g, c * p * p))
    }

    /// Patch + position embeddings (+ CLS and pre-norm for CLIP): hidden state 0, `[B, N, H]`.
    fn embeddings(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let Some(e) = &self.embeddings else { candle_core::bail!("{GPU_ONLY}") };
        let b = pixel_values.dim(0)?;
        let patches = self.patches(pixel_values)?;
        let mut xs = patches.broadcast_matmul(&e.patch_weight_t)?;
        if let Some(bias) = &e.patch_bias {
            xs = xs.broadcast_add(bias)?;
        }
        if let Some(cls) = &e.class_embedding {
            let cls = cls.reshape((1, 1, self.cfg.hidden_size))?.repeat((b, 1, 1))?;
            xs = Tensor::cat(&[cls, xs], 1)?;
        }
        xs = xs.broadcast_add(&e.position_embedding)?;
        if let Some(norm) = &e.pre_layrnorm {
            xs = norm.forward(&xs)?;
        }
        Ok(xs)
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Whether the encoder layers are here (false when they live on the GPU only).
    pub fn has_layers(&self) -> bool {
        self.layers.len() == self.cfg.num_hidden_layers
    }

    /// Read-only references to the tower's weights (for the GPU tower).
    pub fn weights(&self) -> Result<VisionWeights<'_>> {
        let Some(e) = &self.embeddings else { candle_core::bail!("{GPU_ONLY}") };
        Ok(VisionWeights { embeddings: e.weights(), layers: self.layers.iter().map(EncoderLayer::weights).collect() })
    }

    /// The hidden states at the given indices (0 = encoder input), each `[B, N, H]`. Layers past
    /// the largest index are not run.
    pub fn hidden_states(&self, pixel_values: &Tensor, indices: &[usize]) -> Result<Vec<Tensor>> {
        let last = indices.iter().copied().max().unwrap_or(0);
        if !self.has_layers() {
            candle_core::bail!("{GPU_ONLY}");
        }
        if last > self.layers.len() {
            candle_core::bail!("vision hidden state {last} requested, the tower has {} layers", self.layers.len());
        }
        let mut states = Vec::with_capacity(last + 1);
        let mut xs = self.embeddings(pixel_values)?;
        states.push(xs.clone());
        for layer in &self.layers[..last] {
            xs = layer.forward(&xs)?;
            states.push(xs.clone());
        }
        Ok(indices.iter().map(|&i| states[i].clone()).collect())
    }

    /// Every hidden state `[Lv+1, B, N, H]` as a list (for parity tests and probes).
    pub fn all_hidden_states(&self, pixel_values: &Tensor) -> Result<Vec<Tensor>> {
        let all: Vec<usize> = (0..=self.layers.len()).collect();
        self.hidden_states(pixel_values, &all)
    }

    /// Hidden state by index along the last dim (`D::Minus1`) — for several layers concatenated.
    pub fn concat_hidden(states: &[Tensor]) -> Result<Tensor> {
        Tensor::cat(states, D::Minus1)
    }
}

/// Read-only references to one encoder layer's weights ([`VisionTower::weights`]).
pub struct VisionLayerWeights<'a> {
    pub layer_norm1: &'a LayerNorm,
    pub q_proj: LinearRef<'a>,
    pub k_proj: LinearRef<'a>,
    pub v_proj: LinearRef<'a>,
    pub out_proj: LinearRef<'a>,
    pub layer_norm2: &'a LayerNorm,
    pub fc1: LinearRef<'a>,
    pub fc2: LinearRef<'a>,
    pub act: Activation,
}

/// Read-only references to the embeddings' weights ([`VisionEmbeddings::weights`]).
pub struct VisionEmbeddingWeights<'a> {
    /// `[3·p·p, H]` (the conv kernel flattened and transposed).
    pub patch_weight_t: &'a Tensor,
    pub patch_bias: Option<&'a Tensor>,
    pub class_embedding: Option<&'a Tensor>,
    /// `[N, H]`, N = patches (+ 1 for CLIP's CLS).
    pub position_embedding: &'a Tensor,
    pub pre_layrnorm: Option<&'a LayerNorm>,
}

/// Read-only references to the whole tower's weights ([`VisionTower::weights`]).
pub struct VisionWeights<'a> {
    pub embeddings: VisionEmbeddingWeights<'a>,
    pub layers: Vec<VisionLayerWeights<'a>>,
}

/// What a CPU encode on a tower held on the GPU says.
const GPU_ONLY: &str = "the vision tower is held on the GPU only (a GPU-resident load): the CPU cannot run it; \
                        load the model again with the CPU backend";
