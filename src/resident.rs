//! GPU-resident load: the decoder's blocks, its embedding table, final norm and lm_head, the
//! vision tower's layers and embeddings and the projector go to the GPU one piece at a time as
//! their weights arrive, and each CPU copy is dropped as soon as it is uploaded (prompts are
//! embedded on the GPU: [`DecoderBackend::prepare_prompt_async`]; patches are cut from the
//! config alone). The CPU keeps a shell ([`LlavaModel::shell`]): `image_newline`, for anyres
//! packing. Peak CPU memory is the largest piece in flight, not the model: what lets a model
//! larger than wasm32's 4 GiB (LLaVA-1.5-7B as q4) load in a tab.
//!
//! The same [`ResidentLoad`] serves a download converted as it streams (the page: after each
//! chunk, [`ResidentLoad::absorb`] uploads the blocks the stream has moved past) and files on
//! disk (the CLI: [`load_dir`], every block at once).

// wgpu's handles are Send + Sync natively but not on wasm32 (one thread there).
#![cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;
use candle_nn::VarBuilder;

use crate::backend::{BackendInfo, DecoderBackend, GpuVisionSlot};
use crate::config::LlavaConfig;
use crate::gpu::context::GpuContext;
use crate::gpu::decoder::{GpuDecoderBuilder, GpuWeights};
use crate::gpu::vision::GpuVisionBuilder;
use crate::models::llava::LlavaModel;
use crate::projector::Projector;
use crate::quant::WeightFormat;
use crate::text::{load_lm_head, TextModel, TokenEmbedding};
use crate::vision::{VisionEmbeddings, VisionTower};
use crate::weights::Weights;

/// The decoder's pieces beside its blocks that a resident load uploads on their own as they
/// arrive (canonical prefixes).
const TEXT_ENDS: [&str; 3] = ["lm.embed_tokens.", "lm.norm.", "lm_head."];

/// Likewise for the vision tower: its embeddings, CLIP's pre-norm, the projector.
const VISION_ENDS: [&str; 3] = ["vision.embeddings.", "vision.pre_layrnorm.", "projector."];

/// The piece a canonical tensor name is uploaded with (`lm.layers.3.`,
/// `vision.encoder.layers.0.`, `lm.embed_tokens.`, `lm_head.`), or `None` for the shell's
/// tensors.
pub fn block_prefix(name: &str) -> Option<&str> {
    if let Some(end) = TEXT_ENDS.iter().chain(&VISION_ENDS).find(|p| name.starts_with(**p)) {
        return Some(&name[..end.len()]);
    }
    ["lm.layers.", "vision.encoder.layers."].iter().find_map(|head| {
        let rest = name.strip_prefix(head)?;
        let dot = rest.find('.')?;
        Some(&name[..head.len() + dot + 1])
    })
}

/// CPU bytes a GPU-resident load of tensors `shapes` (canonical names) holds at its peak in
/// `format`: the shell and the largest block (a streamed tensor is freed once its block is up).
pub fn cpu_bytes<'a>(format: WeightFormat, shapes: impl Iterator<Item = (&'a str, &'a [usize])>) -> u64 {
    let mut blocks: std::collections::HashMap<&str, Vec<(&str, &[usize])>> = Default::default();
    let mut shell = Vec::new();
    for (name, shape) in shapes {
        match block_prefix(name) {
            Some(block) => blocks.entry(block).or_default().push((name, shape)),
            None => shell.push((name, shape)),
        }
    }
    let largest =
        blocks.values().map(|b| crate::quant::estimate_model_bytes(format, b.iter().copied())).max().unwrap_or(0);
    crate::quant::estimate_model_bytes(format, shell.into_iter()) + largest
}

/// Marks an error as the GPU's side of a resident load — the builders refused the model's
/// shapes, the device ran out of memory or was lost — where the CPU may still load the model
/// (`auto` then does, in the CLI and the page). An error of the weights themselves (a missing or
/// misshapen tensor) is not marked: the CPU would fail on it the same way.
#[derive(Debug, Clone, Copy)]
pub struct GpuUploadFailed;

impl std::fmt::Display for GpuUploadFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("uploading the model to the GPU failed")
    }
}

/// The result of pushing `what` to a GPU builder, with the device's health after it; an error
/// is the GPU's ([`GpuUploadFailed`]).
fn uploaded(ctx: &GpuContext, what: &str, pushed: Result<()>) -> Result<()> {
    pushed.and_then(|()| ctx.check_health()).with_context(|| format!("uploading {what}")).context(GpuUploadFailed)
}

/// A model being uploaded to a GPU block by block.
pub struct ResidentLoad {
    ctx: Arc<GpuContext>,
    config: LlavaConfig,
    format: WeightFormat,
    decoder: GpuDecoderBuilder,
    /// The GPU tower, or why the vision tower stays on the CPU (then its layers are kept).
    vision: std::result::Result<GpuVisionBuilder, String>,
    /// Blocks uploaded so far (decoder and vision).
    uploaded: usize,
    /// Tensors a stream had converted at the last [`Self::absorb_stream`].
    stream_seen: usize,
}

