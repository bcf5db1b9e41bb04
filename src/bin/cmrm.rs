//! `cmrm` — the native CLI: generate, probe, extract, vectors, eval, bench, quantize, inspect,
//! synthesize.
//! With `--json`, every subcommand prints exactly one JSON object on stdout; progress and logs go
//! to stderr (docs/contracts.md).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use cmrm::cmrm::{Anchor, Method};
use cmrm::generate::{Generation, Sampling};
use cmrm::pipeline::StageTime;
use cmrm::steering::{parse_layers, Intervention, Positions, SteeringRequest, SteeringVectors};
use cmrm::{decode_image, PromptText, Vlm};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "cmrm", version, about = "LLaVA-style VLM with CMRM steering (arXiv 2410.09047)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an answer (optionally steered, or unaltered and steered side by side).
    Generate(GenerateArgs),
    /// Hidden states, block outputs and logits at the last prompt token.
    Probe(ProbeArgs),
    /// Dataset-level CMRM vectors over a calibration set.
    Extract(ExtractArgs),
    /// Inspect or convert vector files.
    #[command(subcommand)]
    Vectors(VectorsCommand),
    /// Answer every case unaltered and steered; refusal rate, answer length, representation gap.
    Eval(EvalArgs),
    /// Benchmark a real-size config with random weights.
    Bench(BenchArgs),
    /// Write a smaller copy of a checkpoint: weights as one quantized GGUF (q8_0 or q4), the other
    /// files copied; `--model` and the page load the copy like the original.
    Quantize(QuantizeArgs),
    /// What a model is, from its small files and weight headers only (nothing large is
    /// downloaded): resolved config with defaults marked, rendered prompt, input_ids, image
    /// tokens, EOS ids, weight files, parameters, memory per weight format.
    Inspect(InspectArgs),
    /// Write a random-weight checkpoint from a model's small files, for tests and benchmarks on
    /// real shapes without a download: the files copied (a `.gz` decompressed) and deterministic
    /// BF16 weights (cmrm::synthetic; tests/fixtures/synthetic_weights.py makes the same values).
    Synthesize(SynthesizeArgs),
}

#[derive(Args)]
struct SynthesizeArgs {
    /// Folder with config.json, tokenizer.json and the processor files (no weights needed).
    #[arg(long)]
    files: PathBuf,
    /// Output folder (created).
    #[arg(long)]
    out: PathBuf,
    /// A reduced-depth copy: TEXT,VISION layers (the config is otherwise unchanged).
    #[arg(long)]
    layers: Option<String>,
    /// bf16 (model.safetensors, the default) | q8_0 | q4: the `cmrm quantize` GGUF of the same
    /// weights (model.gguf), written without the BF16 file (a 7B-shaped q4 model in 3.9 GB).
    #[arg(long, default_value = "bf16")]
    format: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// Checkpoint folder or Hub repo id owner/name[@revision].
    #[arg(long)]
    model: String,
    /// An image the prompt asks about (decoded and preprocessed; the prompt gets its placeholder).
    #[arg(long)]
    image: Option<PathBuf>,
    /// The user's question for the chat template (default: "What is in the image?").
    #[arg(long, conflicts_with = "raw_prompt")]
    prompt: Option<String>,
    /// A full prompt, used as is (may contain the image placeholder).
    #[arg(long)]
    raw_prompt: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct QuantizeArgs {
    /// Checkpoint folder or Hub repo id owner/name[@revision].
    #[arg(long)]
    model: PathBuf,
    /// q8_0 (8.5 bits per weight) or q4 (4.5).
    #[arg(long)]
    format: String,
    /// Output folder (created; must not be the input folder).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct InputArgs {
    /// Checkpoint folder (config.json, model.safetensors or shards, tokenizer.json, …) or a
    /// Hugging Face repo id owner/name[@revision].
    #[arg(long)]
    model: PathBuf,
    /// Image file (PNG, JPEG, WebP, GIF); repeat it for several images in one prompt.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// The user's question (the chat template builds the full prompt).
    #[arg(long)]
    prompt: String,
    /// The prompt is already the full prompt (may contain <image>); use it as is.
    #[arg(long)]
    raw_prompt: bool,
    /// In-memory weight format: f32 | q8_0 | q4 (quantized on load), or auto: a quantized
    /// model.gguf's own format, else f32.
    #[arg(long, default_value = "auto")]
    weights: String,
}

#[derive(Args, Clone)]
struct SteeringArgs {
    /// Steering vectors (safetensors `layer.{l}` or llama.cpp GGUF control vector).
    #[arg(long)]
    vectors: Option<PathBuf>,
    /// CMRM's α: h_l ← h_l − α·v_l. Default: the file's default_alpha, else 1.0.
    #[arg(long)]
    alpha: Option<f32>,
    /// Layers: all, 0,2,5 or 3-7. Default: the file's default_layers, else every layer in the file.
    #[arg(long)]
    layers: Option<String>,
    /// Positions steered: all | last | generated | last+generated. Default: the file's
    /// default_positions, else all.
    #[arg(long)]
    positions: Option<String>,
    /// Compute the vector for this prompt (two extra prefills) instead of reading a file.
    #[arg(long)]
    sample_level: bool,
    #[command(flatten)]
    anchor: AnchorArgs,
}

/// The meaningless image of CMRM.
#[derive(Args, Clone)]
struct AnchorArgs {
    /// Meaningless image (for --sample-level, and calibration/eval lines without an image): blank | noise.
    #[arg(long, default_value = "blank")]
    anchor: String,
    /// Seed of the noise anchor.
    #[arg(long, default_value_t = 0)]
    anchor_seed: u64,
}

impl AnchorArgs {
    fn parse(&self) -> Result<Anchor> {
        Anchor::parse(&self.anchor, self.anchor_seed)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    steering: SteeringArgs,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long, conflicts_with = "temperature")]
    greedy: bool,
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
    /// Print the unaltered and the steered answer.
    #[arg(long)]
    compare: bool,
    #[command(flatten)]
    device: BackendArgs,
    #[arg(long)]
    json: bool,
}

