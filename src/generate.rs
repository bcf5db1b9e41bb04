//! Sampling, stopping and streaming: prefill once, then one token per step through the KV cache.

use anyhow::{Context, Result};
use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};
use serde::Serialize;

use crate::models::llava::LlavaModel;
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

/// A boxed future of one pass over several sequences: a [`Next`] for each one still going.
pub type BatchFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Option<Next>>>> + 'a>>;

/// Sequences that share a prompt and differ in their steering, decoded side by side: Compare's
/// unaltered and steered answers, as one batch (every weight read once a step for all of them):
/// [`CpuSession::batch`] on the CPU, `gpu::GpuBatchSession` on the GPU.
pub trait BatchSession {
    /// Run the prompt `embeds` `[1, T, H]` for every sequence.
    fn prefill_all<'a>(&'a mut self, embeds: &'a Tensor) -> BatchFuture<'a>;
    /// Append `ids[r]` to sequence `r`; `None` marks a sequence that has ended (for good: the
    /// session may drop it). A `Next` comes back for each `Some`.
    fn step_all<'a>(&'a mut self, ids: &'a [Option<u32>]) -> BatchFuture<'a>;
}

impl<T: BatchSession + ?Sized> BatchSession for Box<T> {
    fn prefill_all<'a>(&'a mut self, embeds: &'a Tensor) -> BatchFuture<'a> {
        (**self).prefill_all(embeds)
    }
    fn step_all<'a>(&'a mut self, ids: &'a [Option<u32>]) -> BatchFuture<'a> {
        (**self).step_all(ids)
    }
}

impl<T: BatchSession + ?Sized> BatchSession for &mut T {
    fn prefill_all<'a>(&'a mut self, embeds: &'a Tensor) -> BatchFuture<'a> {
        (**self).prefill_all(embeds)
    }
    fn step_all<'a>(&'a mut self, ids: &'a [Option<u32>]) -> BatchFuture<'a> {
        (**self).step_all(ids)
    }
}

/// How many of a `t`-row prompt's first positions sequences steered by `steering` share (the
/// positions before the first steered one, and never the last: each sequence needs its own
/// logits); 0 for one sequence. A batch runs them once and copies their KV cache.
pub fn shared_prompt(steering: &[Option<&Intervention>], prompt_len: usize, t: usize) -> usize {
    if steering.len() < 2 {
        return 0;
    }
    let first_steered = |s: &Option<&Intervention>| s.and_then(|s| s.first_position(prompt_len)).unwrap_or(t);
    steering.iter().map(first_steered).min().unwrap_or(t).min(t.saturating_sub(1))
}

/// The CPU decoder over a KV cache: one sequence, or a batch of sequences that differ only in
/// their steering ([`TextModel::forward_batch`](crate::text::TextModel::forward_batch)).
pub struct CpuSession<'a> {
    pub model: &'a LlavaModel,
    pub cache: crate::text::Cache,
    /// Each sequence's steering.
    steering: Vec<Option<&'a Intervention>>,
    /// The sequence each row of the cache holds (rows of ended sequences are dropped).
    live: Vec<usize>,
    prompt_len: usize,
}

impl<'a> CpuSession<'a> {
    /// A sequence of up to `capacity` positions after a `prompt_len`-token prompt, steered by
    /// `steering`; every pass returns the last position's logits.
    pub fn new(model: &'a LlavaModel, steering: Option<&'a Intervention>, prompt_len: usize, capacity: usize) -> Self {
        Self::batch(model, vec![steering], prompt_len, capacity)
    }

    /// One sequence per entry of `steering`, decoded as one batch.
    pub fn batch(
        model: &'a LlavaModel,
        steering: Vec<Option<&'a Intervention>>,
        prompt_len: usize,
        capacity: usize,
    ) -> Self {
        let live = (0..steering.len()).collect();
        Self { model, cache: model.text.new_cache(capacity), steering, live, prompt_len }
    }