impl ResidentLoad {
    /// Start a load of `config`'s model, its linears held in `format` (as the CPU would hold
    /// them) and stored on the GPU as `gpu_weights`.
    pub fn new(
        ctx: Arc<GpuContext>,
        config: &LlavaConfig,
        format: WeightFormat,
        gpu_weights: GpuWeights,
    ) -> Result<Self> {
        let decoder = GpuDecoderBuilder::new(ctx.clone(), &config.text, gpu_weights).context(GpuUploadFailed)?;
        let vision = GpuVisionBuilder::new(ctx.clone(), config, gpu_weights).map_err(|e| format!("{e:#}"));
        Ok(Self { ctx, config: config.clone(), format, decoder, vision, uploaded: 0, stream_seen: 0 })
    }

    /// Blocks uploaded so far.
    pub fn uploaded(&self) -> usize {
        self.uploaded
    }

    /// Upload every block not yet on the GPU whose tensors have all arrived in `weights`
    /// (`arrived(prefix)`: every tensor under that canonical prefix is in), reading them — which
    /// frees a streamed tensor's bytes — and dropping the CPU block at once. Vision layers past
    /// the selected hidden state are released unread.
    pub fn absorb(&mut self, weights: &Weights, arrived: &dyn Fn(&str) -> bool) -> Result<()> {
        let vb = weights.var_builder(&Device::Cpu);
        for l in self.decoder.missing_layers() {
            let prefix = format!("lm.layers.{l}.");
            if !arrived(&prefix) {
                continue;
            }
            let block = TextModel::load_layer(&self.config.text, self.format, l, vb.clone())
                .with_context(|| format!("decoder block {l}"))?;
            uploaded(&self.ctx, &format!("decoder block {l}"), self.decoder.push_layer(l, &block.weights()))?;
            drop(block);
            self.uploaded += 1;
        }
        if let Ok(vision) = &mut self.vision {
            let cfg = &self.config.vision;
            for l in 0..cfg.num_hidden_layers {
                let prefix = format!("vision.encoder.layers.{l}.");
                if !arrived(&prefix) {
                    continue;
                }
                if l >= vision.layers_needed() {
                    weights.release_prefix(&prefix);
                    continue;
                }
                if !vision.missing_layers().contains(&l) {
                    continue;
                }
                let layer = VisionTower::load_layer(cfg, self.format, l, vb.pp("vision"))
                    .with_context(|| format!("vision layer {l}"))?;
                uploaded(&self.ctx, &format!("vision layer {l}"), vision.push_layer(l, &layer.weights()))?;
                drop(layer);
                self.uploaded += 1;
            }
        }
        self.absorb_text_ends(weights, &vb, arrived)?;
        self.absorb_vision_ends(&vb, arrived)
    }

    /// The vision embeddings (with CLIP's pre-norm) and the projector, each as it arrives, when
    /// the tower runs on the GPU (else the shell keeps them).
    fn absorb_vision_ends(&mut self, vb: &VarBuilder, arrived: &dyn Fn(&str) -> bool) -> Result<()> {
        let Ok(vision) = &mut self.vision else { return Ok(()) };
        let (cfg, format, ctx) = (&self.config, self.format, &self.ctx);
        let gpu = |what: &str, pushed: Result<()>| uploaded(ctx, what, pushed);
        let clip = cfg.vision.kind == crate::config::VisionKind::Clip;
        if !vision.has_embeddings() && arrived(VISION_ENDS[0]) && (!clip || arrived(VISION_ENDS[1])) {
            let embeddings = VisionEmbeddings::new(&cfg.vision, vb.pp("vision")).context("the vision embeddings")?;
            gpu("the vision embeddings", vision.push_embeddings(&embeddings.weights()))?;
        }
        if !vision.has_projector() && arrived(VISION_ENDS[2]) {
            let projector = Projector::new(cfg, format, vb.pp("projector")).context("the projector")?;
            gpu("the projector", vision.push_projector(projector.weights()))?;
        }
        Ok(())
    }

    /// The embedding table, lm_head (when the file has one) and final norm, each as it arrives.
    fn absorb_text_ends(&mut self, weights: &Weights, vb: &VarBuilder, arrived: &dyn Fn(&str) -> bool) -> Result<()> {
        let (cfg, format, ctx) = (&self.config.text, self.format, &self.ctx);
        let gpu = |what: &str, pushed: Result<()>| uploaded(ctx, what, pushed);
        if !self.decoder.has_embed_tokens() && arrived(TEXT_ENDS[0]) {
            let table = TokenEmbedding::load_table(cfg, format, vb.clone()).context("the embedding table")?;
            gpu("the embedding table", self.decoder.push_embed_tokens(table.matrix()))?;
        }
        if !self.decoder.has_norm() && arrived(TEXT_ENDS[1]) {
            let norm = vb.pp("lm.norm").get(cfg.hidden_size, "weight").context("the final norm")?;
            gpu("the final norm", self.decoder.push_norm(&norm))?;
        }
        if !self.decoder.has_lm_head() && weights.contains("lm_head.weight") && arrived(TEXT_ENDS[2]) {
            let head = load_lm_head(cfg, format, vb.clone()).context("lm_head")?;
            gpu("lm_head", self.decoder.push_lm_head(head.matrix()))?;
        }
        Ok(())
    }

