//! Decode throughput on the CPU (candle) and the GPU engine on the same model, and the
//! memory-bandwidth bound (bytes of weights per token ÷ measured read bandwidth).
//! Not a test: numbers only (`cargo bench --bench gpu_decode`, or call [`run`] from `cmrm bench`).

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::context::GpuContext;
use super::decoder::{GpuDecoder, GpuForwardOptions, GpuInput, Readback};
use crate::config::TextConfig;
use crate::generate::now_seconds;
use crate::text::{argmax, ForwardOptions, TextModel};
use crate::weights::RandomWeights;

/// Decoder shapes for a synthetic (random-weight) benchmark model: `small` (~0.2 GB of f32
/// weights, a quick run) or a real-size preset of [`crate::bench`] (its language model).
pub fn preset(name: &str) -> Option<TextConfig> {
    match name {
        "small" => {
            let mut cfg = crate::bench::preset_config("llava-interleave-qwen-0.5b").ok()?.text;
            (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) = (32000, 512, 1536);
            (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) = (8, 8, 2, 64);
            Some(cfg)
        }
        other => crate::bench::preset_config(other).ok().map(|c| c.text),
    }
}

/// A text model with random weights of the given shapes ([`RandomWeights`]), held in `format`.
pub fn random_text_model(cfg: &TextConfig, format: crate::quant::WeightFormat) -> Result<TextModel> {
    let vb = VarBuilder::from_backend(Box::new(RandomWeights { seed: 0 }), DType::F32, Device::Cpu);
    Ok(TextModel::new(cfg, format, vb)?)
}

/// Measured figures of one benchmark run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub adapter: String,
    /// How the GPU stored the matrices (`f32`, `f16`, `q8_0`, `q4_0+q4k`, …).
    pub gpu_weights: String,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub cpu_decode_tokens_per_s: f64,
    pub gpu_decode_tokens_per_s: f64,
    /// Two sequences decoded as one batch on the GPU (Compare's pair): tokens of both per second.
    pub gpu_pair_decode_tokens_per_s: f64,
    pub gpu_prefill_tokens_per_s: f64,
    pub cpu_prefill_tokens_per_s: f64,
    pub weight_bytes_per_token: u64,
    pub measured_read_bandwidth_gb_s: f64,
    pub bandwidth_bound_tokens_per_s: f64,
    /// Greedy tokens equal on both backends.
    pub same_tokens: bool,
    /// Both sequences of the GPU pair gave the GPU's single-sequence tokens.
    pub pair_same_tokens: bool,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "adapter: {} ({} weights on the GPU)", self.adapter, self.gpu_weights)?;
        writeln!(f, "prompt {} tokens, decode {} tokens (greedy)", self.prompt_tokens, self.decode_tokens)?;
        writeln!(
            f,
            "prefill tokens/s: cpu {:.1}  webgpu {:.1}",
            self.cpu_prefill_tokens_per_s, self.gpu_prefill_tokens_per_s
        )?;
        writeln!(
            f,
            "decode tokens/s:  cpu {:.2}  webgpu {:.2}  (webgpu/cpu = {:.2})",
            self.cpu_decode_tokens_per_s,
            self.gpu_decode_tokens_per_s,
            self.gpu_decode_tokens_per_s / self.cpu_decode_tokens_per_s
        )?;
        writeln!(
            f,
            "webgpu pair decode (two sequences, one batch): {:.2} tokens/s = {:.2}x one sequence's",
            self.gpu_pair_decode_tokens_per_s,
            self.gpu_pair_decode_tokens_per_s / self.gpu_decode_tokens_per_s
        )?;
        writeln!(
            f,
            "weights read per token: {:.1} MB; measured host read bandwidth {:.1} GB/s -> bound {:.2} tokens/s",
            self.weight_bytes_per_token as f64 / 1e6,
            self.measured_read_bandwidth_gb_s,
            self.bandwidth_bound_tokens_per_s
        )?;
        write!(
            f,
            "greedy tokens identical on both backends: {}; in both sequences of the pair: {}",
            self.same_tokens, self.pair_same_tokens
        )
    }
}