/// Where the model runs (`generate`, `probe`, `extract`).
#[derive(Args)]
struct BackendArgs {
    /// Backend of the vision tower, projector and decoder: auto (a hardware GPU adapter if one
    /// passes the self-test, else CPU) | webgpu (wgpu: Vulkan/Metal/DX12 natively) | cpu.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// How the GPU stores the model's matrices: auto (a quantized model's own Q8_0 / Q4 blocks,
    /// dequantized in the kernels; dense matrices f16 on a hardware GPU, f32 on a software
    /// rasterizer) | f32 | f16 (every matrix so, blocks dequantized at upload). Computed in f32.
    #[arg(long, default_value = "auto")]
    gpu_weights: String,
}

impl BackendArgs {
    /// Load `model` (as `load_model_as`) on the backend asked for: GPU-resident when it runs on
    /// the GPU (the blocks uploaded one by one, no CPU copy), with what was chosen printed on
    /// stderr unless `quiet`.
    fn load(
        &self,
        model: &Path,
        weights: &str,
        quiet: bool,
    ) -> Result<(Vlm, cmrm::backend::DecoderBackend, cmrm::backend::BackendInfo)> {
        let choice: cmrm::backend::BackendChoice = self.backend.parse()?;
        let gpu_weights: cmrm::gpu::GpuWeights = self.gpu_weights.parse()?;
        let t0 = std::time::Instant::now();
        let format = cmrm::quant::WeightChoice::parse(Some(weights))?;
        let dir = cmrm::hub::resolve_model(&model.to_string_lossy())?;
        let (vlm, backend, info) = cmrm::resident::load_dir_on(&dir, format, choice, gpu_weights)?;
        eprintln!("loaded {} in {:.2}s", dir.display(), t0.elapsed().as_secs_f64());
        if !quiet {
            eprintln!("backend: {}", serde_json::to_string(&info)?);
        }
        Ok((vlm, backend, info))
    }
}

