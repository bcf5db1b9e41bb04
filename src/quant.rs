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
    pub fn name(&self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Q8_0 => "q8_0",
            Self::Q4 => "q4",
        }
    }

    /// The GGML type a `[out, in]` matrix gets, or `None` to keep it in F32.
    pub fn ggml_type(&self, in_dim: usize) -> Option<GgmlDType> {
        let fits = |t: GgmlDType| in_dim.is_multiple_of(t.block_size());
        match self {
            Self::F32 => None,
            Self::Q8_0 => Some(GgmlDType::Q8_0).filter(|&t| fits(t)),
            Self::Q4 => [GgmlDType::Q4K, GgmlDType::Q4_0].into_iter().find(|&t| fits(t)),
        }
    }

    /// Approximate bytes per weight of a matrix with `in_dim` inputs (for memory budgets).
    pub fn bytes_per_weight(&self, in_dim: usize) -> f64 {
        match self.ggml_type(in_dim) {
            None => 4.0,
            Some(t) => t.type_size() as f64 / t.block_size() as f64,
        }
    }
}

/// A linear layer in F32 or in a quantized block format: `y = x·Wᵀ (+ b)`.
#[derive(Debug, Clone)]
pub enum QLinear {
    F32(Linear),
    Quantized { matmul: QMatMul, bias: Option<Tensor>, dtype: GgmlDType, out_dim: usize, in_dim: usize },
}

impl QLinear {
    /// From an F32 `[out, in]` weight; quantized when `format` asks for it and the shape allows.
    pub fn new(weight: Tensor, bias: Option<Tensor>, format: WeightFormat) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        match format.ggml_type(in_dim) {
            None => Ok(Self::F32(Linear::new(weight, bias))),
            Some(dtype) => {
                let q = QTensor::quantize(&weight, dtype)?;
                Ok(Self::Quantized { matmul: QMatMul::from_qtensor(q)?, bias, dtype, out_dim, in_dim })
            }
        }
    }

    /// Load `weight` `[out, in]` (and `bias` `[out]` when `bias`) from `vb`, in `format`.
    pub fn load(in_dim: usize, out_dim: usize, bias: bool, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        let linear = candle_nn::linear_b(in_dim, out_dim, bias, vb)?;
        Self::new(linear.weight().clone(), linear.bias().cloned(), format)
    }

    /// The F32 weight `[out, in]`, when this layer is not quantized.
    pub fn weight(&self) -> Option<&Tensor> {
        match self {
            Self::F32(l) => Some(l.weight()),
            Self::Quantized { .. } => None,
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::F32(l) => l.bias(),
            Self::Quantized { bias, .. } => bias.as_ref(),
        }
    }

    /// Bytes the weight matrix takes in memory.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::F32(l) => l.weight().elem_count() * 4,
            Self::Quantized { dtype, out_dim, in_dim, .. } => out_dim * in_dim / dtype.block_size() * dtype.type_size(),
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

impl Module for QLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::F32(l) => l.forward(xs),
            Self::Quantized { matmul, bias, .. } => {
                let ys = matmul.forward(xs)?;
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
    use super::*;
    use candle_core::Device;

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        d / n
    }

    #[test]
    fn quantized_linear_is_close_to_f32() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 512), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 48, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 5, 512), &dev).unwrap();
        let exact = QLinear::new(w.clone(), Some(b.clone()), WeightFormat::F32).unwrap();
        let want = exact.forward(&x).unwrap();
        for (format, tol, kind) in [(WeightFormat::Q8_0, 0.01, "q8_0"), (WeightFormat::Q4, 0.15, "q4k")] {
            let q = QLinear::new(w.clone(), Some(b.clone()), format).unwrap();
            assert_eq!(q.format(), kind);
            assert!(q.weight().is_none());
            let err = rel_err(&q.forward(&x).unwrap(), &want);
            assert!(err < tol && err > 0.0, "{format:?}: relative error {err}");
            assert!(q.weight_bytes() * 3 < exact.weight_bytes(), "{format:?}");
        }
    }

    #[test]
    fn shapes_that_do_not_fit_a_block_stay_f32() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 48), &dev).unwrap(); // 48 inputs: not a multiple of 32
        assert_eq!(QLinear::new(w.clone(), None, WeightFormat::Q8_0).unwrap().format(), "f32");
        let w = Tensor::randn(0f32, 1.0, (8, 96), &dev).unwrap(); // 96 = 3·32, not a multiple of 256
        assert_eq!(QLinear::new(w, None, WeightFormat::Q4).unwrap().format(), "q4_0");
    }
}
