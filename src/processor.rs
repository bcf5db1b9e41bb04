//! The text side of the processor: chat template (Jinja) → prompt → `input_ids` with `<image>`
//! expanded, plus the image preprocessor read from the same checkpoint folder.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat_template::{template_from_config, ChatTemplate};
use crate::config::LlavaConfig;
use crate::image::{resize_bicubic, ImagePreprocessor, RgbImage};
use crate::models::anyres::{grid_tiles, pad_to_square, Anyres, TileGrid};

/// The processor's files, as bytes/strings, so native and browser loading share one path.
#[derive(Default, Clone)]
pub struct ProcessorFiles {
    pub tokenizer_json: Vec<u8>,
    pub tokenizer_config_json: Option<String>,
    pub chat_template_jinja: Option<String>,
    /// Older llava-hf repos ship `chat_template.json` = `{"chat_template": "..."}`.
    pub chat_template_json: Option<String>,
    pub preprocessor_config_json: Option<String>,
    pub processor_config_json: Option<String>,
    /// Legacy special tokens (`bos_token`, …), read as transformers reads it.
    pub special_tokens_map_json: Option<String>,
}

impl ProcessorFiles {
    /// Put a checkpoint file's bytes in its slot. Returns `false` (and keeps nothing) for a name
    /// that is not a processor file; text files must be UTF-8.
    pub fn insert(&mut self, name: &str, bytes: Vec<u8>) -> Result<bool> {
        let slot = match name {
            "tokenizer.json" => {
                self.tokenizer_json = bytes;
                return Ok(true);
            }
            "tokenizer_config.json" => &mut self.tokenizer_config_json,
            "chat_template.jinja" => &mut self.chat_template_jinja,
            "chat_template.json" => &mut self.chat_template_json,
            "preprocessor_config.json" => &mut self.preprocessor_config_json,
            "processor_config.json" => &mut self.processor_config_json,
            "special_tokens_map.json" => &mut self.special_tokens_map_json,
            _ => return Ok(false),
        };
        *slot = Some(String::from_utf8(bytes).with_context(|| format!("{name} is not UTF-8 text"))?);
        Ok(true)
    }
}

/// What the user typed: a question for the chat template, or a full prompt used as is.
#[derive(Debug, Clone)]
pub enum PromptText {
    Chat(String),
    Raw(String),
}

/// An image cut into what the vision tower reads (its `pixel_values` come beside it).
#[derive(Debug, Clone)]
pub struct ImageTiles {
    /// The tiles in u8 as the tower sees them (before normalisation); an anyres image's base
    /// tile first, then its grid row-major.
    pub tiles: Vec<RgbImage>,
    /// The anyres grid the tiles come from; `None` for LLaVA's one tile.
    pub grid: Option<TileGrid>,
}

/// Token ids of a prompt and where its image tokens are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    pub input_ids: Vec<u32>,
    /// `[start, end)` of each image's expanded tokens, in prompt order.
    pub image_spans: Vec<(usize, usize)>,
}

impl EncodedPrompt {
    pub fn n_image_tokens(&self) -> usize {
        self.image_spans.iter().map(|(s, e)| e - s).sum()
    }

    /// The first image's span (the only one in a one-image prompt).
    pub fn image_span(&self) -> Option<(usize, usize)> {
        self.image_spans.first().copied()
    }
}

pub struct Processor {
    pub tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    /// The file the chat template came from.
    chat_template_file: Option<&'static str>,
    /// The tokenizer's named special tokens (`bos_token`, `eos_token`, …), passed to the
    /// template as transformers passes `special_tokens_map`.
    special_tokens: Vec<(String, String)>,
    pub image: ImagePreprocessor,
    /// The placeholder string (`<image>`).
    pub image_token: String,
    pub image_token_id: u32,
    /// LLaVA-NeXT / OneVision's tiling (from config.json); `None` for LLaVA.
    anyres: Option<Anyres>,
    /// The vision tower's input side (pixels), the side of every tile.
    tile: usize,
}

fn parse_json(name: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{name} is not valid JSON"))
}

