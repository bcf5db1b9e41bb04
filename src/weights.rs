//! Checkpoints → named F32 tensors behind a candle `VarBuilder`, with errors that name the file,
//! the tensor and the problem. Files: safetensors (single file or shards; F32/F16/BF16) and GGUF
//! (`cmrm quantize` output: GGML block formats, dequantized when the model takes a tensor and
//! re-quantized by the layer's in-memory format — bit-exact for Q8_0 → q8_0).
//!
//! Key layouts are normalised to one canonical form, so model code asks for `lm.layers.0...`,
//! `lm_head.weight`, `vision.encoder...`, `projector.linear_1...` whichever layout was saved:
//! - llava-hf hub layout: `language_model.model.*`, `language_model.lm_head.*`,
//!   `vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline` (LLaVA-NeXT / OneVision);
//! - transformers 5 layout: `model.language_model.*`, `lm_head.*`, `model.vision_tower.*`
//!   (without `vision_model.`), `model.multi_modal_projector.*`.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// The bytes of one safetensors file, kept until the model is built.
pub enum FileBytes {
    Owned(Vec<u8>),
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
}

impl AsRef<[u8]> for FileBytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            #[cfg(not(target_arch = "wasm32"))]
            Self::Mapped(m) => m,
        }
    }
}

/// How a tensor's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// A safetensors tensor.
    Plain(DType),
    /// A GGUF tensor (F32, F16 or a block format).
    Ggml(GgmlDType),
}

/// Which bytes hold a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A range of a weight file (`files`).
    File(usize),
    /// Its own buffer in `converted`, already in the model's in-memory form (a streamed
    /// download); freed once the model has read it.
    Converted(usize),
}

/// Where one tensor lives: its bytes, its saved name, storage, shape and byte range.
struct Entry {
    source: Source,
    key: String,
    stored: Stored,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

/// All tensors of a checkpoint, by canonical name. Tensors are converted to F32 only when the
/// model asks for them, so a layer quantized on load never holds a full F32 copy of the model:
/// peak memory ≈ the files plus the model in its in-memory format.
pub struct Weights {
    entries: HashMap<String, Entry>,
    /// `(name, bytes)` of each file, in the order added.
    files: Vec<(Arc<str>, FileBytes)>,
    /// Tensors converted as a download streamed in; `None` once read.
    converted: Vec<std::sync::Mutex<Option<Vec<u8>>>>,
}

/// Whether a file name is a weight file cmrm reads.
pub fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".gguf")
}

/// `(canonical name, shape)` of the tensors cmrm uses (what memory estimates take).
pub fn canonical_shapes(tensors: &[crate::weight_headers::HeaderTensor]) -> Vec<(String, Vec<usize>)> {
    tensors.iter().filter_map(|t| Some((canonical_key(&t.key)?, t.shape.clone()))).collect()
}

/// Map a saved key to the canonical name, or `None` for keys cmrm does not use.
pub fn canonical_key(key: &str) -> Option<String> {
    let key = key
        .strip_prefix("model.")
        .filter(|rest| {
            ["language_model.", "vision_tower.", "multi_modal_projector.", "image_newline"]
                .iter()
                .any(|p| rest.starts_with(p))
        })
        .unwrap_or(key);
    let mapped = if key == "image_newline" {
        key.to_owned()
    } else if let Some(rest) = key.strip_prefix("language_model.model.") {
        format!("lm.{rest}")
    } else if let Some(rest) = key.strip_prefix("language_model.lm_head.") {
        format!("lm_head.{rest}")
    } else if let Some(rest) = key.strip_prefix("language_model.") {
        format!("lm.{rest}")
    } else if let Some(rest) = key.strip_prefix("lm_head.") {
        format!("lm_head.{rest}")
    } else if let Some(rest) = key.strip_prefix("vision_tower.vision_model.") {
        format!("vision.{rest}")
    } else if let Some(rest) = key.strip_prefix("vision_tower.") {
        format!("vision.{rest}")
    } else if let Some(rest) = key.strip_prefix("multi_modal_projector.") {
        format!("projector.{rest}")
    } else {
        return None;
    };
    Some(mapped)
}

impl Weights {
    pub fn empty() -> Self {
        Self { entries: HashMap::new(), files: Vec::new(), converted: Vec::new() }
    }

