//! One answer generated a token at a time, so the browser can interleave two answers, stream
//! them, and stop between tokens.
//!
//! Same steps as `generate::generate` (prefill, pick, stop on EOS / length, one cached forward per
//! token), turned inside out: `generate` owns its loop and a callback cannot await, while a Web
//! Worker only sees a "stop" message when the wasm call returns to the event loop.

use anyhow::{Context, Result};
use candle_core::Tensor;
use candle_transformers::generation::LogitsProcessor;
use serde::Serialize;

use crate::generate::{Sampling, TextStream};
use crate::pipeline::{Prepared, Vlm};
use crate::steering::Intervention;
use crate::text::{argmax, Cache, ForwardOptions};

/// A finished (or stopped) answer, as the page shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaneResult {
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stopped_on_eos: bool,
    pub cancelled: bool,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// One generated token: `text` is what to append (empty while a character is incomplete).
pub struct Step {
    pub index: usize,
    pub id: u32,
    pub text: String,
}

pub struct PaneRun {
    steering: Option<Intervention>,
    sampler: Option<LogitsProcessor>,
    eos_ids: Vec<u32>,
    cache: Cache,
    /// Logits for the next token; `None` before the prefill and after the last token.
    logits: Option<Tensor>,
    prompt_len: usize,
    max_new: usize,
    /// The answer's ids and the text already streamed.
    stream: TextStream,
    finished: bool,
    stopped_on_eos: bool,
    cancelled: bool,
    prefill_seconds: f64,
    decode_seconds: f64,
}

impl PaneRun {
    pub fn new(
        vlm: &Vlm,
        prepared: &Prepared,
        steering: Option<Intervention>,
        max_new_tokens: usize,
        sampling: Sampling,
    ) -> Self {
        let prompt_len = prepared.encoded.input_ids.len();
        let max_new =
            crate::generate::max_new_tokens(vlm.config().text.max_position_embeddings, prompt_len, max_new_tokens);
        let sampler = sampling.sampler();
        Self {
            steering,
            sampler,
            eos_ids: vlm.eos_ids.clone(),
            cache: vlm.model.text.new_cache(prompt_len + max_new),
            logits: None,
            prompt_len,
            max_new,
            stream: TextStream::new(),
            finished: max_new == 0,
            stopped_on_eos: false,
            cancelled: false,
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
        }
    }

    /// One cached forward (prompt or one token) with this pane's steering; logits of its last position.
    fn forward(&mut self, vlm: &Vlm, embeds: &Tensor) -> Result<Tensor> {
        let opts = ForwardOptions {
            steering: self.steering.as_ref(),
            prompt_len: self.prompt_len,
            capture_layers: false,
            logits: true,
        };
        vlm.model.forward(embeds, &mut self.cache, opts)?.logits.context("no logits")
    }

    /// Run the prompt through the decoder (the expensive part before the first token).
    pub fn prefill(&mut self, vlm: &Vlm, prepared: &Prepared) -> Result<()> {
        let t0 = now_seconds();
        self.logits = Some(self.forward(vlm, &prepared.embeds).context("prefill failed")?);
        self.prefill_seconds = now_seconds() - t0;
        Ok(())
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Pick the next token and, unless it ends the answer, run it through the decoder.
    /// `None` once finished.
    pub fn step(&mut self, vlm: &Vlm) -> Result<Option<Step>> {
        if self.finished {
            return Ok(None);
        }
        let t0 = now_seconds();
        let logits = self.logits.take().context("step before prefill")?;
        let id = match self.sampler.as_mut() {
            None => argmax(&logits.to_vec1::<f32>()?),
            Some(s) => s.sample(&logits)?,
        };
        let index = self.stream.ids().len();
        let text = self.stream.push(&vlm.processor.tokenizer, id)?;
        if self.eos_ids.contains(&id) {
            self.stopped_on_eos = true;
            self.finished = true;
        } else if self.stream.ids().len() == self.max_new {
            self.finished = true;
        } else {
            let embed = vlm.model.text.embed(&[id])?;
            self.logits = Some(self.forward(vlm, &embed)?);
        }
        self.decode_seconds += now_seconds() - t0;
        Ok(Some(Step { index, id, text }))
    }

    /// Stop early (the tokens so far are kept).
    pub fn cancel(&mut self) {
        if !self.finished {
            self.finished = true;
            self.cancelled = true;
            self.logits = None;
        }
    }

    pub fn result(&self, vlm: &Vlm) -> Result<PaneResult> {
        // The first token comes from the prefill; decode steps are the ones after it.
        let decode_steps = self.stream.ids().len().saturating_sub(1);
        Ok(PaneResult {
            generated_ids: self.stream.ids().to_vec(),
            text: self.stream.text(&vlm.processor.tokenizer)?,
            stopped_on_eos: self.stopped_on_eos,
            cancelled: self.cancelled,
            prompt_tokens: self.prompt_len,
            prefill_seconds: self.prefill_seconds,
            decode_seconds: self.decode_seconds,
            prefill_tokens_per_s: rate(self.prompt_len, self.prefill_seconds),
            decode_tokens_per_s: rate(decode_steps, self.decode_seconds),
        })
    }
}

/// Seconds from `performance.now()` (sub-millisecond in window and worker; `Date.now()`, which
/// `generate::now_seconds` uses, ticks in whole milliseconds — too coarse for small models).
pub fn now_seconds() -> f64 {
    use wasm_bindgen::JsCast;
    let performance = js_sys::Reflect::get(&js_sys::global(), &"performance".into()).ok();
    let now = performance
        .as_ref()
        .and_then(|p| js_sys::Reflect::get(p, &"now".into()).ok())
        .and_then(|f| f.dyn_into::<js_sys::Function>().ok());
    match (performance, now) {
        (Some(p), Some(f)) => {
            f.call0(&p).ok().and_then(|v| v.as_f64()).map_or_else(crate::generate::now_seconds, |ms| ms / 1000.0)
        }
        _ => crate::generate::now_seconds(),
    }
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}
