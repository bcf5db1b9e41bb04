//! [`Vlm`]: a loaded checkpoint (model + processor + stop ids) and the request-level operations
//! the CLI and the browser share: encode an image, build a prompt, generate, probe.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::config::LlavaConfig;
use crate::generate::{generate_batch, GenerateOptions, Generation, Sampling, TokenEvent};
use crate::image::RgbImage;
use crate::models::llava::LlavaModel;
pub use crate::processor::PromptText;
use crate::processor::{EncodedPrompt, ImageTiles, Processor, ProcessorFiles};
use crate::steering::Intervention;
use crate::text::ForwardOptions;
use crate::weights::Weights;

/// Where one stage of an answer ran (`"cpu"` or `"webgpu"`) and its seconds (`cmrm generate
/// --json`'s `stages`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageTime {
    pub on: &'static str,
    pub seconds: f64,
}

impl StageTime {
    pub fn cpu(seconds: f64) -> Self {
        Self { on: "cpu", seconds }
    }
    pub fn webgpu(seconds: f64) -> Self {
        Self { on: "webgpu", seconds }
    }
}

/// An image's features (`[n_img, H]`) and the time each stage took to make them.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    pub features: Tensor,
    pub vision: StageTime,
    pub projector: StageTime,
}

/// A prompt ready for the decoder.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The full prompt text (after the chat template).
    pub prompt: String,
    pub encoded: EncodedPrompt,
    /// `[1, T, H]`, image features merged in.
    pub embeds: Tensor,
}

/// Hidden states at the last prompt position (the `probe --json` fields).
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub input_ids: Vec<u32>,
    pub n_image_tokens: usize,
    /// `[L+1][H]`: embeddings, block outputs 0..L-2, final norm of block L-1's output.
    pub hidden_states: Vec<Vec<f32>>,
    /// `[L][H]`: raw output of each block (after steering).
    pub layer_outputs: Vec<Vec<f32>>,
    pub logits: Vec<f32>,
}

impl Probe {
    /// From a prefill's output with `capture_layers` and `logits` (CPU or GPU decoder).
    pub fn from_output(prepared: &Prepared, out: crate::text::DecoderOutput) -> Result<Self> {
        let t = prepared.encoded.input_ids.len();
        let layer_outputs: Vec<Vec<f32>> = out
            .layer_outputs
            .context("no layer outputs")?
            .iter()
            .map(|x| x.to_vec1())
            .collect::<candle_core::Result<_>>()?;
        let mut hidden_states = Vec::with_capacity(layer_outputs.len() + 1);
        hidden_states.push(prepared.embeds.get(0)?.get(t - 1)?.to_vec1()?);
        hidden_states.extend(layer_outputs[..layer_outputs.len() - 1].iter().cloned());
        hidden_states.push(out.final_norm.context("no final norm")?.to_vec1()?);
        Ok(Probe {
            input_ids: prepared.encoded.input_ids.clone(),
            n_image_tokens: prepared.encoded.n_image_tokens(),
            hidden_states,
            layer_outputs,
            logits: out.logits.context("no logits")?.to_vec1()?,
        })
    }
}

/// A checkpoint folder's parts, read and checked, the weights indexed (mapped, not read).
#[cfg(not(target_arch = "wasm32"))]
pub struct DirParts {
    pub config: LlavaConfig,
    /// The format the linears will be held in (`choice`, or a quantized GGUF's own).
    pub format: crate::quant::WeightFormat,
    pub processor: ProcessorFiles,
    pub generation_config: Option<String>,
    pub weights: Weights,
}

#[cfg(not(target_arch = "wasm32"))]
impl DirParts {
    pub fn read(dir: &std::path::Path, choice: crate::quant::WeightChoice) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: not a folder (expected a Hugging Face checkpoint folder with config.json)", dir.display());
        }
        let weights = crate::checkpoint::load_weights(dir)?;
        let format = match choice {
            crate::quant::WeightChoice::Fixed(f) => f,
            crate::quant::WeightChoice::Auto => weights.stored_format().unwrap_or_default(),
        };
        let config = LlavaConfig::from_file(&dir.join("config.json"))?;
        let processor = ProcessorFiles::read_dir(dir)?;
        let generation_config = std::fs::read_to_string(dir.join("generation_config.json")).ok();
        Ok(Self { config, format, processor, generation_config, weights })
    }
}

pub struct Vlm {
    pub model: LlavaModel,
    pub processor: Processor,
    pub eos_ids: Vec<u32>,
}

