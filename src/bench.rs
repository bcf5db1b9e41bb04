//! Benchmarks on real-size configs with random weights (no download): image encode, prefill and
//! decode throughput, the cost of steering, peak memory. Figures only — never assertions.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;

use crate::config::LlavaConfig;
use crate::generate::{now_seconds, run_ready, BatchSession, CpuSession, Next};
use crate::models::llava::LlavaModel;
use crate::quant::WeightFormat;
use crate::steering::{Intervention, Positions, SteeringVectors};
use crate::text::{argmax, ForwardOptions};
use crate::weights::RandomWeights;

/// `config.json` of `llava-hf/llava-interleave-qwen-0.5b-hf` (SigLIP-so400m/14-384 + Qwen1.5-0.5B),
/// with the vocabulary of the issue's benchmark spec (151936).
pub const LLAVA_INTERLEAVE_QWEN_05B: &str = r#"{
  "architectures": ["LlavaForConditionalGeneration"],
  "model_type": "llava",
  "image_token_index": 151646,
  "projector_hidden_act": "gelu",
  "vision_feature_layer": -1,
  "vision_feature_select_strategy": "full",
  "tie_word_embeddings": true,
  "text_config": {
    "model_type": "qwen2",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": true,
    "vocab_size": 151936,
    "bos_token_id": 151643,
    "eos_token_id": 151645
  },
  "vision_config": {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6
  }
}"#;

/// `llava-hf/llava-1.5-7b-hf`'s config.json as the Hub holds it (transformers' defaults fill
/// the rest: CLIP ViT-L/14-336, Vicuna-7B).
const LLAVA_15_7B: &str = include_str!("../tests/fixtures/configs/llava-1.5-7b-hf.json");

/// Names accepted by `--preset`.
pub const PRESETS: &[&str] = &["llava-interleave-qwen-0.5b", "llava-1.5-7b"];