#[derive(Args)]
struct ProbeArgs {
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    steering: SteeringArgs,
    #[command(flatten)]
    device: BackendArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExtractArgs {
    #[arg(long)]
    model: PathBuf,
    /// JSONL: {"prompt": "...", "image": "path" | "blank" | "noise"} per line.
    #[arg(long)]
    calibration: PathBuf,
    #[command(flatten)]
    anchor: AnchorArgs,
    /// mean | pca.
    #[arg(long, default_value = "mean")]
    method: String,
    /// Output file: .safetensors (cmrm format) or .gguf (llama.cpp control vector).
    #[arg(long)]
    out: PathBuf,
    /// Also print the vectors-catalog entry for the output published at this URL.
    #[arg(long)]
    catalog_entry: Option<String>,
    /// α recorded in the file as its default (what the page and `generate` use without --alpha).
    #[arg(long, default_value_t = 1.0)]
    default_alpha: f32,
    /// Layers recorded in the file as its default: all, 0,2,5 or 3-7.
    #[arg(long, default_value = "all")]
    default_layers: String,
    /// Positions recorded in the file as its default: all, last, generated or last+generated.
    #[arg(long, default_value = "all")]
    default_positions: String,
    #[command(flatten)]
    device: BackendArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum VectorsCommand {
    /// Print what a vector file holds: layers, norms, metadata.
    Info {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the vectors-catalog entry (www/vectors/catalog.json) of a published vector file.
    CatalogEntry {
        file: PathBuf,
        /// Where the file is published (absolute URL, or relative to the page).
        #[arg(long)]
        url: String,
        /// The model: owner/name[@revision] on the Hub, or bundled:NAME.
        #[arg(long)]
        model: String,
        /// Name of the calibration set the vectors were extracted from.
        #[arg(long, default_value = "unknown")]
        calibration_name: String,
    },
    /// Convert between cmrm safetensors and llama.cpp GGUF control vectors (by extension).
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// `controlvector.model_hint` for GGUF output (llama.cpp arch name, e.g. qwen2, llama).
        #[arg(long)]
        model_hint: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    /// JSONL, one case per line: {"prompt": "...", "image": "path" | "blank" | "noise" | "none",
    /// "kind": "harmful", "expect": "the expected answer"} (all but prompt optional; no image:
    /// the anchor; "none": text only). Figures are reported per kind, with and without image.
    #[arg(long)]
    cases: PathBuf,
    #[arg(long)]
    vectors: Option<PathBuf>,
    /// Per-case vectors from the anchor instead of a file.
    #[arg(long)]
    sample_level: bool,
    #[command(flatten)]
    anchor: AnchorArgs,
    /// α values, comma-separated. Default: the vector file's default_alpha, else 1.
    #[arg(long)]
    alpha: Option<String>,
    /// Default: the vector file's default_layers, else all.
    #[arg(long)]
    layers: Option<String>,
    /// Default: the vector file's default_positions, else all.
    #[arg(long)]
    positions: Option<String>,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// Folder for SVG charts (gap per layer, refusal rate vs α).
    #[arg(long)]
    plot: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Real-size config: llava-interleave-qwen-0.5b.
    #[arg(long, default_value = "llava-interleave-qwen-0.5b")]
    preset: String,
    /// Random weights (the only mode: no download needed).
    #[arg(long)]
    random_weights: bool,
    /// Text tokens in the prompt (the image adds its own tokens).
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// In-memory weight format: f32 | q8_0 | q4.
    #[arg(long, default_value = "f32")]
    weights: String,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Probe(a) => cmd_probe(a),
        Command::Extract(a) => cmd_extract(a),
        Command::Quantize(a) => cmd_quantize(a),
        Command::Vectors(VectorsCommand::Info { file, json }) => cmd_vectors_info(&file, json),
        Command::Vectors(VectorsCommand::CatalogEntry { file, url, model, calibration_name }) => {
            cmd_catalog_entry(&file, &url, &model, &calibration_name)
        }
        Command::Vectors(VectorsCommand::Convert { input, output, model_hint, json }) => {
            cmd_vectors_convert(&input, &output, model_hint.as_deref(), json)
        }
        Command::Eval(a) => cmd_eval(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Inspect(a) => cmd_inspect(a),
        Command::Synthesize(a) => cmd_synthesize(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_synthesize(a: SynthesizeArgs) -> Result<()> {
    let layers = match &a.layers {
        None => None,
        Some(spec) => {
            let (text, vision) = spec.split_once(',').context("--layers takes TEXT,VISION, e.g. 2,2")?;
            Some((
                text.trim().parse().context("--layers: text layers")?,
                vision.trim().parse().context("--layers: vision layers")?,
            ))
        }
    };
    let format = match a.format.as_str() {
        "bf16" => None,
        other => Some(other.parse::<cmrm::quant::WeightFormat>().context("--format: bf16, q8_0 or q4")?),
    };
    let t0 = std::time::Instant::now();
    let cfg = cmrm::synthetic::write_checkpoint(&a.files, &a.out, layers, format)?;
    let weights = if format.is_some() { "model.gguf" } else { "model.safetensors" };
    let bytes = std::fs::metadata(a.out.join(weights))?.len();
    let params: usize = cmrm::synthetic::tensor_specs(&cfg)?.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let seconds = t0.elapsed().as_secs_f64();
    if a.json {
        emit(&json!({"out": a.out, "weights_bytes": bytes, "n_params": params, "seconds": seconds}));
    } else {
        eprintln!("wrote {} ({params} parameters, {bytes} bytes) in {seconds:.1}s", a.out.display());
    }
    Ok(())
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let (files, weights) = cmrm::hub::inspect_sources(&a.model)?;
    let image = match &a.image {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            Some(decode_image(&bytes).with_context(|| format!("{}", path.display()))?)
        }
        None => None,
    };
    let prompt = match (a.prompt, a.raw_prompt) {
        (_, Some(raw)) => PromptText::Raw(raw),
        (Some(q), None) => PromptText::Chat(q),
        (None, None) => PromptText::Chat("What is in the image?".to_owned()),
    };
    let request = cmrm::checkpoint::InspectRequest { prompt, with_image: image.is_some(), image: image.as_ref() };
    let inspection =
        cmrm::checkpoint::inspect(&files, &weights, &request).with_context(|| format!("inspecting {}", a.model))?;
    if a.json {
        emit(&serde_json::to_value(&inspection)?);
    } else {
        print!("{}", inspection.report());
    }
    Ok(())
}

/// Print the one JSON object of `--json` (a closed pipe is not an error worth a panic).
fn emit(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
}

/// `--model`: a checkpoint folder, or a Hub repo id `owner/name[@revision]` (HF cache, `HF_HOME`,
/// `HF_HUB_OFFLINE`).
fn load_model(spec: &Path) -> Result<Vlm> {
    load_model_as(spec, "f32")
}

fn load_model_as(spec: &Path, weights: &str) -> Result<Vlm> {
    let t0 = std::time::Instant::now();
    let choice = cmrm::quant::WeightChoice::parse(Some(weights))?;
    let dir = cmrm::hub::resolve_model(&spec.to_string_lossy())?;
    let vlm = Vlm::load_dir_choice(&dir, choice)?;
    eprintln!("loaded {} in {:.2}s", dir.display(), t0.elapsed().as_secs_f64());
    Ok(vlm)
}

/// The images' stages (`vision`, `projector`): where they ran and their seconds, over all images.
type ImageStages = (StageTime, StageTime);

/// The prepared prompt, with the images' features (if images were given) encoded on `backend`,
/// and the time of the images' stages.
fn prepare(
    vlm: &Vlm,
    input: &InputArgs,
    backend: &cmrm::backend::DecoderBackend,
) -> Result<(cmrm::Prepared, PromptText, Option<ImageStages>)> {
    let mut images = Vec::with_capacity(input.image.len());
    for path in &input.image {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        images.push(decode_image(&bytes).with_context(|| format!("{}", path.display()))?);
    }
    let encoded = backend.encode_images(vlm, &images)?;
    let stages = encoded.first().map(|first| {
        let total = |stage: fn(&cmrm::pipeline::EncodedImage) -> &StageTime| StageTime {
            on: stage(first).on,
            seconds: encoded.iter().map(|e| stage(e).seconds).sum(),
        };
        (total(|e| &e.vision), total(|e| &e.projector))
    });
    let text =
        if input.raw_prompt { PromptText::Raw(input.prompt.clone()) } else { PromptText::Chat(input.prompt.clone()) };
    let features: Vec<&candle_core::Tensor> = encoded.iter().map(|e| &e.features).collect();
    Ok((backend.prepare(vlm, &text, &features)?, text, stages))
}

/// The steering asked for on the command line, with a JSON description for `--json`.
fn steering(
    vlm: &Vlm,
    args: &SteeringArgs,
    text: &PromptText,
    backend: &cmrm::backend::DecoderBackend,
) -> Result<Option<(Intervention, Value)>> {
    let request = SteeringRequest {
        alpha: args.alpha,
        layers: args.layers.clone(),
        positions: args.positions.as_deref().map(str::parse).transpose()?,
    };
    let (vectors, source, extra_s) = match (&args.vectors, args.sample_level) {
        (Some(_), true) => bail!("use either --vectors or --sample-level, not both"),
        (None, false) => {
            if args.alpha.is_some() || args.layers.is_some() || args.positions.is_some() {
                bail!("--alpha/--layers/--positions need --vectors FILE or --sample-level");
            }
            return Ok(None);
        }
        (Some(path), false) => {
            let v = read_vectors(path)?;
            v.validate_for(&path.display().to_string(), vlm.config())?;
            (v, json!({"vectors": path.display().to_string()}), 0.0)
        }
        (None, true) => {
            let anchor = args.anchor.parse()?;
            let t0 = std::time::Instant::now();
            let v = pollster::block_on(cmrm::cmrm::sample_level_vectors_on(backend, vlm, text, anchor))?;
            let s = t0.elapsed().as_secs_f64();
            (v, json!({"sample_level": true, "anchor": anchor.name()}), s)
        }
    };
    let resolved = request.resolve(&vectors, vlm.config().text.num_hidden_layers, vlm.device())?;
    let mut desc = source;
    desc["alpha"] = json!(resolved.alpha);
    desc["layers"] = json!(resolved.layers);
    desc["positions"] = json!(resolved.positions);
    if args.sample_level {
        desc["sample_level_seconds"] = json!(extra_s);
    }
    Ok(Some((resolved.intervention, desc)))
}

/// A vector file in either format, by extension.
fn read_vectors(path: &Path) -> Result<SteeringVectors> {
    SteeringVectors::load(path)
}

fn generation_json(g: &Generation) -> Value {
    json!({
        "input_ids": g.input_ids,
        "generated_ids": g.generated_ids,
        "text": g.text,
        "stopped_on_eos": g.stopped_on_eos,
        "prefill_tokens_per_s": g.prefill_tokens_per_s,
        "decode_tokens_per_s": g.decode_tokens_per_s,
    })
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let (vlm, backend, backend_info) = a.device.load(&a.input.model, &a.input.weights, a.json)?;
    let (prepared, text, image) = prepare(&vlm, &a.input, &backend)?;
    if let (Some((vision, projector)), false) = (&image, a.json) {
        eprintln!(
            "image: vision {:.3} s on {}, projector {:.3} s on {}",
            vision.seconds, vision.on, projector.seconds, projector.on
        );
    }
    let steer = steering(&vlm, &a.steering, &text, &backend)?;
    if a.compare && steer.is_none() {
        bail!("--compare needs steering: --vectors FILE or --sample-level");
    }
    let sampling = match a.temperature {
        // A temperature of 0 is greedy decoding (dividing logits by 0 would give NaNs).
        Some(t) if !a.greedy && t > 0.0 => Sampling::TopP { temperature: t, top_p: a.top_p, seed: a.seed },
        _ => Sampling::Greedy,
    };
    let opts = vlm.default_generate_options(a.max_new_tokens, sampling);
    let decoder_on = if matches!(backend, cmrm::backend::DecoderBackend::Cpu) { "cpu" } else { "webgpu" };
    let stages = |g: &Generation| -> Value {
        let mut stages = json!({
            "prefill": StageTime { on: decoder_on, seconds: g.prefill_seconds },
            "decode": StageTime { on: decoder_on, seconds: g.decode_seconds },
        });
        if let Some((vision, projector)) = &image {
            stages["vision"] = json!(vision);
            stages["projector"] = json!(projector);
        }
        stages
    };
    let generation_json = |g: &Generation| -> Value {
        let mut v = generation_json(g);
        v["stages"] = stages(g);
        v
    };
    let run = |label: &str, intervention: Option<&Intervention>| -> Result<Generation> {
        if !a.json {
            let mut out = std::io::stdout();
            let g = backend.generate(&vlm, &prepared, intervention, &opts, &mut |ev| {
                let _ = write!(out, "{}", ev.text);
                let _ = out.flush();
                true
            })?;
            println!();
            eprintln!("{label}: {}", generation_summary(&g));
            Ok(g)
        } else {
            backend.generate(&vlm, &prepared, intervention, &opts, &mut |_| true)
        }
    };
    let value = match (&steer, a.compare) {
        (Some((intervention, desc)), true) => {
            let [unaltered, steered] = compare(&backend, &vlm, &prepared, intervention, &opts, !a.json)?;
            json!({"unaltered": generation_json(&unaltered), "steered": generation_json(&steered), "steering": desc})
        }
        (Some((intervention, desc)), false) => {
            let mut v = generation_json(&run("CMRM", Some(intervention))?);
            v["steering"] = desc.clone();
            v
        }
        (None, _) => generation_json(&run("unaltered", None)?),
    };
    if a.json {
        let mut value = value;
        value["backend"] = serde_json::to_value(&backend_info)?;
        emit(&value);
    }
    Ok(())
}

/// `--compare`: the unaltered and the steered answer decoded side by side (one batch on the
/// CPU: each weight read once a step for both). When `print`, the unaltered answer streams and
/// the steered one (decoded alongside) follows it.
fn compare(
    backend: &cmrm::backend::DecoderBackend,
    vlm: &Vlm,
    prepared: &cmrm::pipeline::Prepared,
    intervention: &Intervention,
    opts: &cmrm::generate::GenerateOptions,
    print: bool,
) -> Result<[Generation; 2]> {
    let mut out = std::io::stdout();
    if print {
        println!("── unaltered ──");
    }
    let answers = pollster::block_on(backend.generate_batch_async(
        vlm,
        prepared,
        &[None, Some(intervention)],
        opts,
        &mut |answer, ev| {
            if print && answer == 0 {
                let _ = write!(out, "{}", ev.text);
                let _ = out.flush();
            }
            true
        },
    ))?;
    let [unaltered, steered]: [Generation; 2] =
        answers.try_into().map_err(|_| anyhow::anyhow!("compare returned other than two answers"))?;
    if print {
        println!("\n── CMRM ──\n{}", steered.text);
        for (label, g) in [("unaltered", &unaltered), ("CMRM", &steered)] {
            eprintln!("{label}: {}", generation_summary(g));
        }
    }
    Ok([unaltered, steered])
}

/// `N tokens, prefill … tok/s, decode … tok/s[, stopped on EOS]`.
fn generation_summary(g: &Generation) -> String {
    format!(
        "{} tokens, prefill {:.1} tok/s, decode {:.1} tok/s{}",
        g.generated_ids.len(),
        g.prefill_tokens_per_s,
        g.decode_tokens_per_s,
        if g.stopped_on_eos { ", stopped on EOS" } else { "" }
    )
}

fn cmd_probe(a: ProbeArgs) -> Result<()> {
    if !a.json {
        bail!("probe prints JSON only: add --json");
    }
    let (vlm, backend, backend_info) = a.device.load(&a.input.model, &a.input.weights, true)?;
    let (prepared, text, _) = prepare(&vlm, &a.input, &backend)?;
    let steer = steering(&vlm, &a.steering, &text, &backend)?;
    let probe = pollster::block_on(backend.probe_async(&vlm, &prepared, steer.as_ref().map(|(i, _)| i)))?;
    let mut v = serde_json::to_value(&probe)?;
    v["backend"] = serde_json::to_value(&backend_info)?;
    if let Some((_, desc)) = steer {
        v["steering"] = desc;
    }
    emit(&v);
    Ok(())
}

fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    let format: cmrm::quant::WeightFormat = a.format.parse()?;
    let dir = cmrm::hub::resolve_model(&a.model.to_string_lossy())?;
    // Parse the config first: a folder that is not a LLaVA checkpoint fails before any work.
    cmrm::LlavaConfig::from_file(&dir.join("config.json"))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    if std::fs::canonicalize(&dir)? == std::fs::canonicalize(&a.out)? {
        bail!("--out must be another folder than the model's ({})", dir.display());
    }
    let t0 = std::time::Instant::now();
    let weights = cmrm::checkpoint::load_weights(&dir)?;
    let input_bytes: u64 = cmrm::checkpoint::weight_files_in_dir(&dir)?
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    // One tensor at a time: converted tensors go to a spill file, then header + tensors.
    let target = a.out.join("model.gguf");
    let written = cmrm::atomic_file::write_with(&target, |out| {
        let mut spill = cmrm::atomic_file::TempFile::beside(&target, "tensors")?;
        cmrm::quant_export::write_quantized_gguf(&weights, format, out, &mut spill.file)
    });
    let gguf_bytes = written?;
    // Everything but the weights, as is (config, tokenizer, templates, preprocessor, …).
    let mut copied = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let is_weights = cmrm::checkpoint::is_weight_file(&name) || name == cmrm::checkpoint::WEIGHTS_INDEX;
        if path.is_file() && !is_weights {
            cmrm::atomic_file::write(&a.out.join(&name), &std::fs::read(&path)?)?;
            copied.push(name);
        }
    }
    copied.sort();
    let seconds = t0.elapsed().as_secs_f64();
    if a.json {
        emit(&json!({"out": a.out.display().to_string(), "format": format.name(), "input_weight_bytes": input_bytes,
                     "gguf_bytes": gguf_bytes, "copied": copied, "seconds": seconds}));
    } else {
        eprintln!(
            "wrote {} ({} weights: {:.1} MB from {:.1} MB) and {} other files in {seconds:.1}s",
            a.out.join("model.gguf").display(),
            format.name(),
            gguf_bytes as f64 / 1e6,
            input_bytes as f64 / 1e6,
            copied.len()
        );
    }
    Ok(())
}

fn cmd_extract(a: ExtractArgs) -> Result<()> {
    output_format(&a.out)?;
    let name = a.calibration.display().to_string();
    let text = std::fs::read_to_string(&a.calibration).with_context(|| format!("cannot read {name}"))?;
    let items = cmrm::cmrm::parse_calibration(&name, &text)?;
    let anchor = a.anchor.parse()?;
    let method = Method::parse(&a.method)?;
    let base = a.calibration.parent().map(Path::to_path_buf).unwrap_or_default();
    // Check every image exists before spending time on the model.
    for (i, item) in items.iter().enumerate() {
        if let cmrm::cmrm::CalibrationImage::Path(p) = &item.image {
            let path = base.join(p);
            if !path.is_file() {
                bail!("{name}: item {} names image {p}, which does not exist ({})", i + 1, path.display());
            }
        }
    }
    let (vlm, backend, backend_info) = a.device.load(&a.model, "f32", a.json)?;
    let load_image = |p: &str| -> Result<cmrm::RgbImage> {
        let path = base.join(p);
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        decode_image(&bytes).with_context(|| path.display().to_string())
    };
    let t0 = std::time::Instant::now();
    parse_layers(&a.default_layers, vlm.config().text.num_hidden_layers).context("--default-layers")?;
    if !a.default_alpha.is_finite() {
        bail!("--default-alpha must be a finite number");
    }
    a.default_positions.parse::<Positions>().context("--default-positions")?;
    let mut vectors =
        pollster::block_on(cmrm::cmrm::extract_on(&backend, &vlm, &items, anchor, method, &load_image, &mut |p| {
            let width = 30;
            let filled = p.done * width / p.total.max(1);
            eprint!(
                "\r[{}{}] {}/{} pairs  {:.2} pairs/s  ETA {:.0}s ",
                "#".repeat(filled),
                " ".repeat(width - filled),
                p.done,
                p.total,
                p.done as f64 / p.elapsed_s.max(1e-9),
                p.eta_s()
            );
            true
        }))?;
    eprintln!();
    let seconds = t0.elapsed().as_secs_f64();
    let set_name = a.calibration.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    cmrm::cmrm::record_calibration_set(&mut vectors, &set_name, &text);
    vectors.metadata.insert("default_alpha".into(), a.default_alpha.to_string());
    vectors.metadata.insert("default_layers".into(), a.default_layers.clone());
    vectors.metadata.insert("default_positions".into(), a.default_positions.clone());
    let dropped = write_vectors(&a.out, &vectors, None)?;
    let norms: Vec<f32> = vectors.layers.values().map(|v| v.iter().map(|x| x * x).sum::<f32>().sqrt()).collect();
    let catalog_entry = match &a.catalog_entry {
        Some(url) => {
            let spec = a.model.to_string_lossy();
            let (model, revision) = match cmrm::hub::RepoRef::parse(&spec) {
                Some(r) if !a.model.exists() => (r.repo_id, r.revision),
                _ => (format!("local:{}", spec.trim_end_matches('/')), "main".to_owned()),
            };
            let bytes = std::fs::read(&a.out)?;
            Some(cmrm::catalog::entry_for(&bytes, url, &model, &revision, &set_name)?)
        }
        None => None,
    };
    if let (Some(entry), false) = (&catalog_entry, a.json) {
        println!("{}", serde_json::to_string_pretty(entry)?);
    }
    if a.json {
        emit(&json!({"out": a.out.display().to_string(), "n_calibration": items.len(), "layers": vectors.layers.len(),
                   "norms": norms, "seconds": seconds, "pairs_per_s": items.len() as f64 / seconds,
                   "metadata": vectors.metadata, "dropped_layers": dropped,
                   "catalog_entry": catalog_entry, "backend": backend_info}));
    } else {
        eprintln!(
            "wrote {} ({} layers, {} calibration items, {:.1}s)",
            a.out.display(),
            vectors.layers.len(),
            items.len(),
            seconds
        );
    }
    Ok(())
}

/// Output format by extension: `.safetensors` or `.gguf`.
fn output_format(path: &Path) -> Result<&'static str> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok("safetensors"),
        Some("gguf") => Ok("gguf"),
        _ => bail!("{}: the output must end in .safetensors or .gguf", path.display()),
    }
}

/// Write vectors in the format of `path`'s extension (atomically). Returns layers a GGUF control
/// vector cannot hold (layer 0), which were left out.
fn write_vectors(path: &Path, vectors: &SteeringVectors, model_hint: Option<&str>) -> Result<Vec<usize>> {
    match output_format(path)? {
        "gguf" => {
            let hint = model_hint.or(vectors.metadata.get("model_hint").map(String::as_str)).unwrap_or("llava");
            let export = cmrm::steering::control_vector::export_control_vector(vectors, hint);
            if !export.dropped_layers.is_empty() {
                eprintln!(
                    "note: llama.cpp control vectors start at layer 1; left out layer(s) {:?}",
                    export.dropped_layers
                );
            }
            cmrm::atomic_file::write(path, &export.bytes)?;
            Ok(export.dropped_layers)
        }
        _ => {
            cmrm::atomic_file::write(path, &vectors.to_safetensors_bytes()?)?;
            Ok(vec![])
        }
    }
}

fn cmd_vectors_convert(input: &Path, output: &Path, model_hint: Option<&str>, as_json: bool) -> Result<()> {
    let vectors = read_vectors(input)?;
    let dropped = write_vectors(output, &vectors, model_hint)?;
    if as_json {
        emit(&json!({"input": input.display().to_string(), "output": output.display().to_string(),
                     "layers": vectors.layers.keys().filter(|l| !dropped.contains(l)).collect::<Vec<_>>(),
                     "dropped_layers": dropped}));
    } else {
        eprintln!("wrote {}", output.display());
    }
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let name = a.cases.display().to_string();
    let text = std::fs::read_to_string(&a.cases).with_context(|| format!("cannot read {name}"))?;
    let items = cmrm::cmrm::parse_calibration(&name, &text)?;
    let anchor = a.anchor.parse()?;
    let base = a.cases.parent().map(Path::to_path_buf).unwrap_or_default();
    let vlm = load_model(&a.model)?;
    let size = vlm.config().vision.image_size;
    let mut cases = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        use cmrm::cmrm::CalibrationImage as I;
        let image = match &item.image {
            I::Anchor => Some(anchor.image(size)),
            I::Blank => Some(Anchor::Blank.image(size)),
            I::Noise => Some(Anchor::Noise { seed: a.anchor.anchor_seed }.image(size)),
            I::None => None,
            I::Path(p) => {
                let path = base.join(p);
                let bytes = std::fs::read(&path)
                    .with_context(|| format!("{name}: case {} image {}: cannot read", i + 1, path.display()))?;
                Some(decode_image(&bytes).with_context(|| format!("{name}: case {} image {}", i + 1, path.display()))?)
            }
        };
        cases.push(cmrm::eval::EvalCase {
            prompt: item.prompt.clone(),
            image,
            kind: item.kind.clone(),
            expect: item.expect.clone(),
        });
    }
    let file_vectors = match (&a.vectors, a.sample_level) {
        (Some(_), true) => bail!("use either --vectors or --sample-level, not both"),
        (None, false) => bail!("eval needs --vectors FILE or --sample-level"),
        (Some(path), false) => {
            let v = read_vectors(path)?;
            v.validate_for(&path.display().to_string(), vlm.config())?;
            Some(v)
        }
        (None, true) => None,
    };
    // α, layers and positions as `generate` resolves them (the file's defaults where not given).
    let n_layers = vlm.config().text.num_hidden_layers;
    let given_alphas = a.alpha.as_deref().map(cmrm::eval::parse_alphas).transpose()?;
    let request = SteeringRequest {
        alpha: given_alphas.as_ref().and_then(|list| list.first().copied()),
        layers: a.layers.clone(),
        positions: a.positions.as_deref().map(str::parse).transpose()?,
    };
    let (resolved_alpha, layers, positions) = match &file_vectors {
        Some(v) => {
            let resolved = request.resolve(v, n_layers, vlm.device())?;
            (resolved.alpha, resolved.layers, resolved.positions)
        }
        None => (
            1.0,
            parse_layers(a.layers.as_deref().unwrap_or("all"), n_layers)?,
            request.positions.unwrap_or(Positions::All),
        ),
    };
    let alphas = given_alphas.unwrap_or_else(|| vec![resolved_alpha]);
    let source = match &file_vectors {
        Some(v) => cmrm::eval::VectorSource::Dataset(v),
        None => cmrm::eval::VectorSource::SampleLevel(anchor),
    };
    let report =
        cmrm::eval::evaluate(&vlm, &cases, source, &alphas, &layers, positions, a.max_new_tokens, &mut |i, n| {
            eprint!("\rcase {}/{n} ", i + 1)
        })?;
    eprintln!();
    let plots = match &a.plot {
        Some(dir) => cmrm::plot::write_eval_plots(&report, dir)?,
        None => vec![],
    };
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["plots"] = json!(plots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>());
        emit(&v);
    } else {
        println!("{} cases, layers {:?}, positions {:?}", report.n_cases, report.layers, report.positions);
        for m in std::iter::once(&report.unaltered).chain(&report.steered) {
            let mean_gap = m.gap_l2.iter().sum::<f64>() / m.gap_l2.len().max(1) as f64;
            let label =
                if std::ptr::eq(m, &report.unaltered) { "unaltered".to_owned() } else { format!("α = {}", m.alpha) };
            println!(
                "{label:<10} refusal rate {:>5.1}%  mean answer {:>5.1} tokens  mean gap {:.3}",
                100.0 * m.refusal_rate,
                m.mean_answer_tokens,
                mean_gap
            );
            if m.groups.len() > 1 || m.groups.iter().any(|g| g.kind != "all") {
                for g in &m.groups {
                    let accuracy = g.accuracy.map(|a| format!("  accuracy {:>5.1}%", 100.0 * a)).unwrap_or_default();
                    let image = if g.with_image { "with image" } else { "text only" };
                    println!(
                        "    {:<12} {image:<10} n {:>4}  refusal {:>5.1}%{accuracy}",
                        g.kind,
                        g.n,
                        100.0 * g.refusal_rate
                    );
                }
            }
        }
        for p in plots {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}

fn cmd_catalog_entry(file: &Path, url: &str, model: &str, calibration_name: &str) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let (model, revision) = match model.split_once('@') {
        Some((m, r)) => (m, r),
        None => (model, "main"),
    };
    let entry = cmrm::catalog::entry_for(&bytes, url, model, revision, calibration_name)?;
    emit(&serde_json::to_value(&entry)?);
    Ok(())
}

