//! `config.json` of a Hugging Face `LlavaForConditionalGeneration` checkpoint → [`LlavaConfig`].
//!
//! Parsing is strict where a wrong guess would silently give wrong numbers (unknown `model_type`,
//! RoPE scaling, activations) and lenient about fields cmrm does not use.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::quant::WeightFormat;

/// Which vision tower architecture the checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionKind {
    /// `clip_vision_model`: CLS token, `pre_layrnorm`, patch conv without bias.
    Clip,
    /// `siglip_vision_model`: no CLS, no pre-norm, patch conv with bias.
    Siglip,
}

/// Which decoder architecture the language model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    Llama,
    Qwen2,
}

impl TextKind {
    /// llama.cpp's architecture name (GGUF `general.architecture`, control-vector `model_hint`).
    pub fn llama_cpp_arch(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// Activation functions named by HF configs (`hidden_act`, `projector_hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact, erf-based.
    Gelu,
    /// `gelu_pytorch_tanh` / `gelu_new` / `gelu_fast`: tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    Silu,
    Relu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "silu" | "swish" => Self::Silu,
            "relu" => Self::Relu,
            other => {
                bail!("unsupported activation '{other}' (supported: gelu, gelu_pytorch_tanh, quick_gelu, silu, relu)")
            }
        })
    }

    pub fn apply(&self, xs: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Silu => xs.silu(),
            Self::Relu => xs.relu(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct VisionConfig {
    pub kind: VisionKind,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
    /// In-memory format of the linears, chosen at load (not part of config.json).
    pub weight_format: WeightFormat,
}

impl VisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
    /// Tokens the encoder sees: patches, plus CLS for CLIP.
    pub fn num_positions(&self) -> usize {
        self.num_patches() + usize::from(self.kind == VisionKind::Clip)
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Debug, Clone)]
pub struct TextConfig {
    pub kind: TextKind,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// Bias on q/k/v projections (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`; never for Qwen2).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: Activation,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// In-memory format of the linears and lm_head, chosen at load (not part of config.json).
    pub weight_format: WeightFormat,
}

/// Which vision hidden states feed the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the CLS token (the first position) — only meaningful for CLIP.
    Default,
    /// Keep every position.
    Full,
}

#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Hidden-state indices of the vision encoder, already made non-negative (0 = encoder input,
    /// k = output of encoder layer k). Several indices are concatenated along the hidden dim.
    pub vision_feature_layers: Vec<usize>,
    pub feature_select: FeatureSelect,
    pub image_token_id: u32,
    pub projector_act: Activation,
    pub projector_bias: bool,
}

impl LlavaConfig {
    /// Number of `<image>` tokens one image expands to.
    pub fn image_tokens_per_image(&self) -> usize {
        match self.feature_select {
            FeatureSelect::Default if self.vision.kind == VisionKind::Clip => self.vision.num_patches(),
            _ => self.vision.num_positions(),
        }
    }

    /// Input dim of the projector: vision hidden × number of selected feature layers.
    pub fn projector_in_dim(&self) -> usize {
        self.vision.hidden_size * self.vision_feature_layers.len()
    }

    /// The same config with the linears held in `format` (quantize on load).
    pub fn with_weight_format(mut self, format: WeightFormat) -> Self {
        self.vision.weight_format = format;
        self.text.weight_format = format;
        self
    }

    pub fn weight_format(&self) -> WeightFormat {
        self.text.weight_format
    }

