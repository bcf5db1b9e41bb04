//! The multimodal projector: selected vision features `[n_img, Hv·k]` → `image_features` `[n_img, H]`
//! (linear, activation, linear), the embeddings that replace the `<image>` tokens.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::{Activation, LlavaConfig};
use crate::quant::{QLinear, WeightFormat};

pub struct Projector {
    linear_1: QLinear,
    act: Activation,
    linear_2: QLinear,
}

impl Projector {
    /// `vb` points at the canonical `projector.` prefix.
    pub fn new(cfg: &LlavaConfig, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        let hidden = cfg.text.hidden_size;
        // Image features come in batches of hundreds of rows, like the vision tower's.
        let linear = |in_dim, name| {
            QLinear::load(in_dim, hidden, cfg.projector_bias, format, vb.pp(name)).map(QLinear::batches_in_f32)
        };
        Ok(Self {
            linear_1: linear(cfg.projector_in_dim(), "linear_1")?,
            act: cfg.projector_act,
            linear_2: linear(hidden, "linear_2")?,
        })
    }
}

impl Projector {
    /// `(linear_1, activation, linear_2)` (for the GPU tower).
    pub fn weights(&self) -> (crate::text::LinearRef<'_>, Activation, crate::text::LinearRef<'_>) {
        (self.linear_1.linear_ref(), self.act, self.linear_2.linear_ref())
    }
}

impl Module for Projector {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.act.apply(&self.linear_1.forward(xs)?)?)
    }
}