fn cmd_vectors_info(file: &Path, as_json: bool) -> Result<()> {
    let v = read_vectors(file)?;
    let norms: Vec<(usize, f32)> =
        v.layers.iter().map(|(l, x)| (*l, x.iter().map(|a| a * a).sum::<f32>().sqrt())).collect();
    if as_json {
        emit(&json!({"file": file.display().to_string(), "hidden_size": v.hidden_size,
                   "layers": norms.iter().map(|(l, n)| json!({"layer": l, "norm": n})).collect::<Vec<_>>(),
                   "metadata": v.metadata}));
    } else {
        println!("{}: {} layers, hidden size {}", file.display(), v.layers.len(), v.hidden_size);
        let mut meta: Vec<_> = v.metadata.iter().collect();
        meta.sort();
        for (k, val) in meta {
            println!("  {k}: {val}");
        }
        for (l, n) in norms {
            println!("  layer.{l:<3} ‖v‖ = {n:.4}");
        }
    }
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    if !a.random_weights {
        bail!("bench runs on random weights: add --random-weights");
    }
    let format: cmrm::quant::WeightFormat = a.weights.parse()?;
    let report =
        cmrm::bench::run(&a.preset, format, a.prompt_tokens, a.new_tokens, a.seed, &mut |msg| eprintln!("{msg}"))?;
    if a.json {
        emit(&serde_json::to_value(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