    /// Parse one weight file and index its tensors: safetensors (F32, F16 or BF16) or GGUF (by its
    /// magic bytes); `name` labels errors.
    pub fn add_file(&mut self, name: &str, bytes: FileBytes) -> Result<()> {
        let data = bytes.as_ref();
        if data.starts_with(b"GGUF") {
            return self.add_gguf(name, bytes);
        }
        // The header checked as a streamed load checks it (same messages), then the data's length.
        (|| -> Result<()> {
            let need = crate::weight_headers::header_len(data)?
                .with_context(|| format!("{name}: shorter than its header length"))?;
            let header = data.get(8..need as usize).with_context(|| format!("{name}: truncated header"))?;
            let tensors = crate::weight_headers::parse_header(name, header)?;
            let data_len = tensors.iter().map(|t| t.range.end).max().unwrap_or(0);
            if need + data_len > data.len() as u64 {
                bail!("{name}: truncated: its tensors need {} bytes, the file has {}", need + data_len, data.len());
            }
            Ok(())
        })()
        .context("not a valid safetensors file")?;
        let st = safetensors::SafeTensors::deserialize(data).map_err(|e| {
            anyhow!("{name}: not a valid safetensors file ({e}); the download may be truncated or corrupt")
        })?;
        let index = self.files.len();
        for (key, view) in st.tensors() {
            let Some(canonical) = canonical_key(&key) else { continue };
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                other => bail!("{name}: tensor '{key}' has dtype {other:?}; cmrm reads F32, F16 and BF16"),
            };
            if let Some(prev) = self.entries.get(&canonical) {
                bail!("{name}: tensor '{key}' is also in {} (as '{}')", self.source_name(prev), prev.key);
            }
            let start = view.data().as_ptr() as usize - data.as_ptr() as usize;
            let range = start..start + view.data().len();
            let stored = Stored::Plain(dtype);
            let entry = Entry { source: Source::File(index), key, stored, shape: view.shape().to_vec(), range };
            self.entries.insert(canonical, entry);
        }
        self.files.push((Arc::from(name), bytes));
        Ok(())
    }

    fn add_gguf(&mut self, name: &str, bytes: FileBytes) -> Result<()> {
        let data = bytes.as_ref();
        if !crate::gguf::check_header(name, data)? {
            bail!("{name}: the file ends inside its GGUF header; the download may be truncated");
        }
        let content = gguf_file::Content::read(&mut std::io::Cursor::new(data))
            .map_err(|e| anyhow!("{name}: not a valid GGUF file ({e}); the download may be truncated or corrupt"))?;
        let index = self.files.len();
        for t in crate::gguf::tensors(name, &content)? {
            let Some(canonical) = canonical_key(&t.key) else { continue };
            if t.range.end > data.len() as u64 {
                bail!(
                    "{name}: tensor '{}' ends at byte {}, past the end of the file ({} bytes): truncated download?",
                    t.key,
                    t.range.end,
                    data.len()
                );
            }
            if let Some(prev) = self.entries.get(&canonical) {
                bail!("{name}: tensor '{}' is also in {} (as '{}')", t.key, self.source_name(prev), prev.key);
            }
            let range = t.range.start as usize..t.range.end as usize;
            let entry =
                Entry { source: Source::File(index), key: t.key, stored: Stored::Ggml(t.dtype), shape: t.shape, range };
            self.entries.insert(canonical, entry);
        }
        self.files.push((Arc::from(name), bytes));
        Ok(())
    }

    /// The quantized format the files were saved in (a `cmrm quantize` GGUF), if any: what to load
    /// them as unless asked otherwise.
    pub fn stored_format(&self) -> Option<crate::quant::WeightFormat> {
        self.entries.values().find_map(|e| match e.stored {
            Stored::Ggml(t) => crate::quant::WeightFormat::of_ggml(t),
            _ => None,
        })
    }

    /// The entry behind `quant::block_key(name, type)` when `name` is stored in that GGML block
    /// type.
    fn stored_blocks(&self, key: &str) -> Option<&Entry> {
        let (name, _) = key.split_once('#')?;
        let e = self.entries.get(name)?;
        let Stored::Ggml(t) = e.stored else { return None };
        (crate::quant::block_key(name, t) == key).then_some(e)
    }

    /// Add one tensor already in its in-memory form (`quant::in_memory_form`) under its saved
    /// `key`: what a streamed download keeps instead of the file.
    pub fn add_converted(&mut self, key: &str, q: &candle_core::quantized::QTensor) -> Result<()> {
        self.add_converted_bytes(key, q.dtype(), q.shape().dims(), q.data()?.into_owned())
    }

    /// [`Self::add_converted`] from the GGML bytes of a `shape` tensor of type `dtype`.
    pub fn add_converted_bytes(&mut self, key: &str, dtype: GgmlDType, shape: &[usize], bytes: Vec<u8>) -> Result<()> {
        let Some(canonical) = canonical_key(key) else { return Ok(()) };
        if let Some(prev) = self.entries.get(&canonical) {
            bail!("tensor '{key}' is also in {} (as '{}')", self.source_name(prev), prev.key);
        }
        let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        if elements.and_then(|n| crate::quant::block_bytes(dtype, n)) != Some(bytes.len() as u64) {
            bail!("tensor '{key}': {} bytes for {shape:?} in {dtype:?}", bytes.len());
        }
        let entry = Entry {
            source: Source::Converted(self.converted.len()),
            key: key.to_owned(),
            stored: Stored::Ggml(dtype),
            shape: shape.to_vec(),
            range: 0..bytes.len(),
        };
        self.converted.push(std::sync::Mutex::new(Some(bytes)));
        self.entries.insert(canonical, entry);
        Ok(())
    }

    fn source_name(&self, e: &Entry) -> String {
        match e.source {
            Source::File(i) => self.files[i].0.to_string(),
            Source::Converted(_) => "the streamed download".to_owned(),
        }
    }

    /// `f` over a tensor's raw bytes. A converted tensor is freed after its one read (the model
    /// now holds it).
    fn with_bytes<T>(&self, e: &Entry, f: impl FnOnce(&[u8]) -> candle_core::Result<T>) -> candle_core::Result<T> {
        match e.source {
            Source::File(i) => f(&self.files[i].1.as_ref()[e.range.clone()]),
            Source::Converted(i) => f(&self.take_converted(i, &e.key)?),
        }
    }

    /// A converted tensor's bytes, handed over once (the model keeps its own copy).
    fn take_converted(&self, i: usize, key: &str) -> candle_core::Result<Vec<u8>> {
        let mut slot = self.converted[i].lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
        slot.take().ok_or_else(|| candle_core::Error::Msg(format!("tensor '{key}' was already handed to the model")))
    }

    /// `(saved name, canonical name)` of every tensor, sorted by saved name.
    pub fn keys(&self) -> Vec<(&str, &str)> {
        let mut keys: Vec<(&str, &str)> = self.entries.iter().map(|(c, e)| (e.key.as_str(), c.as_str())).collect();
        keys.sort();
        keys
    }

    /// Index weight files (memory-mapped: pages are read as tensors are converted). Which files a
    /// checkpoint folder holds is `checkpoint::load_weights`'s business.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_paths(paths: &[std::path::PathBuf]) -> Result<Self> {
        let mut weights = Self::empty();
        for path in paths {
            let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the map is read-only; checkpoint files are not modified while cmrm loads them.
            let mmap =
                unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            weights.add_file(&path.display().to_string(), FileBytes::Mapped(mmap))?;
        }
        Ok(weights)
    }

    /// Canonical names and shapes of every tensor cmrm uses.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.entries.iter().map(|(name, e)| (name.as_str(), e.shape.as_slice()))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor `name` as F32 (a fresh copy).
    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        self.load_as(name, DType::F32, device)
    }

    /// The tensor `name` converted straight to `dtype` (an F16 table from BF16 never exists in
    /// F32: for a 151936×1024 embedding that is 622 MB saved at the peak).
    pub fn load_as(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let e = self.entry(name)?;
        let plain = match e.stored {
            Stored::Plain(d) => Some(d),
            Stored::Ggml(GgmlDType::F32) => Some(DType::F32),
            Stored::Ggml(GgmlDType::F16) => Some(DType::F16),
            Stored::Ggml(GgmlDType::BF16) => Some(DType::BF16),
            Stored::Ggml(_) => None,
        };
        self.with_bytes(e, |raw| match (plain, e.stored) {
            (Some(d), _) => Tensor::from_raw_buffer(raw, d, &e.shape, device),
            (None, Stored::Ggml(block)) => {
                crate::quant::qtensor_from_bytes(block, raw, e.shape.clone(), device).and_then(|q| q.dequantize(device))
            }
            (None, Stored::Plain(_)) => unreachable!("plain tensors have a dtype"),
        })
        .and_then(|t| t.to_dtype(dtype))
        .map_err(|err| {
            candle_core::Error::Msg(format!("{}: tensor '{}' cannot be read: {err}", self.source_name(e), e.key))
        })
    }

    pub fn into_var_builder(self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), DType::F32, device.clone())
    }

    /// A builder that reads `self` without taking it: a GPU-resident load builds one block at a
    /// time while a download is still adding tensors. (A streamed tensor read through it is
    /// freed as with [`Self::into_var_builder`].)
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'_> {
        VarBuilder::from_backend(Box::new(Borrowed(self)), DType::F32, device.clone())
    }

    /// Free the streamed bytes of every tensor under `prefix` without reading them (layers
    /// the model does not use, e.g. vision layers past the selected hidden state).
    pub fn release_prefix(&self, prefix: &str) {
        for e in self.entries.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, e)| e) {
            if let Source::Converted(i) = e.source {
                if let Ok(mut slot) = self.converted[i].lock() {
                    *slot = None;
                }
            }
        }
    }

    /// Bytes of streamed tensors held now (converted and not yet read or released).
    pub fn held_bytes(&self) -> usize {
        self.converted.iter().filter_map(|c| c.lock().ok().and_then(|c| c.as_ref().map(Vec::len))).sum()
    }

    fn entry(&self, name: &str) -> candle_core::Result<&Entry> {
        self.entries.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("tensor for '{name}' is missing from {}", self.describe_files()))
        })
    }

    fn describe_files(&self) -> String {
        self.files.iter().map(|(f, _)| f.to_string()).collect::<Vec<_>>().join(", ")
    }
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(e) = self.stored_blocks(name) {
            // A converted tensor's buffer moves into the tensor (no copy at the peak).
            let raw = match e.source {
                Source::Converted(i) => {
                    let bytes = self.take_converted(i, &e.key)?;
                    let n = bytes.len();
                    Tensor::from_vec(bytes, n, dev)?
                }
                Source::File(_) => self.with_bytes(e, |raw| Tensor::from_slice(raw, raw.len(), dev))?,
            };
            return raw.reshape(s);
        }
        let entry = self.entry(name)?;
        // A `cmrm quantize` GGUF keeps linears padded with zero columns to whole blocks.
        if let (Stored::Ggml(_), [rows, padded], [want_rows, want_cols]) = (entry.stored, &entry.shape[..], s.dims()) {
            if rows == want_rows && padded > want_cols && padded - want_cols < entry.shape[1].min(256) {
                return self.load_as(name, dtype, dev)?.narrow(1, 0, *want_cols);
            }
        }
        if entry.shape.as_slice() != s.dims() {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor '{}' has shape {:?}, but the config needs {:?}",
                self.source_name(entry),
                entry.key,
                entry.shape,
                s.dims()
            )));
        }
        self.load_as(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load_as(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name) || self.stored_blocks(name).is_some()
    }
}

