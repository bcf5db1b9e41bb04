//! The VLM of all three families: vision tower → feature selection → projector → (anyres
//! packing) → merge into the token embeddings → decoder. Pure model code; prompts, files and
//! sampling live in `pipeline.rs` / `generate.rs`.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::{FeatureSelect, LlavaConfig, VisionKind};
use crate::models::anyres::TileGrid;
use crate::projector::Projector;
use crate::quant::WeightFormat;
use crate::text::{Cache, DecoderOutput, ForwardOptions, TextModel};
use crate::vision::VisionTower;

pub struct LlavaModel {
    pub config: LlavaConfig,
    pub vision: VisionTower,
    /// The projector, or none when it lives on the GPU only ([`Self::shell`]).
    projector: Option<Projector>,
    pub text: TextModel,
    /// LLaVA-NeXT / OneVision's `image_newline` `[H]`, ending each row of an anyres image.
    pub image_newline: Option<Tensor>,
    /// How the linears are held in memory (a load option: quantized on load, or as stored).
    pub weight_format: WeightFormat,
    device: Device,
}

impl LlavaModel {
    /// `vb` holds canonical names (`vision.`, `projector.`, `lm.`, `lm_head.`; see `weights.rs`);
    /// the linears are held in `format`.
    pub fn new(config: &LlavaConfig, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        // The decoder first: its embedding table is the largest tensor and passes through F16
        // while it is quantized; built before anything else, that transient is not stacked on
        // the vision tower (peak memory ≈ the model, not the model + the table).
        let text = TextModel::new(&config.text, format, vb.clone())?;
        let vision = VisionTower::new(&config.vision, format, vb.pp("vision"))?;
        let projector = Projector::new(config, format, vb.pp("projector"))?;
        Self::with_parts(config, format, vb, text, vision, Some(projector))
    }

    /// What the CPU keeps when the model was uploaded to the GPU piece by piece and each piece
    /// dropped (`crate::resident`): `image_newline` (an anyres image is packed here) — and, when
    /// `vision_on_cpu` (a tower the GPU does not run), the whole vision tower and projector.
    /// Nothing of the decoder: prompts are embedded on the GPU. A forward or an embedding
    /// through what is missing is an error that says so.
    pub fn shell(config: &LlavaConfig, format: WeightFormat, vb: VarBuilder, vision_on_cpu: bool) -> Result<Self> {
        let text = TextModel::gpu_only(&config.text);
        let (vision, projector) = match vision_on_cpu {
            true => (
                VisionTower::new(&config.vision, format, vb.pp("vision"))?,
                Some(Projector::new(config, format, vb.pp("projector"))?),
            ),
            false => (VisionTower::gpu_only(&config.vision), None),
        };
        Self::with_parts(config, format, vb, text, vision, projector)
    }

    fn with_parts(
        config: &LlavaConfig,
        format: WeightFormat,
        vb: VarBuilder,
        text: TextModel,
        vision: VisionTower,
        projector: Option<Projector>,
    ) -> Result<Self> {
        let image_newline = match config.anyres {
            Some(_) => Some(vb.get(config.text.hidden_size, "image_newline")?),
            None => None,
        };
        Ok(Self {
            image_newline,
            vision,
            projector,
            weight_format: format,
            text,
            config: config.clone(),
            device: vb.device().clone(),
        })
    }

    /// The projector (an error when it lives on the GPU only).
    pub fn projector(&self) -> Result<&Projector> {
        self.projector.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(
                "the projector is held on the GPU only (a GPU-resident load): load the model again with the CPU backend"
                    .into(),
            )
        })
    }

    /// Whether the CPU holds every block (false after a GPU-resident load).
    pub fn runs_on_cpu(&self) -> bool {
        self.text.has_layers() && self.vision.has_layers()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The vision features LLaVA uses, `[n_tiles, n_img, Hv·k]`: the configured hidden state(s),
    /// CLS dropped for the `default` strategy.
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
        Ok(selected)
    }

    /// `pixel_values` `[n_tiles, 3, S, S]` of one image → `image_features` `[N, H]`.
    pub fn encode_image(&self, pixel_values: &Tensor, grid: Option<&TileGrid>) -> Result<Tensor> {
        let tile_features = self.projector()?.forward(&self.select_vision_features(pixel_values)?)?;
        self.pack_image_features(&tile_features, grid)
    }

    /// Projected tile features `[n_tiles, n_img, H]` → the rows merged into the prompt `[N, H]`:
    /// LLaVA's one tile as it is, an anyres image's tiles packed (see `models::anyres`), an
    /// untiled OneVision image (one of several) followed by one newline.
    pub fn pack_image_features(&self, tile_features: &Tensor, grid: Option<&TileGrid>) -> Result<Tensor> {
        match (&self.config.anyres, grid, &self.image_newline) {
            (Some(anyres), Some(grid), Some(newline)) => anyres
                .pack(tile_features, grid, newline)
                .map_err(|e| candle_core::Error::Msg(format!("packing the image's tiles: {e:#}"))),
            (Some(_), None, Some(newline)) if tile_features.dim(0)? == 1 => {
                Tensor::cat(&[&tile_features.squeeze(0)?, &newline.unsqueeze(0)?], 0)
            }
            (None, None, _) if tile_features.dim(0)? == 1 => tile_features.squeeze(0),
            _ => candle_core::bail!("the image was preprocessed for another model family (tiles do not match)"),
        }
    }

    /// Token embeddings `[1, T, H]` with each image's features written over its span (spans in
    /// prompt order, not overlapping).
    pub fn embed(&self, input_ids: &[u32], images: &[(&Tensor, (usize, usize))]) -> Result<Tensor> {
        self.merge_images(&self.text.embed(input_ids)?, images)
    }

    /// Token embeddings `[1, T, H]` with each image's features written over its span.
    pub fn merge_images(&self, embeds: &Tensor, images: &[(&Tensor, (usize, usize))]) -> Result<Tensor> {
        if images.is_empty() {
            return Ok(embeds.clone());
        }
        let t = embeds.dim(1)?;
        let mut parts = Vec::with_capacity(2 * images.len() + 1);
        let mut done = 0;
        for &(features, (start, end)) in images {
            let n = features.dim(0)?;
            if end - start != n || end > t || start < done {
                candle_core::bail!("the prompt has {} image tokens but the image gives {n} features", end - start);
            }
            if start > done {
                parts.push(embeds.narrow(1, done, start - done)?);
            }
            parts.push(features.unsqueeze(0)?);
            done = end;
        }
        if done < t {
            parts.push(embeds.narrow(1, done, t - done)?);
        }
        Tensor::cat(&parts, 1)
    }

    /// Decoder forward (see [`TextModel::forward`]).
    pub fn forward(&self, embeds: &Tensor, cache: &mut Cache, opts: ForwardOptions) -> Result<DecoderOutput> {
        self.text.forward(embeds, cache, opts)
    }
}