    /// [`Self::absorb`] after a chunk of `stream` went into `weights`: the blocks the stream has
    /// moved past (nothing to do until it converts another tensor).
    pub fn absorb_stream(&mut self, stream: &crate::streaming::WeightStream, weights: &Weights) -> Result<()> {
        if stream.converted_count() == self.stream_seen {
            return Ok(());
        }
        self.stream_seen = stream.converted_count();
        self.absorb(weights, &|prefix| stream.settled(prefix))
    }

    /// Upload what is left (every tensor is in `weights` now) and build the CPU shell: the
    /// model the CPU keeps, and the GPU backend. Errors when a block is missing, or (marked
    /// [`GpuUploadFailed`]) when the GPU reported an error (out of memory, a lost device) at any
    /// point of the load.
    pub async fn finish(mut self, weights: Weights) -> Result<(LlavaModel, DecoderBackend, BackendInfo)> {
        self.absorb(&weights, &|_| true)?;
        // A missing head is the file's fault, not the GPU's: said here, unmarked.
        if !self.decoder.has_lm_head() && !self.config.text.tie_word_embeddings {
            anyhow::bail!("the weights lack lm_head.weight (the model's embeddings are not tied)");
        }
        let vision_on_gpu = self.vision.is_ok();
        let shell =
            LlavaModel::shell(&self.config, self.format, weights.into_var_builder(&Device::Cpu), !vision_on_gpu)
                .context("the weights do not fit the config")?;
        let Self { ctx, decoder, vision, .. } = self;
        let (decoder, vision) = ctx
            .scoped_build("the model", || {
                let decoder = decoder.finish(shell.text.rope_inv_freq())?;
                let vision = match vision {
                    Ok(builder) => GpuVisionSlot::Gpu(Box::new(builder.finish()?)),
                    Err(why) => GpuVisionSlot::Cpu(why),
                };
                Ok((decoder, vision))
            })
            .await
            .context(GpuUploadFailed)?;
        let backend = DecoderBackend::Gpu(Box::new(decoder), vision);
        let info = BackendInfo { resident: true, ..backend.info() };
        Ok((shell, backend, info))
    }
}

/// Load a checkpoint folder GPU-resident (every block read from the mapped files, uploaded and
/// dropped in turn): the [`crate::Vlm`] with its CPU shell, the backend and its report.
#[cfg(not(target_arch = "wasm32"))]
pub fn load_dir(
    dir: &std::path::Path,
    choice: crate::quant::WeightChoice,
    ctx: Arc<GpuContext>,
    gpu_weights: GpuWeights,
) -> Result<(crate::Vlm, DecoderBackend, BackendInfo)> {
    let parts = crate::pipeline::DirParts::read(dir, choice)?;
    let processor = crate::processor::Processor::from_files(&parts.processor, &parts.config)
        .with_context(|| format!("loading {}", dir.display()))?;
    let load = ResidentLoad::new(ctx, &parts.config, parts.format, gpu_weights)?;
    let (model, backend, info) =
        pollster::block_on(load.finish(parts.weights)).with_context(|| format!("loading {}", dir.display()))?;
    let vlm = crate::Vlm::with_model(model, processor, parts.generation_config.as_deref())?;
    Ok((vlm, backend, info))
}

/// Load a checkpoint folder on the backend `backend` asks for: GPU-resident when a GPU context
/// opens (`auto` falls back to a whole CPU model, with the reason, when the GPU cannot take it:
/// [`GpuUploadFailed`]), else on the CPU — with the report of what was chosen.
#[cfg(not(target_arch = "wasm32"))]
pub fn load_dir_on(
    dir: &std::path::Path,
    choice: crate::quant::WeightChoice,
    backend: crate::backend::BackendChoice,
    gpu_weights: GpuWeights,
) -> Result<(crate::Vlm, DecoderBackend, BackendInfo)> {
    let (ctx, info) = pollster::block_on(crate::backend::choose_context(backend))?;
    let fallback = match ctx {
        None => info,
        Some(ctx) => match load_dir(dir, choice, Arc::new(ctx), gpu_weights) {
            Ok(loaded) => return Ok(loaded),
            Err(e)
                if backend == crate::backend::BackendChoice::Auto && e.downcast_ref::<GpuUploadFailed>().is_some() =>
            {
                BackendInfo::cpu(Some(format!("{e:#}")))
            }
            Err(e) => return Err(e.context("--backend webgpu")),
        },
    };
    Ok((crate::Vlm::load_dir_choice(dir, choice)?, DecoderBackend::Cpu, fallback))
}