impl Processor {
    pub fn from_files(files: &ProcessorFiles, config: &LlavaConfig) -> Result<Self> {
        if files.tokenizer_json.is_empty() {
            bail!("the model has no tokenizer.json (every checkpoint needs one)");
        }
        let tokenizer = Tokenizer::from_bytes(&files.tokenizer_json)
            .map_err(|e| anyhow!("tokenizer.json could not be loaded: {e}"))?;
        let tokenizer_config =
            files.tokenizer_config_json.as_deref().map(|t| parse_json("tokenizer_config.json", t)).transpose()?;
        let processor_config =
            files.processor_config_json.as_deref().map(|t| parse_json("processor_config.json", t)).transpose()?;
        let preprocessor_config =
            files.preprocessor_config_json.as_deref().map(|t| parse_json("preprocessor_config.json", t)).transpose()?;

        let chat_template_json =
            files.chat_template_json.as_deref().map(|t| parse_json("chat_template.json", t)).transpose()?;
        let from = |v: &Option<Value>| v.as_ref().and_then(template_from_config);
        let chat_template = [
            ("chat_template.jinja", files.chat_template_jinja.clone()),
            ("chat_template.json", from(&chat_template_json)),
            ("processor_config.json", from(&processor_config)),
            ("tokenizer_config.json", from(&tokenizer_config)),
        ]
        .into_iter()
        .find_map(|(name, source)| source.map(|s| (name, s)));
        let chat_template_file = chat_template.as_ref().map(|(name, _)| *name);
        let chat_template = chat_template
            .map(|(name, source)| ChatTemplate::new(&source).with_context(|| format!("the chat template in {name}")))
            .transpose()?;
        let special_tokens_map =
            files.special_tokens_map_json.as_deref().map(|t| parse_json("special_tokens_map.json", t)).transpose()?;
        let special_tokens = special_tokens(tokenizer_config.as_ref(), special_tokens_map.as_ref());

        let image_cfg = preprocessor_config
            .as_ref()
            .or_else(|| processor_config.as_ref().and_then(|p| p.get("image_processor")))
            .context("no image processor settings: need preprocessor_config.json (or processor_config.json with image_processor)")?;
        let image = ImagePreprocessor::from_value(image_cfg).context("in the image processor config")?;
        if let Some((w, h)) = image.output_size() {
            let s = config.vision.image_size;
            if w != s || h != s {
                bail!("the image processor outputs {w}×{h} but the vision tower expects {s}×{s}");
            }
        } else {
            bail!("the image processor config gives no fixed output size (needs crop_size or size.height/width)");
        }
        if config.anyres.is_some() && image.base_tile_size().is_none() {
            bail!("an anyres image processor needs a size (do_resize with size)");
        }
        // transformers tiles with the processor's own pinpoints and packs with the model's: two
        // different lists would give a wrong number of tiles.
        if let (Some(anyres), Some(pins)) = (&config.anyres, image_cfg.get("image_grid_pinpoints")) {
            let theirs = Anyres::from_config(pins, None, config.vision.image_size)
                .context("in the image processor's image_grid_pinpoints")?;
            if theirs.grid_pinpoints != anyres.grid_pinpoints {
                bail!("the image processor's image_grid_pinpoints differ from config.json's");
            }
        }

        let image_token = processor_config
            .as_ref()
            .and_then(|p| p.get("image_token"))
            .and_then(Value::as_str)
            .unwrap_or("<image>")
            .to_owned();
        let image_token_id = tokenizer
            .token_to_id(&image_token)
            .with_context(|| format!("the tokenizer has no '{image_token}' token"))?;
        if image_token_id != config.image_token_id {
            bail!(
                "the tokenizer maps '{image_token}' to id {image_token_id} but config.json's image_token_index is {}",
                config.image_token_id
            );
        }
        let tokenizer_vocab = tokenizer.get_vocab_size(true);
        if tokenizer_vocab > config.text.vocab_size {
            bail!(
                "the tokenizer has {tokenizer_vocab} tokens, more than the model's vocab_size {}",
                config.text.vocab_size
            );
        }
        let processor = Self {
            tokenizer,
            chat_template,
            chat_template_file,
            special_tokens,
            image,
            image_token,
            image_token_id,
            anyres: config.anyres.clone(),
            tile: config.vision.image_size,
        };
        // Render the template once now (before any weight moves), as the page and `cmrm
        // generate` will: a template that fails for a plain question fails here.
        if processor.chat_template.is_some() {
            processor.chat_prompt("What is in the image?", 1).context("checking the chat template")?;
        }
        Ok(processor)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The file the chat template came from (`chat_template.json`, …).
    pub fn chat_template_file(&self) -> Option<&'static str> {
        self.chat_template_file
    }

