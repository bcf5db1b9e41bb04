//! In-memory weight formats chosen at load ("quantize on load"): F32, Q8_0, or 4-bit.
//!
//! Quantized linears use candle's GGML block formats and its quantized matmul, which has SIMD
//! kernels natively (AVX/NEON) and in wasm (simd128). A matrix whose input dimension is not a
//! multiple of the block size stays in F32 (e.g. SigLIP-so400m's `fc2` with 4304 inputs).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

/// The in-memory format of the large matrices (decoder and vision linears, lm_head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    #[default]
    F32,
    /// 8-bit blocks of 32 with an f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit: Q4_K (super-blocks of 256, 4.5 bits per weight) where the input dimension allows,
    /// else Q4_0 (blocks of 32, 4.5 bits per weight).
    Q4,
}

impl std::str::FromStr for WeightFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "q8_0" => Ok(Self::Q8_0),
            "q4" => Ok(Self::Q4),
            other => anyhow::bail!("weight format must be f32, q8_0 or q4 (got '{other}')"),
        }
    }
}

impl WeightFormat {
    /// The format whose blocks these are (`q8_0`; `q4` for Q4_K and Q4_0), if any.
    pub fn of_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4K | GgmlDType::Q4_0 => Some(Self::Q4),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Q8_0 => "q8_0",
            Self::Q4 => "q4",
        }
    }

    /// The GGML type a `[out, in]` matrix gets when its input dimension is a whole number of
    /// blocks, or `None`.
    pub fn ggml_type(&self, in_dim: usize) -> Option<GgmlDType> {
        let fits = |t: GgmlDType| in_dim.is_multiple_of(t.block_size());
        match self {
            Self::F32 => None,
            Self::Q8_0 => Some(GgmlDType::Q8_0).filter(|&t| fits(t)),
            Self::Q4 => [GgmlDType::Q4K, GgmlDType::Q4_0].into_iter().find(|&t| fits(t)),
        }
    }

    /// In memory: the GGML type and the input dimension padded with zero columns to whole
    /// blocks (SigLIP-so400m's `fc2` has 4304 inputs: 4320 = 135 blocks of 32), or `None` for
    /// F32 — also when padding would add over 1/16 (small layers, where it costs accuracy and
    /// saves nothing).
    pub fn padded_type(&self, in_dim: usize) -> Option<(GgmlDType, usize)> {
        let pad = |t: GgmlDType| (t, in_dim.div_ceil(t.block_size()) * t.block_size());
        let (t, padded) = match self {
            Self::F32 => return None,
            Self::Q8_0 => pad(GgmlDType::Q8_0),
            Self::Q4 => self.ggml_type(in_dim).map_or_else(|| pad(GgmlDType::Q4_0), pad),
        };
        (in_dim > 0 && padded - in_dim <= in_dim / 16).then_some((t, padded))
    }

    /// Bytes of an `[out, in]` matrix in memory in this format (padding included).
    pub fn matrix_bytes(&self, out_dim: usize, in_dim: usize) -> u64 {
        match self.padded_type(in_dim) {
            None => out_dim as u64 * in_dim as u64 * 4,
            // In u64: on wasm32 a usize product overflows for a large table.
            Some((t, padded)) => out_dim as u64 * (padded / t.block_size()) as u64 * t.type_size() as u64,
        }
    }
}

/// The decoder's token embedding table (canonical name): F16 when the model is quantized.
pub(crate) const EMBED_TOKENS: &str = "lm.embed_tokens.weight";

/// A linear layer's `[out, in]` weight (canonical name): what a quantized format quantizes.
fn is_linear_weight(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.ends_with(".weight") && !name.contains("embed")
}

