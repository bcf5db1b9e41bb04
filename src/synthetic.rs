//! Deterministic random-weight checkpoints in the llava-hf layout, for tests and benchmarks on
//! real shapes without a download: every tensor a config needs, each value drawn by a
//! counter-based generator (splitmix64 of the tensor name's FNV-1a hash plus the element index)
//! that `tests/fixtures/real/make_real_refs.py` reproduces with numpy — so transformers computes
//! its references on exactly the weights this module writes.
//!
//! Value `i` of tensor `name` (BF16 on disk, rounded to nearest even):
//! `offset + (2·u − 1)·scale` in f32, `u = (splitmix64(fnv1a64(name) + (i+1)·φ) >> 40) / 2²⁴`,
//! with `(offset, scale)` from [`distribution`].

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::config::LlavaConfig;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn splitmix64(x: u64) -> u64 {
    let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `(offset, scale)` of a tensor's values by its hub name and shape: norm weights near 1, small
/// biases and position tables, linears `±gain/√fan_in`, the token table `±0.135` (logits with a
/// spread of about 2.5, so greedy tokens are decided by clear margins).
pub fn distribution(name: &str, shape: &[usize]) -> (f32, f32) {
    let fan_in: usize = shape.iter().skip(1).product();
    if name.contains("norm") || name.contains("layrnorm") {
        if name.ends_with(".bias") {
            (0.0, 0.05)
        } else {
            (1.0, 0.1)
        }
    } else if name.ends_with(".bias") {
        (0.0, 0.02)
    } else if name.contains("embed_tokens") || name.contains("lm_head") {
        (0.0, 0.135)
    } else if name.contains("position_embedding") || name.contains("class_embedding") {
        (0.0, 0.1)
    } else {
        // Sharper attention (q, k ×4) and stronger attention outputs (v, o ×2): without them a
        // shallow random model mostly copies its input token, and greedy decoding settles on
        // one token; with them, answers depend on the context and vary.
        let gain = if name.contains("q_proj") || name.contains("k_proj") {
            4.0
        } else if name.contains("v_proj") || name.contains("o_proj") {
            2.0
        } else {
            1.0
        };
        (0.0, gain / (fan_in.max(1) as f32).sqrt())
    }
}

/// Values `start .. start + out.len()` of tensor `name`, in f32.
pub fn fill(name: &str, (offset, scale): (f32, f32), start: u64, out: &mut [f32]) {
    let seed = fnv1a64(name);
    for (k, v) in out.iter_mut().enumerate() {
        let i = start + k as u64;
        let bits = splitmix64(seed.wrapping_add((i + 1).wrapping_mul(GOLDEN)));
        let u = (bits >> 40) as f32 / (1u32 << 24) as f32;
        *v = offset + (2.0 * u - 1.0) * scale;
    }
}

/// `(name, shape)` of every tensor a model asked for.
type Recorded = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<usize>)>>>;

/// Records the names and shapes a model asks for, answering with (broadcast) zeros.
struct ShapeRecorder(Recorded);

impl SimpleBackend for ShapeRecorder {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().expect("not poisoned").push((name.to_owned(), s.dims().to_vec()));
        // A broadcast scalar: the shape without the memory (a 7B config records in megabytes).
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        // A tied lm_head is the token table: not a tensor of its own.
        !name.starts_with("lm_head.")
    }
}

