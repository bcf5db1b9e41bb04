//! `config.json` of a Hugging Face `LlavaForConditionalGeneration` checkpoint → [`LlavaConfig`].
//!
//! Parsing is strict where a wrong guess would silently give wrong numbers (unknown `model_type`,
//! RoPE scaling, activations) and lenient about fields cmrm does not use.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::models::anyres::Anyres;

/// The checkpoint's model family (`config.json`'s `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// `llava` (`LlavaForConditionalGeneration`, LLaVA-1.5 / llava-interleave): one tile per image.
    Llava,
    /// `llava_next` (LLaVA-1.6): anyres tiles, unpadded, a newline per row.
    LlavaNext,
    /// `llava_onevision`: LLaVA-NeXT's tiles with SigLIP + Qwen2 and a bilinear shrink of large
    /// feature maps (`anyres_max_N`).
    LlavaOnevision,
}

impl ModelFamily {
    pub const ALL: [Self; 3] = [Self::Llava, Self::LlavaNext, Self::LlavaOnevision];

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == model_type)
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Llava => "llava",
            Self::LlavaNext => "llava_next",
            Self::LlavaOnevision => "llava_onevision",
        }
    }

    /// The transformers class that loads it.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Llava => "LlavaForConditionalGeneration",
            Self::LlavaNext => "LlavaNextForConditionalGeneration",
            Self::LlavaOnevision => "LlavaOnevisionForConditionalGeneration",
        }
    }
}

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
    /// Llama's layers with a sliding attention window (bakLlava's Mistral-7B).
    Mistral,
}

