//! How a weight matrix is stored on the GPU, and the repacking from the CPU's form.
//!
//! Every matmul kernel reads its weights through `w4_at(row, col)` (four consecutive weights,
//! `col` a multiple of 4) and `w_at(row, col)` (one; row within the chunk); each storage is a
//! WGSL snippet (`shaders/storage/*.wgsl`) defining `w`'s element type and both functions,
//! compiled into its own set of kernels. Quantized storages keep GGML's blocks bit for bit (the
//! values equal candle's `dequantize`), row after row; Q8_0 and Q4_0 rows are regrouped (the
//! quants, then the scales) so that every load is a whole `u32` (their 34- and 18-byte blocks
//! are not 4-byte aligned); Q4_K gets its packed 6-bit scales unpacked to bytes (4 more bytes
//! per 256 values) so that a sub-block's scale is one load.

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightStorage {
    F32,
    /// Two f16 per `u32`.
    F16,
    Q8_0,
    Q4_0,
    Q4K,
}

impl WeightStorage {
    pub const ALL: [Self; 5] = [Self::F32, Self::F16, Self::Q8_0, Self::Q4_0, Self::Q4K];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4K => "q4k",
        }
    }

    /// The storage holding GGML `dtype` blocks as they are, if the kernels read that type.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4K => Some(Self::Q4K),
            _ => None,
        }
    }

    /// The GGML block type of a quantized storage.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4_0 => Some(GgmlDType::Q4_0),
            Self::Q4K => Some(GgmlDType::Q4K),
            Self::F32 | Self::F16 => None,
        }
    }

    /// The WGSL declaring `WeightWord`, `w_at` and `w4_at` for the matmul kernels.
    pub(super) fn wgsl(self) -> String {
        const BLOCKS32: &str = include_str!("shaders/storage/blocks32.wgsl");
        match self {
            Self::F32 => include_str!("shaders/storage/f32.wgsl").to_owned(),
            Self::F16 => include_str!("shaders/storage/f16.wgsl").to_owned(),
            Self::Q8_0 => format!("{BLOCKS32}\n{}", include_str!("shaders/storage/q8_0.wgsl")),
            Self::Q4_0 => format!("{BLOCKS32}\n{}", include_str!("shaders/storage/q4_0.wgsl")),
            Self::Q4K => include_str!("shaders/storage/q4k.wgsl").to_owned(),
        }
    }

    /// Blocks per row of `k` values (a quantized row is padded to whole blocks).
    fn blocks_per_row(self, k: usize) -> usize {
        self.ggml().map_or(0, |t| k.div_ceil(t.block_size()))
    }

    /// Bytes one row of `k` values takes (every quantized row is whole words, so a chunk of rows
    /// is too; an f16 row of odd `k` ends mid-word, and a chunk is padded to a whole word).
    pub fn row_bytes(self, k: usize) -> u64 {
        let nb = self.blocks_per_row(k) as u64;
        let scale_words = nb.div_ceil(2);
        match self {
            Self::F32 => 4 * k as u64,
            Self::F16 => 2 * k as u64,
            Self::Q8_0 => 32 * nb + 4 * scale_words,
            Self::Q4_0 => 16 * nb + 4 * scale_words,
            Self::Q4K => 148 * nb,
        }
    }

    /// `rows` rows of GGML blocks of this type (`rows · blocks_per_row · type_size` bytes, row
    /// after row, as candle's `QTensor::data`) in the layout `w_at` reads, row after row.
    pub fn pack_blocks(self, data: &[u8], rows: usize, k: usize) -> Result<Vec<u32>> {
        let Some(dtype) = self.ggml() else { bail!("{} is not a block format", self.name()) };
        let (nb, block_bytes) = (self.blocks_per_row(k), dtype.type_size());
        if nb == 0 {
            bail!("{} blocks: rows of {k} values", self.name());
        }
        if data.len() != rows * nb * block_bytes {
            bail!(
                "{} blocks: {} bytes for {rows} rows of {k} values, expected {}",
                self.name(),
                data.len(),
                rows * nb * block_bytes
            );
        }
        let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mut out = Vec::with_capacity((rows as u64 * self.row_bytes(k) / 4) as usize);
        for row in data.chunks_exact(nb * block_bytes) {
            let blocks = row.chunks_exact(block_bytes);
            match self {
                // Q8_0 / Q4_0 blocks are an f16 scale and the quants: quants of the whole row
                // first, then the scales two per word.
                Self::Q8_0 | Self::Q4_0 => {
                    out.extend(blocks.clone().flat_map(|b| b[2..].chunks_exact(4).map(word)));
                    let scales: Vec<u32> = blocks.map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))).collect();
                    out.extend(scales.chunks(2).map(|pair| pair[0] | pair.get(1).map_or(0, |hi| hi << 16)));
                }
                // Q4_K: d, dmin | 12 bytes of packed 6-bit scales and mins | 128 quant bytes →
                // d, dmin | (sc, m) of the 8 sub-blocks, a byte each | the quant bytes.
                _ => {
                    for b in blocks {
                        out.push(word(&b[..4]));
                        let unpacked: Vec<u8> = (0..8).flat_map(|sub| q4k_scale_min(sub, &b[4..16])).collect();
                        out.extend(unpacked.chunks_exact(4).map(word));
                        out.extend(b[16..].chunks_exact(4).map(word));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Dense values (`f32` storage: as they are; `f16`: rounded, two per word).
    pub fn pack_dense(self, values: &[f32]) -> Result<Vec<u32>> {
        match self {
            Self::F32 => Ok(values.iter().map(|v| v.to_bits()).collect()),
            Self::F16 => Ok(pack_f16(values)),
            other => bail!("{} weights are uploaded as blocks, not values", other.name()),
        }
    }
}

/// Sub-block `j`'s 6-bit scale and min from Q4_K's 12 packed bytes (GGML's `get_scale_min_k4`).
fn q4k_scale_min(j: usize, q: &[u8]) -> [u8; 2] {
    if j < 4 {
        [q[j] & 63, q[j + 4] & 63]
    } else {
        [(q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)]
    }
}

/// f32 values as f16, two per `u32` (the even element in the low half; an odd count is padded).
fn pack_f16(values: &[f32]) -> Vec<u32> {
    values
        .chunks(2)
        .map(|pair| {
            let lo = u32::from(half::f16::from_f32(pair[0]).to_bits());
            let hi = pair.get(1).map_or(0, |v| u32::from(half::f16::from_f32(*v).to_bits()));
            lo | (hi << 16)
        })
        .collect()
}
