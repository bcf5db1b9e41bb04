//! What a checkpoint is made of, read from its small files and the headers of its weight files
//! only: which files it has, which of them hold the weights, and [`inspect`] — the facts
//! `cmrm inspect` prints and the page's plan shows before any weight moves (the config with
//! transformers' defaults filled, the rendered prompt, `input_ids`, image tokens, EOS ids, the
//! weight files, the parameter count and the memory each weight format needs).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::config::{resolve, LlavaConfig};
use crate::image::RgbImage;

use crate::processor::{Processor, ProcessorFiles, PromptText};
use crate::quant::{estimate_model_bytes, FORMATS};

pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// Files every checkpoint must have.
pub const REQUIRED_FILES: [&str; 2] = [CONFIG_FILE, "tokenizer.json"];
/// Small files a checkpoint may have, in load order (the processor's, then the generation config).
pub const OPTIONAL_FILES: [&str; 7] = [
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    GENERATION_CONFIG_FILE,
];
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
/// A `cmrm quantize` copy: the weights as one quantized GGUF.
pub const WEIGHTS_GGUF: &str = "model.gguf";

pub use crate::weights::is_weight_file;

/// The weight files of a checkpoint, given which names it has: the index's shards, else
/// `model.safetensors`, else `model.gguf`. `read_index` fetches the index's text when needed.
pub fn weight_file_names(
    has: &dyn Fn(&str) -> bool,
    read_index: &mut dyn FnMut() -> Result<String>,
) -> Result<Vec<String>> {
    if has(WEIGHTS_INDEX) {
        return shard_names_from_index(&read_index()?).context("invalid model.safetensors.index.json");
    }
    for name in [WEIGHTS_FILE, WEIGHTS_GGUF] {
        if has(name) {
            return Ok(vec![name.to_owned()]);
        }
    }
    bail!(
        "no {WEIGHTS_FILE}, {WEIGHTS_INDEX} or {WEIGHTS_GGUF} (cmrm reads safetensors checkpoints such as the \
         llava-hf/* repos, and their `cmrm quantize` copies)"
    )
}

/// The small files of a checkpoint, as text.
#[derive(Default, Clone)]
pub struct SmallFiles {
    pub config_json: Option<String>,
    pub processor: ProcessorFiles,
    pub generation_config_json: Option<String>,
}

impl SmallFiles {
    /// Keep a file's bytes if it is one of the small files; returns whether it was.
    pub fn insert(&mut self, name: &str, bytes: Vec<u8>) -> Result<bool> {
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).with_context(|| format!("{name} is not UTF-8 text"));
        match name {
            CONFIG_FILE => self.config_json = Some(text(bytes)?),
            GENERATION_CONFIG_FILE => self.generation_config_json = Some(text(bytes)?),
            _ => return self.processor.insert(name, bytes),
        }
        Ok(true)
    }

    /// The resolved model config.
    pub fn config(&self) -> Result<LlavaConfig> {
        LlavaConfig::from_json_str(self.config_json.as_deref().context("the model has no config.json")?)
            .context("config.json: unsupported or invalid model config")
    }

    /// Read every small file present in a folder.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_dir(dir: &std::path::Path) -> Result<Self> {
        let mut files = Self::default();
        for name in REQUIRED_FILES.iter().chain(&OPTIONAL_FILES) {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => {
                    files.insert(name, bytes).with_context(|| format!("cannot read {}", path.display()))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => bail!("cannot read {}: {e}", path.display()),
            }
        }
        Ok(files)
    }
}

/// One weight file, as its header describes it.
#[derive(Debug, Clone, Serialize)]
pub struct WeightFileInfo {
    pub name: String,
    /// Size of the file, when known.
    pub bytes: Option<u64>,
    /// Tensors and parameters in the header; `None` when the header could not be read.
    pub tensors: Option<usize>,
    pub params: Option<u64>,
    /// Storage types and the parameters in each (`BF16`, `Q4K`, …).
    pub dtypes: BTreeMap<String, u64>,
    /// `(canonical name, shape)` of the tensors cmrm uses.
    #[serde(skip)]
    pub shapes: Vec<(String, Vec<usize>)>,
}