impl TextKind {
    /// llama.cpp's architecture name (GGUF `general.architecture`, control-vector `model_hint`).
    pub fn llama_cpp_arch(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Mistral => "mistral",
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
    /// SigLIP's attention-pooling head (`vision_use_head`, default true): in the checkpoint,
    /// never used by LLaVA.
    pub use_head: bool,
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
    /// Per layer: the attention window (a query sees its last `w` positions, itself included),
    /// or `None` for full causal attention. Mistral: every layer; Qwen2 with
    /// `use_sliding_window`: the layers from `max_window_layers` on (or as `layer_types` says).
    pub sliding_windows: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
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
    pub family: ModelFamily,
    /// LLaVA-NeXT / OneVision's tiling of an image; `None` for LLaVA (one tile).
    pub anyres: Option<Anyres>,
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
    /// Features the vision tower gives one tile (CLS dropped for `default` with CLIP): LLaVA's
    /// image tokens per image, the base tile's share of an anyres image.
    pub fn tokens_per_tile(&self) -> usize {
        match self.feature_select {
            FeatureSelect::Default if self.vision.kind == VisionKind::Clip => self.vision.num_patches(),
            _ => self.vision.num_positions(),
        }
    }

    /// Number of `<image>` tokens an image of `(height, width)` pixels expands to, alone in its
    /// prompt.
    pub fn image_tokens(&self, image: (usize, usize)) -> usize {
        self.image_tokens_among(image, 1)
    }

    /// [`Self::image_tokens`] for an image among `among` in one prompt (OneVision tiles only an
    /// image that is alone: the others are one tile and a newline).
    pub fn image_tokens_among(&self, image: (usize, usize), among: usize) -> usize {
        match &self.anyres {
            None => self.tokens_per_tile(),
            Some(anyres) if !anyres.tiles_among(among) => self.tokens_per_tile() + 1,
            Some(anyres) => {
                let side = self.vision.image_size / self.vision.patch_size;
                anyres.image_tokens(image, self.vision.image_size, side, self.tokens_per_tile())
            }
        }
    }

    /// Input dim of the projector: vision hidden × number of selected feature layers.
    pub fn projector_in_dim(&self) -> usize {
        self.vision.hidden_size * self.vision_feature_layers.len()
    }

    /// A short identifier of the architecture, written into vector files and checked on load.
    pub fn fingerprint(&self) -> String {
        let t = &self.text;
        // LLaVA's fingerprint has no family prefix (vector files written before the others).
        let family = match self.family {
            ModelFamily::Llava => String::new(),
            other => format!("{}-", other.model_type()),
        };
        family
            + &format!(
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
        Self::from_resolved(&resolve(root)?.config)
    }

    /// Build from a config whose defaults [`resolve`] has filled.
    fn from_resolved(root: &Value) -> Result<Self> {
        let model_type = root.get("model_type").and_then(Value::as_str).unwrap_or("");
        let Some(family) = ModelFamily::from_model_type(model_type) else {
            let known: Vec<String> =
                ModelFamily::ALL.iter().map(|f| format!("\"{}\" ({})", f.model_type(), f.class_name())).collect();
            bail!("unknown model_type '{model_type}': cmrm loads {}", known.join(", "));
        };
        let vision = parse_vision(&root["vision_config"]).context("in vision_config")?;
        let text = parse_text(&root["text_config"], root["tie_word_embeddings"].as_bool() == Some(true))
            .context("in text_config")?;

        let n_hidden_states = vision.num_hidden_layers as i64 + 1;
        let raw_layers: Vec<i64> = match &root["vision_feature_layer"] {
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_i64().context("vision_feature_layer entries must be integers"))
                .collect::<Result<_>>()?,
            v => vec![v.as_i64().context("vision_feature_layer must be an integer or a list")?],
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
        let feature_select = match root["vision_feature_select_strategy"].as_str().unwrap_or("") {
            "default" => FeatureSelect::Default,
            "full" => FeatureSelect::Full,
            other => bail!("unsupported vision_feature_select_strategy '{other}' (supported: default, full)"),
        };
        let image_token_id =
            u32::try_from(get_u64(root, "image_token_index")?).context("image_token_index does not fit 32 bits")?;
        let projector_act = Activation::from_hf(root["projector_hidden_act"].as_str().unwrap_or(""))?;
        let projector_bias = root["multimodal_projector_bias"].as_bool().unwrap_or(true);
        let anyres = match family {
            ModelFamily::Llava => None,
            ModelFamily::LlavaNext | ModelFamily::LlavaOnevision => {
                let aspect = root["vision_aspect_ratio"].as_str();
                let anyres = Anyres::from_config(&root["image_grid_pinpoints"], aspect, vision.image_size)
                    .context("in the anyres settings")?;
                Some(Anyres { single_images_only: family == ModelFamily::LlavaOnevision, ..anyres })
            }
        };
        // An image token outside the vocabulary fails when a prompt with an image is embedded,
        // as in transformers (which loads such a config and runs text-only prompts).
        Ok(Self {
            family,
            anyres,
            vision,
            text,
            vision_feature_layers,
            feature_select,
            image_token_id,
            projector_act,
            projector_bias,
        })
    }
}

/// A `config.json` with every key transformers would default filled in, and which keys those
/// are (`text_config.hidden_size`, …): what `cmrm inspect` prints.
#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    pub config: Value,
    pub defaulted: Vec<String>,
}

/// The defaults of transformers 5's config classes for the keys cmrm reads. `Value::Null`
/// marks a default derived from other keys (`num_key_value_heads` = heads, `head_dim` =
/// hidden / heads) or one the class leaves as `None`.
fn class_defaults(model_type: &str) -> Option<Vec<(&'static str, Value)>> {
    use serde_json::json;
    let text = |vocab: u64, hidden: u64, inter: u64, kv: Value, max_pos: u64, bos: Value, eos: Value| {
        vec![
            ("vocab_size", json!(vocab)),
            ("hidden_size", json!(hidden)),
            ("intermediate_size", json!(inter)),
            ("num_hidden_layers", json!(32)),
            ("num_attention_heads", json!(32)),
            ("num_key_value_heads", kv),
            ("hidden_act", json!("silu")),
            ("max_position_embeddings", json!(max_pos)),
            ("rms_norm_eps", json!(1e-6)),
            ("tie_word_embeddings", json!(false)),
            ("rope_theta", json!(10000.0)),
            ("bos_token_id", bos),
            ("eos_token_id", eos),
        ]
    };
    #[allow(clippy::too_many_arguments)]
    fn vision(
        hidden: u64,
        inter: u64,
        layers: u64,
        heads: u64,
        image: u64,
        patch: u64,
        act: &str,
        eps: f64,
    ) -> Vec<(&'static str, Value)> {
        vec![
            ("hidden_size", json!(hidden)),
            ("intermediate_size", json!(inter)),
            ("num_hidden_layers", json!(layers)),
            ("num_attention_heads", json!(heads)),
            ("num_channels", json!(3)),
            ("image_size", json!(image)),
            ("patch_size", json!(patch)),
            ("hidden_act", json!(act)),
            ("layer_norm_eps", json!(eps)),
        ]
    }
    Some(match model_type {
        "llama" => {
            let mut d = text(32000, 4096, 11008, Value::Null, 2048, json!(1), json!(2));
            d.extend([("attention_bias", json!(false)), ("mlp_bias", json!(false)), ("head_dim", Value::Null)]);
            d
        }
        "mistral" => {
            let mut d = text(32000, 4096, 14336, json!(8), 4096 * 32, json!(1), json!(2));
            d.extend([("head_dim", Value::Null), ("sliding_window", json!(4096))]);
            d
        }
        "qwen2" => {
            let mut d = text(151936, 4096, 22016, json!(32), 32768, Value::Null, Value::Null);
            d.extend([
                ("use_sliding_window", json!(false)),
                ("sliding_window", json!(4096)),
                ("max_window_layers", json!(28)),
            ]);
            d
        }
        "clip_vision_model" => vision(768, 3072, 12, 12, 224, 32, "quick_gelu", 1e-5),
        "siglip_vision_model" => vision(768, 3072, 12, 12, 224, 16, "gelu_pytorch_tanh", 1e-6),
        _ => return None,
    })
}

/// Fill a sub-config's absent keys with its class's defaults (`prefix`: its path, for the list
/// of defaulted keys). Unknown model types are left as they are (the parser names them).
fn fill_defaults(v: &mut Value, prefix: &str, defaulted: &mut Vec<String>) {
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("").to_owned();
    let Some(defaults) = class_defaults(&model_type) else { return };
    let Some(obj) = v.as_object_mut() else { return };
    for (key, default) in defaults {
        if obj.get(key).is_some_and(|x| !x.is_null()) {
            continue;
        }
        // `rope_theta` may live in transformers 5's `rope_parameters` instead.
        if key == "rope_theta"
            && obj.get("rope_parameters").and_then(|p| p.get("rope_theta")).is_some_and(|x| !x.is_null())
        {
            continue;
        }
        // An explicit `null` where the class derives the value also means "derive it".
        let derived = match key {
            "num_key_value_heads" if default.is_null() => obj.get("num_attention_heads").cloned(),
            "head_dim" => {
                let hidden = obj.get("hidden_size").and_then(Value::as_u64);
                let heads = obj.get("num_attention_heads").and_then(Value::as_u64).filter(|&h| h > 0);
                hidden.zip(heads).map(|(h, n)| Value::from(h / n))
            }
            _ => None,
        };
        let value = derived.unwrap_or(default);
        if value.is_null() && obj.contains_key(key) {
            continue; // an explicit null the class keeps as None (e.g. Qwen2's bos_token_id)
        }
        obj.insert(key.to_owned(), value);
        defaulted.push(format!("{prefix}{key}"));
    }
}

/// `config.json` with transformers' defaults filled in, as the family's config class resolves
/// it: a missing `text_config` / `vision_config` is the class's default sub-config (LLaVA and
/// LLaVA-NeXT: Llama and the llava-1.5 CLIP ViT-L/14-336; OneVision: Qwen2 and SigLIP-so400m/14
/// at 384 px without its head); a sub-config without `model_type` is the class's; then every
/// key the classes default. `tie_word_embeddings` at the top is forwarded from the text config
/// when that one ties (the classes' `__post_init__`).
pub fn resolve(root: &Value) -> Result<ResolvedConfig> {
    use serde_json::json;
    let mut config = root.clone();
    let obj = config.as_object_mut().context("config.json is not a JSON object")?;
    let mut defaulted = Vec::new();
    let family = obj.get("model_type").and_then(Value::as_str).and_then(ModelFamily::from_model_type);
    if let Some(family) = family {
        let (vision_type, text_type) = match family {
            ModelFamily::LlavaOnevision => ("siglip_vision_model", "qwen2"),
            _ => ("clip_vision_model", "llama"),
        };
        if obj.get("vision_config").is_none_or(Value::is_null) {
            let vision = match family {
                ModelFamily::LlavaOnevision => json!({"model_type": vision_type, "hidden_size": 1152,
                    "intermediate_size": 4304, "patch_size": 14, "image_size": 384, "num_hidden_layers": 26,
                    "num_attention_heads": 16, "vision_use_head": false}),
                _ => json!({"model_type": vision_type, "intermediate_size": 4096, "hidden_size": 1024,
                    "patch_size": 14, "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16}),
            };
            obj.insert("vision_config".into(), vision);
            defaulted.push("vision_config".to_owned());
        }
        if obj.get("text_config").is_none_or(Value::is_null) {
            obj.insert("text_config".into(), json!({"model_type": text_type}));
            defaulted.push("text_config".to_owned());
        }
        for (key, model_type) in [("vision_config", vision_type), ("text_config", text_type)] {
            let sub = obj.get_mut(key).expect("inserted above");
            let sub = sub.as_object_mut().with_context(|| format!("{key} is not a JSON object"))?;
            if !sub.contains_key("model_type") {
                sub.insert("model_type".into(), json!(model_type));
                defaulted.push(format!("{key}.model_type"));
            }
        }
        fill_defaults(obj.get_mut("vision_config").expect("present"), "vision_config.", &mut defaulted);
        fill_defaults(obj.get_mut("text_config").expect("present"), "text_config.", &mut defaulted);
        if obj.get("image_token_index").is_none_or(Value::is_null) {
            if let Some(id) = obj.get("image_token_id").filter(|v| !v.is_null()).cloned() {
                obj.insert("image_token_index".into(), id);
            }
        }
        let mut defaults = vec![
            ("image_token_index", json!(32000)),
            ("projector_hidden_act", json!("gelu")),
            ("vision_feature_select_strategy", json!("default")),
            ("vision_feature_layer", json!(-2)),
            ("multimodal_projector_bias", json!(true)),
            ("tie_word_embeddings", json!(false)),
        ];
        match family {
            ModelFamily::Llava => {}
            ModelFamily::LlavaNext => defaults
                .push(("image_grid_pinpoints", json!([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]))),
            ModelFamily::LlavaOnevision => {
                let sides = [384, 768, 1152, 1536, 1920, 2304];
                let pinpoints: Vec<[u64; 2]> = sides.iter().flat_map(|&h| sides.map(|w| [h, w])).collect();
                defaults[0].1 = json!(151646);
                defaults[2].1 = json!("full");
                defaults[3].1 = json!(-1);
                defaults.push(("image_grid_pinpoints", json!(pinpoints)));
                defaults.push(("vision_aspect_ratio", json!("anyres_max_9")));
            }
        }
        for (key, default) in defaults {
            if obj.get(key).is_none_or(Value::is_null) {
                obj.insert(key.into(), default);
                defaulted.push(key.to_owned());
            }
        }
        let text_ties = obj["text_config"].get("tie_word_embeddings").and_then(Value::as_bool) == Some(true);
        if obj["tie_word_embeddings"].as_bool() != Some(true) && text_ties {
            obj.insert("tie_word_embeddings".into(), json!(true));
        }
    }
    Ok(ResolvedConfig { config, defaulted })
}

fn get_u64(v: &Value, key: &str) -> Result<u64> {
    v.get(key).and_then(Value::as_u64).with_context(|| format!("'{key}' must be a non-negative integer"))
}

fn get_usize(v: &Value, key: &str) -> Result<usize> {
    usize::try_from(get_u64(v, key)?).with_context(|| format!("'{key}' is too large"))
}

fn get_f64(v: &Value, key: &str) -> Result<f64> {
    v.get(key).and_then(Value::as_f64).with_context(|| format!("'{key}' must be a number"))
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
        Some(Value::Array(items)) => {
            items.iter().filter_map(Value::as_u64).filter_map(|x| u32::try_from(x).ok()).collect()
        }
        _ => vec![],
    }
}

/// The ids that end an answer: `generation_config.json`'s `eos_token_id` (int or list), else the
/// text config's (what transformers' `generate` uses).
pub fn eos_ids(config: &LlavaConfig, generation_config: Option<&str>) -> Result<Vec<u32>> {
    let from_generation = match generation_config {
        Some(text) => eos_ids_from_generation_config(text)?,
        None => Vec::new(),
    };
    Ok(if from_generation.is_empty() { config.text.eos_token_ids.clone() } else { from_generation })
}

/// Token ids from a `generation_config.json`'s `eos_token_id` (int or list).
pub fn eos_ids_from_generation_config(text: &str) -> Result<Vec<u32>> {
    let v: Value = serde_json::from_str(text).context("generation_config.json is not valid JSON")?;
    Ok(token_ids(v.get("eos_token_id")))
}

fn parse_vision(v: &Value) -> Result<VisionConfig> {
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let kind = match model_type {
        "clip_vision_model" => VisionKind::Clip,
        "siglip_vision_model" => VisionKind::Siglip,
        other => bail!("unknown vision model_type '{other}' (supported: clip_vision_model, siglip_vision_model)"),
    };
    let cfg = VisionConfig {
        kind,
        hidden_size: get_usize(v, "hidden_size")?,
        intermediate_size: get_usize(v, "intermediate_size")?,
        num_hidden_layers: get_usize(v, "num_hidden_layers")?,
        num_attention_heads: get_usize(v, "num_attention_heads")?,
        num_channels: get_usize(v, "num_channels")?,
        image_size: get_usize(v, "image_size").context("image_size must be one integer (square images)")?,
        patch_size: get_usize(v, "patch_size").context("patch_size must be one integer (square patches)")?,
        layer_norm_eps: get_f64(v, "layer_norm_eps")?,
        hidden_act: Activation::from_hf(v["hidden_act"].as_str().unwrap_or(""))?,
        use_head: kind == VisionKind::Siglip && v.get("vision_use_head").and_then(Value::as_bool) != Some(false),
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

fn parse_text(v: &Value, tie: bool) -> Result<TextConfig> {
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let kind = match model_type {
        "llama" => TextKind::Llama,
        "qwen2" => TextKind::Qwen2,
        "mistral" => TextKind::Mistral,
        other => bail!("unknown text model_type '{other}' (supported: llama, qwen2, mistral)"),
    };
    let hidden_size = get_usize(v, "hidden_size")?;
    let num_attention_heads = get_usize(v, "num_attention_heads")?;
    let num_key_value_heads = get_usize(v, "num_key_value_heads")?;
    if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
        bail!(
            "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
        );
    }
    // transformers' LlamaConfig validates this even with an explicit head_dim.
    if kind == TextKind::Llama && (num_attention_heads == 0 || !hidden_size.is_multiple_of(num_attention_heads)) {
        bail!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}");
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
    // plus `rope_scaling`, which wins when both are there (`rope_scaling or rope_parameters`).
    let rope_params =
        v.get("rope_scaling").filter(|p| p.is_object()).or_else(|| v.get("rope_parameters").filter(|p| p.is_object()));
    let rope_theta = rope_params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or_else(|| v.get("rope_theta").and_then(Value::as_f64))
        .unwrap_or(10_000.0);
    let rope_type = rope_params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if rope_type != "default" {
        bail!("RoPE type '{rope_type}' is not supported (only the default RoPE)");
    }
    let num_hidden_layers = get_usize(v, "num_hidden_layers")?;
    if num_hidden_layers == 0 {
        bail!("num_hidden_layers is 0");
    }
    let sliding_windows = sliding_windows(kind, v, num_hidden_layers)?;
    let attention_bias = v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false);
    let (qkv_bias, o_bias) = match kind {
        TextKind::Llama => (attention_bias, attention_bias),
        TextKind::Qwen2 => (true, false),
        TextKind::Mistral => (false, false),
    };
    Ok(TextConfig {
        kind,
        vocab_size: get_usize(v, "vocab_size")?,
        hidden_size,
        intermediate_size: get_usize(v, "intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: get_f64(v, "rms_norm_eps")?,
        rope_theta,
        max_position_embeddings: get_usize(v, "max_position_embeddings")?,
        qkv_bias,
        o_bias,
        mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
        hidden_act: Activation::from_hf(v["hidden_act"].as_str().unwrap_or(""))?,
        tie_word_embeddings: tie,
        sliding_windows,
        bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).and_then(|x| u32::try_from(x).ok()),
        eos_token_ids: token_ids(v.get("eos_token_id")),
    })
}

/// Each layer's attention window, as transformers' Mistral / Qwen2 configs decide it.
fn sliding_windows(kind: TextKind, v: &Value, layers: usize) -> Result<Vec<Option<usize>>> {
    let window = match v.get("sliding_window") {
        None | Some(Value::Null) => None,
        Some(w) => Some(w.as_u64().filter(|&w| w > 0).context("sliding_window must be a positive integer")? as usize),
    };
    Ok(match kind {
        TextKind::Llama => vec![None; layers],
        TextKind::Mistral => vec![window; layers],
        TextKind::Qwen2 => {
            let used = if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) { window } else { None };
            match v.get("layer_types").and_then(Value::as_array) {
                Some(types) => {
                    if types.len() != layers {
                        bail!("layer_types lists {} layers, the model has {layers}", types.len());
                    }
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            Some("full_attention") => Ok(None),
                            Some("sliding_attention") => Ok(used),
                            other => bail!("unsupported layer type {other:?} (full_attention, sliding_attention)"),
                        })
                        .collect::<Result<_>>()?
                }
                None => {
                    let first = v.get("max_window_layers").and_then(Value::as_u64).unwrap_or(28) as usize;
                    (0..layers).map(|i| if i >= first { used } else { None }).collect()
                }
            }
        }
    })
}