    /// The prompt for every sequence: the positions before the first steered one are run once
    /// and their KV cache copied to each sequence (they are the same in all of them); the rest
    /// runs as a batch. Logits `[V]` per sequence.
    fn prefill_rows(&mut self, embeds: &Tensor) -> Result<Vec<Tensor>> {
        let (n, t) = (self.steering.len(), embeds.dim(1)?);
        let shared = shared_prompt(&self.steering, self.prompt_len, t);
        if shared > 0 {
            let opts =
                ForwardOptions { steering: None, prompt_len: self.prompt_len, capture_layers: false, logits: false };
            self.model.text.forward(&embeds.narrow(1, 0, shared)?, &mut self.cache, opts)?;
            self.cache.repeat_sequence(n)?;
        }
        let rest = embeds.narrow(1, shared, t - shared)?;
        let rest = if n > 1 { Tensor::cat(&vec![&rest; n], 0)? } else { rest };
        let logits = self.model.text.forward_batch(&rest, &mut self.cache, &self.steering, self.prompt_len)?;
        (0..n).map(|r| Ok(logits.get(r)?)).collect()
    }

    /// One token for each sequence still going (`None`: ended; its row is dropped).
    fn step_rows(&mut self, ids: &[Option<u32>]) -> Result<Vec<Option<Tensor>>> {
        anyhow::ensure!(ids.len() == self.steering.len(), "{} tokens for {} sequences", ids.len(), self.steering.len());
        if let Some(resumed) = (0..ids.len()).find(|r| ids[*r].is_some() && !self.live.contains(r)) {
            anyhow::bail!("sequence {resumed} ended and cannot go on");
        }
        let keep: Vec<usize> = (0..self.live.len()).filter(|&row| ids[self.live[row]].is_some()).collect();
        let mut out = vec![None; ids.len()];
        if keep.is_empty() {
            return Ok(out);
        }
        if keep.len() < self.live.len() {
            self.cache.keep_sequences(&keep)?;
            self.live = keep.iter().map(|&row| self.live[row]).collect();
        }
        let step_ids: Vec<u32> = self.live.iter().filter_map(|&r| ids[r]).collect();
        // `[1, n, H]` → `[n, 1, H]`: one new position for each sequence.
        let embeds = self.model.text.embed(&step_ids)?.transpose(0, 1)?.contiguous()?;
        let steering: Vec<_> = self.live.iter().map(|&r| self.steering[r]).collect();
        let logits = self.model.text.forward_batch(&embeds, &mut self.cache, &steering, self.prompt_len)?;
        for (row, &r) in self.live.iter().enumerate() {
            out[r] = Some(logits.get(row)?);
        }
        Ok(out)
    }
}

impl DecodeSession for CpuSession<'_> {
    fn prefill<'a>(&'a mut self, embeds: &'a Tensor) -> StepFuture<'a> {
        let out = self.prefill_rows(embeds).context("prefill failed").and_then(|mut rows| {
            anyhow::ensure!(rows.len() == 1, "a batch of {} sequences used as one", rows.len());
            Ok(Next::Logits(rows.remove(0)))
        });
        Box::pin(std::future::ready(out))
    }

    fn step(&mut self, id: u32) -> StepFuture<'_> {
        let out =
            self.step_rows(&[Some(id)]).and_then(|mut rows| Ok(Next::Logits(rows.remove(0).context("no logits")?)));
        Box::pin(std::future::ready(out))
    }
}