/// A tensor (canonical name, any float dtype) as a model in `format` holds it: linears in the
/// block type (padded with zero columns where [`WeightFormat::padded_type`] pads), the token
/// embedding quantized by rows from its F16 values (F16 where rows are not whole blocks), the
/// rest F32. What `cmrm quantize` writes and a streamed download keeps.
pub fn in_memory_form(canonical: &str, tensor: &Tensor, format: WeightFormat) -> Result<QTensor> {
    let f32 = candle_core::DType::F32;
    if canonical == EMBED_TOKENS && format != WeightFormat::F32 {
        let table = tensor.to_dtype(candle_core::DType::F16)?;
        return match format.ggml_type(table.dim(1)?) {
            Some(block) => quantize_rows(&table, block),
            None => QTensor::quantize(&table, GgmlDType::F16),
        };
    }
    match format.padded_type(tensor.dims().get(1).copied().unwrap_or(0)) {
        Some((block, padded)) if is_linear_weight(canonical, tensor.dims()) => {
            let in_dim = tensor.dim(1)?;
            let tensor = if padded > in_dim { tensor.pad_with_zeros(1, 0, padded - in_dim)? } else { tensor.clone() };
            quantize_rows(&tensor, block)
        }
        _ => QTensor::quantize(&tensor.to_dtype(f32)?, GgmlDType::F32),
    }
}

/// Bytes a model takes in memory in `format`, from its tensors' canonical names and shapes (as
/// `weights::canonical_key` names them): linears quantized (input padded to whole blocks where
/// that adds little), the embedding table quantized by rows (shared by a tied lm_head; F16 with a
/// quantized lm_head copy where rows are not whole blocks); everything else F32.
pub fn estimate_model_bytes<'a>(format: WeightFormat, tensors: impl Iterator<Item = (&'a str, &'a [usize])>) -> u64 {
    let mut total = 0u64;
    let mut has_lm_head = false;
    let mut embed: Option<(usize, usize)> = None;
    for (name, shape) in tensors {
        let elements: u64 = shape.iter().map(|&d| d as u64).product();
        has_lm_head |= name == "lm_head.weight";
        total += if name == EMBED_TOKENS && shape.len() == 2 {
            embed = Some((shape[0], shape[1]));
            match format {
                WeightFormat::F32 => elements * 4,
                // Quantized rows (dense F16 where rows are not whole blocks).
                _ if format.ggml_type(shape[1]).is_some() => format.matrix_bytes(shape[0], shape[1]),
                _ => elements * 2,
            }
        } else if is_linear_weight(name, shape) {
            format.matrix_bytes(shape[0], shape[1])
        } else {
            elements * 4
        };
    }
    // A tied lm_head shares a quantized table; next to an F16 table it is a quantized copy.
    if let (Some((vocab, hidden)), false, false) = (embed, has_lm_head, format == WeightFormat::F32) {
        if format.ggml_type(hidden).is_none() {
            total += format.matrix_bytes(vocab, hidden);
        }
    }
    total
}

/// A requested weight format: a fixed one, or `auto` (the most precise that fits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightChoice {
    Auto,
    Fixed(WeightFormat),
}

impl WeightChoice {
    /// `"auto"` (also when absent), `"f32"`, `"q8_0"` or `"q4"`.
    pub fn parse(option: Option<&str>) -> anyhow::Result<Self> {
        match option.unwrap_or("auto") {
            "auto" => Ok(Self::Auto),
            other => Ok(Self::Fixed(other.parse()?)),
        }
    }

    /// `auto` for weights stored quantized (a `cmrm quantize` GGUF) means their own format.
    pub fn or_stored(self, stored: Option<WeightFormat>) -> Self {
        match (self, stored) {
            (Self::Auto, Some(stored)) => Self::Fixed(stored),
            (choice, _) => choice,
        }
    }
}

/// A wasm32 instance can address at most 4 GiB.
pub const WASM_MEMORY_LIMIT: u64 = 4 << 30;

/// Memory a browser tab (wasm32) can give the model: 90% of 4 GiB, the rest is for activations,
/// the KV cache and the allocator.
pub const BROWSER_WEIGHT_BUDGET: u64 = WASM_MEMORY_LIMIT * 9 / 10;

/// Formats from the most to the least precise.
pub const FORMATS: [WeightFormat; 3] = [WeightFormat::F32, WeightFormat::Q8_0, WeightFormat::Q4];

