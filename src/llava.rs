//! The VLM: vision tower → feature selection → projector → merge into the token embeddings →
//! decoder. Pure model code; prompts, files and sampling live in `pipeline.rs` / `generate.rs`.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::{FeatureSelect, LlavaConfig, VisionKind};
use crate::projector::Projector;
use crate::text::{Cache, DecoderOutput, ForwardOptions, TextModel};
use crate::vision::VisionTower;

pub struct LlavaModel {
    pub config: LlavaConfig,
    pub vision: VisionTower,
    pub projector: Projector,
    pub text: TextModel,
    device: Device,
}

impl LlavaModel {
    /// `vb` holds canonical names (`vision.`, `projector.`, `lm.`, `lm_head.`; see `weights.rs`).
    pub fn new(config: &LlavaConfig, vb: VarBuilder) -> Result<Self> {
        // The decoder first: its embedding table is the largest tensor and passes through F16
        // while it is quantized; built before anything else, that transient is not stacked on
        // the vision tower (peak memory ≈ the model, not the model + the table).
        let text = TextModel::new(&config.text, vb.clone())?;
        Ok(Self {
            vision: VisionTower::new(&config.vision, vb.pp("vision"))?,
            projector: Projector::new(config, vb.pp("projector"))?,
            text,
            config: config.clone(),
            device: vb.device().clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The vision features LLaVA uses, `[n_img, Hv·k]`: the configured hidden state(s), CLS
    /// dropped for the `default` strategy.
    pub fn select_vision_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let states = self.vision.hidden_states(pixel_values, &self.config.vision_feature_layers)?;
        let selected = VisionTower::concat_hidden(&states)?;
        let selected = match (self.config.feature_select, self.config.vision.kind) {
            (FeatureSelect::Default, VisionKind::Clip) => {
                let n = selected.dim(1)?;
                selected.narrow(1, 1, n - 1)?
            }
            _ => selected,
        };
        selected.squeeze(0)
    }

    /// `pixel_values` `[1, 3, S, S]` → `image_features` `[n_img, H]`.
    pub fn encode_image(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.projector.forward(&self.select_vision_features(pixel_values)?)
    }

    /// Token embeddings `[1, T, H]` with the image features written over `image_span`.
    pub fn embed(&self, input_ids: &[u32], image: Option<(&Tensor, (usize, usize))>) -> Result<Tensor> {
        let embeds = self.text.embed(input_ids)?;
        let Some((features, (start, end))) = image else { return Ok(embeds) };
        let n = features.dim(0)?;
        if end - start != n || end > input_ids.len() {
            candle_core::bail!("the prompt has {} image tokens but the image gives {n} features", end - start);
        }
        let t = input_ids.len();
        let mut parts = Vec::with_capacity(3);
        if start > 0 {
            parts.push(embeds.narrow(1, 0, start)?);
        }
        parts.push(features.unsqueeze(0)?);
        if end < t {
            parts.push(embeds.narrow(1, end, t - end)?);
        }
        Tensor::cat(&parts, 1)
    }

    /// Decoder forward (see [`TextModel::forward`]).
    pub fn forward(&self, embeds: &Tensor, cache: &mut Cache, opts: ForwardOptions) -> Result<DecoderOutput> {
        self.text.forward(embeds, cache, opts)
    }
}