pub fn preset_config(name: &str) -> Result<LlavaConfig> {
    match name {
        "llava-interleave-qwen-0.5b" => LlavaConfig::from_json_str(LLAVA_INTERLEAVE_QWEN_05B),
        "llava-1.5-7b" => LlavaConfig::from_json_str(LLAVA_15_7B),
        other => bail!("unknown preset '{other}' (known: {})", PRESETS.join(", ")),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub preset: String,
    pub weights: String,
    /// Bytes of decoder weights held in memory (embedding, linears, lm_head).
    pub weight_bytes_in_memory: usize,
    pub threads: usize,
    pub parameters: usize,
    pub load_s: f64,
    pub image_encode_s: f64,
    pub image_tokens: usize,
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub prefill_tokens_per_s: f64,
    pub new_tokens: usize,
    pub decode_tokens_per_s: f64,
    pub steered_decode_tokens_per_s: f64,
    /// Steered decode time ÷ unsteered decode time (1.0 = free).
    pub steered_decode_ratio: f64,
    pub steered_layers: usize,
    /// Compare's decode: the unaltered and the steered answer as one batch of two, tokens per
    /// second over both answers.
    pub pair_decode_tokens_per_s: f64,
    /// `pair_decode_tokens_per_s` ÷ `decode_tokens_per_s` (2.0 = the second answer is free;
    /// 1.0 = no better than one after the other).
    pub pair_throughput_ratio: f64,
    /// Bytes of decoder weights read per decode step, for the bandwidth bound.
    pub weight_bytes_per_token: usize,
    /// Host memory read bandwidth measured in this run (GB/s; all threads summing 256 MiB).
    pub read_bandwidth_gb_s: f64,
    /// Decode's weight reads per second ÷ that bandwidth (1.0 = at the memory bound).
    pub decode_bandwidth_fraction: f64,
    /// CMRM dataset-level extraction: calibration pairs per second (one multimodal and one
    /// text-only prefill per pair; the anchor image is encoded once per run).
    pub extract_pairs_per_s: f64,
    /// Sample-level CMRM's extra work before answering: anchor encode + two prefills.
    pub sample_level_extra_s: f64,
    /// (plain generation + sample-level extra) ÷ plain generation, for `new_tokens` tokens.
    pub sample_level_ratio: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// Host memory read bandwidth (GB/s): summing a 256 MiB buffer (natively on every thread, in
/// pieces), best of 3 — the bound that decode, which reads every weight once a step, can reach.
pub fn measure_read_bandwidth() -> f64 {
    let data: Vec<f32> = (0..64 << 20).map(|i| (i % 7) as f32).collect();
    let sum = |piece: &[f32]| -> f32 {
        let mut acc = [0f32; 16];
        for block in piece.chunks_exact(16) {
            for (a, x) in acc.iter_mut().zip(block) {
                *a += x;
            }
        }
        acc.iter().sum()
    };
    let mut best = 0f64;
    for _ in 0..3 {
        let t0 = now_seconds();
        #[cfg(not(target_arch = "wasm32"))]
        let total: f32 = {
            use rayon::prelude::*;
            data.par_chunks(1 << 20).map(sum).sum()
        };
        #[cfg(target_arch = "wasm32")]
        let total = sum(&data);
        std::hint::black_box(total);
        best = best.max((data.len() * 4) as f64 / (now_seconds() - t0) / 1e9);
    }
    best
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Parameters of the decoder: blocks, final norm and the embedding table.
fn decoder_parameters(cfg: &LlavaConfig) -> usize {
    let t = &cfg.text;
    let (h, d) = (t.hidden_size, t.head_dim);
    let attn = h * t.num_attention_heads * d * 2 + h * t.num_key_value_heads * d * 2;
    let mlp = 3 * h * t.intermediate_size;
    let per_layer = attn + mlp + 2 * h;
    per_layer * t.num_hidden_layers + h + t.vocab_size * h
}

/// Run the benchmark: random weights, one random image, `prompt_text_tokens` text tokens plus the
/// image tokens, `new_tokens` greedy steps unsteered and again steered at every layer (best of 3).
pub fn run(
    preset: &str,
    format: WeightFormat,
    prompt_text_tokens: usize,
    new_tokens: usize,
    seed: u64,
    log: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    let cfg = preset_config(preset)?;
    let device = Device::Cpu;
    let t0 = now_seconds();
    log(&format!("building {preset} with random weights…"));
    let vb = VarBuilder::from_backend(Box::new(RandomWeights { seed }), DType::F32, device.clone());
    let model = LlavaModel::new(&cfg, format, vb).context("building the model")?;
    let load_s = now_seconds() - t0;
    let parameters = count_parameters(&cfg);

    let s = cfg.vision.image_size;
    let pixel_values = Tensor::rand(-1f32, 1f32, (1, 3, s, s), &device)?;
    log("encoding the image…");
    let t1 = now_seconds();
    let image_features = model.encode_image(&pixel_values, None)?;
    let image_encode_s = now_seconds() - t1;
    let image_tokens = image_features.dim(0)?;

    // Synthetic prompt: a few text tokens, the image, the rest of the text.
    let head = prompt_text_tokens.min(4);
    let mut ids: Vec<u32> = (0..head as u32).map(|i| 1000 + i).collect();
    let span = (ids.len(), ids.len() + image_tokens);
    ids.extend(std::iter::repeat_n(cfg.image_token_id, image_tokens));
    ids.extend((head..prompt_text_tokens).map(|i| 2000 + i as u32));
    let embeds = model.embed(&ids, &[(&image_features, span)])?;

    let mut vectors = std::collections::BTreeMap::new();
    for l in 0..cfg.text.num_hidden_layers {
        let v: Vec<f32> = (0..cfg.text.hidden_size).map(|i| ((i * 7 + l) % 13) as f32 * 0.01).collect();
        vectors.insert(l, v);
    }
    let vectors = SteeringVectors::new(cfg.text.hidden_size, vectors)?;
    let steering = Intervention::cmrm(&vectors, 1.0, None, Positions::All, &device)?;

    // Unsteered and steered runs alternate, best of `REPEATS` each: the ratio is then not skewed
    // by whatever else the machine does during one of them.
    const REPEATS: usize = 3;
    let (mut prefill_s, mut decode_s, mut steered_decode_s) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let mut pair_decode_s = f64::INFINITY;
    for rep in 0..REPEATS {
        log(&format!("prefill + decode: unsteered, steered at every layer, both as a pair ({}/{REPEATS})…", rep + 1));
        let (p, d) = timed_generation(&model, &embeds, ids.len(), new_tokens, &[None])?;
        let (_, sd) = timed_generation(&model, &embeds, ids.len(), new_tokens, &[Some(&steering)])?;
        let (_, pd) = timed_generation(&model, &embeds, ids.len(), new_tokens, &[None, Some(&steering)])?;
        prefill_s = prefill_s.min(p);
        decode_s = decode_s.min(d);
        steered_decode_s = steered_decode_s.min(sd);
        pair_decode_s = pair_decode_s.min(pd);
    }
    // CMRM extraction / sample-level: last-token block outputs of the multimodal and the
    // text-only prompt (no logits), the path `cmrm::shift_for_prompt` takes.
    log("CMRM: multimodal and text-only prefills…");
    let text_ids: Vec<u32> = ids.iter().copied().filter(|&id| id != cfg.image_token_id).collect();
    let text_embeds = model.embed(&text_ids, &[])?;
    let capture = |embeds: &Tensor, len: usize| -> Result<f64> {
        let mut cache = model.text.new_cache(len);
        let t = now_seconds();
        let out = model.forward(
            embeds,
            &mut cache,
            ForwardOptions { steering: None, prompt_len: len, capture_layers: true, logits: false },
        )?;
        out.layer_outputs.context("no layer outputs")?;
        Ok(now_seconds() - t)
    };
    let pair_s = capture(&embeds, ids.len())? + capture(&text_embeds, text_ids.len())?;
    let sample_level_extra_s = image_encode_s + pair_s;
    let plain_s = image_encode_s + prefill_s + decode_s;

    let steps = new_tokens.saturating_sub(1).max(1) as f64;
    log("measuring the memory read bandwidth…");
    let read_bandwidth_gb_s = measure_read_bandwidth();
    let weight_bytes_per_token = model.text.bytes_read_per_token();
    Ok(BenchReport {
        preset: preset.to_owned(),
        weights: format!("random {}", format.name()),
        weight_bytes_in_memory: model.text.weight_bytes(),
        threads: candle_core::utils::get_num_threads(),
        parameters,
        load_s,
        image_encode_s,
        image_tokens,
        prompt_tokens: ids.len(),
        prefill_s,
        prefill_tokens_per_s: ids.len() as f64 / prefill_s,
        new_tokens,
        decode_tokens_per_s: steps / decode_s,
        steered_decode_tokens_per_s: steps / steered_decode_s,
        steered_decode_ratio: steered_decode_s / decode_s,
        steered_layers: cfg.text.num_hidden_layers,
        pair_decode_tokens_per_s: 2.0 * steps / pair_decode_s,
        pair_throughput_ratio: 2.0 * decode_s / pair_decode_s,
        weight_bytes_per_token,
        read_bandwidth_gb_s,
        decode_bandwidth_fraction: weight_bytes_per_token as f64 * steps / decode_s / (read_bandwidth_gb_s * 1e9),
        extract_pairs_per_s: 1.0 / pair_s,
        sample_level_extra_s,
        sample_level_ratio: (plain_s + sample_level_extra_s) / plain_s,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// `(prefill seconds, seconds for new_tokens − 1 decode steps)` of one answer per entry of
/// `steering`, decoded as one batch (greedy, never stopping early).
fn timed_generation(
    model: &LlavaModel,
    embeds: &Tensor,
    prompt_len: usize,
    new_tokens: usize,
    steering: &[Option<&Intervention>],
) -> Result<(f64, f64)> {
    let mut session = CpuSession::batch(model, steering.to_vec(), prompt_len, prompt_len + new_tokens);
    let next_ids = |nexts: Vec<Option<Next>>| -> Result<Vec<Option<u32>>> {
        nexts
            .into_iter()
            .map(|n| match n {
                Some(Next::Logits(l)) => Ok(Some(argmax(&l.to_vec1::<f32>()?))),
                Some(Next::Token(id)) => Ok(Some(id)),
                None => bail!("a sequence ended"),
            })
            .collect()
    };
    let t0 = now_seconds();
    let mut ids = next_ids(run_ready(session.prefill_all(embeds))?)?;
    let prefill_s = now_seconds() - t0;
    let t1 = now_seconds();
    for _ in 1..new_tokens.max(2) {
        ids = next_ids(run_ready(session.step_all(&ids))?)?;
    }
    Ok((prefill_s, now_seconds() - t1))
}

/// Parameter count of a config (vision + projector + decoder; tied lm_head counted once).
pub fn count_parameters(cfg: &LlavaConfig) -> usize {
    let v = &cfg.vision;
    let vh = v.hidden_size;
    let vision_layer = 4 * (vh * vh + vh) + 2 * vh * v.intermediate_size + v.intermediate_size + vh + 4 * vh;
    let vision =
        3 * v.patch_size * v.patch_size * vh + vh + v.num_positions() * vh + v.num_hidden_layers * vision_layer;
    let h = cfg.text.hidden_size;
    let projector = cfg.projector_in_dim() * h + h * h + 2 * h;
    let lm_head = if cfg.text.tie_word_embeddings { 0 } else { cfg.text.vocab_size * h };
    vision + projector + decoder_parameters(cfg) + lm_head
}