/// The format to load `name` in within a memory `budget`: the fixed one if it fits, else (auto)
/// the most precise that fits; otherwise a message with each format's size and a suggestion.
/// `model_bytes(format)` estimates the model; `held` is memory already taken.
pub fn choose_format(
    name: &str,
    choice: WeightChoice,
    model_bytes: impl Fn(WeightFormat) -> u64,
    held: u64,
    budget: u64,
) -> anyhow::Result<WeightFormat> {
    let fits = |f: WeightFormat| held + model_bytes(f) <= budget;
    let gb = |n: u64| n as f64 / 1e9;
    let sizes =
        FORMATS.iter().map(|&f| format!("{} {:.2} GB", f.name(), gb(model_bytes(f)))).collect::<Vec<_>>().join(", ");
    let wanted = match choice {
        WeightChoice::Fixed(f) if fits(f) => return Ok(f),
        WeightChoice::Auto => match FORMATS.into_iter().find(|&f| fits(f)) {
            Some(f) => return Ok(f),
            None => WeightFormat::Q4,
        },
        WeightChoice::Fixed(f) => f,
    };
    let suggestion = FORMATS.into_iter().find(|&g| fits(g)).map_or_else(
        || "no weight format fits: use the native CLI".to_owned(),
        |g| format!("choose weights \"{}\" instead", g.name()),
    );
    anyhow::bail!(
        "{name} needs about {:.2} GB of WebAssembly memory with {} weights ({sizes}; {:.2} GB already in use), a browser tab has {:.2} GB: {suggestion}",
        gb(held + model_bytes(wanted)),
        wanted.name(),
        gb(held),
        gb(budget)
    )
}

/// A linear layer in F32 or in a quantized block format: `y = x·Wᵀ (+ b)`.
#[derive(Debug, Clone)]
pub enum QLinear {
    F32(Linear),
    /// `padded_in ≥ in_dim`: the weight has zero columns up to whole blocks; inputs are padded
    /// to match.
    Quantized {
        matmul: QMatMul,
        bias: Option<Tensor>,
        dtype: GgmlDType,
        out_dim: usize,
        in_dim: usize,
        padded_in: usize,
        /// Multiply batches of rows as dequantize + F32 matmul ([`QLinear::batches_in_f32`]).
        batches_in_f32: bool,
    },
}

/// Quantize a `[rows, cols]` matrix of any float dtype a slice of rows at a time: the F32 copy
/// that quantizing needs never exceeds [`QUANTIZE_CHUNK`] values (an F16 embedding table becomes
/// a tied lm_head without a 622 MB F32 detour). Blocks run along rows, so the slices' bytes
/// concatenate to the whole matrix's.
pub fn quantize_rows(weight: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    quantize_rows_by(weight, dtype, QUANTIZE_CHUNK)
}

/// [`quantize_rows`] with at most `chunk` values converted at a time.
fn quantize_rows_by(weight: &Tensor, dtype: GgmlDType, chunk: usize) -> Result<QTensor> {
    let (rows, cols) = weight.dims2()?;
    let step = (chunk / cols.max(1)).max(1);
    if rows <= step {
        return QTensor::quantize(&weight.to_dtype(candle_core::DType::F32)?, dtype);
    }
    let mut bytes = Vec::with_capacity(rows * (cols / dtype.block_size()) * dtype.type_size());
    for start in (0..rows).step_by(step) {
        let n = step.min(rows - start);
        // A slice of its own: `QTensor::quantize` reads its input's whole storage, and a
        // narrowed F32 tensor still shares the full table's (an untied F32 lm_head panicked here).
        let values: Vec<f32> =
            weight.narrow(0, start, n)?.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let slice = Tensor::from_vec(values, (n, cols), weight.device())?;
        bytes.extend_from_slice(&QTensor::quantize(&slice, dtype)?.data()?);
    }
    qtensor_from_bytes(dtype, &bytes, vec![rows, cols], weight.device())
}

/// The name under which a weight file offers `name`'s raw GGML blocks of type `dtype`
/// (`weights::Weights` answers for GGUF tensors stored in that type): `embed_tokens.weight#q8_0`.
pub fn block_key(name: &str, dtype: GgmlDType) -> String {
    format!("{name}#{}", format!("{dtype:?}").to_lowercase())
}