/// The llava-hf key of a canonical tensor name (the inverse of `weights::canonical_key`).
fn hub_key(canonical: &str) -> String {
    for (from, to) in [
        ("lm_head.", "language_model.lm_head."),
        ("lm.", "language_model.model."),
        ("vision.", "vision_tower.vision_model."),
        ("projector.", "multi_modal_projector."),
    ] {
        if let Some(rest) = canonical.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    canonical.to_owned()
}

/// Every tensor of a config's checkpoint, as transformers' `LlavaForConditionalGeneration` holds
/// them: `(llava-hf key, shape)`, sorted by key.
pub fn tensor_specs(cfg: &LlavaConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let recorded = Recorded::default();
    let vb =
        VarBuilder::from_backend(Box::new(ShapeRecorder(std::sync::Arc::clone(&recorded))), DType::F32, Device::Cpu);

    let f32 = crate::quant::WeightFormat::F32;
    drop(crate::models::llava::LlavaModel::new(cfg, f32, vb).context("recording the model's tensors")?);
    let mut specs: Vec<(String, Vec<usize>)> =
        recorded.lock().expect("not poisoned").iter().map(|(n, s)| (hub_key(n), s.clone())).collect();
    // Tensors transformers' model holds that LLaVA never uses (so cmrm never asks for them): the
    // vision tower's final norm, and SigLIP's pooling head unless `vision_use_head` is false.
    let (h, i) = (cfg.vision.hidden_size, cfg.vision.intermediate_size);
    let mut unused = vec![("post_layernorm.weight", vec![h]), ("post_layernorm.bias", vec![h])];
    if cfg.vision.use_head {
        unused.extend([
            ("head.probe", vec![1, 1, h]),
            ("head.attention.in_proj_weight", vec![3 * h, h]),
            ("head.attention.in_proj_bias", vec![3 * h]),
            ("head.attention.out_proj.weight", vec![h, h]),
            ("head.attention.out_proj.bias", vec![h]),
            ("head.layernorm.weight", vec![h]),
            ("head.layernorm.bias", vec![h]),
            ("head.mlp.fc1.weight", vec![i, h]),
            ("head.mlp.fc1.bias", vec![i]),
            ("head.mlp.fc2.weight", vec![h, i]),
            ("head.mlp.fc2.bias", vec![h]),
        ]);
    }
    specs.extend(unused.into_iter().map(|(name, shape)| (format!("vision_tower.vision_model.{name}"), shape)));
    specs.sort();
    specs.dedup();
    Ok(specs)
}

/// Write `model.safetensors` (BF16, llava-hf keys) for `cfg` into `path`, a slice of values at a
/// time (a 1.7 GB checkpoint needs a few MB of memory). Returns the bytes written.
#[cfg(not(target_arch = "wasm32"))]
pub fn write_safetensors(cfg: &LlavaConfig, path: &std::path::Path) -> Result<u64> {
    use std::io::Write;
    let specs = tensor_specs(cfg)?;
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in &specs {
        let bytes = shape.iter().product::<usize>() as u64 * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header)?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    crate::atomic_file::write_with(path, |out| {
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        let mut values = vec![0f32; 1 << 20];
        let mut bytes = Vec::with_capacity(2 << 20);
        for (name, shape) in &specs {
            let n = shape.iter().product::<usize>() as u64;
            let dist = distribution(name, shape);
            let mut done = 0u64;
            while done < n {
                let len = (n - done).min(values.len() as u64) as usize;
                fill(name, dist, done, &mut values[..len]);
                bytes.clear();
                bytes.extend(values[..len].iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()));
                out.write_all(&bytes)?;
                done += len as u64;
            }
        }
        Ok(())
    })?;
    Ok(8 + json.len() as u64 + offset)
}

/// A config's synthetic tensors as an export source: the values [`write_safetensors`] writes
/// (BF16-rounded), generated when asked for, so `cmrm synthesize --format q4` writes the GGUF
/// `cmrm quantize` would make of that checkpoint without writing the checkpoint.
pub struct SyntheticTensors {
    /// `(llava-hf key, canonical name, shape)`, sorted by key.
    specs: Vec<(String, String, Vec<usize>)>,
}

impl SyntheticTensors {
    pub fn new(cfg: &LlavaConfig) -> Result<Self> {
        let specs = tensor_specs(cfg)?
            .into_iter()
            .filter_map(|(key, shape)| Some((key.clone(), crate::weights::canonical_key(&key)?, shape)))
            .collect();
        Ok(Self { specs })
    }
}

impl crate::quant_export::TensorSource for SyntheticTensors {
    fn tensor_keys(&self) -> Vec<(String, String)> {
        self.specs.iter().map(|(k, c, _)| (k.clone(), c.clone())).collect()
    }

