//! The GGUF container: writing ([`header`], what `cmrm quantize`'s export and the control-vector
//! codec share) and reading (header checks that resume as a download arrives, tensor listings,
//! the [`Reader`] the control-vector codec in `steering::control_vector` uses). It knows
//! nothing of what the tensors mean.

use anyhow::{bail, Context, Result};

pub(crate) const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
pub(crate) const ALIGNMENT: usize = 32;
pub(crate) const GGML_TYPE_F32: u32 = 0;

// GGUF metadata value types.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A metadata value of a GGUF being written.
pub enum MetaValue<'a> {
    String(&'a str),
    U32(u32),
}

/// One tensor of a GGUF being written: its name, GGML type, shape (outermost first, as candle
/// has it; GGUF stores it innermost first) and data bytes.
pub struct TensorInfo {
    pub name: String,
    pub ggml_type: u32,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

/// The GGML type id of a block type.
pub fn ggml_type_id(dtype: candle_core::quantized::GgmlDType) -> Result<u32> {
    use candle_core::quantized::GgmlDType as T;
    Ok(match dtype {
        T::F32 => GGML_TYPE_F32,
        T::F16 => 1,
        T::Q4_0 => 2,
        T::Q8_0 => 8,
        T::Q4K => 12,
        T::BF16 => 30,
        other => bail!("writing {other:?} tensors to GGUF is not supported"),
    })
}

/// Bytes a tensor of `bytes` takes in a GGUF's data section (each starts aligned).
pub fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(ALIGNMENT as u64) * ALIGNMENT as u64
}

/// One tensor of a GGUF file: saved name, type, shape (outermost first, as candle has it) and its
/// bytes' range within the file.
pub struct GgufTensor {
    pub key: String,
    pub dtype: candle_core::quantized::GgmlDType,
    pub shape: Vec<usize>,
    pub range: std::ops::Range<u64>,
}

/// The tensors of a GGUF header read by candle, checked: rows of whole blocks, ranges that fit
/// in 64 bits (what a corrupt header would break).
pub fn tensors(name: &str, content: &candle_core::quantized::gguf_file::Content) -> Result<Vec<GgufTensor>> {
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    for (key, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let block = info.ggml_dtype.block_size();
        if dims.last().is_some_and(|cols| !cols.is_multiple_of(block)) {
            bail!("{name}: tensor '{key}' has rows of {dims:?}, not whole {:?} blocks", info.ggml_dtype);
        }
        let elements = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        let bytes = elements.and_then(|n| crate::quant::block_bytes(info.ggml_dtype, n));
        let start = content.tensor_data_offset.checked_add(info.offset);
        let (Some(start), Some(end)) = (start, start.zip(bytes).and_then(|(s, b)| s.checked_add(b))) else {
            bail!("{name}: tensor '{key}' has an impossible size or offset (corrupt header?)");
        };
        tensors.push(GgufTensor { key: key.clone(), dtype: info.ggml_dtype, shape: dims.to_vec(), range: start..end });
    }
    Ok(tensors)
}

/// A GGUF v3 header: metadata, then the tensor infos with their data offsets (the tensors
/// follow in this order, each padded to [`padded`]), padded to the alignment: the data section
/// starts right after it.
pub fn header(metadata: &[(&str, MetaValue)], tensors: &[TensorInfo]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(MAGIC);
    out.extend(VERSION.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        match value {
            MetaValue::String(s) => {
                out.extend(T_STRING.to_le_bytes());
                put_string(&mut out, s);
            }
            MetaValue::U32(v) => {
                out.extend(T_U32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
        }
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(t.ggml_type.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += padded(t.bytes);
    }
    out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    out
}

/// A cursor over GGUF bytes whose reads name the file when they run out.
pub(crate) struct Reader<'a> {
    name: &'a str,
    bytes: &'a [u8],
    pub(crate) pos: usize,
    /// A read went past the end of `bytes` (truncated, or not all here yet).
    ran_out: bool,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(name: &'a str, bytes: &'a [u8]) -> Self {
        Self { name, bytes, pos: 0, ran_out: false }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            self.ran_out = true;
            bail!(
                "{}: truncated GGUF file (needs {n} bytes at offset {}, has {})",
                self.name,
                self.pos,
                self.bytes.len()
            )
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub(crate) fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        if n > 1 << 20 {
            bail!("{}: implausible string length {n} at offset {}", self.name, self.pos);
        }
        String::from_utf8(self.take(n)?.to_vec()).with_context(|| format!("{}: a GGUF string is not UTF-8", self.name))
    }
    /// A metadata value: strings and integers are returned as text, the rest skipped.
    pub(crate) fn value(&mut self, kind: u32) -> Result<Option<String>> {
        self.value_at_depth(kind, 0)
    }

    /// Arrays nest at most [`MAX_ARRAY_DEPTH`] deep (a file of nested arrays would otherwise
    /// overflow the stack); an array of fixed-size values is skipped in one step, its length
    /// checked against the bytes left.
    fn value_at_depth(&mut self, kind: u32, depth: usize) -> Result<Option<String>> {
        let fixed = |k| match k {
            T_U8 | T_I8 | T_BOOL => Some(1),
            T_U16 | T_I16 => Some(2),
            T_U32 | T_I32 | T_F32 => Some(4),
            T_U64 | T_I64 | T_F64 => Some(8),
            _ => None,
        };
        Ok(match kind {
            T_STRING => Some(self.string()?),
            T_U32 => Some(self.u32()?.to_string()),
            T_I32 => Some((self.u32()? as i32).to_string()),
            T_U64 => Some(self.u64()?.to_string()),
            T_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("{}: GGUF arrays nested more than {MAX_ARRAY_DEPTH} deep (corrupt file?)", self.name);
                }
                let inner = self.u32()?;
                let n = self.u64()?;
                if let Some(size) = fixed(inner) {
                    let bytes = n.checked_mul(size as u64).filter(|&b| b <= usize::MAX as u64).with_context(|| {
                        format!("{}: a GGUF array of {n} values at offset {} (corrupt file?)", self.name, self.pos)
                    })?;
                    self.take(bytes as usize)?;
                } else {
                    // Each element takes at least 8 bytes (a string's length, an array's header).
                    if n > (self.bytes.len() - self.pos) as u64 / 8 + 1 {
                        self.take(usize::MAX)?; // reads past the end: truncated, or more to come
                    }
                    for _ in 0..n {
                        self.value_at_depth(inner, depth + 1)?;
                    }
                }
                None
            }
            k => match fixed(k) {
                Some(size) => {
                    self.take(size)?;
                    None
                }
                None => bail!("{}: unknown GGUF value type {k}", self.name),
            },
        })
    }
}