/// Greedy decode of `decode_tokens` after a `prompt_tokens`-token prompt on both backends.
#[cfg(not(target_arch = "wasm32"))]
pub fn run(
    model: &TextModel,
    ctx: Arc<GpuContext>,
    prompt_tokens: usize,
    decode_tokens: usize,
    weights: super::GpuWeights,
) -> Result<BenchReport> {
    let cfg = model.config().clone();
    let ids: Vec<u32> = (0..prompt_tokens).map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32).collect();
    let embeds = model.embed(&ids)?;
    let prompt_len = ids.len();

    // CPU.
    let mut cache = model.new_cache(prompt_len + decode_tokens + 1);
    let opts = ForwardOptions { steering: None, prompt_len, capture_layers: false, logits: true };
    let t0 = now_seconds();
    let logits = model.forward(&embeds, &mut cache, opts)?.logits.expect("logits");
    let cpu_prefill = now_seconds() - t0;
    let mut next = argmax(&logits.to_vec1()?);
    let mut cpu_tokens = vec![next];
    let t1 = now_seconds();
    for _ in 0..decode_tokens {
        let e = model.embed(&[next])?;
        next = argmax(&model.forward(&e, &mut cache, opts)?.logits.expect("logits").to_vec1()?);
        cpu_tokens.push(next);
    }
    let cpu_decode = now_seconds() - t1;

    // GPU.
    let dec = pollster::block_on(GpuDecoder::new_with(ctx.clone(), model, weights))?;
    let mut cache = dec.new_cache(prompt_len + decode_tokens + 1)?;
    let gopts = GpuForwardOptions { steering: None, prompt_len, capture_layers: false, readback: Readback::Argmax };
    let data: Vec<f32> = embeds.flatten_all()?.to_vec1()?;
    // Warm-up (pipeline / driver first-use costs), not timed.
    let mut warm = dec.new_cache(prompt_len + 2)?;
    let w = dec.forward_blocking(GpuInput::Embeds(&data), &mut warm, &gopts)?.token.expect("token");
    dec.forward_blocking(GpuInput::Tokens(&[w]), &mut warm, &gopts)?;
    drop(warm);
    let t0 = now_seconds();
    let mut next = dec.forward_blocking(GpuInput::Embeds(&data), &mut cache, &gopts)?.token.expect("token");
    let gpu_prefill = now_seconds() - t0;
    let mut gpu_tokens = vec![next];
    let t1 = now_seconds();
    for _ in 0..decode_tokens {
        next = dec.forward_blocking(GpuInput::Tokens(&[next]), &mut cache, &gopts)?.token.expect("token");
        gpu_tokens.push(next);
    }
    let gpu_decode = now_seconds() - t1;

    // GPU, two sequences as one batch (the prompt's shared positions run once).
    let mut pair =
        super::session::GpuBatchSession::new(&dec, prompt_len, prompt_len + decode_tokens + 1, &[None, None], true)?;
    pollster::block_on(pair.prefill_all_async(&embeds))?;
    let mut pair_tokens = [vec![gpu_tokens[0]], vec![gpu_tokens[0]]];
    let t2 = now_seconds();
    for _ in 0..decode_tokens {
        let ids = [pair_tokens[0].last().copied(), pair_tokens[1].last().copied()];
        let next = pollster::block_on(pair.step_all_async(&ids))?;
        for (tokens, next) in pair_tokens.iter_mut().zip(next) {
            match next {
                Some(crate::generate::Next::Token(id)) => tokens.push(id),
                _ => anyhow::bail!("the pair step returned no token"),
            }
        }
    }
    let gpu_pair_decode = now_seconds() - t2;

    let bytes = dec.weight_bytes_per_token();
    let bw = crate::bench::measure_read_bandwidth();
    Ok(BenchReport {
        adapter: super::context::adapter_label(&ctx.adapter_info),
        gpu_weights: dec.weights_name(),
        prompt_tokens,
        decode_tokens,
        cpu_decode_tokens_per_s: decode_tokens as f64 / cpu_decode,
        gpu_decode_tokens_per_s: decode_tokens as f64 / gpu_decode,
        gpu_pair_decode_tokens_per_s: 2.0 * decode_tokens as f64 / gpu_pair_decode,
        gpu_prefill_tokens_per_s: prompt_len as f64 / gpu_prefill,
        cpu_prefill_tokens_per_s: prompt_len as f64 / cpu_prefill,
        weight_bytes_per_token: bytes,
        measured_read_bandwidth_gb_s: bw,
        bandwidth_bound_tokens_per_s: bw * 1e9 / bytes as f64,
        same_tokens: cpu_tokens == gpu_tokens,
        pair_same_tokens: pair_tokens.iter().all(|tokens| *tokens == gpu_tokens),
    })
}