impl WeightFileInfo {
    /// A file whose header was not read (not downloaded, or the server does not answer ranges).
    pub fn unread(name: &str, bytes: Option<u64>) -> Self {
        Self { name: name.to_owned(), bytes, tensors: None, params: None, dtypes: BTreeMap::new(), shapes: Vec::new() }
    }

    fn from_tensors(name: &str, bytes: Option<u64>, tensors: &[crate::weight_headers::HeaderTensor]) -> Self {
        let mut dtypes = BTreeMap::new();
        let mut params = 0u64;
        for t in tensors {
            let n: u64 = t.shape.iter().map(|&d| d as u64).product();
            params += n;
            *dtypes.entry(t.stored.name()).or_insert(0) += n;
        }
        let shapes = crate::weights::canonical_shapes(tensors);
        Self { name: name.to_owned(), bytes, tensors: Some(tensors.len()), params: Some(params), dtypes, shapes }
    }

    /// From a file's first bytes: a safetensors header (8-byte length, JSON) or a GGUF header.
    /// `Ok(None)` when `prefix` is too short; the length it needs is then returned by
    /// [`crate::weight_headers::header_len`].
    pub fn from_prefix(name: &str, bytes: Option<u64>, prefix: &[u8]) -> Result<Option<Self>> {
        if prefix.starts_with(b"GGUF") {
            return Ok(crate::weight_headers::gguf_header_tensors(name, prefix)?
                .map(|tensors| Self::from_tensors(name, bytes, &tensors)));
        }
        let Some(need) = crate::weight_headers::header_len(prefix)? else { return Ok(None) };
        if (prefix.len() as u64) < need {
            return Ok(None);
        }
        let tensors = crate::weight_headers::parse_header(name, &prefix[8..need as usize])?;
        Ok(Some(Self::from_tensors(name, bytes, &tensors)))
    }
}

/// Memory a weight format needs, and whether a browser tab can hold it.
#[derive(Debug, Clone, Serialize)]
pub struct FormatFit {
    pub bytes: u64,
    pub fits_browser: bool,
}

/// Size and resize of an image the prompt carries.
#[derive(Debug, Clone, Serialize)]
pub struct ImageFacts {
    pub width: usize,
    pub height: usize,
    /// `[width, height]` the vision tower sees.
    pub model_input: [usize; 2],
    /// Tiles the tower encodes: 1 for LLaVA, the base tile + the grid for an anyres model.
    pub tiles: usize,
    /// `[rows, cols]` of an anyres image's grid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grid: Option<[usize; 2]>,
}

/// The facts of a checkpoint from its small files (the `cmrm inspect --json` object).
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// config.json with transformers' defaults filled in.
    pub config: Value,
    /// The keys of `config` that were absent and hold transformers' default.
    pub defaulted_keys: Vec<String>,
    /// `llava: clip_vision_model + llama`.
    pub architecture: String,
    /// The file the chat template came from.
    pub chat_template: Option<String>,
    /// The question rendered by the template (chat mode).
    pub question: Option<String>,
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub n_image_tokens: usize,
    pub image_span: Option<[usize; 2]>,
    pub image: Option<ImageFacts>,
    pub eos_token_ids: Vec<u32>,
    pub weight_files: Vec<WeightFileInfo>,
    pub n_params: u64,
    /// `weight files` (their headers) or `config` (counted from the shapes the config implies).
    pub n_params_from: String,
    /// `f32`, `q8_0`, `q4`: bytes in memory, and whether a browser tab holds them.
    pub formats: BTreeMap<String, FormatFit>,
}

/// What [`inspect`] renders and tokenizes.
pub struct InspectRequest<'a> {
    /// The question for the chat template, or a raw prompt.
    pub prompt: PromptText,
    /// The prompt carries an image (its placeholder and tokens).
    pub with_image: bool,
    /// The image itself, when there is one: its size and what the processor makes of it.
    pub image: Option<&'a RgbImage>,
}