/// `name`'s stored blocks as a `[rows, cols]` QTensor when `vb`'s files hold them in `dtype`
/// (no dequantize → re-quantize), else `None`.
pub fn stored_blocks(
    vb: &VarBuilder,
    name: &str,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
) -> Result<Option<QTensor>> {
    let key = block_key(name, dtype);
    if !vb.contains_tensor(&key) {
        return Ok(None);
    }
    let bytes = rows * (cols / dtype.block_size()) * dtype.type_size();
    let raw = vb.get_with_hints_dtype(bytes, &key, candle_nn::Init::Const(0.), candle_core::DType::U8)?;
    let from = |data: &[u8]| qtensor_from_bytes(dtype, data, vec![rows, cols], vb.device());
    // Read the bytes in place (one copy, into the QTensor).
    let (storage, layout) = raw.storage_and_layout();
    let q = match (&*storage, raw.is_contiguous()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::U8(data)), true) => {
            from(&data[layout.start_offset()..layout.start_offset() + bytes])?
        }
        _ => {
            drop(storage);
            from(&raw.to_vec1::<u8>()?)?
        }
    };
    Ok(Some(q))
}

/// A weight matrix `[out, in]` as a model holds it.
#[derive(Clone, Copy)]
pub enum MatrixRef<'a> {
    /// Values (F32; F16 for an embedding table that is not whole blocks). May hold more
    /// columns than the layer's input (zero padding), never fewer.
    Dense(&'a Tensor),
    /// GGML blocks: rows of `in_dim` values padded with zeros to whole blocks.
    Blocks { blocks: &'a QTensor, in_dim: usize },
}

impl MatrixRef<'_> {
    /// Output rows.
    pub fn rows(&self) -> Result<usize> {
        match self {
            Self::Dense(t) => t.dim(0),
            Self::Blocks { blocks, .. } => blocks.shape().dims2().map(|(rows, _)| rows),
        }
    }

    /// Whether both are the same storage (a tied lm_head sharing the embedding table).
    pub fn same_as(&self, other: &MatrixRef<'_>) -> bool {
        match (*self, *other) {
            (MatrixRef::Dense(a), MatrixRef::Dense(b)) => a.id() == b.id(),
            (MatrixRef::Blocks { blocks: a, .. }, MatrixRef::Blocks { blocks: b, .. }) => {
                std::ptr::eq(a as *const QTensor, b as *const QTensor)
            }
            _ => false,
        }
    }
}

/// Bytes of `values` values of GGML type `dtype` (whole blocks); `None` past `u64` (a corrupt
/// header's shape).
pub fn block_bytes(dtype: GgmlDType, values: u64) -> Option<u64> {
    (values / dtype.block_size() as u64).checked_mul(dtype.type_size() as u64)
}

/// candle's `qtensor_from_ggml` made safe for any bytes: candle reads them in place as a slice of
/// its block structs (which need up to 8-byte alignment) and trusts `dims` for their count, so the
/// length is checked here and bytes at an unaligned address (a GGUF with an odd
/// `general.alignment` or tensor offset) are copied to an aligned buffer first.
pub fn qtensor_from_bytes(
    dtype: GgmlDType,
    bytes: &[u8],
    dims: Vec<usize>,
    device: &candle_core::Device,
) -> candle_core::Result<QTensor> {
    let values = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
    let expected = values.filter(|v| v % dtype.block_size() as u64 == 0).and_then(|v| block_bytes(dtype, v));
    if expected != Some(bytes.len() as u64) {
        candle_core::bail!("{} bytes do not hold a {dims:?} tensor of {dtype:?} blocks", bytes.len());
    }
    if bytes.as_ptr().align_offset(16) == 0 {
        return candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, dims, device);
    }
    let mut aligned = vec![0u128; bytes.len().div_ceil(16)];
    let copy = &mut bytemuck::cast_slice_mut::<u128, u8>(&mut aligned)[..bytes.len()];
    copy.copy_from_slice(bytes);
    candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, copy, dims, device)
}

/// Values per slice in [`quantize_rows`] (16 Mi: 64 MB of F32).
const QUANTIZE_CHUNK: usize = 16 << 20;

