//! The browser API (wasm-bindgen; docs/contracts.md). Everything model-related happens here in Rust; the
//! page's JavaScript only moves bytes and draws.
//!
//! ```js
//! import init, { Session } from "./pkg/cmrm.js";
//! await init();
//! const s = await Session.load({ model: "llava-hf/llava-interleave-qwen-0.5b-hf" }, p => bar(p.loaded / p.total));
//! await s.setImage(new Uint8Array(await file.arrayBuffer()));
//! const r = await s.compare({ prompt: "What is shown?", alpha: 1, layers: "all", variant: "sample" },
//!                           ev => ev.kind === "token" && append(ev.pane, ev.text));
//! ```
//! Every error is a JS `Error` whose message says what went wrong and what to do.

mod calibrate;
mod fetch;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use js_sys::{Function, Object, Reflect, Uint8Array};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use crate::backend::{BackendChoice, BackendInfo, DecoderBackend};
use crate::cmrm::{anchor_features_on, shift_for_prompt_on, Anchor};
use crate::config::LlavaConfig;
use crate::generate::{now_seconds, GenerateOptions, Generation, Generator, Sampling};
use crate::gpu::GpuWeights;
use crate::image::{decode_image, RgbImage};
use crate::pipeline::{PromptText, Vlm};
use crate::processor::ProcessorFiles;
use crate::quant::{choose_format, WeightChoice, WeightFormat};
use crate::steering::{Positions, ResolvedSteering, SteeringRequest, SteeringVectors};
use crate::weights::{FileBytes, Weights};
use fetch::{fetch_bytes, Plan};

/// The threads build's pool (`initThreadPool(n)` from JS, before `Session.load`): `n` Web Workers
/// sharing this instance's memory, on which the CPU kernels split their work.
#[cfg(feature = "threads")]
pub use wasm_bindgen_rayon::init_thread_pool;

/// Threads the CPU kernels run on: the pool's size in the threads build, else 1.
fn cpu_threads() -> usize {
    #[cfg(feature = "threads")]
    return rayon::current_num_threads();
    #[cfg(not(feature = "threads"))]
    1
}

/// Panics become readable console messages (the instance is unusable after one: reload it).
#[wasm_bindgen(js_name = initPanicHook)]
pub fn init_panic_hook() {
    console_error_panic_hook::set_once();
}

/// What kind of failure an error is, for the page. Errors reach JS with a `kind`:
/// `"cancelled"` (Stop), `"out-of-memory"` (refused for the memory a tab has), `"error"` (any
/// other failure cmrm reports: bad input, a download); the worker adds `"crashed"` for a trap of
/// the wasm instance. The page acts on the kind, never on the message text. Attached to an error
/// as an anyhow context that prints nothing ([`message_of`] leaves it out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Cancelled,
    OutOfMemory,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::OutOfMemory => "out-of-memory",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}

/// The error's chain of messages, outermost first, joined by ": " (the `{:#}` form, without the
/// [`ErrorKind`] markers).
pub fn message_of(e: &anyhow::Error) -> String {
    e.chain().map(ToString::to_string).filter(|m| !m.is_empty()).collect::<Vec<_>>().join(": ")
}

/// anyhow error (with its context chain) → JS `Error` with its kind.
fn to_js(e: anyhow::Error) -> JsValue {
    // A lost GPU device is its own kind: the page loads the model again on the CPU. A GPU that
    // could not take the model (`gpu`): the CPU backend may.
    let kind = if e.downcast_ref::<crate::gpu::context::DeviceLost>().is_some() {
        "gpu-lost"
    } else if e.downcast_ref::<crate::resident::GpuUploadFailed>().is_some() {
        "gpu"
    } else {
        e.downcast_ref::<ErrorKind>().map_or("error", |k| k.name())
    };
    js_error_of_kind(&message_of(&e), kind)
}

/// An `Error` named `CmrmError`: a failure cmrm reports (bad input, a download, a refusal), as
/// opposed to a crash of the wasm instance (a trap, a stack overflow), after which the worker
/// must be restarted.
pub(crate) fn error_value(message: &str) -> JsValue {
    js_error_of_kind(message, "error")
}

/// A `CmrmError` with its `kind` ([`ErrorKind`]).
fn js_error_of_kind(message: &str, kind: &str) -> JsValue {
    let error = js_sys::Error::new(message);
    error.set_name("CmrmError");
    let _ = js_sys::Reflect::set(&error, &"kind".into(), &kind.into());
    error.into()
}

fn to_js_value<T: Serialize>(value: &T) -> Result<JsValue> {
    value
        .serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(|e| anyhow!("cannot convert to JS: {e}"))
}

fn from_js_value<T: for<'de> Deserialize<'de>>(what: &str, value: JsValue) -> Result<T> {
    serde_wasm_bindgen::from_value(value).map_err(|e| anyhow!("invalid {what}: {e}"))
}

/// Where a model comes from: a Hub repo id (`owner/name`) or a folder URL.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModelSpec {
    model: String,
    #[serde(default)]
    revision: Option<String>,
    /// The folder's files, when known (skips probing for optional files).
    #[serde(default)]
    files: Option<Vec<String>>,
    /// In-memory weights: "auto" (the most precise of f32 / q8_0 / q4 that fits), "f32",
    /// "q8_0" or "q4".
    #[serde(default)]
    weights: Option<String>,
}

/// `Session.plan`'s options: the model, and the backend the load will ask for.
#[derive(Deserialize)]
struct PlanOptions {
    #[serde(flatten)]
    spec: ModelSpec,
    #[serde(default)]
    backend: Option<String>,
}

