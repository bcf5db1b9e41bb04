//! [`DecoderBackend`]: where a request runs — the CPU (candle), or the wgpu engine (the decoder,
//! and the vision tower with the projector when they could be uploaded). The CLI, the page and
//! CMRM's own prefills choose here; `gpu/` is the engine and knows nothing of requests.

// wgpu's handles are Send + Sync natively but not on wasm32 (one thread there).
#![cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::generate::{generate_batch_on, BatchSession, CpuSession, GenerateOptions, Generation, Sampling, TokenEvent};
use crate::gpu::context::GpuContext;
use crate::gpu::decoder::{GpuDecoder, GpuWeights};
use crate::gpu::session::GpuBatchSession;
use crate::gpu::vision::GpuVision;
use crate::image::RgbImage;
use crate::models::llava::LlavaModel;
use crate::pipeline::{EncodedImage, Prepared, Probe, PromptText, StageTime, Vlm};
use crate::steering::Intervention;
use crate::text::{DecoderOutput, ForwardOptions, TextModel};

/// Which compute backend runs the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// WebGPU / Vulkan when a hardware adapter exists and passes the self-test, else the CPU.
    #[default]
    Auto,
    /// The wgpu engine or an error.
    Webgpu,
    /// candle on the CPU.
    Cpu,
}

impl std::str::FromStr for BackendChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "webgpu" | "gpu" | "wgpu" => Ok(Self::Webgpu),
            "cpu" => Ok(Self::Cpu),
            other => bail!("backend must be auto, webgpu or cpu (got '{other}')"),
        }
    }
}

/// What was chosen, for `info()` and the CLI's `--json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BackendInfo {
    /// `"webgpu"` or `"cpu"`.
    pub backend: String,
    /// Adapter name (e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`), when a GPU adapter is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// wgpu backend under WebGPU's API (`vulkan`, `browser_webgpu`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// Why `auto` fell back to the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    /// How the decoder's matrices are stored on the GPU (`GpuDecoder::weights_name`: `f32`, `f16`,
    /// `q8_0`, `q4_0+q4k`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_weights: Option<String>,
    /// Where the vision tower and projector run (`"webgpu"` or `"cpu"`); with the decoder on the
    /// GPU, `"cpu"` comes with `vision_reason`.
    pub vision: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vision_reason: Option<String>,
    /// The blocks live on the GPU only (a GPU-resident load, `crate::resident`): the CPU holds
    /// the embedding table, lm_head, vision embeddings and projector, not the model; the CPU
    /// backend then needs the model loaded again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resident: bool,
}

impl BackendInfo {
    /// The CPU, with why when `auto` fell back to it.
    pub fn cpu(reason: Option<String>) -> Self {
        Self {
            backend: "cpu".into(),
            adapter: None,
            api: None,
            fallback_reason: reason,
            gpu_weights: None,
            vision: "cpu".into(),
            vision_reason: None,
            resident: false,
        }
    }

    /// A GPU context's adapter (the decoder's storage and the vision tower's place still to fill).
    pub fn gpu(ctx: &GpuContext) -> Self {
        Self {
            backend: "webgpu".into(),
            adapter: Some(crate::gpu::context::adapter_label(&ctx.adapter_info)),
            api: Some(format!("{:?}", ctx.adapter_info.backend).to_lowercase()),
            fallback_reason: None,
            gpu_weights: None,
            vision: "cpu".into(),
            vision_reason: None,
            resident: false,
        }
    }
}

/// Whether `choice` would run on a GPU here (an adapter exists; for `auto`, a hardware one),
/// without opening a device: what a plan made before the load assumes.
pub async fn uses_gpu(choice: BackendChoice) -> bool {
    match choice {
        BackendChoice::Cpu => false,
        BackendChoice::Webgpu => crate::gpu::context::probe_adapter().await.is_some(),
        BackendChoice::Auto => {
            crate::gpu::context::probe_adapter().await.is_some_and(|info| auto_declines(&info).is_none())
        }
    }
}

