//! Sampling, stopping and streaming: prefill once, then one token per step through the KV cache.

use anyhow::{Context, Result};
use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};
use serde::Serialize;

use crate::llava::LlavaModel;
use crate::steering::Intervention;
use crate::text::{argmax, ForwardOptions};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Argmax, first index on ties (as torch).
    Greedy,
    /// Temperature then nucleus (top-p) sampling from a seeded generator.
    TopP { temperature: f64, top_p: f64, seed: u64 },
}

impl Sampling {
    pub fn sampler(&self) -> Option<LogitsProcessor> {
        match *self {
            Self::Greedy => None,
            Self::TopP { temperature, top_p, seed } => Some(LogitsProcessor::from_sampling(
                seed,
                if top_p < 1.0 {
                    CandleSampling::TopP { p: top_p, temperature }
                } else {
                    CandleSampling::All { temperature }
                },
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Ids that end generation (included in the output, as HF does).
    pub eos_ids: Vec<u32>,
}

/// One streamed token.
#[derive(Debug, Clone, Serialize)]
pub struct TokenEvent {
    pub index: usize,
    pub id: u32,
    /// New text since the previous event (empty while a multi-byte character is incomplete).
    pub text: String,
}

/// Result of one generation, with the timing fields of the CLI's `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub input_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stopped_on_eos: bool,
    /// Stopped by the caller's callback.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cancelled: bool,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// Incremental detokenisation: decodes the whole answer each step and emits the new suffix.
/// A trailing U+FFFD is held back for up to 3 tokens (a UTF-8 character split over byte tokens);
/// after that it is real output (random-weight models produce lone bytes) and is emitted.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
    held: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a token; returns the text to append (possibly empty).
    pub fn push(&mut self, tokenizer: &tokenizers::Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.text(tokenizer)?;
        let incomplete = text.ends_with('\u{FFFD}') && self.held < 3;
        if incomplete || text.len() < self.emitted || !text.is_char_boundary(self.emitted) {
            self.held += 1;
            return Ok(String::new());
        }
        self.held = 0;
        let delta = text[self.emitted..].to_owned();
        self.emitted = text.len();
        Ok(delta)
    }

    /// The whole answer so far.
    pub fn text(&self, tokenizer: &tokenizers::Tokenizer) -> Result<String> {
        tokenizer.decode(&self.ids, true).map_err(|e| anyhow::anyhow!("detokenizing failed: {e}"))
    }

    /// The token ids so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// Seconds since an arbitrary origin (`Instant` is not available on wasm32-unknown-unknown).
pub fn now_seconds() -> f64 {
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now() / 1000.0
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
    }
}

/// What picks the next token: the logits, or a token a backend already chose (greedy on the GPU).
pub enum Next {
    Logits(Tensor),
    Token(u32),
}

/// A boxed future of one decoder pass.
pub type StepFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Next>> + 'a>>;

/// One sequence being decoded by some backend: candle on the CPU ([`CpuSession`], whose futures
/// are ready at once) or the wgpu engine (`gpu::GpuSession`, which awaits the GPU).
pub trait DecodeSession {
    /// Run the prompt `embeds` `[1, T, H]`.
    fn prefill<'a>(&'a mut self, embeds: &'a Tensor) -> StepFuture<'a>;
    /// Append one generated token.
    fn step(&mut self, id: u32) -> StepFuture<'_>;
}

/// The CPU decoder over a KV cache.
pub struct CpuSession<'a> {
    pub model: &'a LlavaModel,
    pub cache: crate::text::Cache,
    pub opts: ForwardOptions<'a>,
}

impl DecodeSession for CpuSession<'_> {
    fn prefill<'a>(&'a mut self, embeds: &'a Tensor) -> StepFuture<'a> {
        let out = self.model.forward(embeds, &mut self.cache, self.opts).context("prefill failed");
        Box::pin(std::future::ready(out.and_then(|o| Ok(Next::Logits(o.logits.context("no logits")?)))))
    }

    fn step(&mut self, id: u32) -> StepFuture<'_> {
        let out = self
            .model
            .text
            .embed(&[id])
            .and_then(|embed| self.model.forward(&embed, &mut self.cache, self.opts))
            .map_err(anyhow::Error::from)
            .and_then(|o| Ok(Next::Logits(o.logits.context("no logits")?)));
        Box::pin(std::future::ready(out))
    }
}