/// The weight format a model loads in within a tab's memory; a refusal is of kind
/// [`ErrorKind::OutOfMemory`].
fn fit_format(
    name: &str,
    choice: WeightChoice,
    model_bytes: impl Fn(WeightFormat) -> u64,
    held: u64,
) -> Result<WeightFormat> {
    choose_format(name, choice, model_bytes, held, crate::quant::BROWSER_WEIGHT_BUDGET).context(ErrorKind::OutOfMemory)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoadOptions {
    #[serde(flatten)]
    spec: ModelSpec,
    /// URL of a vector file to load with the model.
    #[serde(default)]
    vectors: Option<String>,
    #[serde(default)]
    backend: Option<String>,
    /// How WebGPU stores the decoder's matrices: "auto" (default: a quantized model's own
    /// blocks; dense matrices f16 on a hardware GPU, f32 on a software one), "f32" or "f16".
    #[serde(default)]
    gpu_weights: Option<String>,
}

/// Options of one side-by-side comparison.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CompareOptions {
    prompt: String,
    /// The prompt is already the full model prompt (may hold the image placeholder).
    #[serde(default)]
    raw_prompt: bool,
    #[serde(default = "default_max_new_tokens")]
    max_new_tokens: usize,
    /// CMRM's α. Missing: the vector file's `default_alpha`, else 1.
    #[serde(default)]
    alpha: Option<f32>,
    /// `all` (every layer the file holds), `0,2,5`, `3-7`. Missing: the file's `default_layers`,
    /// else all.
    #[serde(default)]
    layers: Option<String>,
    /// `all`, `last`, `generated`, `last+generated`. Missing: the file's `default_positions`,
    /// else all.
    #[serde(default)]
    positions: Option<Positions>,
    /// `dataset` (the loaded vector file) or `sample` (computed for this prompt).
    #[serde(default)]
    variant: Option<String>,
    /// Anchor image of sample-level vectors: `blank` (default) or `noise`.
    #[serde(default)]
    anchor: Option<String>,
    /// Also measure the representation gap per layer, before and after steering (3 prefills).
    #[serde(default)]
    gap: bool,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
}

fn default_max_new_tokens() -> usize {
    64
}

/// Summary of a vector set for the page: norms per layer and the file's defaults.
#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
struct VectorsInfo {
    name: String,
    variant: String,
    hidden_size: usize,
    /// `‖v_l‖` for every decoder layer (`null` where the file has no vector).
    norms: Vec<Option<f32>>,
    sign: String,
    default_alpha: Option<f32>,
    default_layers: Option<String>,
    default_positions: Option<String>,
    metadata: HashMap<String, String>,
}

impl VectorsInfo {
    fn new(name: &str, variant: &str, v: &SteeringVectors, num_layers: usize) -> Self {
        let norms =
            (0..num_layers).map(|l| v.layers.get(&l).map(|x| x.iter().map(|a| a * a).sum::<f32>().sqrt())).collect();
        Self {
            name: name.to_owned(),
            variant: variant.to_owned(),
            hidden_size: v.hidden_size,
            norms,
            sign: v.sign().to_owned(),
            default_alpha: v.metadata.get("default_alpha").and_then(|a| a.parse().ok()),
            default_layers: v.metadata.get("default_layers").cloned(),
            default_positions: v.metadata.get("default_positions").cloned(),
            metadata: v.metadata.clone(),
        }
    }
}

#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
struct ImageInfo {
    width: usize,
    height: usize,
    image_tokens: usize,
    encode_seconds: f64,
    /// Where the vision tower and the projector ran, and their seconds.
    vision: crate::pipeline::StageTime,
    projector: crate::pipeline::StageTime,
}

/// A finished (or stopped) answer, as the page shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct PaneResult {
    generated_ids: Vec<u32>,
    text: String,
    stopped_on_eos: bool,
    cancelled: bool,
    prompt_tokens: usize,
    prefill_seconds: f64,
    decode_seconds: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
}

impl From<Generation> for PaneResult {
    fn from(g: Generation) -> Self {
        Self {
            prompt_tokens: g.input_ids.len(),
            generated_ids: g.generated_ids,
            text: g.text,
            stopped_on_eos: g.stopped_on_eos,
            cancelled: g.cancelled,
            prefill_seconds: g.prefill_seconds,
            decode_seconds: g.decode_seconds,
            prefill_tokens_per_s: g.prefill_tokens_per_s,
            decode_tokens_per_s: g.decode_tokens_per_s,
        }
    }
}

/// Progress of a load, one stream over every file.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoadProgress<'a> {
    /// `download`, `parse`, `backend` (choosing the decoder's backend, uploading it to WebGPU)
    /// or `ready`.
    phase: &'a str,
    file: &'a str,
    file_loaded: u64,
    file_total: u64,
    loaded: u64,
    total: u64,
    from_cache: bool,
}

