//! Weight files' headers, read before any tensor data: a safetensors header (its length field
//! and JSON) and a GGUF header, as the tensors they list (key, stored type, shape, byte range).
//! The whole-file reader (`weights.rs`), the streamed one (`streaming.rs`) and the checkpoint's
//! facts (`checkpoint.rs`) all read headers here.

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::DType;

/// How a tensor is stored in a weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredType {
    /// Values (F32, F16, BF16): converted to the model's in-memory form.
    Values(DType),
    /// GGML blocks (a `cmrm quantize` GGUF): kept as they are.
    Blocks(GgmlDType),
}

impl StoredType {
    /// `F32`, `F16`, `BF16`, or the GGML block type (`Q8_0`, `Q4K`, …).
    pub fn name(&self) -> String {
        match self {
            Self::Values(d) => d.as_str().to_uppercase(),
            Self::Blocks(b) => format!("{b:?}").to_uppercase(),
        }
    }

    /// Bytes of `values` values (whole blocks); saturates, so that a size past `u64` matches no
    /// byte range.
    pub(crate) fn bytes(self, values: u64) -> u64 {
        match self {
            Self::Values(d) => values.saturating_mul(d.size_in_bytes() as u64),
            Self::Blocks(t) => crate::quant::block_bytes(t, values).unwrap_or(u64::MAX),
        }
    }
}

/// One tensor of a weight file's header: saved key, type, shape, byte range within the data
/// section.
pub struct HeaderTensor {
    pub key: String,
    pub stored: StoredType,
    pub shape: Vec<usize>,
    pub range: std::ops::Range<u64>,
}

/// Largest header accepted (a real one is kilobytes; a bigger length means not safetensors).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The length of a safetensors file's header, with its 8-byte length field, from its first
/// bytes; `Ok(None)` while fewer than 8 bytes are here.
pub fn header_len(prefix: &[u8]) -> Result<Option<u64>> {
    let Some(len) = prefix.get(..8) else { return Ok(None) };
    let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        bail!("not a safetensors file (a {n}-byte header)");
    }
    Ok(Some(8 + n))
}

/// The tensors of a safetensors header (the JSON after the 8-byte length), in data order, each
/// checked: F32/F16/BF16, and a byte range that matches its shape.
pub fn parse_header(name: &str, json: &[u8]) -> Result<Vec<HeaderTensor>> {
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(json).with_context(|| format!("{name}: not a valid safetensors header"))?;
    let mut tensors = Vec::new();
    for (key, info) in &header {
        if key == "__metadata__" {
            continue;
        }
        let bad = || format!("{name}: tensor '{key}' has a malformed header entry");
        let dtype = match info.get("dtype").and_then(|d| d.as_str()).with_context(bad)? {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => bail!("{name}: tensor '{key}' has dtype {other}; cmrm reads F32, F16 and BF16"),
        };
        let dims = info.get("shape").and_then(|s| s.as_array()).with_context(bad)?;
        let shape: Vec<usize> = dims
            .iter()
            .map(|d| d.as_u64().with_context(bad).map(|d| usize::try_from(d).ok()))
            .collect::<Result<Option<_>>>()?
            .with_context(|| format!("{name}: tensor '{key}' has an impossible shape {dims:?}"))?;
        let offsets = info.get("data_offsets").and_then(|o| o.as_array()).with_context(bad)?;
        let (start, end) = match offsets.as_slice() {
            [a, b] => (a.as_u64().with_context(bad)?, b.as_u64().with_context(bad)?),
            _ => bail!(bad()),
        };
        let bytes = shape
            .iter()
            .try_fold(dtype.size_in_bytes() as u64, |n, &d| n.checked_mul(d as u64))
            .with_context(|| format!("{name}: tensor '{key}' has an impossible shape {shape:?}"))?;
        if end < start || end - start != bytes {
            bail!("{name}: tensor '{key}' has {} bytes for shape {shape:?}", end.saturating_sub(start));
        }
        tensors.push(HeaderTensor { key: key.clone(), stored: StoredType::Values(dtype), shape, range: start..end });
    }
    tensors.sort_by_key(|t| t.range.start);
    Ok(tensors)
}

/// The tensors of a GGUF file's header, from its first bytes; `Ok(None)` while `bytes` may not
/// hold the whole header.
pub fn gguf_header_tensors(name: &str, bytes: &[u8]) -> Result<Option<Vec<HeaderTensor>>> {
    Ok(parse_gguf_header(name, bytes, &mut crate::gguf::HeaderScan::default())?.map(|(tensors, _)| tensors))
}

/// The tensors of a GGUF file's header (candle's reader over the bytes so far), in data order:
/// F32 / F16 / BF16 as values, anything else as blocks. `Ok(None)` while the header may still be
/// incomplete. `scan` carries the structural check over from the previous call (a header that
/// arrives in chunks is checked once, not from byte 0 after every chunk).
pub(crate) fn parse_gguf_header(
    name: &str,
    bytes: &[u8],
    scan: &mut crate::gguf::HeaderScan,
) -> Result<Option<(Vec<HeaderTensor>, u64)>> {
    if !scan.advance(name, bytes)? {
        if bytes.len() as u64 > MAX_HEADER_BYTES {
            bail!("{name}: not a valid GGUF file (no end to its header in {MAX_HEADER_BYTES} bytes)");
        }
        return Ok(None);
    }
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(bytes))
        .map_err(|e| anyhow::anyhow!("{name}: not a valid GGUF file ({e})"))?;
    let mut tensors: Vec<HeaderTensor> = crate::gguf::tensors(name, &content)?
        .into_iter()
        .map(|t| {
            let stored = match t.dtype {
                GgmlDType::F32 => StoredType::Values(DType::F32),
                GgmlDType::F16 => StoredType::Values(DType::F16),
                GgmlDType::BF16 => StoredType::Values(DType::BF16),
                blocks => StoredType::Blocks(blocks),
            };
            HeaderTensor { key: t.key, stored, shape: t.shape, range: t.range }
        })
        .collect();
    tensors.sort_by_key(|t| t.range.start);
    Ok(Some((tensors, content.tensor_data_offset)))
}