/// Why `auto` leaves `adapter` for the CPU path, if it does: lavapipe / SwiftShader run the
/// shaders on the CPU, slower than candle's CPU path (decided from the adapter alone, before
/// opening a device and compiling kernels).
fn auto_declines(adapter: &wgpu::AdapterInfo) -> Option<String> {
    (adapter.device_type == wgpu::DeviceType::Cpu).then(|| {
        format!(
            "the adapter '{}' is a software rasterizer; the CPU path is faster (choose the webgpu backend to force it)",
            crate::gpu::context::adapter_label(adapter)
        )
    })
}

/// `auto` / `webgpu` / `cpu` → a GPU context or `None` (CPU), with what was chosen and why.
pub async fn choose_context(choice: BackendChoice) -> Result<(Option<GpuContext>, BackendInfo)> {
    match choice {
        BackendChoice::Cpu => Ok((None, BackendInfo::cpu(None))),
        BackendChoice::Webgpu => {
            let ctx = GpuContext::new().await.context("--backend webgpu: no usable WebGPU/Vulkan adapter")?;
            let info = BackendInfo::gpu(&ctx);
            Ok((Some(ctx), info))
        }
        BackendChoice::Auto => {
            let adapter = match crate::gpu::context::request_adapter().await {
                Ok(adapter) => adapter,
                Err(e) => return Ok((None, BackendInfo::cpu(Some(format!("no WebGPU/Vulkan adapter: {e}"))))),
            };
            if let Some(reason) = auto_declines(&adapter.get_info()) {
                return Ok((None, BackendInfo::cpu(Some(reason))));
            }
            match GpuContext::from_adapter(adapter).await {
                Ok(ctx) => {
                    let info = BackendInfo::gpu(&ctx);
                    Ok((Some(ctx), info))
                }
                Err(e) => Ok((None, BackendInfo::cpu(Some(format!("{e:#}"))))),
            }
        }
    }
}

/// Where a generation runs: the CPU (candle), or the GPU — the decoder, and the vision tower
/// with the projector when they could be uploaded (else they stay on the CPU, and
/// `vision_reason` says why).
pub enum DecoderBackend {
    Cpu,
    Gpu(Box<GpuDecoder>, GpuVisionSlot),
}

/// The GPU vision tower of a [`DecoderBackend::Gpu`], or why the image is encoded on the CPU.
pub enum GpuVisionSlot {
    Gpu(Box<GpuVision>),
    Cpu(String),
}

impl DecoderBackend {
    /// Upload `model`'s decoder to a GPU context (in f32; the image stays on the CPU).
    pub async fn gpu(ctx: Arc<GpuContext>, model: &TextModel) -> Result<Self> {
        let decoder = GpuDecoder::new(ctx, model).await?;
        Ok(Self::Gpu(Box::new(decoder), GpuVisionSlot::Cpu("only the decoder was uploaded".into())))
    }

    /// Upload `model` — decoder, vision tower and projector — to a GPU context, the matrices
    /// stored as `weights`. A vision tower the GPU cannot take stays on the CPU (with the reason).
    pub async fn gpu_model(ctx: Arc<GpuContext>, model: &LlavaModel, weights: GpuWeights) -> Result<Self> {
        let decoder = GpuDecoder::new_with(ctx.clone(), &model.text, weights).await?;
        let vision = match GpuVision::new(ctx, model, weights).await {
            Ok(v) => GpuVisionSlot::Gpu(Box::new(v)),
            Err(e) => GpuVisionSlot::Cpu(format!("{e:#}")),
        };
        Ok(Self::Gpu(Box::new(decoder), vision))
    }

    /// `auto` / `webgpu` / `cpu`: pick the backend for `model` and say which. `auto` falls back
    /// to the CPU (with the reason in the info) when no adapter passes the self-test or the
    /// weights do not fit.
    pub async fn select(choice: BackendChoice, model: &LlavaModel) -> Result<(Self, BackendInfo)> {
        Self::select_with(choice, model, GpuWeights::F32).await
    }