/// Most dimensions a GGUF tensor has (GGML's limit is 4).
const MAX_DIMS: u32 = 8;

/// Deepest nesting of metadata arrays accepted (llama.cpp writes arrays of scalars or strings).
const MAX_ARRAY_DEPTH: usize = 4;

/// Check a GGUF header's structure before candle reads it (candle allocates whatever lengths the
/// file claims and divides by its alignment, so a corrupt header would abort instead of
/// failing): `Ok(false)` while `bytes` end inside the header (more to come, or truncated),
/// `Ok(true)` when it is whole and plausible, an error naming what cannot be right.
pub fn check_header(name: &str, bytes: &[u8]) -> Result<bool> {
    HeaderScan::default().advance(name, bytes)
}

/// [`check_header`] that resumes where the previous call stopped: a header arriving in chunks
/// is read once in all, not again from byte 0 after each chunk.
#[derive(Debug, Default, Clone)]
pub struct HeaderScan {
    /// Where the next entry starts, and which part of the header that is.
    pos: usize,
    stage: ScanStage,
    n_kv: u64,
    n_tensors: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ScanStage {
    #[default]
    Preamble,
    Metadata(u64),
    Tensors(u64),
    Done,
}

impl HeaderScan {
    /// Read as much of the header as `bytes` (the file from its start) holds: `Ok(true)` once all
    /// of it has been checked.
    pub fn advance(&mut self, name: &str, bytes: &[u8]) -> Result<bool> {
        let mut r = Reader::new(name, bytes);
        r.pos = self.pos;
        let result = self.scan(name, &mut r);
        match result {
            Ok(()) => Ok(true),
            Err(_) if r.ran_out => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn scan(&mut self, name: &str, r: &mut Reader) -> Result<()> {
        loop {
            // Each step reads one whole entry; a step cut short is read again from its start.
            match self.stage {
                ScanStage::Preamble => {
                    (self.n_tensors, self.n_kv) = read_preamble(name, r)?;
                    self.stage = ScanStage::Metadata(0);
                }
                ScanStage::Metadata(i) if i == self.n_kv => self.stage = ScanStage::Tensors(0),
                ScanStage::Metadata(i) => {
                    let key = r.string()?;
                    let kind = r.u32()?;
                    let value = r.value(kind)?;
                    if key == "general.alignment"
                        && !value.and_then(|v| v.parse::<u64>().ok()).is_some_and(|a| a.is_power_of_two())
                    {
                        bail!("{name}: general.alignment must be a power of two");
                    }
                    self.stage = ScanStage::Metadata(i + 1);
                }
                ScanStage::Tensors(i) if i == self.n_tensors => self.stage = ScanStage::Done,
                ScanStage::Tensors(i) => {
                    let key = r.string()?;
                    let dims = r.u32()?;
                    if dims > MAX_DIMS {
                        bail!("{name}: a tensor with {dims} dimensions (corrupt header?)");
                    }
                    // candle turns each u64 dimension into a usize with `as`: on wasm32 a
                    // dimension of 2^32 would silently become 0, so the element count is
                    // checked here, where the dimensions are still whole.
                    let mut elements = Some(1u64);
                    for _ in 0..dims {
                        let dim = r.u64()?;
                        let fits = |n: u64| usize::try_from(n).is_ok();
                        elements = elements.filter(|_| fits(dim)).and_then(|n| n.checked_mul(dim)).filter(|&n| fits(n));
                    }
                    if elements.is_none() {
                        bail!("{name}: tensor '{key}' has an impossible size (corrupt header?)");
                    }
                    r.take(4 + 8)?; // type, offset
                    self.stage = ScanStage::Tensors(i + 1);
                }
                ScanStage::Done => return Ok(()),
            }
            self.pos = r.pos;
        }
    }
}

/// Magic, version and counts: `(n_tensors, n_kv)`, each at most 2^20.
pub(crate) fn read_preamble(name: &str, r: &mut Reader) -> Result<(u64, u64)> {
    if r.take(4)? != MAGIC.as_slice() {
        bail!("{name}: not a GGUF file (no GGUF magic)");
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        bail!("{name}: GGUF version {version} is not supported (2 or 3)");
    }
    let (n_tensors, n_kv) = (r.u64()?, r.u64()?);
    if n_tensors > 1 << 20 || n_kv > 1 << 20 {
        bail!("{name}: implausible GGUF header ({n_tensors} tensors, {n_kv} metadata entries)");
    }
    Ok((n_tensors, n_kv))
}