/// Drive a future that never waits (the CPU path) to completion without an executor.
pub fn complete_now<T>(future: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => anyhow::bail!("a CPU decode step was not ready (internal error)"),
    }
}

/// New tokens that fit the context after a prompt of `prompt_len` tokens.
pub fn max_new_tokens(context: usize, prompt_len: usize, requested: usize) -> usize {
    requested.min(context.saturating_sub(prompt_len))
}

/// Generate after a prompt whose embeddings are `embeds` `[1, T, H]` (ids `input_ids`).
/// `on_token` is called for every token; returning `false` stops (the result is kept).
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &LlavaModel,
    tokenizer: &tokenizers::Tokenizer,
    input_ids: &[u32],
    embeds: &Tensor,
    steering: Option<&Intervention>,
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&TokenEvent) -> bool,
) -> Result<Generation> {
    let prompt_len = input_ids.len();
    let max_new = max_new_tokens(model.config.text.max_position_embeddings, prompt_len, opts.max_new_tokens);
    let mut session = CpuSession {
        model,
        cache: model.text.new_cache(prompt_len + max_new),
        opts: ForwardOptions { steering, prompt_len, capture_layers: false, logits: true },
    };
    complete_now(generate_on(&mut session, tokenizer, input_ids, embeds, max_new, opts, on_token))
}

/// The generation loop over any [`DecodeSession`]: prefill, then up to `max_new` tokens.
pub async fn generate_on(
    session: &mut dyn DecodeSession,
    tokenizer: &tokenizers::Tokenizer,
    input_ids: &[u32],
    embeds: &Tensor,
    max_new: usize,
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&TokenEvent) -> bool,
) -> Result<Generation> {
    let prompt_len = input_ids.len();
    let mut sampler = opts.sampling.sampler();
    let mut pick = |next: Next| -> Result<u32> {
        Ok(match (next, sampler.as_mut()) {
            (Next::Token(id), _) => id,
            (Next::Logits(logits), None) => argmax(&logits.to_vec1::<f32>()?),
            (Next::Logits(logits), Some(s)) => s.sample(&logits)?,
        })
    };

    let t0 = now_seconds();
    let mut next = session.prefill(embeds).await?;
    let prefill_seconds = now_seconds() - t0;

    let mut stream = TextStream::new();
    let mut generated_ids = Vec::new();
    let (mut stopped_on_eos, mut cancelled) = (false, false);
    let t1 = now_seconds();
    for index in 0..max_new {
        let id = pick(next)?;
        generated_ids.push(id);
        let text = stream.push(tokenizer, id)?;
        let keep_going = on_token(&TokenEvent { index, id, text });
        if opts.eos_ids.contains(&id) {
            stopped_on_eos = true;
            break;
        }
        if !keep_going {
            cancelled = true;
            break;
        }
        if index + 1 == max_new {
            break;
        }
        next = session.step(id).await?;
    }
    let decode_seconds = now_seconds() - t1;
    // The first token comes from the prefill; decode steps are the ones after it.
    let decode_steps = generated_ids.len().saturating_sub(1);
    Ok(Generation {
        input_ids: input_ids.to_vec(),
        text: stream.text(tokenizer)?,
        generated_ids,
        stopped_on_eos,
        cancelled,
        prefill_seconds,
        decode_seconds,
        prefill_tokens_per_s: rate(prompt_len, prefill_seconds),
        decode_tokens_per_s: rate(decode_steps, decode_seconds),
    })
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}
