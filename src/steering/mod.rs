//! Steering vectors (`layer.{l}` files) and the intervention applied to decoder-block outputs.
//!
//! Library convention: an [`Intervention`] *adds* `scale · v_l` to the output of block `l`
//! (0-based), the semantics of the oracle's `steer()`. CMRM subtracts: [`Intervention::cmrm`]
//! uses `scale = −α`, so `h_l ← h_l − α·v_l`.

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::config::LlavaConfig;

pub mod control_vector;

/// Which positions of the sequence are steered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Every position of every forward pass: the prompt and each generated token.
    All,
    /// Only the last prompt token (absolute position `prompt_len − 1`). Later tokens still attend
    /// to its steered keys and values.
    Last,
    /// Only generated tokens (absolute positions ≥ `prompt_len`).
    Generated,
    /// The last prompt token and every generated token (positions ≥ `prompt_len − 1`): the state
    /// that produces the first answer token, and every later one.
    #[serde(rename = "last+generated")]
    LastAndGenerated,
}

impl std::str::FromStr for Positions {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Self::All),
            "last" => Ok(Self::Last),
            "generated" => Ok(Self::Generated),
            "last+generated" => Ok(Self::LastAndGenerated),
            other => bail!("positions must be all, last, generated or last+generated (got '{other}')"),
        }
    }
}

/// `format` value of cmrm's own vector files.
pub const VECTORS_FORMAT: &str = "cmrm-vectors/1";

/// Per-layer vectors `v_l` (`[hidden]` each) with the file's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct SteeringVectors {
    pub hidden_size: usize,
    /// Layer index → vector.
    pub layers: BTreeMap<usize, Vec<f32>>,
    /// The safetensors `__metadata__` (format, model, method, anchor, sign, defaults…).
    pub metadata: HashMap<String, String>,
}

impl SteeringVectors {
    pub fn new(hidden_size: usize, layers: BTreeMap<usize, Vec<f32>>) -> Result<Self> {
        for (l, v) in &layers {
            if v.len() != hidden_size {
                bail!("layer.{l} has {} values, expected hidden size {hidden_size}", v.len());
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!("layer.{l} holds a non-finite value ({}) at index {i}", v[i]);
            }
        }
        Ok(Self { hidden_size, layers, metadata: HashMap::new() })
    }

    /// Parse a safetensors vector file: tensors `layer.{l}` F32 `[hidden]`. `name` labels errors.
    pub fn from_safetensors_bytes(name: &str, bytes: &[u8]) -> Result<Self> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("{name}: not a valid safetensors file ({e})"))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow!("{name}: not a valid safetensors file ({e})"))?;
        let mut layers = BTreeMap::new();
        let mut hidden = None;
        for (key, view) in st.tensors() {
            let Some(index) = key.strip_prefix("layer.") else {
                bail!("{name}: unexpected tensor '{key}' (a vector file holds only layer.{{l}} tensors)");
            };
            let l: usize = index.parse().map_err(|_| anyhow!("{name}: tensor '{key}' has no layer number"))?;
            if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 1 {
                bail!("{name}: tensor '{key}' must be F32 [hidden], got {:?} {:?}", view.dtype(), view.shape());
            }
            let n = view.shape()[0];
            if *hidden.get_or_insert(n) != n {
                bail!("{name}: tensor '{key}' has {n} values, other layers have {}", hidden.unwrap_or(0));
            }
            let values: Vec<f32> =
                view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            layers.insert(l, values);
        }
        let Some(hidden_size) = hidden else { bail!("{name}: the file holds no layer.{{l}} tensors") };
        let mut this = Self::new(hidden_size, layers).with_context(|| name.to_owned())?;
        this.metadata = meta.metadata().clone().unwrap_or_default();
        Ok(this)
    }

    /// Parse a vector file in either format, told apart by its first bytes: cmrm safetensors, or a
    /// llama.cpp GGUF control vector (negated on import, see `gguf.rs`).
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self> {
        if bytes.starts_with(b"GGUF") {
            control_vector::import_control_vector(name, bytes)
        } else {
            Self::from_safetensors_bytes(name, bytes)
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(&path.display().to_string(), &bytes)
    }

    /// Serialize as a safetensors file with `layer.{l}` tensors and this metadata. The bytes are
    /// deterministic (header keys sorted), so the same vectors always have the same sha256 — what
    /// a catalog entry pins. (`safetensors::serialize` writes metadata in `HashMap` order.)
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let mut header = serde_json::Map::new();
        if !self.metadata.is_empty() {
            let sorted: BTreeMap<&String, &String> = self.metadata.iter().collect();
            header.insert("__metadata__".into(), serde_json::to_value(sorted)?);
        }
        let mut data = Vec::with_capacity(self.layers.len() * self.hidden_size * 4);
        for (l, v) in &self.layers {
            if v.len() != self.hidden_size {
                bail!("layer {l} has {} values, expected {}", v.len(), self.hidden_size);
            }
            let start = data.len();
            data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            header.insert(
                format!("layer.{l}"),
                serde_json::json!({"dtype": "F32", "shape": [self.hidden_size], "data_offsets": [start, data.len()]}),
            );
        }
        let mut json = serde_json::to_vec(&header)?;
        // The format pads the header with spaces to a multiple of 8 bytes.
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let mut out = Vec::with_capacity(8 + json.len() + data.len());
        out.extend((json.len() as u64).to_le_bytes());
        out.extend(json);
        out.extend(data);
        Ok(out)
    }

    /// Check that the vectors fit a model: hidden size, layer indices, and the `model` hint when
    /// the file records the model's fingerprint.
    pub fn validate_for(&self, name: &str, config: &LlavaConfig) -> Result<()> {
        let hidden = config.text.hidden_size;
        let n_layers = config.text.num_hidden_layers;
        if self.hidden_size != hidden {
            bail!("{name}: vectors have hidden size {}, the model's hidden size is {hidden} — these vectors are for another model", self.hidden_size);
        }
        if let Some((&l, _)) = self.layers.iter().next_back().filter(|(&l, _)| l >= n_layers) {
            bail!(
                "{name}: vectors include layer.{l}, the model has only {n_layers} decoder layers (0..{})",
                n_layers - 1
            );
        }
        // cmrm files record the architecture fingerprint of the model they were extracted from.
        if self.metadata.get("format").map(String::as_str) == Some(VECTORS_FORMAT) {
            if let Some(model) = self.metadata.get("model").filter(|m| **m != config.fingerprint()) {
                bail!("{name}: vectors were extracted from model '{model}', this model is '{}'", config.fingerprint());
            }
        }
        if let Some(declared) = self.metadata.get("num_layers").and_then(|s| s.parse::<usize>().ok()) {
            if declared != n_layers {
                bail!("{name}: vectors were made for a model with {declared} layers, this model has {n_layers}");
            }
        }
        Ok(())
    }

    /// The sign convention recorded in the file: `add` only when the file says so; `subtract`
    /// (CMRM: h − α·v) for cmrm files, GGUF imports and files that record no sign.
    pub fn sign(&self) -> &str {
        match self.metadata.get("sign").map(String::as_str) {
            Some("add") => "add",
            _ => "subtract",
        }
    }
}

