//! `cmrm quantize`'s export: a checkpoint's weights written as one GGUF file in a quantized
//! in-memory format (the GGUF container is `gguf.rs`, the formats `quant.rs`).

use anyhow::Context;

use crate::gguf::{ggml_type_id, header, padded, MetaValue, TensorInfo};
use crate::quant::{in_memory_form, WeightFormat, EMBED_TOKENS};
use crate::weights::Weights;

/// `cmrm quantize`: a checkpoint's tensors as one GGUF file holding exactly what loading in
/// `format` holds in memory — linears in the block type (padded with zero columns where
/// `padded_type` pads), the token embedding quantized by rows (F16 where rows are not whole
/// blocks), the rest F32 — so the file is the model's in-memory size and loads without
/// re-quantizing. Tensor names stay the checkpoint's own (any layout `canonical_key` reads).
pub fn quantize_to_gguf(weights: &Weights, format: WeightFormat) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    write_quantized_gguf(weights, format, &mut out, &mut std::io::Cursor::new(Vec::new()))?;
    Ok(out)
}

/// The tensors an export reads: `(saved key, canonical name)` of each, sorted by key, and a
/// tensor's values by canonical name — a checkpoint's [`Weights`], or a synthetic model's
/// generator (`synthetic::SyntheticTensors`: a 7B-shaped GGUF without its 14 GB of BF16).
pub trait TensorSource {
    fn tensor_keys(&self) -> Vec<(String, String)>;
    fn tensor(&self, canonical: &str, dtype: candle_core::DType) -> anyhow::Result<candle_core::Tensor>;
}

impl TensorSource for Weights {
    fn tensor_keys(&self) -> Vec<(String, String)> {
        self.keys().into_iter().map(|(k, c)| (k.to_owned(), c.to_owned())).collect()
    }
    fn tensor(&self, canonical: &str, dtype: candle_core::DType) -> anyhow::Result<candle_core::Tensor> {
        Ok(self.load_as(canonical, dtype, &candle_core::Device::Cpu)?)
    }
}

/// [`quantize_to_gguf`] written to `out` a tensor at a time: each converted tensor goes to
/// `spill` (a temporary file natively) as soon as it is made, and `out` gets the header (once
/// every tensor's type and size is known) followed by `spill`'s bytes. Memory: one tensor and its
/// conversion, not the whole model. Returns the bytes written.
pub fn write_quantized_gguf<S: std::io::Read + std::io::Write + std::io::Seek>(
    weights: &dyn TensorSource,
    format: WeightFormat,
    out: &mut impl std::io::Write,
    spill: &mut S,
) -> anyhow::Result<u64> {
    if format == WeightFormat::F32 {
        anyhow::bail!("quantize to q8_0 or q4 (f32 is the checkpoint itself)");
    }
    let mut infos = Vec::new();
    for (key, canonical) in weights.tensor_keys() {
        // The table as the model loads it: F16 first (its rows are quantized from those values).
        let dtype = if canonical == EMBED_TOKENS { candle_core::DType::F16 } else { candle_core::DType::F32 };
        let tensor = weights.tensor(&canonical, dtype)?;
        let q = in_memory_form(&canonical, &tensor, format).with_context(|| format!("quantizing {key}"))?;
        drop(tensor);
        let data = q.data()?;
        spill.write_all(&data).context("writing the converted tensors")?;
        spill.write_all(&vec![0u8; (padded(data.len() as u64) - data.len() as u64) as usize])?;
        infos.push(TensorInfo {
            name: key,
            ggml_type: ggml_type_id(q.dtype())?,
            shape: q.shape().dims().to_vec(),
            bytes: data.len() as u64,
        });
    }
    let metadata =
        [("general.architecture", MetaValue::String("cmrm-llava")), ("cmrm.weights", MetaValue::String(format.name()))];
    let head = header(&metadata, &infos);
    out.write_all(&head).context("writing the GGUF header")?;
    spill.seek(std::io::SeekFrom::Start(0))?;
    let data = std::io::copy(spill, out).context("writing the GGUF tensors")?;
    Ok(head.len() as u64 + data)
}