/// Events streamed by `compare` (field `kind`).
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum CompareEvent<'a> {
    #[serde(rename_all = "camelCase")]
    Vectors { vectors: &'a VectorsInfo, layers: &'a [usize], alpha: f32 },
    #[serde(rename_all = "camelCase")]
    Prefill { pane: &'a str, prompt_tokens: usize, seconds: f64 },
    #[serde(rename_all = "camelCase")]
    Token { pane: &'a str, index: usize, id: u32, text: &'a str },
    #[serde(rename_all = "camelCase")]
    Done { pane: &'a str, result: &'a PaneResult },
    #[serde(rename_all = "camelCase")]
    Gap { gap: &'a Gap },
    /// Something the person should know about this comparison (e.g. fewer tokens than asked).
    #[serde(rename_all = "camelCase")]
    Notice { message: &'a str },
}

/// Per layer, `‖h_l(prompt, image) − h_l(prompt alone)‖` at the last prompt token, without and
/// with steering: the representation gap CMRM closes.
#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Gap {
    before: Vec<f32>,
    after: Vec<f32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CompareResult {
    prompt: String,
    unaltered: PaneResult,
    steered: PaneResult,
    vectors: VectorsInfo,
    layers: Vec<usize>,
    alpha: f32,
    gap: Option<Gap>,
    /// Set when the comparison could not be run exactly as asked (fewer tokens).
    notice: Option<String>,
}

/// State that changes between requests (a comparison copies what it needs when it starts).
struct SessionState {
    /// Where the panes' decoders run (the vision tower, probes and calibration use the CPU).
    backend: Rc<DecoderBackend>,
    backend_info: BackendInfo,
    vectors: Option<(SteeringVectors, VectorsInfo)>,
    image: Option<(Tensor, ImageInfo)>,
    /// Anchor features for sample-level vectors, encoded on first use.
    anchors: HashMap<String, Tensor>,
}

impl Default for SessionState {
    fn default() -> Self {
        Self {
            backend: Rc::new(DecoderBackend::Cpu),
            backend_info: BackendInfo::cpu(None),
            vectors: None,
            image: None,
            anchors: HashMap::new(),
        }
    }
}

/// A loaded model in the browser. (`Clone` shares the model and state: the futures behind
/// returned promises hold one.)
#[wasm_bindgen]
#[derive(Clone)]
pub struct Session {
    vlm: Rc<Vlm>,
    state: Rc<RefCell<SessionState>>,
    stop: Rc<Cell<bool>>,
    busy: Rc<Cell<bool>>,
    name: String,
    /// The model's revision (`main` unless asked for; `local` for `fromFiles`).
    revision: String,
    /// Bytes of the weight files loaded.
    weight_bytes: u64,
    /// The weights were converted while they downloaded (never held whole).
    streamed: bool,
}

/// Collects a checkpoint file by file; each weight file's header is parsed as it arrives and its
/// bytes are kept until the model is built (tensors are converted as the model takes them), so
/// peak memory is the weight files plus the model in memory.
struct Assembler {
    config: Option<LlavaConfig>,
    generation_config: Option<String>,
    processor: ProcessorFiles,
    weights: Weights,
    weight_files: usize,
    weight_bytes: u64,
    /// The weights were converted as they streamed in, in this format (not held as files).
    streamed: Option<WeightFormat>,
}

impl Assembler {
    fn new() -> Self {
        Self {
            config: None,
            generation_config: None,
            processor: ProcessorFiles::default(),
            weights: Weights::empty(),
            weight_files: 0,
            weight_bytes: 0,
            streamed: None,
        }
    }

    fn add(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        match name {
            "config.json" => {
                let text = String::from_utf8(bytes).context("config.json is not UTF-8 text")?;
                self.config = Some(LlavaConfig::from_json_str(&text).context("config.json")?);
            }
            "generation_config.json" => {
                self.generation_config =
                    Some(String::from_utf8(bytes).context("generation_config.json is not UTF-8 text")?)
            }
            n if crate::checkpoint::is_weight_file(n) => {
                self.weight_bytes += bytes.len() as u64;
                self.weights.add_file(n, FileBytes::Owned(bytes))?;
                self.weight_files += 1;
            }
            n if n.ends_with(".index.json") => {}
            n => {
                self.processor.insert(n, bytes)?;
            }
        }
        Ok(())
    }

    /// The format the model is built in (`auto`: the most precise that fits, now that every
    /// tensor's shape is known and the files are in memory; streamed weights are already in
    /// theirs), after checking that every part is there.
    fn format(&self, name: &str, choice: WeightChoice, resident: bool) -> Result<WeightFormat> {
        self.config.as_ref().context("config.json is missing")?;
        if self.processor.tokenizer_json.is_empty() {
            bail!("tokenizer.json is missing");
        }
        if self.weight_files == 0 {
            bail!("no weights (model.safetensors or shards) were given");
        }
        // A quantized GGUF (`cmrm quantize`) loads in its own format unless asked otherwise.
        let choice = choice.or_stored(self.weights.stored_format());
        match self.streamed {
            Some(format) => Ok(format),
            None => fit_format(
                name,
                choice,
                |f| match resident {
                    true => crate::resident::cpu_bytes(f, self.weights.shapes()),
                    false => crate::quant::estimate_model_bytes(f, self.weights.shapes()),
                },
                wasm_memory_bytes(),
            ),
        }
    }

    /// Build the whole model on the CPU.
    fn finish(self, name: &str, choice: WeightChoice) -> Result<Session> {
        let format = self.format(name, choice, false)?;
        let (config, weight_bytes, streamed) =
            (self.config.clone().context("config.json is missing")?, self.weight_bytes, self.streamed.is_some());
        let vlm = Vlm::from_parts(config, format, &self.processor, self.generation_config.as_deref(), self.weights)?;
        Ok(Session::new(name, vlm, SessionState::default(), weight_bytes, streamed))
    }

    /// Build GPU-resident on `gpu`: the blocks not yet uploaded go up now (all of them when the
    /// load was not `started` while the weights streamed in), the CPU keeps the shell.
    async fn finish_resident(
        self,
        name: &str,
        choice: WeightChoice,
        (ctx, gpu_weights): (std::sync::Arc<crate::gpu::GpuContext>, GpuWeights),
        started: Option<crate::resident::ResidentLoad>,
    ) -> Result<Session> {
        let format = self.format(name, choice, true)?;
        let config = self.config.clone().context("config.json is missing")?;
        let processor = crate::processor::Processor::from_files(&self.processor, &config)?;
        let load = match started {
            Some(load) => load,
            None => crate::resident::ResidentLoad::new(ctx, &config, format, gpu_weights)?,
        };
        let (weight_bytes, streamed) = (self.weight_bytes, self.streamed.is_some());
        let (model, backend, backend_info) = load.finish(self.weights).await?;
        let vlm = Vlm::with_model(model, processor, self.generation_config.as_deref())?;
        let state = SessionState { backend: Rc::new(backend), backend_info, ..SessionState::default() };
        Ok(Session::new(name, vlm, state, weight_bytes, streamed))
    }
}

impl Session {
    fn new(name: &str, vlm: Vlm, state: SessionState, weight_bytes: u64, streamed: bool) -> Self {
        Self {
            vlm: Rc::new(vlm),
            state: Rc::new(RefCell::new(state)),
            stop: Rc::default(),
            busy: Rc::default(),
            name: name.to_owned(),
            revision: "local".to_owned(),
            weight_bytes,
            streamed,
        }
    }
}

async fn plan_for(spec: &ModelSpec) -> Result<Plan> {
    let revision = spec.revision.as_deref().unwrap_or("main");
    if fetch::is_hub_repo_id(&spec.model) {
        fetch::plan_hub(&spec.model, revision).await
    } else {
        fetch::plan_url(&spec.model, &spec.model, spec.files.clone()).await
    }
}

/// A URL relative to the worker's location (catalog entries are relative to the page, which is
/// where the worker script lives too), or the URL itself when absolute or unparsable.
fn resolve_url(url: &str) -> String {
    let base = Reflect::get(&js_sys::global(), &"location".into())
        .ok()
        .and_then(|l| Reflect::get(&l, &"href".into()).ok())
        .and_then(|h| h.as_string());
    match base.and_then(|b| web_sys::Url::new_with_base(url, &b).ok()) {
        Some(u) => u.href(),
        None => url.to_owned(),
    }
}

fn wasm_memory_bytes() -> u64 {
    let memory = wasm_bindgen::memory().unchecked_into::<js_sys::WebAssembly::Memory>();
    memory.buffer().unchecked_into::<js_sys::ArrayBuffer>().byte_length() as u64
}

/// Before downloading: the weight format the model will load in, or a readable refusal. `None`
/// when the safetensors headers could not be read (a GGUF copy, a cached or unreachable file):
/// then the format is decided from the only weight file's header as it streams in, or once the
/// files are in memory.
fn check_memory(plan: &Plan, choice: WeightChoice, resident: bool) -> Result<Option<WeightFormat>> {
    let Some(shapes) = plan.tensor_shapes() else { return Ok(None) };
    fit_streamed(&plan.model, choice, &shapes, resident).map(Some)
}

/// The format streamed weights (safetensors, or a GGUF copy) load in: beside the model, only a
/// slice of rows in conversion is held (`streaming::STREAM_OVERHEAD_BYTES`). A GPU-resident load
/// (`resident`) holds the shell and one block, not the model (`resident::cpu_bytes`).
fn fit_streamed(
    name: &str,
    choice: WeightChoice,
    shapes: &[(String, Vec<usize>)],
    resident: bool,
) -> Result<WeightFormat> {
    let tensors = || shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
    let estimate = |f| match resident {
        true => crate::resident::cpu_bytes(f, tensors()),
        false => crate::quant::estimate_model_bytes(f, tensors()),
    };
    fit_format(name, choice, estimate, wasm_memory_bytes() + crate::streaming::STREAM_OVERHEAD_BYTES)
}

/// The facts of a planned model (`cmrm inspect`'s), from its small files and weight headers.
async fn inspect_plan(plan: &Plan) -> Result<crate::checkpoint::Inspection> {
    let mut small = crate::checkpoint::SmallFiles::default();
    for file in plan.files.iter().filter(|f| !crate::checkpoint::is_weight_file(&f.name)) {
        let check = |bytes: &[u8]| fetch::check_small_file(&file.name, bytes);
        let bytes = fetch::fetch_bytes_checked(&file.url, &file.expect(), &mut |_, _, _| {}, &check).await?;
        small.insert(&file.name, bytes).with_context(|| format!("{}: {}", plan.model, file.name))?;
    }
    let weights = plan.weight_files.clone().unwrap_or_default();
    let request = crate::checkpoint::InspectRequest {
        prompt: PromptText::Chat("What is in the image?".to_owned()),
        with_image: true,
        image: None,
    };
    crate::checkpoint::inspect(&small, &weights, &request).with_context(|| plan.model.clone())
}

/// Resolves after the event loop has run once (a `stop` message gets its turn).
async fn yield_to_event_loop() {
    let promise = js_sys::Promise::new(&mut |resolve, _reject| {
        let global = js_sys::global();
        let set_timeout = Reflect::get(&global, &"setTimeout".into()).ok().and_then(|f| f.dyn_into::<Function>().ok());
        match set_timeout {
            Some(f) => {
                let _ = f.call2(&global, &resolve, &JsValue::from(0));
            }
            None => {
                let _ = resolve.call0(&JsValue::NULL);
            }
        }
    });
    let _ = JsFuture::from(promise).await;
}

fn call_js(callback: &Function, value: &JsValue) -> Result<JsValue> {
    callback.call1(&JsValue::NULL, value).map_err(|e| fetch::js_error("the callback threw", e))
}

fn norm_of_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt()
}

#[wasm_bindgen]
impl Session {
    /// Which files a model needs and their sizes, before downloading (`{files, totalBytes,
    /// cachedBytes}`). Options: `{model, revision?, files?}` as for `load`.
    pub async fn plan(options: JsValue) -> Result<JsValue, JsValue> {
        init_panic_hook();
        async {
            let PlanOptions { spec, backend } = from_js_value("model options", options)?;
            let choice = WeightChoice::parse(spec.weights.as_deref())?;
            let backend: BackendChoice = backend.as_deref().unwrap_or("auto").parse()?;
            let mut plan = plan_for(&spec).await?;
            plan.read_weight_headers().await;
            // On a GPU the blocks go to GPU memory as they download: wasm memory holds the rest.
            let resident = crate::backend::uses_gpu(backend).await;
            let fit = check_memory(&plan, choice, resident);
            let mut value = serde_json::to_value(&plan)?;
            value["gpuResident"] = resident.into();
            value["memoryProblem"] = fit.as_ref().err().map(message_of).into();
            value["weights"] = fit.ok().flatten().map(|f| f.name()).into();
            value["modelBytes"] = serde_json::json!({
                "f32": plan.model_bytes(WeightFormat::F32),
                "q8_0": plan.model_bytes(WeightFormat::Q8_0),
                "q4": plan.model_bytes(WeightFormat::Q4),
            });
            // What `cmrm inspect` says, from the small files (kept in the cache for the load)
            // and the headers: a template or config that cannot work is known before any weight.
            match inspect_plan(&plan).await {
                Ok(facts) => value["inspection"] = serde_json::to_value(facts)?,
                Err(e) => value["inspectionProblem"] = message_of(&e).into(),
            }
            to_js_value(&value)
        }
        .await
        .map_err(to_js)
    }

    /// Download (cache-first) and load a model. `options`: `{model: "owner/name" | folder URL,
    /// revision?, files?, weights?: "auto"|"f32"|"q8_0"|"q4", vectors?: URL,
    /// backend?: "auto"|"cpu"|"webgpu"}` (see `setBackend`).
    /// `on_progress({phase, file, fileLoaded, fileTotal, loaded, total, fromCache})`.
    pub async fn load(options: JsValue, on_progress: Option<Function>) -> Result<Session, JsValue> {
        init_panic_hook();
        Self::load_inner(options, on_progress).await.map_err(to_js)
    }

    /// Build from bytes already in memory: `files` maps file names (`config.json`,
    /// `tokenizer.json`, `model.safetensors` or shards, …) to `Uint8Array`s.
    #[wasm_bindgen(js_name = fromFiles)]
    pub fn from_files(name: &str, files: &Object) -> Result<Session, JsValue> {
        init_panic_hook();
        let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
        for key in Object::keys(files).iter() {
            let key = key.as_string().unwrap_or_default();
            let value = Reflect::get(files, &JsValue::from(&key)).map_err(|e| to_js(fetch::js_error(&key, e)))?;
            let bytes =
                value.dyn_into::<Uint8Array>().map_err(|_| error_value(&format!("{key}: expected a Uint8Array")))?;
            entries.push((key, bytes.to_vec()));
        }
        Self::from_named_bytes(name, entries).map_err(to_js)
    }

    /// Delete every cached model file (the "clear cached models" button).
    #[wasm_bindgen(js_name = clearCache)]
    pub async fn clear_cache() -> Result<bool, JsValue> {
        fetch::clear_cache().await.map_err(to_js)
    }

    /// Use a vector file (safetensors `layer.{l}`) for dataset-level steering. Checked against the
    /// model; returns `{norms, defaultAlpha, defaultLayers, sign, …}`.
    #[wasm_bindgen(js_name = setVectors)]
    pub fn set_vectors(&self, name: &str, bytes: &[u8]) -> Result<JsValue, JsValue> {
        self.set_vectors_inner(name, bytes).and_then(|info| to_js_value(&info)).map_err(to_js)
    }

    /// Fetch a vector file from a URL (cache-first) and use it; as `setVectors`.
    /// Download (cache-first) and use a vector file. `source`: a URL, or a vectors-catalog entry
    /// (`{vectors_url, sha256, size, …}`, www/vectors/catalog.json), whose size and sha256 the
    /// download must match — a mismatch is an error and the file is not kept in the cache.
    #[wasm_bindgen(js_name = loadVectors)]
    pub async fn load_vectors(&self, source: JsValue) -> Result<JsValue, JsValue> {
        async move {
            let (url, bytes) = match source.as_string() {
                Some(url) => {
                    let bytes = fetch_bytes(&url, &mut |_, _, _| {}).await?;
                    (url, bytes)
                }
                None => {
                    let entry: crate::catalog::CatalogEntry = from_js_value("catalog entry", source)?;
                    let url = resolve_url(&entry.vectors_url);
                    let bytes = fetch::fetch_verified(&url, &entry, &mut |_, _, _| {}).await?;
                    (url, bytes)
                }
            };
            let info = self.use_vectors(&url, SteeringVectors::from_bytes(&url, &bytes)?)?;
            to_js_value(&info)
        }
        .await
        .map_err(to_js)
    }

    /// Whether a URL is in the model cache (for tests and the page's cache note).
    #[wasm_bindgen(js_name = isCached)]
    pub async fn is_cached(url: String) -> bool {
        fetch::is_cached(&resolve_url(&url)).await
    }

    #[wasm_bindgen(js_name = clearVectors)]
    pub fn clear_vectors(&self) {
        self.state.borrow_mut().vectors = None;
    }

    /// Decode (PNG, JPEG, WebP, GIF) and encode an image once; every later `compare` uses it.
    /// Returns `{width, height, imageTokens, encodeSeconds}`.
    /// On the WebGPU backend the vision tower and projector run there (`vision.on`).
    #[wasm_bindgen(js_name = setImage)]
    pub async fn set_image(&self, bytes: Vec<u8>) -> Result<JsValue, JsValue> {
        let img = decode_image(&bytes).context("the image cannot be used").map_err(to_js)?;
        self.set_rgb(img).await.map_err(to_js)
    }

    /// As `setImage`, from RGBA pixels (what a canvas gives, e.g. after downscaling in the page).
    #[wasm_bindgen(js_name = setImageRgba)]
    pub async fn set_image_rgba(&self, width: usize, height: usize, rgba: Vec<u8>) -> Result<JsValue, JsValue> {
        // Alpha dropped, as decode_image does (PIL convert("RGB")).
        let img = RgbImage::from_rgba(width, height, &rgba).map_err(to_js)?;
        self.set_rgb(img).await.map_err(to_js)
    }

    #[wasm_bindgen(js_name = clearImage)]
    pub fn clear_image(&self) {
        self.state.borrow_mut().image = None;
    }

    /// Where the answers' decoder runs: `"auto"` (WebGPU when a hardware adapter passes the
    /// self-test, else the CPU, with the reason in `info().backendFallbackReason`), `"webgpu"`
    /// (or an error saying why not) or `"cpu"`; `gpu_weights`: `"auto"` (default: a quantized model's
    /// own Q8_0 / Q4 blocks, dequantized in the kernels; dense matrices f16 on a hardware GPU, f32
    /// on a software one), `"f32"` or `"f16"` (every matrix so; computed in f32 whatever the
    /// storage). Resolves to `info()`.
    #[wasm_bindgen(js_name = setBackend)]
    pub async fn set_backend(&self, choice: String, gpu_weights: Option<String>) -> Result<JsValue, JsValue> {
        if self.busy.get() {
            return Err(error_value("the model is busy: stop the running task first"));
        }
        self.busy.set(true);
        let selected =
            async { self.select_backend(choice.parse()?, gpu_weights.as_deref().unwrap_or("auto").parse()?).await }
                .await;
        self.busy.set(false);
        selected.map_err(to_js)?;
        self.info()
    }

    /// Stop the running comparison after its current token (both panes keep what they have).
    pub fn stop(&self) {
        self.stop.set(true);
    }

    /// Backend, model sizes, wasm memory in use, the loaded vectors and image.
    pub fn info(&self) -> Result<JsValue, JsValue> {
        let cfg = self.vlm.config();
        let memory = wasm_memory_bytes();
        let state = self.state.borrow();
        let info = serde_json::json!({
            "model": self.name,
            "backend": state.backend_info.backend,
            "backendDetail": match &state.backend_info.adapter {
                Some(adapter) => format!(
                    "WebGPU: {adapter}, {} weights{}",
                    state.backend_info.gpu_weights.as_deref().unwrap_or("f32"),
                    if state.backend_info.resident { ", on the GPU only" } else { "" }
                ),
                None => match cpu_threads() {
                    1 => "candle on the CPU, wasm32 simd128, one thread".to_owned(),
                    n => format!("candle on the CPU, wasm32 simd128, {n} threads"),
                },
            },
            "threads": cpu_threads(),
            "backendFallbackReason": state.backend_info.fallback_reason,
            "visionOn": state.backend_info.vision,
            "visionReason": state.backend_info.vision_reason,
            // The blocks live on the GPU only (no CPU copy in wasm memory).
            "resident": state.backend_info.resident,
            "weights": self.vlm.weight_format().name(),
            "weightBytes": self.weight_bytes,
            "streamedLoad": self.streamed,
            "wasmMemoryBytes": memory,
            "numLayers": cfg.text.num_hidden_layers,
            "hiddenSize": cfg.text.hidden_size,
            "vocabSize": cfg.text.vocab_size,
            "contextLength": cfg.text.max_position_embeddings,
            // Tokens of an image of the tower's own size (an anyres model's vary with the image).
            "imageTokens": cfg.image_tokens((cfg.vision.image_size, cfg.vision.image_size)),
            "family": cfg.family.model_type(),
            "imageSize": cfg.vision.image_size,
            "fingerprint": cfg.fingerprint(),
            "hasChatTemplate": self.vlm.processor.has_chat_template(),
            "busy": self.busy.get(),
            "vectors": state.vectors.as_ref().and_then(|(_, i)| serde_json::to_value(i).ok()),
            "image": state.image.as_ref().map(|(_, i)| serde_json::json!({"width": i.width, "height": i.height, "imageTokens": i.image_tokens})),
        });
        to_js_value(&info).map_err(to_js)
    }

    /// Answer `options.prompt` twice — unaltered and CMRM-steered — with the current image,
    /// interleaving the two answers token by token. `on_event` receives `{kind: "vectors" |
    /// "prefill" | "token" | "done" | "gap", pane?, …}`; returning `false` stops.
    /// Resolves to `{unaltered, steered, vectors, layers, alpha, gap}`.
    pub fn compare(&self, options: JsValue, on_event: Option<Function>) -> js_sys::Promise {
        let options: Result<CompareOptions> = from_js_value("compare options", options);
        let (vlm, state, stop, busy) = (self.vlm.clone(), self.state.clone(), self.stop.clone(), self.busy.clone());
        if busy.get() {
            return js_sys::Promise::reject(&error_value(
                "the model is busy (a comparison or a calibration is running): stop it first",
            ));
        }
        // Claimed now, not when the future first runs: a `stop()` right after this call counts.
        busy.set(true);
        stop.set(false);
        wasm_bindgen_futures::future_to_promise(async move {
            let result = compare(&vlm, &state, &stop, options, on_event.as_ref()).await;
            busy.set(false);
            result.and_then(|r| to_js_value(&r)).map_err(to_js)
        })
    }
}

/// The Rust-side halves of the exported methods.
impl Session {
    async fn load_inner(options: JsValue, on_progress: Option<Function>) -> Result<Session> {
        let options: LoadOptions = from_js_value("load options", options)?;
        fetch::discard_stale_downloads().await;
        let backend: BackendChoice = options.backend.as_deref().unwrap_or("auto").parse()?;
        let gpu_weights: GpuWeights = options.gpu_weights.as_deref().unwrap_or("auto").parse()?;
        // WebGPU first: with a GPU context the weights go to GPU buffers block by block as they
        // stream in, and no CPU copy of the model stays (`crate::resident`).
        let (ctx, gpu_info) = match backend {
            BackendChoice::Cpu => (None, BackendInfo::cpu(None)),
            _ => match crate::backend::choose_context(backend).await {
                Ok(chosen) => chosen,
                Err(e) => (None, BackendInfo::cpu(Some(format!("WebGPU was asked for: {}", message_of(&e))))),
            },
        };
        let cpu_info = match ctx {
            Some(ctx) => {
                #[allow(clippy::arc_with_non_send_sync)] // (one thread in wasm; the engine takes an Arc)
                let ctx = std::sync::Arc::new(ctx);
                match Self::load_with(&options, on_progress.as_ref(), Some((ctx, gpu_weights))).await {
                    Ok(session) => return Ok(session),
                    // `auto`: the GPU could not take the model; the CPU may (a second download,
                    // from the cache when the first one completed).
                    Err(e)
                        if backend == BackendChoice::Auto
                            && e.downcast_ref::<crate::resident::GpuUploadFailed>().is_some() =>
                    {
                        BackendInfo::cpu(Some(message_of(&e)))
                    }
                    Err(e) => return Err(e),
                }
            }
            None => gpu_info,
        };
        let session = Self::load_with(&options, on_progress.as_ref(), None).await?;
        session.state.borrow_mut().backend_info = cpu_info;
        Ok(session)
    }

    /// One load of `options`' model: GPU-resident on `gpu` (the GPU's errors marked
    /// `resident::GpuUploadFailed`), else whole on the CPU.
    async fn load_with(
        options: &LoadOptions,
        on_progress: Option<&Function>,
        gpu: Option<(std::sync::Arc<crate::gpu::GpuContext>, GpuWeights)>,
    ) -> Result<Session> {
        let choice = WeightChoice::parse(options.spec.weights.as_deref())?;
        let mut plan = plan_for(&options.spec).await?;
        if plan.files.iter().any(|f| f.name.ends_with(".safetensors") && !f.cached) {
            plan.read_weight_headers().await;
        }
        let resident = gpu.is_some();
        let known_format = check_memory(&plan, choice, resident)?;
        // Weights stream in when the format is known, or decided from the header of the only
        // weight file (safetensors, or a `cmrm quantize` GGUF: its own format unless asked
        // otherwise); shards with unknown sizes are held until all are in.
        let weight_files = plan.files.iter().filter(|f| crate::checkpoint::is_weight_file(&f.name)).count();
        let stream_weights = known_format.is_some() || weight_files == 1;
        let vectors_size = match &options.vectors {
            Some(url) => fetch::probe_size(url).await?.map_or(0, |(n, _)| n),
            None => 0,
        };
        let total = plan.total_bytes + vectors_size;
        let mut done_before = 0u64;
        let report = |phase: &str, file: &str, file_loaded: u64, file_total: u64, loaded: u64, from_cache: bool| {
            if let Some(cb) = on_progress {
                let p =
                    LoadProgress { phase, file, file_loaded, file_total, loaded, total: total.max(loaded), from_cache };
                if let Ok(v) = to_js_value(&p) {
                    let _ = cb.call1(&JsValue::NULL, &v);
                }
            }
        };
        let mut assembler = Assembler::new();
        // The GPU-resident load, started once the config and the weights' format are known.
        let mut upload: Option<crate::resident::ResidentLoad> = None;
        for file in &plan.files {
            let mut on_bytes = |n: u64, t: Option<u64>, cached: bool| {
                report("download", &file.name, n, t.unwrap_or(file.size), done_before + n, cached)
            };
            let is_weights = crate::checkpoint::is_weight_file(&file.name);
            if is_weights && assembler.weight_files == 0 {
                // Config and tokenizer disagree? Say so before gigabytes move.
                if let Some(config) = &assembler.config {
                    crate::processor::Processor::from_files(&assembler.processor, config)
                        .with_context(|| format!("loading {}", plan.model))?;
                }
            }
            if stream_weights && is_weights {
                let model = plan.model.clone();
                let decide: crate::streaming::DecideFormat = match known_format {
                    Some(format) => Box::new(move |_, _| Ok(format)),
                    None => {
                        Box::new(move |shapes, stored| fit_streamed(&model, choice.or_stored(stored), shapes, resident))
                    }
                };
                let mut stream = crate::streaming::WeightStream::new(&file.name, decide);
                let weights = &mut assembler.weights;
                let config = assembler.config.as_ref();
                let mut on_chunk = |chunk: &[u8]| -> Result<()> {
                    stream.push(chunk, weights)?;
                    let (Some((ctx, gpu_weights)), Some(format)) = (&gpu, stream.format()) else { return Ok(()) };
                    let load = match &mut upload {
                        Some(load) => load,
                        None => {
                            let config = config.context("config.json must come before the weights")?;
                            upload.insert(crate::resident::ResidentLoad::new(
                                ctx.clone(),
                                config,
                                format,
                                *gpu_weights,
                            )?)
                        }
                    };
                    load.absorb_stream(&stream, weights)
                };
                let fetched =
                    fetch::fetch_chunks(&file.url, &file.expect(), &mut on_bytes, &mut |_| Ok(()), &mut on_chunk)
                        .await
                        .with_context(|| format!("{}: {}", plan.model, file.name))?;
                // Kept in the cache only once the whole file converted.
                let format = match stream.finish() {
                    Ok(format) => format,
                    Err(e) => {
                        fetched.discard().await;
                        return Err(e);
                    }
                };
                let n = fetched.bytes;
                fetched.keep().await;
                if assembler.streamed.is_some_and(|f| f != format) {
                    bail!("{}: the weight files were converted to different formats", plan.model);
                }
                assembler.streamed = Some(format);
                assembler.weight_files += 1;
                assembler.weight_bytes += n;
                done_before += n;
                continue;
            }
            let check = |bytes: &[u8]| fetch::check_small_file(&file.name, bytes);
            let bytes = fetch::fetch_bytes_checked(&file.url, &file.expect(), &mut on_bytes, &check)
                .await
                .with_context(|| plan.model.clone())?;
            done_before += bytes.len() as u64;
            report("parse", &file.name, bytes.len() as u64, bytes.len() as u64, done_before, file.cached);
            assembler.add(&file.name, bytes).with_context(|| format!("{}: {}", plan.model, file.name))?;
        }
        report("backend", "", 0, 0, done_before, false);
        let session = match gpu {
            Some(gpu) => assembler.finish_resident(&plan.model, choice, gpu, upload).await,
            None => assembler.finish(&plan.model, choice),
        };
        let mut session = session.with_context(|| format!("loading {}", plan.model))?;
        session.revision = options.spec.revision.clone().unwrap_or_else(|| "main".to_owned());
        if let Some(url) = &options.vectors {
            let mut on_bytes = |n: u64, t: Option<u64>, cached: bool| {
                report("download", url, n, t.unwrap_or(vectors_size), done_before + n, cached)
            };
            let bytes = fetch_bytes(url, &mut on_bytes).await?;
            done_before += bytes.len() as u64;
            session.set_vectors_inner(url, &bytes)?;
        }
        report("ready", "", 0, 0, done_before, false);
        Ok(session)
    }

    /// Shareable core of `fromFiles` for Rust callers (tests).
    pub fn from_named_bytes(name: &str, mut entries: Vec<(String, Vec<u8>)>) -> Result<Session> {
        // config first (fail fast), weights last.
        entries.sort_by_key(|(n, _)| (n != "config.json", n.ends_with(".safetensors")));
        let mut assembler = Assembler::new();
        for (file, bytes) in entries {
            assembler.add(&file, bytes).with_context(|| format!("{name}: {file}"))?;
        }
        assembler.finish(name, WeightChoice::Auto).with_context(|| format!("loading {name}"))
    }

    /// Upload the decoder to WebGPU (or not) per `choice`; the previous backend is kept on error.
    async fn select_backend(&self, choice: BackendChoice, weights: GpuWeights) -> Result<()> {
        if !self.vlm.model.runs_on_cpu() {
            bail!(
                "this model was loaded GPU-resident (its blocks live on the GPU only, no CPU copy): \
                 to change its backend, load it again with the backend you want"
            );
        }
        let (backend, info) = DecoderBackend::select_with(choice, &self.vlm.model, weights)
            .await
            .map_err(|e| e.context("WebGPU is not available for this model (choose the CPU backend)"))?;
        let mut state = self.state.borrow_mut();
        state.backend = Rc::new(backend);
        state.backend_info = info;
        Ok(())
    }

    fn set_vectors_inner(&self, name: &str, bytes: &[u8]) -> Result<VectorsInfo> {
        // cmrm safetensors or a llama.cpp GGUF control vector, as the CLI reads them.
        self.use_vectors(name, SteeringVectors::from_bytes(name, bytes)?)
    }

    /// Check dataset-level vectors against the model and make them the ones in use.
    fn use_vectors(&self, name: &str, vectors: SteeringVectors) -> Result<VectorsInfo> {
        vectors.validate_for(name, self.vlm.config())?;
        let info = VectorsInfo::new(name, "dataset", &vectors, self.vlm.config().text.num_hidden_layers);
        self.state.borrow_mut().vectors = Some((vectors, info.clone()));
        Ok(info)
    }

    async fn set_rgb(&self, img: RgbImage) -> Result<JsValue> {
        let t0 = now_seconds();
        let backend = self.state.borrow().backend.clone();
        let encoded = backend.encode_image_async(&self.vlm, &img).await.context("encoding the image failed")?;
        let info = ImageInfo {
            width: img.width,
            height: img.height,
            image_tokens: encoded.features.dim(0)?,
            encode_seconds: now_seconds() - t0,
            vision: encoded.vision,
            projector: encoded.projector,
        };
        let value = to_js_value(&info)?;
        self.state.borrow_mut().image = Some((encoded.features, info));
        Ok(value)
    }
}

async fn compare(
    vlm: &Vlm,
    state: &RefCell<SessionState>,
    stop: &Cell<bool>,
    options: Result<CompareOptions>,
    on_event: Option<&Function>,
) -> Result<CompareResult> {
    let opts = options?;
    if opts.prompt.trim().is_empty() {
        bail!("the prompt is empty: type a question");
    }
    let num_layers = vlm.config().text.num_hidden_layers;
    let emit = |event: CompareEvent| -> Result<bool> {
        let Some(cb) = on_event else { return Ok(true) };
        Ok(call_js(cb, &to_js_value(&event)?)?.as_bool() != Some(false))
    };
    let image = state.borrow().image.as_ref().map(|(f, _)| f.clone());
    let text =
        if opts.raw_prompt { PromptText::Raw(opts.prompt.clone()) } else { PromptText::Chat(opts.prompt.clone()) };
    let backend = state.borrow().backend.clone();
    let prepared = backend.prepare_async(vlm, &text, image.as_ref().as_slice()).await?;

    // Vectors: the loaded file, or this prompt's own shift (sample-level).
    let variant = opts.variant.as_deref().unwrap_or("dataset");
    let (vectors, info) = match variant {
        "dataset" => state
            .borrow()
            .vectors
            .clone()
            .context("no steering vectors are loaded: load a vector file, or use sample-level vectors")?,
        "sample" => {
            let anchor = Anchor::parse(opts.anchor.as_deref().unwrap_or("blank"), opts.seed.unwrap_or(0))?;
            // Keyed by name and seed: two noise seeds are two images.
            let key = format!("{}:{}", anchor.name(), opts.seed.unwrap_or(0));
            let cached = state.borrow().anchors.get(&key).cloned();
            let features = match cached {
                Some(f) => f,
                None => {
                    let f = anchor_features_on(&backend, vlm, anchor).await?;
                    state.borrow_mut().anchors.insert(key, f.clone());
                    f
                }
            };
            let shift =
                shift_for_prompt_on(&backend, vlm, &text, &features).await.context("computing sample-level vectors")?;
            let mut v = SteeringVectors::new(vlm.config().text.hidden_size, shift.into_iter().enumerate().collect())?;
            v.metadata.insert("sign".into(), "subtract".into());
            v.metadata.insert("anchor".into(), anchor.name().into());
            let info = VectorsInfo::new(&format!("sample-level ({} image)", anchor.name()), "sample", &v, num_layers);
            (v, info)
        }
        other => bail!("variant must be dataset or sample (got '{other}')"),
    };
    let request = SteeringRequest { alpha: opts.alpha, layers: opts.layers.clone(), positions: opts.positions };
    let ResolvedSteering { alpha, layers, intervention: steering, .. } =
        request.resolve(&vectors, num_layers, vlm.device()).with_context(|| info.name.clone())?;
    emit(CompareEvent::Vectors { vectors: &info, layers: &layers, alpha })?;

    let sampling = match opts.temperature {
        Some(t) if t > 0.0 => {
            Sampling::TopP { temperature: t, top_p: opts.top_p.unwrap_or(1.0), seed: opts.seed.unwrap_or(0) }
        }
        _ => Sampling::Greedy,
    };
    let ids = &prepared.encoded.input_ids;
    let prompt_len = ids.len();
    // Both panes' KV caches must fit the wasm memory that is left (less a margin for activations).
    let memory_left = crate::quant::WASM_MEMORY_LIMIT.saturating_sub(wasm_memory_bytes() + (256 << 20));
    let (max_new, notice) = crate::generate::max_new_tokens_within(
        vlm.config().text.max_position_embeddings,
        prompt_len,
        opts.max_new_tokens,
        crate::generate::kv_bytes_per_token(&vlm.config().text),
        2,
        memory_left,
    );
    if let Some(message) = &notice {
        emit(CompareEvent::Notice { message })?;
    }
    let gen_opts = GenerateOptions { max_new_tokens: max_new, sampling, eos_ids: vlm.eos_ids.clone() };
    let greedy = sampling == Sampling::Greedy;
    // Both answers side by side, as one batch on the CPU and on the GPU (each weight read once a
    // step for the two).
    let session = backend.batch_session(vlm, &[None, Some(&steering)], prompt_len, prompt_len + max_new, greedy)?;
    let mut generator = Generator::new(session, 2, ids, max_new, &gen_opts);
    const PANES: [&str; 2] = ["unaltered", "steered"];
    let tokenizer = &vlm.processor.tokenizer;
    yield_to_event_loop().await;
    let mut stopped = stop.get();
    if !stopped {
        generator.prefill(&prepared.embeds).await?;
        for (index, pane) in PANES.iter().enumerate() {
            let seconds = generator.result(index, tokenizer)?.prefill_seconds;
            emit(CompareEvent::Prefill { pane, prompt_tokens: prompt_len, seconds })?;
        }
    }
    // A token for each pane per step, yielding between steps so `stop` can arrive.
    while !stopped && !generator.is_finished() {
        let events = generator.step(tokenizer).await?;
        for (index, event) in events.iter().enumerate() {
            let Some(step) = event else { continue };
            let pane = PANES[index];
            if !emit(CompareEvent::Token { pane, index: step.index, id: step.id, text: &step.text })? {
                stopped = true;
            }
            if generator.answer_finished(index) {
                emit(CompareEvent::Done { pane, result: &generator.result(index, tokenizer)?.into() })?;
            }
        }
        yield_to_event_loop().await;
        stopped |= stop.get();
    }
    let going: Vec<bool> = (0..PANES.len()).map(|index| !generator.answer_finished(index)).collect();
    generator.cancel();
    for (index, pane) in PANES.iter().enumerate().filter(|(index, _)| going[*index]) {
        emit(CompareEvent::Done { pane, result: &generator.result(index, tokenizer)?.into() })?;
    }
    let (unaltered, steered) = (generator.result(0, tokenizer)?, generator.result(1, tokenizer)?);

    let gap = if opts.gap && image.is_some() && !stopped {
        yield_to_event_loop().await;
        let text_only = backend
            .layer_outputs_async(vlm, &backend.prepare_text_only_async(vlm, &prepared.prompt).await?, None)
            .await?;
        let before = backend.layer_outputs_async(vlm, &prepared, None).await?;
        let after = backend.layer_outputs_async(vlm, &prepared, Some(&steering)).await?;
        let gap = Gap {
            before: before.iter().zip(&text_only).map(|(m, t)| norm_of_difference(m, t)).collect(),
            after: after.iter().zip(&text_only).map(|(m, t)| norm_of_difference(m, t)).collect(),
        };
        emit(CompareEvent::Gap { gap: &gap })?;
        Some(gap)
    } else {
        None
    };
    Ok(CompareResult {
        prompt: prepared.prompt.clone(),
        unaltered: unaltered.into(),
        steered: steered.into(),
        vectors: info,
        layers,
        alpha,
        gap,
        notice,
    })
}