    /// A short identifier of the architecture, written into vector files and checked on load.
    pub fn fingerprint(&self) -> String {
        let t = &self.text;
        format!(
            "{:?}-L{}-H{}-V{}+{:?}-{}px",
            t.kind, t.num_hidden_layers, t.hidden_size, t.vocab_size, self.vision.kind, self.vision.image_size
        )
        .to_lowercase()
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("{}: unsupported or invalid model config", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        Self::from_value(&root)
    }

    pub fn from_value(root: &Value) -> Result<Self> {
        let model_type = root.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "llava" {
            bail!(
                "unknown model_type '{model_type}': cmrm loads LLaVA checkpoints (model_type \"llava\", \
                 LlavaForConditionalGeneration)"
            );
        }
        let vision_value = root.get("vision_config").context("config has no vision_config")?;
        let text_value = root.get("text_config").context("config has no text_config")?;
        let vision = parse_vision(vision_value).context("in vision_config")?;
        let tie_top = root.get("tie_word_embeddings").and_then(Value::as_bool);
        let text = parse_text(text_value, tie_top).context("in text_config")?;

        let n_hidden_states = vision.num_hidden_layers as i64 + 1;
        let raw_layers: Vec<i64> = match root.get("vision_feature_layer") {
            None => vec![-2],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_i64().context("vision_feature_layer entries must be integers"))
                .collect::<Result<_>>()?,
            Some(v) => vec![v.as_i64().context("vision_feature_layer must be an integer or a list")?],
        };
        let mut vision_feature_layers = Vec::new();
        for layer in raw_layers {
            let index = if layer < 0 { n_hidden_states + layer } else { layer };
            if !(0..n_hidden_states).contains(&index) {
                bail!(
                    "vision_feature_layer {layer} is out of range for a vision tower with {} layers",
                    vision.num_hidden_layers
                );
            }
            vision_feature_layers.push(index as usize);
        }
        let feature_select =
            match root.get("vision_feature_select_strategy").and_then(Value::as_str).unwrap_or("default") {
                "default" => FeatureSelect::Default,
                "full" => FeatureSelect::Full,
                other => bail!("unsupported vision_feature_select_strategy '{other}' (supported: default, full)"),
            };
        let image_token_id = root
            .get("image_token_index")
            .or_else(|| root.get("image_token_id"))
            .and_then(Value::as_u64)
            .context("config has no image_token_index")? as u32;
        let projector_act =
            Activation::from_hf(root.get("projector_hidden_act").and_then(Value::as_str).unwrap_or("gelu"))?;
        let projector_bias = root.get("multimodal_projector_bias").and_then(Value::as_bool).unwrap_or(true);
        if image_token_id as usize >= text.vocab_size {
            bail!("image_token_index {image_token_id} is outside the vocabulary ({})", text.vocab_size);
        }
        Ok(Self { vision, text, vision_feature_layers, feature_select, image_token_id, projector_act, projector_bias })
    }
}

fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize).with_context(|| format!("missing or invalid '{key}'"))
}

fn get_usize_or(v: &Value, key: &str, default: usize) -> usize {
    v.get(key).and_then(Value::as_u64).map_or(default, |x| x as usize)
}

fn get_f64_or(v: &Value, key: &str, default: f64) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(default)
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

/// Token ids from a `generation_config.json`'s `eos_token_id` (int or list).
pub fn eos_ids_from_generation_config(text: &str) -> Result<Vec<u32>> {
    let v: Value = serde_json::from_str(text).context("generation_config.json is not valid JSON")?;
    Ok(token_ids(v.get("eos_token_id")))
}