/// The facts of a checkpoint from its small files and weight headers: nothing else is read.
pub fn inspect(files: &SmallFiles, weights: &[WeightFileInfo], request: &InspectRequest) -> Result<Inspection> {
    let InspectRequest { prompt, with_image, image } = request;
    let with_image = *with_image || image.is_some();
    let raw_config: Value = serde_json::from_str(files.config_json.as_deref().context("the model has no config.json")?)
        .context("config.json is not valid JSON")?;
    let resolved = resolve(&raw_config)?;
    let config = files.config()?;
    let processor = Processor::from_files(&files.processor, &config)?;
    let prompt_text = match prompt {
        PromptText::Chat(q) => processor.chat_prompt(q, usize::from(with_image))?,
        PromptText::Raw(p) => p.clone(),
    };
    let side = config.vision.image_size;
    let image_hw = image.map_or((side, side), |img| (img.height, img.width));
    let image_tokens = if with_image { vec![config.image_tokens(image_hw)] } else { vec![] };
    let encoded = processor.encode(&prompt_text, &image_tokens)?;
    let image = image.map(|img| {
        let (tiles, _) = processor.preprocess_image(img, 1);
        ImageFacts {
            width: img.width,
            height: img.height,
            model_input: [tiles.tiles[0].width, tiles.tiles[0].height],
            tiles: tiles.tiles.len(),
            grid: tiles.grid.map(|g| [g.rows, g.cols]),
        }
    });
    let all_read = !weights.is_empty() && weights.iter().all(|w| w.params.is_some());
    let (n_params, shapes, n_params_from) = if all_read {
        let params = weights.iter().filter_map(|w| w.params).sum();
        (params, weights.iter().flat_map(|w| w.shapes.clone()).collect(), "weight files")
    } else {
        let specs = crate::synthetic::tensor_specs(&config)?;
        let params = specs.iter().map(|(_, s)| s.iter().map(|&d| d as u64).product::<u64>()).sum();
        let shapes: Vec<(String, Vec<usize>)> =
            specs.into_iter().filter_map(|(key, shape)| Some((crate::weights::canonical_key(&key)?, shape))).collect();
        (params, shapes, "config")
    };
    let formats = FORMATS
        .iter()
        .map(|&f| {
            let bytes = estimate_model_bytes(f, shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())));
            (f.name().to_owned(), FormatFit { bytes, fits_browser: fits_browser(bytes) })
        })
        .collect();
    let text = &config.text;
    let vision_type = resolved.config["vision_config"]["model_type"].as_str().unwrap_or("?").to_owned();
    Ok(Inspection {
        config: resolved.config,
        defaulted_keys: resolved.defaulted,
        architecture: format!("{}: {} + {}", config.family.model_type(), vision_type, text.kind.llama_cpp_arch()),
        chat_template: processor.chat_template_file().map(str::to_owned),
        question: match prompt {
            PromptText::Chat(q) => Some(q.clone()),
            PromptText::Raw(_) => None,
        },
        prompt: prompt_text,
        n_image_tokens: encoded.n_image_tokens(),
        image_span: encoded.image_span().map(|(s, e)| [s, e]),
        input_ids: encoded.input_ids,
        image,
        eos_token_ids: crate::config::eos_ids(&config, files.generation_config_json.as_deref())?,
        weight_files: weights.to_vec(),
        n_params,
        n_params_from: n_params_from.to_owned(),
        formats,
    })
}

/// Whether a model of `bytes` loads in a browser tab: streamed, it takes its own size plus the
/// slices in conversion, within wasm32's budget.
pub fn fits_browser(bytes: u64) -> bool {
    bytes + crate::streaming::STREAM_OVERHEAD_BYTES <= crate::quant::BROWSER_WEIGHT_BUDGET
}

