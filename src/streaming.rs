//! Streaming load: a weight file (safetensors, or a `cmrm quantize` GGUF) converted tensor by
//! tensor as its bytes arrive, so a download never sits in memory whole. Each tensor goes
//! straight to the form the model holds it in (`quant::in_memory_form`: quantized blocks,
//! F16/F32; a GGUF's blocks are kept as they are) and its raw bytes are dropped; the model then
//! takes those blocks as they are (`quant::stored_blocks`), and each is freed as the model takes
//! it. Peak memory ≈ the model in its format plus one slice of raw rows.

use anyhow::{bail, Context, Result};

use candle_core::{Device, Tensor};

use crate::quant::{in_memory_form, WeightFormat};
use crate::weight_headers::{parse_gguf_header, parse_header, HeaderTensor, StoredType, MAX_HEADER_BYTES};
use crate::weights::{canonical_key, canonical_shapes, Weights};

/// The format a GGUF's blocks are in, if any.
fn stored_format(tensors: &[HeaderTensor]) -> Option<WeightFormat> {
    tensors.iter().find_map(|t| match t.stored {
        StoredType::Blocks(blocks) => WeightFormat::of_ggml(blocks),
        StoredType::Values(_) => None,
    })
}

/// Decides the in-memory format once the header's shapes are known (canonical names), given the
/// format the file's blocks are stored in (a quantized GGUF; `None` for safetensors).
pub type DecideFormat<'a> = Box<dyn FnMut(&[(String, Vec<usize>)], Option<WeightFormat>) -> Result<WeightFormat> + 'a>;

/// A weight file converted as it streams in: safetensors, or GGUF (told apart by the GGUF magic).
pub struct WeightStream<'a> {
    name: String,
    decide: Option<DecideFormat<'a>>,
    format: Option<WeightFormat>,
    /// Bytes received and not yet consumed; `buf[0]` is at file offset `buf_offset`.
    buf: Vec<u8>,
    buf_offset: u64,
    /// Tensors in data order, their ranges as file offsets; `next` is the first not yet converted.
    tensors: Vec<HeaderTensor>,
    next: usize,
    received: u64,
    /// The current tensor's converted bytes so far, their type and the last slice's shape.
    out: Vec<u8>,
    out_dtype: Option<candle_core::quantized::GgmlDType>,
    out_shape: Vec<usize>,
    slice_bytes: u64,
    /// How far a GGUF header has been checked.
    gguf_scan: crate::gguf::HeaderScan,
}

/// Rows are converted once this many bytes of them are buffered (or the tensor is complete).
const SLICE_BYTES: u64 = 16 << 20;

/// Memory a streamed load needs beside the model: a slice of raw rows, its tensor copy and F32
/// conversion, and the quantizer's F32 chunk (64 MiB).
pub const STREAM_OVERHEAD_BYTES: u64 = 4 * SLICE_BYTES + (64 << 20);

impl<'a> WeightStream<'a> {
    /// `decide` picks the format from the header (called once, before any tensor is converted).
    pub fn new(name: &str, decide: DecideFormat<'a>) -> Self {
        Self {
            name: name.to_owned(),
            decide: Some(decide),
            format: None,
            buf: Vec::new(),
            buf_offset: 0,
            tensors: Vec::new(),
            next: 0,
            received: 0,
            out: Vec::new(),
            out_dtype: None,
            out_shape: Vec::new(),
            slice_bytes: SLICE_BYTES,
            gguf_scan: Default::default(),
        }
    }

    /// Convert rows once `bytes` of them are buffered (default 16 MiB; tests use tiny slices).
    pub fn with_slice_bytes(mut self, bytes: u64) -> Self {
        self.slice_bytes = bytes.max(1);
        self
    }

    /// The format chosen (once the header has arrived).
    pub fn format(&self) -> Option<WeightFormat> {
        self.format
    }