impl Vlm {
    /// Build from parsed parts (the browser path; `load_dir` reads the same parts from disk),
    /// the linears held in `format`.
    pub fn from_parts(
        config: LlavaConfig,
        format: crate::quant::WeightFormat,
        processor_files: &ProcessorFiles,
        generation_config: Option<&str>,
        weights: Weights,
    ) -> Result<Self> {
        // The tokenizer is checked against the config before the weights are read.
        let processor = Processor::from_files(processor_files, &config)?;
        let model = LlavaModel::new(&config, format, weights.into_var_builder(&Device::Cpu))
            .context("the weights do not fit the config")?;
        Self::with_model(model, processor, generation_config)
    }

    /// A built model (whole, or the CPU shell of a GPU-resident load) with its processor.
    pub fn with_model(model: LlavaModel, processor: Processor, generation_config: Option<&str>) -> Result<Self> {
        let eos_ids = crate::config::eos_ids(&model.config, generation_config)?;
        Ok(Self { model, processor, eos_ids })
    }

    /// Load a checkpoint folder: `config.json`, weights, tokenizer and processor files.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load_dir(dir: &std::path::Path) -> Result<Self> {
        Self::load_dir_as(dir, crate::quant::WeightFormat::F32)
    }

    /// [`Vlm::load_dir`] with the linears held in `format` (quantized on load).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load_dir_as(dir: &std::path::Path, format: crate::quant::WeightFormat) -> Result<Self> {
        Self::load_dir_choice(dir, crate::quant::WeightChoice::Fixed(format))
    }

    /// [`Vlm::load_dir`] in a fixed format, or `Auto`: the format of a quantized GGUF
    /// (`cmrm quantize`), else F32.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load_dir_choice(dir: &std::path::Path, choice: crate::quant::WeightChoice) -> Result<Self> {
        let parts = DirParts::read(dir, choice)?;
        Self::from_parts(
            parts.config,
            parts.format,
            &parts.processor,
            parts.generation_config.as_deref(),
            parts.weights,
        )
        .with_context(|| format!("loading {}", dir.display()))
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.model.config
    }

    /// How the model's linears are held in memory.
    pub fn weight_format(&self) -> crate::quant::WeightFormat {
        self.model.weight_format
    }

    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// An image's tiles and their `pixel_values` `[n_tiles, 3, S, S]` (one tile for LLaVA), the
    /// image being one of `among` in its prompt (OneVision tiles only an image alone).
    pub fn pixel_values(&self, img: &RgbImage, among: usize) -> Result<(ImageTiles, Tensor)> {
        let (tiles, pixels) = self.processor.preprocess_image(img, among);
        let s = self.config().vision.image_size;
        let pixel_values = Tensor::from_vec(pixels, (tiles.tiles.len(), 3, s, s), self.device())?;
        Ok((tiles, pixel_values))
    }

    /// Image → `image_features` `[N, H]` (run once, reuse for every answer).
    pub fn encode_image(&self, img: &RgbImage) -> Result<Tensor> {
        Ok(self.encode_image_timed(img, 1)?.features)
    }

    /// The features of several images for one prompt, in order.
    pub fn encode_images(&self, images: &[RgbImage]) -> Result<Vec<Tensor>> {
        images.iter().map(|img| Ok(self.encode_image_timed(img, images.len())?.features)).collect()
    }

    /// An image's features (one of `among` in its prompt) with the time of each stage: `vision`
    /// (preprocessing + tower + feature selection) and `projector` (with an anyres image's
    /// packing), both on the CPU.
    pub fn encode_image_timed(&self, img: &RgbImage, among: usize) -> Result<EncodedImage> {
        let t0 = crate::generate::now_seconds();
        let (tiles, pixel_values) = self.pixel_values(img, among)?;
        let selected = self.model.select_vision_features(&pixel_values)?;
        let t1 = crate::generate::now_seconds();
        let tile_features = candle_core::Module::forward(self.model.projector()?, &selected)?;
        let features = self.model.pack_image_features(&tile_features, tiles.grid.as_ref())?;
        let t2 = crate::generate::now_seconds();
        Ok(EncodedImage { features, vision: StageTime::cpu(t1 - t0), projector: StageTime::cpu(t2 - t1) })
    }

    /// Full prompt text for a request with `n_images` images.
    pub fn prompt_text(&self, text: &PromptText, n_images: usize) -> Result<String> {
        match text {
            PromptText::Chat(q) => self.processor.chat_prompt(q, n_images),
            PromptText::Raw(p) => Ok(p.clone()),
        }
    }

    /// Tokenize a full prompt and merge each image's features (in placeholder order) into its
    /// embeddings.
    pub fn prepare_prompt(&self, prompt: &str, image_features: &[&Tensor]) -> Result<Prepared> {
        let encoded = self.encode_prompt(prompt, image_features)?;
        let token_embeds = self.model.text.embed(&encoded.input_ids)?;
        self.merge_prompt(prompt, encoded, &token_embeds, image_features)
    }

    /// A full prompt's tokens with room for `image_features` (one placeholder run each),
    /// checked against the model's context.
    pub fn encode_prompt(&self, prompt: &str, image_features: &[&Tensor]) -> Result<EncodedPrompt> {
        let image_tokens: Vec<usize> = image_features.iter().map(|f| f.dim(0)).collect::<candle_core::Result<_>>()?;
        let encoded = self.processor.encode(prompt, &image_tokens)?;
        if encoded.input_ids.is_empty() {
            bail!("the prompt is empty: it tokenizes to no tokens");
        }
        let context = self.config().text.max_position_embeddings;
        if encoded.input_ids.len() >= context {
            bail!(
                "the prompt is {} tokens ({} of them image tokens), over the model's context of {context} tokens; shorten it",
                encoded.input_ids.len(),
                encoded.n_image_tokens()
            );
        }
        Ok(encoded)
    }

    /// [`Prepared`] from the prompt's token embeddings `token_embeds` `[1, T, H]` (the CPU's, or
    /// the GPU's: [`crate::backend::DecoderBackend::prepare_prompt_async`]) with each image's
    /// features merged over its placeholders.
    pub fn merge_prompt(
        &self,
        prompt: &str,
        encoded: EncodedPrompt,
        token_embeds: &Tensor,
        image_features: &[&Tensor],
    ) -> Result<Prepared> {
        let images: Vec<(&Tensor, (usize, usize))> =
            image_features.iter().copied().zip(encoded.image_spans.iter().copied()).collect();
        let embeds = self.model.merge_images(token_embeds, &images)?;
        Ok(Prepared { prompt: prompt.to_owned(), encoded, embeds })
    }

    /// Chat prompt (or raw prompt) + optional image features → [`Prepared`].
    pub fn prepare(&self, text: &PromptText, image_features: Option<&Tensor>) -> Result<Prepared> {
        self.prepare_images(text, image_features.as_slice())
    }

    /// [`Self::prepare`] with any number of images (their features in prompt order).
    pub fn prepare_images(&self, text: &PromptText, image_features: &[&Tensor]) -> Result<Prepared> {
        let prompt = self.prompt_text(text, image_features.len())?;
        self.prepare_prompt(&prompt, image_features)
    }

    /// CMRM's text-only counterpart of a prompt: the placeholder removed, nothing else changed.
    pub fn prepare_text_only(&self, prompt: &str) -> Result<Prepared> {
        self.prepare_prompt(&self.text_only_prompt(prompt), &[])
    }

    /// A full prompt with its image placeholders removed (CMRM's text-only counterpart).
    pub fn text_only_prompt(&self, prompt: &str) -> String {
        self.processor.text_only(prompt)
    }

    pub fn default_generate_options(&self, max_new_tokens: usize, sampling: Sampling) -> GenerateOptions {
        GenerateOptions { max_new_tokens, sampling, eos_ids: self.eos_ids.clone() }
    }

    pub fn generate(
        &self,
        prepared: &Prepared,
        steering: Option<&Intervention>,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Generation> {
        let mut answers = self.generate_batch(prepared, &[steering], opts, &mut |_, event| on_token(event))?;
        Ok(answers.remove(0))
    }

    /// One answer per entry of `steering` to the same prompt, decoded as one batch (each weight
    /// read once a step for all of them): Compare's two panes, or an α sweep.
    pub fn generate_batch(
        &self,
        prepared: &Prepared,
        steering: &[Option<&Intervention>],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(usize, &TokenEvent) -> bool,
    ) -> Result<Vec<Generation>> {
        let (tokenizer, ids) = (&self.processor.tokenizer, &prepared.encoded.input_ids);
        generate_batch(&self.model, tokenizer, ids, &prepared.embeds, steering, opts, on_token)
    }

    /// One forward pass over the prompt; hidden states, block outputs and logits at its last token.
    pub fn probe(&self, prepared: &Prepared, steering: Option<&Intervention>) -> Result<Probe> {
        Probe::from_output(prepared, self.capture_prefill(prepared, steering, true)?)
    }

    /// One prefill of `prepared` (with `steering`) with every block's output captured at the
    /// last position, and the logits when `logits`.
    pub fn capture_prefill(
        &self,
        prepared: &Prepared,
        steering: Option<&Intervention>,
        logits: bool,
    ) -> Result<crate::text::DecoderOutput> {
        let t = prepared.encoded.input_ids.len();
        let mut cache = self.model.text.new_cache(t);
        let opts = ForwardOptions { steering, prompt_len: t, capture_layers: true, logits };
        Ok(self.model.forward(&prepared.embeds, &mut cache, opts)?)
    }
}