/// Parse a `--layers` spec: `all`, `0,2,5`, `3-7`, or a mix (`0,3-5`).
pub fn parse_layers(spec: &str, num_layers: usize) -> Result<Vec<usize>> {
    if spec.trim() == "all" {
        return Ok((0..num_layers).collect());
    }
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| anyhow!("bad layer '{part}' in '{spec}' (use all, 0,2,5 or 3-7)"))?;
        let b: usize = b.parse().map_err(|_| anyhow!("bad layer '{part}' in '{spec}' (use all, 0,2,5 or 3-7)"))?;
        if a > b {
            bail!("layer range '{part}' is reversed");
        }
        if b >= num_layers {
            bail!("layer {b} is out of range: the model has {num_layers} decoder layers (0..{})", num_layers - 1);
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        bail!("no layers in '{spec}'");
    }
    Ok(out)
}

/// What a user asks of a vector file (`cmrm generate` flags, the page's Compare options); what is
/// left out comes from the file's recorded defaults (`default_alpha`, `default_layers`,
/// `default_positions`), else α = 1, every layer the file holds and every position. The CLI and the
/// page resolve steering only through [`SteeringRequest::resolve`].
#[derive(Debug, Clone, Default)]
pub struct SteeringRequest {
    pub alpha: Option<f32>,
    /// `all`, `0,2,5`, `3-7`.
    pub layers: Option<String>,
    pub positions: Option<Positions>,
}

/// A request with every choice made, and its intervention.
#[derive(Debug, Clone)]
pub struct ResolvedSteering {
    pub alpha: f32,
    pub layers: Vec<usize>,
    pub positions: Positions,
    pub intervention: Intervention,
}

impl SteeringRequest {
    pub fn resolve(&self, vectors: &SteeringVectors, num_layers: usize, device: &Device) -> Result<ResolvedSteering> {
        let meta = |key: &str| vectors.metadata.get(key).map(String::as_str);
        let alpha = match self.alpha {
            Some(a) => a,
            None => meta("default_alpha").and_then(|a| a.parse().ok()).unwrap_or(1.0),
        };
        if !alpha.is_finite() {
            bail!("alpha must be a finite number (got {alpha})");
        }
        // `all` is every layer the file holds (a llama.cpp control vector has no layer 0).
        let layers = match self.layers.as_deref().or(meta("default_layers")) {
            Some(spec) if spec.trim() != "all" => parse_layers(spec, num_layers)?,
            _ => vectors.layers.keys().copied().filter(|&l| l < num_layers).collect(),
        };
        let positions = match self.positions {
            Some(p) => p,
            None => meta("default_positions").map(str::parse).transpose()?.unwrap_or(Positions::All),
        };
        let intervention = Intervention::from_file(vectors, alpha, Some(&layers), positions, device)?;
        Ok(ResolvedSteering { alpha, layers, positions, intervention })
    }
}