fn parse_vision(v: &Value) -> Result<VisionConfig> {
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("clip_vision_model");
    let kind = match model_type {
        "clip_vision_model" => VisionKind::Clip,
        "siglip_vision_model" => VisionKind::Siglip,
        other => bail!("unknown vision model_type '{other}' (supported: clip_vision_model, siglip_vision_model)"),
    };
    let default_eps = if kind == VisionKind::Clip { 1e-5 } else { 1e-6 };
    let default_act = if kind == VisionKind::Clip { "quick_gelu" } else { "gelu_pytorch_tanh" };
    let cfg = VisionConfig {
        kind,
        hidden_size: get_usize(v, "hidden_size")?,
        intermediate_size: get_usize(v, "intermediate_size")?,
        num_hidden_layers: get_usize(v, "num_hidden_layers")?,
        num_attention_heads: get_usize(v, "num_attention_heads")?,
        num_channels: get_usize_or(v, "num_channels", 3),
        image_size: get_usize(v, "image_size")?,
        patch_size: get_usize(v, "patch_size")?,
        layer_norm_eps: get_f64_or(v, "layer_norm_eps", default_eps),
        hidden_act: Activation::from_hf(v.get("hidden_act").and_then(Value::as_str).unwrap_or(default_act))?,
        weight_format: WeightFormat::F32,
    };
    if cfg.num_channels != 3 {
        bail!("num_channels = {} (only RGB vision towers are supported)", cfg.num_channels);
    }
    if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
        bail!("hidden_size {} is not divisible by num_attention_heads {}", cfg.hidden_size, cfg.num_attention_heads);
    }
    // Not necessarily a multiple: the patch conv has valid padding, so SigLIP-so400m/14 at 384 px
    // sees 27×27 patches and ignores the last 6 pixel rows and columns.
    if cfg.patch_size == 0 || cfg.patch_size > cfg.image_size {
        bail!("patch_size {} does not fit image_size {}", cfg.patch_size, cfg.image_size);
    }
    Ok(cfg)
}

fn parse_text(v: &Value, tie_top: Option<bool>) -> Result<TextConfig> {
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("llama");
    let kind = match model_type {
        "llama" => TextKind::Llama,
        "qwen2" => TextKind::Qwen2,
        other => bail!("unknown text model_type '{other}' (supported: llama, qwen2)"),
    };
    let hidden_size = get_usize(v, "hidden_size")?;
    let num_attention_heads = get_usize(v, "num_attention_heads")?;
    let num_key_value_heads = get_usize_or(v, "num_key_value_heads", num_attention_heads);
    if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
        bail!(
            "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
        );
    }
    let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
        Some(d) => d as usize,
        None => {
            if num_attention_heads == 0 || !hidden_size.is_multiple_of(num_attention_heads) {
                bail!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}");
            }
            hidden_size / num_attention_heads
        }
    };
    // transformers 5 nests RoPE settings in `rope_parameters`; 4.x and the hub use `rope_theta`
    // plus `rope_scaling`.
    let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
    let rope_theta = rope_params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or_else(|| v.get("rope_theta").and_then(Value::as_f64))
        .unwrap_or(10_000.0);
    let rope_type = rope_params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .or_else(|| {
            v.get("rope_scaling").filter(|s| !s.is_null()).and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
        })
        .and_then(Value::as_str)
        .unwrap_or("default");
    if rope_type != "default" {
        bail!("RoPE type '{rope_type}' is not supported (only the default RoPE)");
    }
    if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
        bail!("sliding-window attention is not supported");
    }
    let attention_bias = v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false);
    let (qkv_bias, o_bias) = match kind {
        TextKind::Llama => (attention_bias, attention_bias),
        TextKind::Qwen2 => (true, false),
    };
    let cfg = TextConfig {
        kind,
        vocab_size: get_usize(v, "vocab_size")?,
        hidden_size,
        intermediate_size: get_usize(v, "intermediate_size")?,
        num_hidden_layers: get_usize(v, "num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: get_f64_or(v, "rms_norm_eps", 1e-6),
        rope_theta,
        max_position_embeddings: get_usize_or(v, "max_position_embeddings", 4096),
        qkv_bias,
        o_bias,
        mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
        hidden_act: Activation::from_hf(v.get("hidden_act").and_then(Value::as_str).unwrap_or("silu"))?,
        tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).or(tie_top).unwrap_or(false),
        bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
        eos_token_ids: token_ids(v.get("eos_token_id")),
        weight_format: WeightFormat::F32,
    };
    if cfg.num_hidden_layers == 0 {
        bail!("num_hidden_layers is 0");
    }
    Ok(cfg)
}