impl QLinear {
    /// From an `[out, in]` weight (F32, or F16/BF16 to quantize); quantized when `format` asks
    /// for it and the shape allows, else held in F32.
    pub fn new(weight: Tensor, bias: Option<Tensor>, format: WeightFormat) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        match format.padded_type(in_dim) {
            None => Ok(Self::F32(Linear::new(weight.to_dtype(candle_core::DType::F32)?, bias))),
            Some((dtype, padded_in)) => {
                let weight = if padded_in > in_dim { weight.pad_with_zeros(1, 0, padded_in - in_dim)? } else { weight };
                let q = quantize_rows(&weight, dtype)?;
                drop(weight);
                Ok(Self::Quantized {
                    matmul: QMatMul::from_qtensor(q)?,
                    bias,
                    dtype,
                    out_dim,
                    in_dim,
                    padded_in,
                    batches_in_f32: false,
                })
            }
        }
    }

    /// A quantized `[out, in]` matrix used as is (a tied lm_head sharing the quantized
    /// embedding table).
    pub fn from_qtensor(q: std::sync::Arc<QTensor>) -> Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let dtype = q.dtype();
        Ok(Self::Quantized {
            matmul: QMatMul::from_arc(q)?,
            bias: None,
            dtype,
            out_dim,
            in_dim,
            padded_in: in_dim,
            batches_in_f32: false,
        })
    }

    /// Load `weight` `[out, in]` (and `bias` `[out]` when `bias`) from `vb`, in `format`: the
    /// stored blocks as they are when the file holds this format's (a `cmrm quantize` GGUF),
    /// else quantized on load.
    pub fn load(in_dim: usize, out_dim: usize, bias: bool, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        if let Some((dtype, padded_in)) = format.padded_type(in_dim) {
            if let Some(q) = stored_blocks(&vb, "weight", dtype, out_dim, padded_in)? {
                let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
                let matmul = QMatMul::from_qtensor(q)?;
                return Ok(Self::Quantized { matmul, bias, dtype, out_dim, in_dim, padded_in, batches_in_f32: false });
            }
        }
        let linear = candle_nn::linear_b(in_dim, out_dim, bias, vb)?;
        Self::new(linear.weight().clone(), linear.bias().cloned(), format)
    }

    /// Multiply batches of rows (≥ 32) as dequantize + F32 matmul when the blocks are Q8_0 /
    /// Q4_0. For the vision tower: candle's kernels for these types ran its 729-row batches
    /// (inputs 1152 and 4320 wide) 3× slower than F32 (`cmrm bench`, 0.5B preset, Q8_0: image
    /// encode 20.2 s, 6.9 s this way, 6.9 s in F32). For the decoder's prefill: in wasm they run
    /// on one thread and took the page's two prefills on 0.5B-wide layers 11.5 s against 6.0 s
    /// this way; natively they were faster (3.07 s vs 3.62 s for 761 tokens), but one way on both
    /// targets keeps the page's answers equal to the CLI's on the same weights. K-quants keep
    /// their own (faster) kernels everywhere.
    pub fn batches_in_f32(mut self) -> Self {
        if let Self::Quantized { batches_in_f32, .. } = &mut self {
            *batches_in_f32 = true;
        }
        self
    }

    /// The weight matrix as it is held (for other compute backends).
    pub fn matrix(&self) -> MatrixRef<'_> {
        match self {
            Self::F32(l) => MatrixRef::Dense(l.weight()),
            Self::Quantized { matmul: QMatMul::QTensor(blocks), in_dim, .. } => {
                MatrixRef::Blocks { blocks, in_dim: *in_dim }
            }
            // candle's CANDLE_DEQUANTIZE_ALL[_F16] keeps quantized layers dense (padded columns
            // included).
            Self::Quantized { matmul: QMatMul::Tensor(t) | QMatMul::TensorF16(t), .. } => MatrixRef::Dense(t),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::F32(l) => l.bias(),
            Self::Quantized { bias, .. } => bias.as_ref(),
        }
    }

    /// `(matrix, bias)` as held: what other compute backends upload (`text::LinearRef`).
    pub fn linear_ref(&self) -> (MatrixRef<'_>, Option<&Tensor>) {
        (self.matrix(), self.bias())
    }

    /// Bytes the weight matrix takes in memory.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::F32(l) => l.weight().elem_count() * 4,
            Self::Quantized { dtype, out_dim, padded_in, .. } => {
                out_dim * (padded_in / dtype.block_size()) * dtype.type_size()
            }
        }
    }

    /// `"f32"` or the GGML block type.
    pub fn format(&self) -> String {
        match self {
            Self::F32(_) => "f32".into(),
            Self::Quantized { dtype, .. } => format!("{dtype:?}").to_lowercase(),
        }
    }
}