    /// [`Self::select`] with the GPU matrices stored as `weights`.
    pub async fn select_with(
        choice: BackendChoice,
        model: &LlavaModel,
        weights: GpuWeights,
    ) -> Result<(Self, BackendInfo)> {
        let (ctx, info) = choose_context(choice).await?;
        let Some(ctx) = ctx else { return Ok((Self::Cpu, info)) };
        match Self::gpu_model(Arc::new(ctx), model, weights).await {
            Ok(backend) => {
                let info = backend.info();
                Ok((backend, info))
            }
            Err(e) if choice == BackendChoice::Auto => Ok((Self::Cpu, BackendInfo::cpu(Some(format!("{e:#}"))))),
            Err(e) => Err(e.context("--backend webgpu")),
        }
    }

    /// Blocking [`Self::select_with`] (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn select_blocking(
        choice: BackendChoice,
        model: &LlavaModel,
        weights: GpuWeights,
    ) -> Result<(Self, BackendInfo)> {
        pollster::block_on(Self::select_with(choice, model, weights))
    }

    pub fn info(&self) -> BackendInfo {
        match self {
            Self::Cpu => BackendInfo::cpu(None),
            Self::Gpu(d, vision) => {
                let (vision, vision_reason) = match vision {
                    GpuVisionSlot::Gpu(_) => ("webgpu".to_owned(), None),
                    GpuVisionSlot::Cpu(why) => ("cpu".to_owned(), Some(why.clone())),
                };
                BackendInfo {
                    gpu_weights: Some(d.weights_name()),
                    vision,
                    vision_reason,
                    ..BackendInfo::gpu(d.context())
                }
            }
        }
    }

    /// The GPU context the decoder runs on (`None` on the CPU).
    pub fn gpu_context(&self) -> Option<&Arc<GpuContext>> {
        match self {
            Self::Cpu => None,
            Self::Gpu(decoder, _) => Some(decoder.context()),
        }
    }

    /// The GPU vision tower, when the image is encoded there.
    pub fn gpu_vision(&self) -> Option<&GpuVision> {
        match self {
            Self::Gpu(_, GpuVisionSlot::Gpu(v)) => Some(v),
            _ => None,
        }
    }

    /// A full prompt tokenized, embedded and each image's features merged in (as
    /// [`Vlm::prepare_prompt`]). On the GPU the tokens are embedded there, from the GPU's copy
    /// of the table (a GPU-resident model keeps none on the CPU).
    pub async fn prepare_prompt_async(&self, vlm: &Vlm, prompt: &str, image_features: &[&Tensor]) -> Result<Prepared> {
        match self {
            Self::Cpu => vlm.prepare_prompt(prompt, image_features),
            Self::Gpu(decoder, _) => {
                let encoded = vlm.encode_prompt(prompt, image_features)?;
                let (t, h) = (encoded.input_ids.len(), vlm.config().text.hidden_size);
                let rows = decoder.embed_tokens(&encoded.input_ids).await.context("embedding the prompt on the GPU")?;
                let token_embeds = Tensor::from_vec(rows, (1, t, h), &candle_core::Device::Cpu)?;
                vlm.merge_prompt(prompt, encoded, &token_embeds, image_features)
            }
        }
    }

    /// Chat prompt (or raw prompt) + the features of its images, in order (as
    /// [`Vlm::prepare_images`]), on this backend.
    pub async fn prepare_async(&self, vlm: &Vlm, text: &PromptText, image_features: &[&Tensor]) -> Result<Prepared> {
        let prompt = vlm.prompt_text(text, image_features.len())?;
        self.prepare_prompt_async(vlm, &prompt, image_features).await
    }

    /// CMRM's text-only counterpart of a prompt (as [`Vlm::prepare_text_only`]), on this
    /// backend.
    pub async fn prepare_text_only_async(&self, vlm: &Vlm, prompt: &str) -> Result<Prepared> {
        self.prepare_prompt_async(vlm, &vlm.text_only_prompt(prompt), &[]).await
    }

    /// Blocking [`Self::prepare_async`] (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn prepare(&self, vlm: &Vlm, text: &PromptText, image_features: &[&Tensor]) -> Result<Prepared> {
        pollster::block_on(self.prepare_async(vlm, text, image_features))
    }

    /// Blocking [`Self::prepare_text_only_async`] (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn prepare_text_only(&self, vlm: &Vlm, prompt: &str) -> Result<Prepared> {
        pollster::block_on(self.prepare_text_only_async(vlm, prompt))
    }

    /// Image → its features (as [`Vlm::encode_image`]) and the time of each stage, on the GPU
    /// when the vision tower is there.
    pub async fn encode_image_async(&self, vlm: &Vlm, img: &RgbImage) -> Result<EncodedImage> {
        self.encode_image_among_async(vlm, img, 1).await
    }

    /// Several images for one prompt (as [`Vlm::encode_images`]), on this backend.
    pub async fn encode_images_async(&self, vlm: &Vlm, images: &[RgbImage]) -> Result<Vec<EncodedImage>> {
        let mut encoded = Vec::with_capacity(images.len());
        for img in images {
            encoded.push(self.encode_image_among_async(vlm, img, images.len()).await?);
        }
        Ok(encoded)
    }

    /// One image of `among` in a prompt (OneVision tiles only an image alone).
    async fn encode_image_among_async(&self, vlm: &Vlm, img: &RgbImage, among: usize) -> Result<EncodedImage> {
        match self.gpu_vision() {
            Some(vision) => {
                let t0 = crate::generate::now_seconds();
                let (tiles, pixel_values) = vlm.pixel_values(img, among)?;
                let preprocess = crate::generate::now_seconds() - t0;
                // The GPU tower takes one tile at a time; an anyres image's tiles are then packed.
                let mut per_tile = Vec::with_capacity(tiles.tiles.len());
                let (mut vision_s, mut projector_s) = (preprocess, 0.0);
                for i in 0..tiles.tiles.len() {
                    let encoded = vision
                        .encode_timed(&vlm.model, &pixel_values.narrow(0, i, 1)?)
                        .await
                        .context("encoding the image on the GPU failed")?;
                    vision_s += encoded.vision.seconds;
                    projector_s += encoded.projector.seconds;
                    per_tile.push(encoded.features);
                }
                let t1 = crate::generate::now_seconds();
                let features =
                    vlm.model.pack_image_features(&candle_core::Tensor::stack(&per_tile, 0)?, tiles.grid.as_ref())?;
                projector_s += crate::generate::now_seconds() - t1;
                Ok(EncodedImage {
                    features,
                    vision: StageTime::webgpu(vision_s),
                    projector: StageTime::webgpu(projector_s),
                })
            }
            None => vlm.encode_image_timed(img, among),
        }
    }

    /// Blocking [`Self::encode_image_async`] (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn encode_image(&self, vlm: &Vlm, img: &RgbImage) -> Result<EncodedImage> {
        pollster::block_on(self.encode_image_async(vlm, img))
    }

    /// Blocking [`Self::encode_images_async`] (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn encode_images(&self, vlm: &Vlm, images: &[RgbImage]) -> Result<Vec<EncodedImage>> {
        pollster::block_on(self.encode_images_async(vlm, images))
    }

    /// [`Vlm::capture_prefill`] on this backend.
    async fn capture_prefill(
        &self,
        vlm: &Vlm,
        prepared: &Prepared,
        steering: Option<&Intervention>,
        logits: bool,
    ) -> Result<DecoderOutput> {
        match self {
            Self::Cpu => vlm.capture_prefill(prepared, steering, logits),
            Self::Gpu(decoder, _) => {
                let n = prepared.encoded.input_ids.len();
                let mut cache = decoder.new_cache(n)?;
                let opts = ForwardOptions { steering, prompt_len: n, capture_layers: true, logits };
                decoder.forward_like_cpu(&prepared.embeds, &mut cache, opts).await
            }
        }
    }

    /// [`Vlm::probe`] on this backend: hidden states, block outputs and logits at the last
    /// prompt position of `prepared` with `steering` (one prefill).
    pub async fn probe_async(&self, vlm: &Vlm, prepared: &Prepared, steering: Option<&Intervention>) -> Result<Probe> {
        Probe::from_output(prepared, self.capture_prefill(vlm, prepared, steering, true).await?)
    }

    /// Block outputs at the last prompt position, `[L][H]` (as [`Self::probe_async`]'s, without
    /// the logits: CMRM's shifts need only these).
    pub async fn layer_outputs_async(
        &self,
        vlm: &Vlm,
        prepared: &Prepared,
        steering: Option<&Intervention>,
    ) -> Result<Vec<Vec<f32>>> {
        let out = self.capture_prefill(vlm, prepared, steering, false).await?;
        let layers = out.layer_outputs.context("the prefill returned no layer outputs")?;
        Ok(layers.iter().map(|t| t.to_vec1()).collect::<candle_core::Result<_>>()?)
    }

    /// Sequences that differ only in their steering (`steering[r]` for sequence `r`), with KV
    /// caches for `capacity` positions, decoded side by side as one batch (each weight read once
    /// a step for all of them), on the CPU or the GPU (steering uploaded once; `greedy`: only
    /// the argmax comes back).
    pub fn batch_session<'a>(
        &'a self,
        vlm: &'a Vlm,
        steering: &[Option<&'a Intervention>],
        prompt_len: usize,
        capacity: usize,
        greedy: bool,
    ) -> Result<Box<dyn BatchSession + 'a>> {
        Ok(match self {
            Self::Cpu => Box::new(CpuSession::batch(&vlm.model, steering.to_vec(), prompt_len, capacity)),
            Self::Gpu(decoder, _) => Box::new(GpuBatchSession::new(decoder, prompt_len, capacity, steering, greedy)?),
        })
    }

    /// [`Vlm::generate`] on this backend, blocking (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn generate(
        &self,
        vlm: &Vlm,
        prepared: &Prepared,
        steering: Option<&Intervention>,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Generation> {
        pollster::block_on(self.generate_async(vlm, prepared, steering, opts, on_token))
    }

    /// [`Vlm::generate`] on this backend, awaiting the GPU (the browser's path; also native).
    pub async fn generate_async(
        &self,
        vlm: &Vlm,
        prepared: &Prepared,
        steering: Option<&Intervention>,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Generation> {
        let mut answers = self.generate_batch_async(vlm, prepared, &[steering], opts, &mut |_, e| on_token(e)).await?;
        Ok(answers.remove(0))
    }

    /// One answer per entry of `steering` to the same prompt, decoded side by side
    /// ([`Self::batch_session`]); `on_token(answer, event)` for every token, `false` stops all.
    pub async fn generate_batch_async(
        &self,
        vlm: &Vlm,
        prepared: &Prepared,
        steering: &[Option<&Intervention>],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(usize, &TokenEvent) -> bool,
    ) -> Result<Vec<Generation>> {
        let ids = &prepared.encoded.input_ids;
        let prompt_len = ids.len();
        let max_new =
            crate::generate::max_new_tokens(vlm.config().text.max_position_embeddings, prompt_len, opts.max_new_tokens);
        let greedy = opts.sampling == Sampling::Greedy;
        let mut session = self.batch_session(vlm, steering, prompt_len, prompt_len + max_new, greedy)?;
        let tokenizer = &vlm.processor.tokenizer;
        generate_batch_on(&mut session, steering.len(), tokenizer, ids, &prepared.embeds, max_new, opts, on_token).await
    }
}