/// [`Weights`] lent to a [`VarBuilder`] ([`Weights::var_builder`]).
struct Borrowed<'a>(&'a Weights);

impl SimpleBackend for Borrowed<'_> {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Random weights of any requested shape (benchmarks on real-size configs without a download):
/// normal(0, 0.02) for matrices, 1 for norm weights, 0 for biases.
pub struct RandomWeights {
    pub seed: u64,
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let is_norm = name.contains("norm") || name.contains("layrnorm");
        if name.ends_with(".bias") {
            return Tensor::zeros(s, dtype, dev);
        }
        if is_norm {
            return Tensor::ones(s, dtype, dev);
        }
        use rand::{Rng, SeedableRng};
        let mut hash = self.seed;
        for b in name.bytes() {
            hash = hash.wrapping_mul(0x100000001b3).wrapping_add(u64::from(b));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(hash);
        // Uniform with the variance of N(0, 0.02²): cheap to draw for ~1e9 parameters.
        let bound = 0.02f32 * 3f32.sqrt();
        let mut draw = || rng.random_range(-bound..bound);
        if dtype == DType::F16 {
            // Straight to F16: no F32 copy of a large table at the peak.
            let data: Vec<half::f16> = (0..s.elem_count()).map(|_| half::f16::from_f32(draw())).collect();
            return Tensor::from_vec(data, s, dev);
        }
        let data: Vec<f32> = (0..s.elem_count()).map(|_| draw()).collect();
        Tensor::from_vec(data, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!("random weights need a shape for '{name}'")))
    }

    /// Every tensor but a separate lm_head: a tied config then shares the embedding, as real
    /// tied checkpoints do (an untied config asks for `lm_head.weight` regardless).
    fn contains_tensor(&self, name: &str) -> bool {
        !name.starts_with("lm_head.") && !name.contains('#')
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_key;

    #[test]
    fn both_layouts_map_to_one_name() {
        for (saved, canonical) in [
            ("language_model.model.layers.0.mlp.up_proj.weight", "lm.layers.0.mlp.up_proj.weight"),
            ("model.language_model.layers.0.mlp.up_proj.weight", "lm.layers.0.mlp.up_proj.weight"),
            ("language_model.lm_head.weight", "lm_head.weight"),
            ("lm_head.weight", "lm_head.weight"),
            ("vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias", "vision.encoder.layers.1.mlp.fc1.bias"),
            ("model.vision_tower.encoder.layers.1.mlp.fc1.bias", "vision.encoder.layers.1.mlp.fc1.bias"),
            ("model.multi_modal_projector.linear_1.weight", "projector.linear_1.weight"),
            ("image_newline", "image_newline"),
            ("model.image_newline", "image_newline"),
        ] {
            assert_eq!(canonical_key(saved).as_deref(), Some(canonical), "{saved}");
        }
        assert_eq!(canonical_key("something.else"), None);
    }
}
