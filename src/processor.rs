//! The text side of the processor: chat template (Jinja) → prompt → `input_ids` with `<image>`
//! expanded, plus the image preprocessor read from the same checkpoint folder.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat_template::{template_from_config, ChatTemplate};
use crate::config::LlavaConfig;
use crate::image::{ImagePreprocessor, RgbImage};

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
    /// Every file name a processor reads (`tokenizer.json` is required, the rest optional).
    pub const NAMES: [&'static str; 7] = [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
        "special_tokens_map.json",
    ];

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

/// Token ids of a prompt and where its image tokens are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    pub input_ids: Vec<u32>,
    /// `[start, end)` of the expanded image tokens, if the prompt has an image.
    pub image_span: Option<(usize, usize)>,
}

impl EncodedPrompt {
    pub fn n_image_tokens(&self) -> usize {
        self.image_span.map_or(0, |(s, e)| e - s)
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
    /// Tokens each image expands to.
    pub image_seq_len: usize,
}

fn parse_json(name: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{name} is not valid JSON"))
}

impl Processor {
    pub fn from_files(files: &ProcessorFiles, config: &LlavaConfig) -> Result<Self> {
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
            image_seq_len: config.image_tokens_per_image(),
        };
        // Render the template once now (before any weight moves), as the page and `cmrm
        // generate` will: a template that fails for a plain question fails here.
        if processor.chat_template.is_some() {
            processor.chat_prompt("What is in the image?", true).context("checking the chat template")?;
        }
        Ok(processor)
    }

    /// Read the processor files from a checkpoint folder.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_dir(dir: &std::path::Path, config: &LlavaConfig) -> Result<Self> {
        let files = ProcessorFiles::read_dir(dir)?;
        Self::from_files(&files, config).with_context(|| format!("loading the processor from {}", dir.display()))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The file the chat template came from (`chat_template.json`, …).
    pub fn chat_template_file(&self) -> Option<&'static str> {
        self.chat_template_file
    }

    /// The full prompt for one user turn, with the image placeholder where the template puts it:
    /// `apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
    /// "text": question}]}], add_generation_prompt=True)`.
    pub fn chat_prompt(&self, question: &str, with_image: bool) -> Result<String> {
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
        let mut content = Vec::new();
        if with_image {
            content.push(Part { r#type: "image", text: None });
        }
        content.push(Part { r#type: "text", text: Some(question) });
        let messages = minijinja::Value::from_serialize([Message { role: "user", content }]);
        let variables: Vec<(String, minijinja::Value)> =
            self.special_tokens.iter().map(|(k, v)| (k.clone(), minijinja::Value::from(v.as_str()))).collect();
        let prompt = template.render(&messages, true, &variables)?;
        if with_image && !prompt.contains(&self.image_token) {
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
    /// its `<image>` placeholder to `image_seq_len` tokens. `n_images` must match the placeholders.
    ///
    /// A prompt that already starts with the BOS token gets no second one (transformers'
    /// `apply_chat_template(tokenize=True)` rule).
    pub fn encode(&self, prompt: &str, n_images: usize) -> Result<EncodedPrompt> {
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
        if n_images > 1 {
            bail!("only one image per prompt is supported");
        }
        let mut input_ids = Vec::with_capacity(raw.len() + self.image_seq_len);
        let mut image_span = None;
        for &id in raw {
            if id == self.image_token_id {
                let start = input_ids.len();
                input_ids.extend(std::iter::repeat_n(id, self.image_seq_len));
                image_span = Some((start, input_ids.len()));
            } else {
                input_ids.push(id);
            }
        }
        Ok(EncodedPrompt { input_ids, image_span })
    }

    /// `pixel_values` `[3, S, S]` (CHW f32) and the resized u8 image.
    pub fn preprocess_image(&self, img: &RgbImage) -> (RgbImage, Vec<f32>) {
        self.image.preprocess(img)
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

#[cfg(not(target_arch = "wasm32"))]
impl ProcessorFiles {
    /// The processor's files in a checkpoint folder (`tokenizer.json` required).
    pub fn read_dir(dir: &std::path::Path) -> Result<Self> {
        let files = crate::checkpoint::SmallFiles::read_dir(dir)?.processor;
        if files.tokenizer_json.is_empty() {
            bail!("cannot read {}: no such file", dir.join("tokenizer.json").display());
        }
        Ok(files)
    }
}