    /// The full prompt for one user turn, with `n_images` image placeholders where the template
    /// puts them: `apply_chat_template([{"role": "user", "content": [{"type": "image"}, …,
    /// {"type": "text", "text": question}]}], add_generation_prompt=True)`.
    pub fn chat_prompt(&self, question: &str, n_images: usize) -> Result<String> {
        let template = self
            .chat_template
            .as_ref()
            .context("the model has no chat template (chat_template.jinja, chat_template.json, tokenizer_config.json); pass the full prompt with --raw-prompt")?;
        #[derive(serde::Serialize)]
        struct Part<'a> {
            r#type: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            text: Option<&'a str>,
        }
        #[derive(serde::Serialize)]
        struct Message<'a> {
            role: &'a str,
            content: Vec<Part<'a>>,
        }
        let mut content: Vec<Part> = (0..n_images).map(|_| Part { r#type: "image", text: None }).collect();
        content.push(Part { r#type: "text", text: Some(question) });
        let messages = minijinja::Value::from_serialize([Message { role: "user", content }]);
        let variables: Vec<(String, minijinja::Value)> =
            self.special_tokens.iter().map(|(k, v)| (k.clone(), minijinja::Value::from(v.as_str()))).collect();
        let prompt = template.render(&messages, true, &variables)?;
        if n_images > 0 && !prompt.contains(&self.image_token) {
            bail!("the chat template did not place the image token '{}' in the prompt", self.image_token);
        }
        Ok(prompt)
    }

    /// The tokenizer's BOS token string, if it has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.special_tokens.iter().find(|(k, _)| k == "bos_token").map(|(_, v)| v.as_str())
    }

    /// CMRM's text-only counterpart: the same full prompt with the image placeholder removed.
    pub fn text_only(&self, prompt: &str) -> String {
        prompt.replace(&self.image_token, "")
    }

    /// Tokenize a full prompt (special tokens added by the tokenizer's post-processor) and expand
    /// its `<image>` placeholders, the i-th to `image_tokens[i]` tokens (one entry per image:
    /// [`LlavaConfig::image_tokens`], or the rows of its features).
    ///
    /// A prompt that already starts with the BOS token gets no second one (transformers'
    /// `apply_chat_template(tokenize=True)` rule).
    pub fn encode(&self, prompt: &str, image_tokens: &[usize]) -> Result<EncodedPrompt> {
        let n_images = image_tokens.len();
        let add_special_tokens = !self.bos_token().is_some_and(|bos| !bos.is_empty() && prompt.starts_with(bos));
        let encoding = self
            .tokenizer
            .encode(prompt, add_special_tokens)
            .map_err(|e| anyhow!("tokenizing the prompt failed: {e}"))?;
        let raw = encoding.get_ids();
        let placeholders = raw.iter().filter(|&&id| id == self.image_token_id).count();
        if placeholders != n_images {
            bail!(
                "the prompt has {placeholders} '{}' placeholder(s) but {n_images} image(s) were given",
                self.image_token
            );
        }
        let mut input_ids = Vec::with_capacity(raw.len() + image_tokens.iter().sum::<usize>());
        let mut image_spans = Vec::with_capacity(n_images);
        let mut counts = image_tokens.iter();
        for &id in raw {
            if id == self.image_token_id {
                let start = input_ids.len();
                let n = *counts.next().expect("one count per placeholder, checked above");
                input_ids.extend(std::iter::repeat_n(id, n));
                image_spans.push((start, input_ids.len()));
            } else {
                input_ids.push(id);
            }
        }
        Ok(EncodedPrompt { input_ids, image_spans })
    }

    /// An image's tiles for the vision tower and their `pixel_values` (`[n_tiles, 3, S, S]` f32,
    /// CHW per tile), the image being one of `among` in its prompt: LLaVA's one resized (and
    /// cropped) tile, or an anyres image's base tile and grid (each then resized and cropped as
    /// transformers does, which leaves a tile as it is). OneVision tiles an image only when it is
    /// alone; among several, each is padded to a square of the mean colour and resized to one tile.
    pub fn preprocess_image(&self, img: &RgbImage, among: usize) -> (ImageTiles, Vec<f32>) {
        let one_tile = |img: &RgbImage| {
            let (resized, pixel_values) = self.image.preprocess(img);
            (ImageTiles { tiles: vec![resized], grid: None }, pixel_values)
        };
        let anyres = match &self.anyres {
            None => return one_tile(img),
            Some(anyres) if !anyres.tiles_among(among) => {
                return one_tile(&pad_to_square(&self.image.convert_rgb(img), self.image.mean_u8()));
            }
            Some(anyres) => anyres,
        };
        let img = self.image.convert_rgb(img);
        let grid = anyres.grid((img.height, img.width), self.tile);
        let (base_w, base_h) = self.image.base_tile_size().expect("checked when the processor was made");
        let mut tiles = vec![resize_bicubic(&img, base_w, base_h)];
        tiles.extend(grid_tiles(&img, &grid, self.tile));
        let tiles: Vec<RgbImage> = tiles.iter().map(|t| self.image.resize_and_crop(t)).collect();
        let pixel_values = tiles.iter().flat_map(|t| self.image.normalize(t)).collect();
        (ImageTiles { tiles, grid: Some(grid) }, pixel_values)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| anyhow!("detokenizing failed: {e}"))
    }
}

/// The named special tokens transformers passes to a chat template (`special_tokens_map`):
/// from `tokenizer_config.json`, overridden by the legacy `special_tokens_map.json` when the
/// tokenizer config has no `added_tokens_decoder` (transformers 5's loading rule).
fn special_tokens(tokenizer_config: Option<&Value>, special_tokens_map: Option<&Value>) -> Vec<(String, String)> {
    const NAMES: [&str; 7] =
        ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];
    let token = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    };
    let legacy_map =
        special_tokens_map.filter(|_| tokenizer_config.is_none_or(|tc| tc.get("added_tokens_decoder").is_none()));
    NAMES
        .iter()
        .filter_map(|&name| {
            let from_map = legacy_map.and_then(|m| m.get(name)).and_then(token);
            let from_config = tokenizer_config.and_then(|tc| tc.get(name)).and_then(token);
            from_map.or(from_config).map(|v| (name.to_owned(), v))
        })
        .collect()
}