/// Input rows from which a layer marked [`QLinear::batches_in_f32`] multiplies as dequantize +
/// F32 matmul.
const DEQUANTIZE_FROM_ROWS: usize = 32;
/// Largest temporary F32 weight that path may make.
const MAX_DEQUANTIZED_BYTES: usize = 64 << 20;

impl Module for QLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::F32(l) => {
                let ys = match crate::decode_kernels::matmul_rows(xs, l.weight())? {
                    Some(ys) => Some(ys),
                    None => crate::prefill_kernels::matmul_many_rows(xs, l.weight())?,
                };
                match (ys, l.bias()) {
                    (Some(ys), Some(b)) => ys.broadcast_add(b),
                    (Some(ys), None) => Ok(ys),
                    (None, _) => l.forward(xs),
                }
            }
            Self::Quantized { matmul, bias, in_dim, padded_in, dtype, out_dim, batches_in_f32 } => {
                let xs = if padded_in > in_dim {
                    xs.pad_with_zeros(candle_core::D::Minus1, 0, padded_in - in_dim)?
                } else {
                    xs.clone()
                };
                let rows = xs.elem_count() / padded_in;
                let ys = match matmul {
                    QMatMul::QTensor(q)
                        if *batches_in_f32
                            && rows >= DEQUANTIZE_FROM_ROWS
                            && matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4_0)
                            && out_dim * padded_in * 4 <= MAX_DEQUANTIZED_BYTES =>
                    {
                        let weight = q.dequantize(xs.device())?;
                        match crate::prefill_kernels::matmul_many_rows(&xs, &weight)? {
                            Some(ys) => ys,
                            None => xs.broadcast_matmul(&weight.t()?)?,
                        }
                    }
                    QMatMul::QTensor(q) if rows <= crate::decode_kernels::MAX_ROWS => {
                        match crate::decode_kernels::matmul_rows_quantized(&xs, q)? {
                            Some(ys) => ys,
                            None => matmul.forward(&xs)?,
                        }
                    }
                    _ => matmul.forward(&xs)?,
                };
                match bias {
                    Some(b) => ys.broadcast_add(b),
                    None => Ok(ys),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Quantized a chunk of rows at a time, an F32, F16 or BF16 table gives the blocks of the
    /// whole table quantized at once (an F32 table's rows were once read from its start).
    #[test]
    fn quantize_rows_in_chunks_equals_whole() {
        let dev = &candle_core::Device::Cpu;
        let table = Tensor::randn(0f32, 1.0, (37, 512), dev).unwrap();
        for dtype in [candle_core::DType::F32, candle_core::DType::F16, candle_core::DType::BF16] {
            let t = table.to_dtype(dtype).unwrap();
            for block in [GgmlDType::Q4K, GgmlDType::Q8_0, GgmlDType::Q4_0] {
                let whole = QTensor::quantize(&t.to_dtype(candle_core::DType::F32).unwrap(), block).unwrap();
                let chunked = super::quantize_rows_by(&t, block, 5 * 512).unwrap();
                assert_eq!(chunked.data().unwrap(), whole.data().unwrap(), "{dtype:?} {block:?}");
            }
        }
    }

    use super::*;
    use candle_core::Device;

    /// Blocks at an odd address read as the same values; a wrong byte count is an error, not a
    /// read past the slice.
    #[test]
    fn qtensor_from_bytes_takes_any_address_and_checks_the_length() {
        let cpu = &Device::Cpu;
        let weight = seeded_normal(&[4, 64], 7);
        let q = QTensor::quantize(&weight, GgmlDType::Q8_0).unwrap();
        let bytes = q.data().unwrap().to_vec();
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        let odd = &shifted[1..];
        assert_ne!(odd.as_ptr().align_offset(2), 0);
        let a = qtensor_from_bytes(GgmlDType::Q8_0, &bytes, vec![4, 64], cpu).unwrap().dequantize(cpu).unwrap();
        let b = qtensor_from_bytes(GgmlDType::Q8_0, odd, vec![4, 64], cpu).unwrap().dequantize(cpu).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        let err = qtensor_from_bytes(GgmlDType::Q8_0, &bytes[..bytes.len() - 34], vec![4, 64], cpu).unwrap_err();
        assert!(err.to_string().contains("do not hold a [4, 64] tensor"), "{err}");
    }

    /// N(0, 1) values from a seed (Box–Muller): the same tensor on every run.
    fn seeded_normal(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        d / n
    }

    #[test]
    fn quantized_linear_is_close_to_f32() {
        let w = seeded_normal(&[48, 512], 1);
        let b = seeded_normal(&[48], 2);
        let x = seeded_normal(&[1, 5, 512], 3);
        let exact = QLinear::new(w.clone(), Some(b.clone()), WeightFormat::F32).unwrap();
        let want = exact.forward(&x).unwrap();
        for (format, tol, kind) in [(WeightFormat::Q8_0, 0.01, "q8_0"), (WeightFormat::Q4, 0.15, "q4k")] {
            let q = QLinear::new(w.clone(), Some(b.clone()), format).unwrap();
            assert_eq!(q.format(), kind);
            assert!(matches!(q.matrix(), MatrixRef::Blocks { .. }));
            let err = rel_err(&q.forward(&x).unwrap(), &want);
            eprintln!("{format:?}: relative error {err}");
            assert!(err < tol && err > 0.0, "{format:?}: relative error {err}");
            assert!(q.weight_bytes() * 3 < exact.weight_bytes(), "{format:?}");
        }
    }

    #[test]
    fn auto_picks_the_most_precise_format_that_fits() {
        let size = |f: WeightFormat| match f {
            WeightFormat::F32 => 4000,
            WeightFormat::Q8_0 => 1100,
            WeightFormat::Q4 => 600,
        };
        let pick = |choice, budget| choose_format("m", choice, size, 100, budget);
        assert_eq!(pick(WeightChoice::Auto, 5000).unwrap(), WeightFormat::F32);
        assert_eq!(pick(WeightChoice::Auto, 2000).unwrap(), WeightFormat::Q8_0);
        assert_eq!(pick(WeightChoice::Auto, 800).unwrap(), WeightFormat::Q4);
        let msg = pick(WeightChoice::Auto, 500).unwrap_err().to_string();
        assert!(msg.contains("with q4 weights") && msg.contains("use the native CLI"), "{msg}");
        let msg = pick(WeightChoice::Fixed(WeightFormat::F32), 2000).unwrap_err().to_string();
        assert!(msg.contains("with f32 weights") && msg.contains("choose weights \"q8_0\" instead"), "{msg}");
        assert_eq!(pick(WeightChoice::Fixed(WeightFormat::Q4), 5000).unwrap(), WeightFormat::Q4);
        assert_eq!(WeightChoice::parse(None).unwrap(), WeightChoice::Auto);
        assert!(WeightChoice::parse(Some("q5")).is_err());
    }

    /// Input dimensions that are not whole blocks are padded with zero columns (and the inputs
    /// with zeros): the result equals the unpadded product up to quantization.
    #[test]
    fn shapes_that_do_not_fit_a_block_are_padded() {
        let dev = Device::Cpu;
        let w = seeded_normal(&[40, 4304 / 8], 4); // 538 inputs: 16.8 blocks of 32
        let x = seeded_normal(&[1, 3, 538], 5);
        let want = QLinear::new(w.clone(), None, WeightFormat::F32).unwrap().forward(&x).unwrap();
        for (format, kind, tol) in [(WeightFormat::Q8_0, "q8_0", 0.01), (WeightFormat::Q4, "q4_0", 0.15)] {
            let q = QLinear::new(w.clone(), None, format).unwrap();
            assert_eq!(q.format(), kind);
            assert_eq!(q.weight_bytes(), 40 * 544 / 32 * if kind == "q8_0" { 34 } else { 18 });
            let err = rel_err(&q.forward(&x).unwrap(), &want);
            eprintln!("padded {format:?}: relative error {err}");
            assert!(err < tol && err > 0.0, "{format:?}: relative error {err}");
        }
        let w = Tensor::randn(0f32, 1.0, (8, 96), &dev).unwrap(); // 96 = 3·32, not a multiple of 256
        assert_eq!(QLinear::new(w, None, WeightFormat::Q4).unwrap().format(), "q4_0");
    }
}
