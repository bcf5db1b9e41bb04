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

/// Seconds since an arbitrary origin (`Instant` is not available on wasm32-unknown-unknown: there
/// `performance.now()`, sub-millisecond in windows and workers; `Date.now()` where it is missing).
pub fn now_seconds() -> f64 {
    #[cfg(target_arch = "wasm32")]
    {
        use wasm_bindgen::JsCast;
        let global = js_sys::global();
        let performance = js_sys::Reflect::get(&global, &"performance".into()).ok().filter(|p| p.is_object());
        let now = performance.as_ref().and_then(|p| js_sys::Reflect::get(p, &"now".into()).ok());
        match (performance, now.and_then(|f| f.dyn_into::<js_sys::Function>().ok())) {
            (Some(p), Some(f)) => f.call0(&p).ok().and_then(|v| v.as_f64()).unwrap_or_else(js_sys::Date::now) / 1000.0,
            _ => js_sys::Date::now() / 1000.0,
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
    }
}

/// The result of a future that never waits — the CPU backend's (candle computes in place): polled
/// once. The sync entry points run the backend-generic async code this way on the CPU.
pub fn run_ready<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(result) => result,
        std::task::Poll::Pending => anyhow::bail!("a computation waited for a device on the CPU path"),
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

impl<'a> CpuSession<'a> {
    /// A sequence of up to `capacity` positions after a `prompt_len`-token prompt, steered by
    /// `steering`; every pass returns the last position's logits.
    pub fn new(model: &'a LlavaModel, steering: Option<&'a Intervention>, prompt_len: usize, capacity: usize) -> Self {
        let opts = ForwardOptions { steering, prompt_len, capture_layers: false, logits: true };
        Self { model, cache: model.text.new_cache(capacity), opts }
    }
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

/// Bytes of KV cache one position takes: K and V, every layer, F32.
pub fn kv_bytes_per_token(cfg: &crate::config::TextConfig) -> u64 {
    2 * (cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim) as u64 * 4
}

/// [`max_new_tokens`] for `sequences` answers whose KV caches (`per_token` bytes a position)
/// must fit `memory_left` bytes: the tokens, and a message when memory lowered them.
pub fn max_new_tokens_within(
    context: usize,
    prompt_len: usize,
    requested: usize,
    per_token: u64,
    sequences: u64,
    memory_left: u64,
) -> (usize, Option<String>) {
    let by_context = max_new_tokens(context, prompt_len, requested);
    let positions = memory_left / per_token.max(1) / sequences.max(1);
    let by_memory = positions.saturating_sub(prompt_len as u64).min(usize::MAX as u64) as usize;
    if by_memory >= by_context {
        return (by_context, None);
    }
    let message = format!(
        "max new tokens lowered from {by_context} to {by_memory}: the KV cache of {sequences} answer(s) takes {} kB a \
         token and {:.0} MB of memory is left",
        per_token / 1000,
        memory_left as f64 / 1e6
    );
    (by_memory, Some(message))
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
    let mut session = CpuSession::new(model, steering, prompt_len, prompt_len + max_new);
    complete_now(generate_on(&mut session, tokenizer, input_ids, embeds, max_new, opts, on_token))
}

impl<T: DecodeSession + ?Sized> DecodeSession for Box<T> {
    fn prefill<'a>(&'a mut self, embeds: &'a Tensor) -> StepFuture<'a> {
        (**self).prefill(embeds)
    }
    fn step(&mut self, id: u32) -> StepFuture<'_> {
        (**self).step(id)
    }
}

impl<T: DecodeSession + ?Sized> DecodeSession for &mut T {
    fn prefill<'a>(&'a mut self, embeds: &'a Tensor) -> StepFuture<'a> {
        (**self).prefill(embeds)
    }
    fn step(&mut self, id: u32) -> StepFuture<'_> {
        (**self).step(id)
    }
}