impl BatchSession for CpuSession<'_> {
    fn prefill_all<'a>(&'a mut self, embeds: &'a Tensor) -> BatchFuture<'a> {
        let out = self.prefill_rows(embeds).context("prefill failed");
        Box::pin(std::future::ready(out.map(|rows| rows.into_iter().map(|l| Some(Next::Logits(l))).collect())))
    }

    fn step_all<'a>(&'a mut self, ids: &'a [Option<u32>]) -> BatchFuture<'a> {
        let out = self.step_rows(ids);
        Box::pin(std::future::ready(out.map(|rows| rows.into_iter().map(|l| l.map(Next::Logits)).collect())))
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

/// Answers after a prompt whose embeddings are `embeds` `[1, T, H]` (ids `input_ids`), one per
/// entry of `steering`, decoded as one batch on the CPU. `on_token(answer, event)` is called for
/// every token; returning `false` stops them all (the results are kept).
#[allow(clippy::too_many_arguments)]
pub fn generate_batch(
    model: &LlavaModel,
    tokenizer: &tokenizers::Tokenizer,
    input_ids: &[u32],
    embeds: &Tensor,
    steering: &[Option<&Intervention>],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, &TokenEvent) -> bool,
) -> Result<Vec<Generation>> {
    let prompt_len = input_ids.len();
    let max_new = max_new_tokens(model.config.text.max_position_embeddings, prompt_len, opts.max_new_tokens);
    let mut session = CpuSession::batch(model, steering.to_vec(), prompt_len, prompt_len + max_new);
    let answers = steering.len();
    run_ready(generate_batch_on(&mut session, answers, tokenizer, input_ids, embeds, max_new, opts, on_token))
}