    fn tensor(&self, canonical: &str, dtype: DType) -> Result<Tensor> {
        let (key, _, shape) =
            self.specs.iter().find(|(_, c, _)| c == canonical).with_context(|| format!("no tensor '{canonical}'"))?;
        let mut values = vec![0f32; shape.iter().product()];
        fill(key, distribution(key, shape), 0, &mut values);
        let rounded: Vec<half::bf16> = values.into_iter().map(half::bf16::from_f32).collect();
        Ok(Tensor::from_vec(rounded, shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?)
    }
}

/// A complete checkpoint folder: the small files of `files` (a `.gz` is decompressed; a README
/// is not copied), `config.json` with `layers` = `(text, vision)` layers when given (a
/// reduced-depth copy of a real config), and weights: [`write_safetensors`] (BF16), or with
/// `format` the `cmrm quantize` GGUF of those weights (`model.gguf`). Returns the config.
#[cfg(not(target_arch = "wasm32"))]
pub fn write_checkpoint(
    files: &std::path::Path,
    out: &std::path::Path,
    layers: Option<(usize, usize)>,
    format: Option<crate::quant::WeightFormat>,
) -> Result<LlavaConfig> {
    std::fs::create_dir_all(out)?;
    for entry in std::fs::read_dir(files)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        // (a folder's own weights are not copied: this one gets its own)
        let weights = crate::weights::is_weight_file(&name) || name.ends_with(".safetensors.index.json");
        if name.ends_with(".md") || !path.is_file() || weights {
            continue;
        }
        if let Some(plain) = name.strip_suffix(".gz") {
            let mut decoder = flate2::read::GzDecoder::new(std::fs::File::open(&path)?);
            let mut target = std::fs::File::create(out.join(plain))?;
            std::io::copy(&mut decoder, &mut target).with_context(|| format!("decompressing {}", path.display()))?;
        } else {
            std::fs::copy(&path, out.join(&name))?;
        }
    }
    let config_path = out.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    if let Some((text, vision)) = layers {
        config["text_config"]["num_hidden_layers"] = text.into();
        config["vision_config"]["num_hidden_layers"] = vision.into();
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;
    }
    let cfg = LlavaConfig::from_value(&config)?;
    match format {
        None => {
            write_safetensors(&cfg, &out.join("model.safetensors"))?;
        }
        Some(format) => {
            let target = out.join("model.gguf");
            let source = SyntheticTensors::new(&cfg)?;
            crate::atomic_file::write_with(&target, |file| {
                let mut spill = crate::atomic_file::TempFile::beside(&target, "tensors")?;
                crate::quant_export::write_quantized_gguf(&source, format, file, &mut spill.file)
            })?;
        }
    }
    Ok(cfg)
}

/// sha256 over every tensor's BF16 bytes, in key order: equal to the digest make_real_refs.py
/// records when both wrote the same values.
#[cfg(not(target_arch = "wasm32"))]
pub fn weights_digest(cfg: &LlavaConfig) -> Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut values = vec![0f32; 1 << 20];
    for (name, shape) in tensor_specs(cfg)? {
        let n = shape.iter().product::<usize>() as u64;
        let dist = distribution(&name, &shape);
        let mut done = 0u64;
        while done < n {
            let len = (n - done).min(values.len() as u64) as usize;
            fill(&name, dist, done, &mut values[..len]);
            for v in &values[..len] {
                hasher.update(half::bf16::from_f32(*v).to_le_bytes());
            }
            done += len as u64;
        }
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_the_documented_one() {
        // Pinned values: make_real_refs.py asserts the same three numbers.
        let mut v = [0f32; 3];
        fill("language_model.model.norm.weight", (1.0, 0.1), 0, &mut v);
        let again = {
            let mut w = [0f32; 2];
            fill("language_model.model.norm.weight", (1.0, 0.1), 1, &mut w);
            w
        };
        assert_eq!(&v[1..], &again, "values depend only on (name, index)");
        assert!(v.iter().all(|x| (0.9..1.1).contains(x)), "{v:?}");
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(splitmix64(GOLDEN), 0xe220_a839_7b1d_cdaf);
    }
}