/// One answer, a token at a time, over any [`DecodeSession`]: prefill, then pick a token (greedy
/// or sampled; or the one a GPU already picked), stop on EOS or length, else run it through the
/// decoder. The CLI drives it to the end ([`generate_on`]); the browser interleaves two of them
/// and returns to the event loop between tokens (to stream, and to see Stop).
pub struct Generator<S> {
    session: S,
    sampler: Option<LogitsProcessor>,
    eos_ids: Vec<u32>,
    input_ids: Vec<u32>,
    max_new: usize,
    /// What picks the next token; `None` before the prefill and once finished.
    next: Option<Next>,
    /// The last token, not yet run through the decoder (that happens at the next step, so
    /// stopping after a token costs no decoder pass).
    pending: Option<u32>,
    stream: TextStream,
    finished: bool,
    stopped_on_eos: bool,
    cancelled: bool,
    prefill_seconds: f64,
    decode_seconds: f64,
}

impl<S: DecodeSession> Generator<S> {
    /// `max_new`: already clipped to the context ([`max_new_tokens`]).
    pub fn new(session: S, input_ids: &[u32], max_new: usize, opts: &GenerateOptions) -> Self {
        Self {
            session,
            sampler: opts.sampling.sampler(),
            eos_ids: opts.eos_ids.clone(),
            input_ids: input_ids.to_vec(),
            max_new,
            next: None,
            pending: None,
            stream: TextStream::new(),
            finished: max_new == 0,
            stopped_on_eos: false,
            cancelled: false,
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
        }
    }

    /// Run the prompt `embeds` `[1, T, H]` (the expensive part before the first token).
    pub async fn prefill(&mut self, embeds: &Tensor) -> Result<()> {
        let t0 = now_seconds();
        self.next = Some(self.session.prefill(embeds).await?);
        self.prefill_seconds = now_seconds() - t0;
        Ok(())
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The next token, run through the decoder unless it ends the answer; `None` once finished.
    pub async fn step(&mut self, tokenizer: &tokenizers::Tokenizer) -> Result<Option<TokenEvent>> {
        if self.finished {
            return Ok(None);
        }
        let t0 = now_seconds();
        if let Some(previous) = self.pending.take() {
            self.next = Some(self.session.step(previous).await?);
        }
        let id = match (self.next.take().context("a decode step before the prefill")?, self.sampler.as_mut()) {
            (Next::Token(id), _) => id,
            (Next::Logits(logits), None) => argmax(&logits.to_vec1::<f32>()?),
            (Next::Logits(logits), Some(s)) => s.sample(&logits)?,
        };
        let index = self.stream.ids().len();
        let text = self.stream.push(tokenizer, id)?;
        if self.eos_ids.contains(&id) {
            self.stopped_on_eos = true;
            self.finished = true;
        } else if index + 1 == self.max_new {
            self.finished = true;
        } else {
            self.pending = Some(id);
        }
        self.decode_seconds += now_seconds() - t0;
        Ok(Some(TokenEvent { index, id, text }))
    }

    /// Stop early; the tokens so far are kept.
    pub fn cancel(&mut self) {
        if !self.finished {
            self.finished = true;
            self.cancelled = true;
            self.next = None;
            self.pending = None;
        }
    }

    /// The answer so far, with timings.
    pub fn result(&self, tokenizer: &tokenizers::Tokenizer) -> Result<Generation> {
        // The first token comes from the prefill; decode steps are the ones after it.
        let decode_steps = self.stream.ids().len().saturating_sub(1);
        Ok(Generation {
            input_ids: self.input_ids.clone(),
            generated_ids: self.stream.ids().to_vec(),
            text: self.stream.text(tokenizer)?,
            stopped_on_eos: self.stopped_on_eos,
            cancelled: self.cancelled,
            prefill_seconds: self.prefill_seconds,
            decode_seconds: self.decode_seconds,
            prefill_tokens_per_s: rate(self.input_ids.len(), self.prefill_seconds),
            decode_tokens_per_s: rate(decode_steps, self.decode_seconds),
        })
    }
}

/// A [`Generator`] run to the end. `on_token` is called for every token; returning `false`
/// stops (the result is kept).
pub async fn generate_on(
    session: &mut dyn DecodeSession,
    tokenizer: &tokenizers::Tokenizer,
    input_ids: &[u32],
    embeds: &Tensor,
    max_new: usize,
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&TokenEvent) -> bool,
) -> Result<Generation> {
    let mut generator = Generator::new(session, input_ids, max_new, opts);
    generator.prefill(embeds).await?;
    while let Some(event) = generator.step(tokenizer).await? {
        if !on_token(&event) {
            generator.cancel();
        }
    }
    generator.result(tokenizer)
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}