impl Inspection {
    /// The human-readable report of `cmrm inspect` (without `--json`).
    pub fn report(&self) -> String {
        let mut out = String::new();
        let defaulted: std::collections::HashSet<&str> = self.defaulted_keys.iter().map(String::as_str).collect();
        out.push_str(&format!("architecture   {}\n", self.architecture));
        out.push_str("config         (* = absent from config.json, transformers' default)\n");
        let mut keys = Vec::new();
        flatten(&self.config, "", &mut keys);
        for (key, value) in keys {
            let mark = if defaulted.contains(key.as_str()) { "*" } else { " " };
            out.push_str(&format!("  {mark} {key} = {value}\n"));
        }
        out.push_str(&format!("chat template  {}\n", self.chat_template.as_deref().unwrap_or("(none)")));
        out.push_str(&format!("prompt         {:?}\n", self.prompt));
        out.push_str(&format!("input_ids      {} tokens: {:?}\n", self.input_ids.len(), self.input_ids));
        if let Some([s, e]) = self.image_span {
            out.push_str(&format!("image tokens   {} at [{s}, {e})\n", self.n_image_tokens));
        }
        if let Some(img) = &self.image {
            let grid = img.grid.map_or(String::new(), |[r, c]| format!(" + a {r}×{c} grid of tiles"));
            out.push_str(&format!(
                "image          {}×{} → {}×{}{grid}\n",
                img.width, img.height, img.model_input[0], img.model_input[1]
            ));
        }
        out.push_str(&format!("eos ids        {:?}\n", self.eos_token_ids));
        if self.weight_files.is_empty() {
            out.push_str("weights        none found (only the small files are here)\n");
        }
        for w in &self.weight_files {
            let size = w.bytes.map_or("size unknown".to_owned(), human_bytes);
            let detail = match (w.tensors, &w.params) {
                (Some(t), Some(p)) => format!("{t} tensors, {p} parameters, {:?}", w.dtypes),
                _ => "header not read".to_owned(),
            };
            out.push_str(&format!("weights        {} ({size}): {detail}\n", w.name));
        }
        out.push_str(&format!("parameters     {} (from the {})\n", self.n_params, self.n_params_from));
        for (name, fit) in &self.formats {
            let verdict = if fit.fits_browser { "fits a browser tab" } else { "too big for a browser tab" };
            out.push_str(&format!("memory {name:<7} {}, {verdict}\n", human_bytes(fit.bytes)));
        }
        out
    }
}

/// `1.73 GB`, `4.2 MB`, `850 kB`.
fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n => format!("{:.0} kB", n as f64 / 1e3),
    }
}

fn flatten(v: &Value, prefix: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(v, &key, out);
            }
        }
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

/// The weight files of a checkpoint folder: the shards named by the index, or the single file.
#[cfg(not(target_arch = "wasm32"))]
pub fn weight_files_in_dir(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let index = dir.join(WEIGHTS_INDEX);
    let names = weight_file_names(&|name| dir.join(name).exists(), &mut || {
        std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))
    })
    .with_context(|| format!("{}: the weights", dir.display()))?;
    Ok(names.into_iter().map(|s| dir.join(s)).collect())
}

/// A checkpoint folder's weights: its weight files (memory-mapped).
#[cfg(not(target_arch = "wasm32"))]
pub fn load_weights(dir: &std::path::Path) -> Result<crate::weights::Weights> {
    crate::weights::Weights::from_paths(&weight_files_in_dir(dir)?)
}

/// Distinct shard file names from a `model.safetensors.index.json`, in first-seen order.
pub fn shard_names_from_index(text: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).context("no weight_map object")?;
    let mut shards: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file.as_str().context("weight_map values must be file names")?;
        // A plain file name: nothing that could leave the checkpoint folder on any platform.
        if file.is_empty() || file.starts_with('.') || file.contains(['/', '\\', ':', '\0']) {
            bail!("shard name '{file}' is not a plain file name");
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_owned());
        }
    }
    if shards.is_empty() {
        bail!("weight_map is empty");
    }
    Ok(shards)
}

#[cfg(not(target_arch = "wasm32"))]
impl ProcessorFiles {
    /// The processor's files in a checkpoint folder (a missing `tokenizer.json` is refused by
    /// [`Processor::from_files`]).
    pub fn read_dir(dir: &std::path::Path) -> Result<Self> {
        Ok(SmallFiles::read_dir(dir)?.processor)
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Processor {
    /// Read the processor files from a checkpoint folder.
    pub fn from_dir(dir: &std::path::Path, config: &LlavaConfig) -> Result<Self> {
        let files = ProcessorFiles::read_dir(dir)?;
        Self::from_files(&files, config).with_context(|| format!("loading the processor from {}", dir.display()))
    }
}