/// One answer's token choice and stopping: pick a token (greedy or sampled, or the one a GPU
/// already picked), stop on EOS or length, stream its text, time it.
struct Answer {
    sampler: Option<LogitsProcessor>,
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

impl Answer {
    fn new(max_new: usize, opts: &GenerateOptions) -> Self {
        Self {
            sampler: opts.sampling.sampler(),
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

    /// The next token from `next`; `None` once finished.
    fn choose(
        &mut self,
        tokenizer: &tokenizers::Tokenizer,
        eos_ids: &[u32],
        max_new: usize,
    ) -> Result<Option<TokenEvent>> {
        if self.finished {
            return Ok(None);
        }
        let id = match (self.next.take().context("a decode step before the prefill")?, self.sampler.as_mut()) {
            (Next::Token(id), _) => id,
            (Next::Logits(logits), None) => argmax(&logits.to_vec1::<f32>()?),
            (Next::Logits(logits), Some(s)) => s.sample(&logits)?,
        };
        let index = self.stream.ids().len();
        let text = self.stream.push(tokenizer, id)?;
        if eos_ids.contains(&id) {
            self.stopped_on_eos = true;
            self.finished = true;
        } else if index + 1 == max_new {
            self.finished = true;
        } else {
            self.pending = Some(id);
        }
        Ok(Some(TokenEvent { index, id, text }))
    }

    fn cancel(&mut self) {
        if !self.finished {
            self.finished = true;
            self.cancelled = true;
            self.next = None;
            self.pending = None;
        }
    }
}

/// Answers to one prompt, a token at a time, over a [`BatchSession`]: one answer (the CLI's
/// `generate`), or Compare's unaltered and steered answers decoded side by side. The CLI drives
/// it to the end ([`generate_batch_on`]); the browser returns to the event loop between steps (to
/// stream, and to see Stop).
pub struct Generator<S> {
    session: S,
    answers: Vec<Answer>,
    eos_ids: Vec<u32>,
    input_ids: Vec<u32>,
    max_new: usize,
}

impl<S: BatchSession> Generator<S> {
    /// `answers`: the session's sequences; `max_new`: already clipped to the context
    /// ([`max_new_tokens`]).
    pub fn new(session: S, answers: usize, input_ids: &[u32], max_new: usize, opts: &GenerateOptions) -> Self {
        Self {
            session,
            answers: (0..answers).map(|_| Answer::new(max_new, opts)).collect(),
            eos_ids: opts.eos_ids.clone(),
            input_ids: input_ids.to_vec(),
            max_new,
        }
    }

    /// Run the prompt `embeds` `[1, T, H]` (the expensive part before the first token). Each
    /// answer's prefill time is the wall time to its first token: the whole pass.
    pub async fn prefill(&mut self, embeds: &Tensor) -> Result<()> {
        let t0 = now_seconds();
        let nexts = self.session.prefill_all(embeds).await?;
        anyhow::ensure!(nexts.len() == self.answers.len(), "the prefill returned {} answers", nexts.len());
        let seconds = now_seconds() - t0;
        for (answer, next) in self.answers.iter_mut().zip(nexts) {
            answer.next = next;
            answer.prefill_seconds = seconds;
        }
        Ok(())
    }

    pub fn is_finished(&self) -> bool {
        self.answers.iter().all(|a| a.finished)
    }

    /// Whether answer `index` has ended (EOS, length or cancel).
    pub fn answer_finished(&self, index: usize) -> bool {
        self.answers.get(index).is_none_or(|a| a.finished)
    }

    /// The next token of every answer still going (`None` for the others), run through the
    /// decoder together unless it ends its answer. Each answer's decode time is the wall time of
    /// the steps it took part in.
    pub async fn step(&mut self, tokenizer: &tokenizers::Tokenizer) -> Result<Vec<Option<TokenEvent>>> {
        let t0 = now_seconds();
        let going: Vec<bool> = self.answers.iter().map(|a| !a.finished).collect();
        let pending: Vec<Option<u32>> = self.answers.iter_mut().map(|a| a.pending.take()).collect();
        if pending.iter().any(Option::is_some) {
            let nexts = self.session.step_all(&pending).await?;
            for (answer, next) in self.answers.iter_mut().zip(nexts) {
                if next.is_some() {
                    answer.next = next;
                }
            }
        }
        let events = self
            .answers
            .iter_mut()
            .map(|a| a.choose(tokenizer, &self.eos_ids, self.max_new))
            .collect::<Result<Vec<_>>>()?;
        let seconds = now_seconds() - t0;
        for (answer, _) in self.answers.iter_mut().zip(going).filter(|(_, going)| *going) {
            answer.decode_seconds += seconds;
        }
        Ok(events)
    }

    /// Stop every answer early; the tokens so far are kept.
    pub fn cancel(&mut self) {
        self.answers.iter_mut().for_each(Answer::cancel);
    }

    /// Answer `index` so far, with timings.
    pub fn result(&self, index: usize, tokenizer: &tokenizers::Tokenizer) -> Result<Generation> {
        let answer = self.answers.get(index).context("no such answer")?;
        // The first token comes from the prefill; decode steps are the ones after it.
        let decode_steps = answer.stream.ids().len().saturating_sub(1);
        Ok(Generation {
            input_ids: self.input_ids.clone(),
            generated_ids: answer.stream.ids().to_vec(),
            text: answer.stream.text(tokenizer)?,
            stopped_on_eos: answer.stopped_on_eos,
            cancelled: answer.cancelled,
            prefill_seconds: answer.prefill_seconds,
            decode_seconds: answer.decode_seconds,
            prefill_tokens_per_s: rate(self.input_ids.len(), answer.prefill_seconds),
            decode_tokens_per_s: rate(decode_steps, answer.decode_seconds),
        })
    }

    /// Every answer so far.
    pub fn results(&self, tokenizer: &tokenizers::Tokenizer) -> Result<Vec<Generation>> {
        (0..self.answers.len()).map(|i| self.result(i, tokenizer)).collect()
    }
}

/// A [`Generator`] of the session's answers run to the end. `on_token(answer, event)` is called
/// for every token; returning `false` stops them all (the results are kept).
#[allow(clippy::too_many_arguments)]
pub async fn generate_batch_on(
    session: &mut dyn BatchSession,
    answers: usize,
    tokenizer: &tokenizers::Tokenizer,
    input_ids: &[u32],
    embeds: &Tensor,
    max_new: usize,
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, &TokenEvent) -> bool,
) -> Result<Vec<Generation>> {
    let mut generator = Generator::new(session, answers, input_ids, max_new, opts);
    generator.prefill(embeds).await?;
    while !generator.is_finished() {
        let events = generator.step(tokenizer).await?;
        let mut go_on = true;
        for (i, event) in events.iter().enumerate() {
            if let Some(event) = event {
                go_on &= on_token(i, event);
            }
        }
        if !go_on {
            generator.cancel();
        }
    }
    generator.results(tokenizer)
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}