/// Deltas ready to add to block outputs: `delta_l = scale · v_l` as `[1, 1, H]` tensors.
#[derive(Debug, Clone)]
pub struct Intervention {
    deltas: BTreeMap<usize, Tensor>,
    pub positions: Positions,
}

impl Intervention {
    /// `h_l ← h_l + scale·v_l` for each `l` in `layers` (every layer of the file when `None`).
    /// Layers the file lacks are an error.
    pub fn add(
        vectors: &SteeringVectors,
        scale: f32,
        layers: Option<&[usize]>,
        positions: Positions,
        device: &Device,
    ) -> Result<Self> {
        let chosen: Vec<usize> = match layers {
            Some(ls) => ls.to_vec(),
            None => vectors.layers.keys().copied().collect(),
        };
        let mut deltas = BTreeMap::new();
        for l in chosen {
            let v = vectors.layers.get(&l).with_context(|| format!("the vectors have no layer.{l}"))?;
            // scale·v in f32 first, then broadcast (the oracle's order of operations).
            let delta: Vec<f32> = v.iter().map(|x| x * scale).collect();
            deltas.insert(l, Tensor::from_vec(delta, (1, 1, vectors.hidden_size), device)?);
        }
        Ok(Self { deltas, positions })
    }

    /// A vector file applied with α as its `sign` says: `h − α·v` (CMRM, the default) or, for
    /// files that record `sign = add`, `h + α·v`. The CLI and the page both use this.
    pub fn from_file(
        vectors: &SteeringVectors,
        alpha: f32,
        layers: Option<&[usize]>,
        positions: Positions,
        device: &Device,
    ) -> Result<Self> {
        let scale = if vectors.sign() == "add" { alpha } else { -alpha };
        Self::add(vectors, scale, layers, positions, device)
    }

    /// CMRM: `h_l ← h_l − α·v_l`.
    pub fn cmrm(
        vectors: &SteeringVectors,
        alpha: f32,
        layers: Option<&[usize]>,
        positions: Positions,
        device: &Device,
    ) -> Result<Self> {
        Self::add(vectors, -alpha, layers, positions, device)
    }

    pub fn layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.deltas.keys().copied()
    }

    /// Whether block `layer`'s output is changed at all.
    pub fn steers_layer(&self, layer: usize) -> bool {
        self.deltas.contains_key(&layer)
    }

    /// The first absolute position this steers (`None`: none, as with no layers). Every earlier
    /// position has the unaltered states, so sequences that differ only in their steering can
    /// share the prompt up to here.
    pub fn first_position(&self, prompt_len: usize) -> Option<usize> {
        if self.deltas.is_empty() {
            return None;
        }
        Some(match self.positions {
            Positions::All => 0,
            Positions::Last | Positions::LastAndGenerated => prompt_len.saturating_sub(1),
            Positions::Generated => prompt_len,
        })
    }

    fn steers_position(&self, pos: usize, prompt_len: usize) -> bool {
        match self.positions {
            Positions::All => true,
            Positions::Last => pos + 1 == prompt_len,
            Positions::Generated => pos >= prompt_len,
            Positions::LastAndGenerated => pos + 1 >= prompt_len,
        }
    }

    /// Apply to the output `xs` `[B, t, H]` of block `layer` (every sequence of the batch alike),
    /// whose rows are absolute positions `start .. start + t`; `prompt_len` counts every prompt
    /// token (BOS and image tokens included).
    pub fn apply(&self, layer: usize, xs: &Tensor, start: usize, prompt_len: usize) -> candle_core::Result<Tensor> {
        let Some(delta) = self.deltas.get(&layer) else { return Ok(xs.clone()) };
        let t = xs.dim(1)?;
        let rows: Vec<bool> = (start..start + t).map(|pos| self.steers_position(pos, prompt_len)).collect();
        if rows.iter().all(|&r| r) {
            return xs.broadcast_add(delta);
        }
        if !rows.iter().any(|&r| r) {
            return Ok(xs.clone());
        }
        // Add delta only on the chosen rows; the others get an exact +0.
        let mask: Vec<f32> = rows.iter().map(|&r| if r { 1.0 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (1, t, 1), xs.device())?;
        xs.broadcast_add(&mask.broadcast_mul(delta)?)
    }
}