    /// Feed the next bytes of the file; converted tensors go into `into`. Matrices are converted
    /// a slice of rows at a time as their bytes arrive (all conversions are row-wise), so the
    /// buffer holds about one slice, not one tensor.
    pub fn push(&mut self, chunk: &[u8], into: &mut Weights) -> Result<()> {
        self.received += chunk.len() as u64;
        self.buf.extend_from_slice(chunk);
        if self.format.is_none() && !self.read_header()? {
            return Ok(());
        }
        let format = self.format.unwrap_or_default();
        while let Some(t) = self.tensors.get(self.next) {
            let buffered_end = self.buf_offset + self.buf.len() as u64;
            let (start, end) = (t.range.start, t.range.end);
            let available = buffered_end.min(end).saturating_sub(self.buf_offset.max(start));
            let whole = buffered_end >= end;
            let canonical = canonical_key(&t.key);
            // Rows of a matrix (skip the rows of tensors cmrm does not use), or the whole tensor.
            let row_bytes = match t.shape.as_slice() {
                [rows, cols] if *rows > 0 => t.stored.bytes(*cols as u64),
                _ => end - start,
            }
            .max(1);
            let rows = available / row_bytes;
            if !whole && rows * row_bytes < self.slice_bytes {
                break; // wait for a slice's worth of rows
            }
            if rows == 0 {
                // Whole but nothing left to convert (an empty tensor): skip to its end.
                let skip = end.saturating_sub(self.buf_offset) as usize;
                self.buf.drain(..skip.min(self.buf.len()));
                self.buf_offset = self.buf_offset.max(end);
            } else {
                let from = (self.buf_offset.max(start) - self.buf_offset) as usize;
                let raw = &self.buf[from..from + (rows * row_bytes) as usize];
                if let Some(canonical) = &canonical {
                    let shape = match t.shape.as_slice() {
                        [_, cols] => vec![rows as usize, *cols],
                        other => other.to_vec(),
                    };
                    // Values go to the model's form; blocks stay as they are.
                    let converted = match t.stored {
                        StoredType::Values(dtype) => {
                            let tensor = Tensor::from_raw_buffer(raw, dtype, &shape, &Device::Cpu)
                                .with_context(|| format!("{}: tensor '{}'", self.name, t.key))?;
                            let q = in_memory_form(canonical, &tensor, format)
                                .with_context(|| format!("{}: converting '{}'", self.name, t.key))?;
                            (std::borrow::Cow::Owned(q.data()?.into_owned()), q.dtype(), q.shape().dims().to_vec())
                        }
                        StoredType::Blocks(blocks) => (std::borrow::Cow::Borrowed(raw), blocks, shape),
                    };
                    let (data, dtype, shape) = converted;
                    if self.out.is_empty() {
                        // The whole tensor's converted size, known from its first slice: one
                        // allocation, no doubling (a 165 MB table would pass through 256 MB).
                        let total_rows = t.shape.first().copied().unwrap_or(1) as u64;
                        let per_row = data.len() as u64 / (rows.max(1));
                        let whole_tensor =
                            if t.shape.len() == 2 { per_row.checked_mul(total_rows) } else { Some(data.len() as u64) };
                        whole_tensor
                            .and_then(|n| usize::try_from(n).ok())
                            .and_then(|n| self.out.try_reserve_exact(n).ok())
                            .with_context(|| format!("{}: not enough memory for tensor '{}'", self.name, t.key))?;
                    }
                    self.out.extend_from_slice(&data);
                    self.out_shape = shape;
                    self.out_dtype = Some(dtype);
                }
                let consumed = from + (rows * row_bytes) as usize;
                self.buf.drain(..consumed);
                self.buf_offset += consumed as u64;
            }
            if self.buf_offset < end {
                continue; // more rows of this tensor are buffered, or none: the loop re-checks
            }
            // The tensor is complete.
            if let (Some(_), Some(dtype)) = (&canonical, self.out_dtype) {
                let mut shape = self.out_shape.clone();
                if let (Some(first), [rows, _]) = (shape.first_mut(), t.shape.as_slice()) {
                    *first = *rows;
                }
                let bytes = std::mem::take(&mut self.out);
                into.add_converted_bytes(&t.key, dtype, &shape, bytes).with_context(|| self.name.clone())?;
            }
            self.out.clear();
            self.out_dtype = None;
            self.next += 1;
        }
        Ok(())
    }

    /// Tensors converted so far.
    pub fn converted_count(&self) -> usize {
        self.next
    }

    /// Whether every tensor of this file under the canonical `prefix` (a block, `lm.layers.3.`)
    /// is converted and the stream has moved past them: at least one is in, none is pending,
    /// and the last one converted is another's. (A block cut at a shard's end is thus settled
    /// only once the next shard has moved past the rest of it.)
    pub fn settled(&self, prefix: &str) -> bool {
        let under = |t: &HeaderTensor| canonical_key(&t.key).is_some_and(|k| k.starts_with(prefix));
        let (done, pending) = self.tensors.split_at(self.next.min(self.tensors.len()));
        done.iter().any(under) && !pending.iter().any(under) && !done.last().is_some_and(under)
    }

    /// Parse the header once it is in; `false` while more bytes are needed.
    fn read_header(&mut self) -> Result<bool> {
        if self.buf.len() < 8 {
            return Ok(false);
        }
        if self.buf.starts_with(b"GGUF") {
            let Some((tensors, data_start)) = parse_gguf_header(&self.name, &self.buf, &mut self.gguf_scan)? else {
                return Ok(false);
            };
            return self.start_data(tensors, data_start, true);
        }
        let n = u64::from_le_bytes(self.buf[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER_BYTES {
            bail!("{}: not a safetensors file (header of {n} bytes)", self.name);
        }
        if (self.buf.len() as u64) < 8 + n {
            return Ok(false);
        }
        let mut tensors = parse_header(&self.name, &self.buf[8..8 + n as usize])?;
        // Ranges from here on are file offsets (the data section starts after the header).
        for t in &mut tensors {
            t.range = t.range.start + 8 + n..t.range.end + 8 + n;
        }
        self.start_data(tensors, 8 + n, false)
    }

    /// The header is in: decide the format, then take tensors from `data_start` on.
    fn start_data(&mut self, tensors: Vec<HeaderTensor>, data_start: u64, gguf: bool) -> Result<bool> {
        let mut decide = self.decide.take().context("the header was read twice")?;
        let stored = if gguf { stored_format(&tensors) } else { None };
        self.format = Some(decide(&canonical_shapes(&tensors), stored)?);
        self.tensors = tensors;
        // The data section may start past the bytes so far (a GGUF pads its header to the
        // alignment): `buf[0]` stays at its true offset and the gap is skipped like the others.
        let header_end = data_start.min(self.buf.len() as u64);
        self.buf.drain(..header_end as usize);
        self.buf_offset = header_end;
        Ok(true)
    }

    /// After the last byte: every tensor must have arrived.
    pub fn finish(self) -> Result<WeightFormat> {
        let Some(format) = self.format else {
            bail!(
                "{}: the download stopped after {} bytes, inside the header (truncated file?)",
                self.name,
                self.received
            )
        };
        if self.next < self.tensors.len() {
            bail!(
                "{}: the download stopped after {} bytes; tensor '{}' and {} more are missing (truncated file?)",
                self.name,
                self.received,
                self.tensors[self.next].key,
                self.tensors.len() - self.next - 1
            );
        }
        Ok(format)
    }
}
