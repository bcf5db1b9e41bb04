//! Sequences decoded on the GPU behind the traits generation drives: one ([`GpuSession`], a
//! [`DecodeSession`](crate::generate::DecodeSession)) or several that differ in their steering,
//! as one batch ([`GpuBatchSession`], a [`BatchSession`]).

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use super::buffers::GEMV_ROWS;
use super::decoder::{GpuCache, GpuDecoder, GpuForwardOptions, GpuInput, GpuOutput, GpuSteering, Readback};
use crate::generate::{shared_prompt, BatchFuture, BatchSession, Next, StepFuture};
use crate::steering::Intervention;

/// One sequence on the GPU: its KV cache and uploaded steering.
pub struct GpuSession<'a> {
    pub decoder: &'a GpuDecoder,
    pub cache: GpuCache,
    pub steering: Option<GpuSteering>,
    pub prompt_len: usize,
    /// Greedy: only the argmax comes back per step.
    pub greedy: bool,
}

impl<'a> GpuSession<'a> {
    pub fn new(
        decoder: &'a GpuDecoder,
        prompt_len: usize,
        capacity: usize,
        steering: Option<&Intervention>,
        greedy: bool,
    ) -> Result<Self> {
        let steering = steering.map(|s| decoder.prepare_steering(s)).transpose()?;
        let cache = decoder.new_cache(capacity)?;
        Ok(Self { decoder, cache, steering, prompt_len, greedy })
    }

    async fn run(&mut self, input: GpuInput<'_>) -> Result<Next> {
        let opts = GpuForwardOptions {
            steering: self.steering.as_ref(),
            prompt_len: self.prompt_len,
            capture_layers: false,
            readback: if self.greedy { Readback::Argmax } else { Readback::Logits },
        };
        next_of(self.decoder.forward(input, &mut self.cache, &opts).await?)
    }

    pub async fn prefill_async(&mut self, embeds: &Tensor) -> Result<Next> {
        let data: Vec<f32> = embeds.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        self.run(GpuInput::Embeds(&data)).await.context("GPU prefill failed")
    }

    pub async fn step_async(&mut self, id: u32) -> Result<Next> {
        self.run(GpuInput::Tokens(&[id])).await.context("GPU decode step failed")
    }
}

impl crate::generate::DecodeSession for GpuSession<'_> {
    fn prefill<'a>(&'a mut self, embeds: &'a Tensor) -> StepFuture<'a> {
        Box::pin(self.prefill_async(embeds))
    }
    fn step(&mut self, id: u32) -> StepFuture<'_> {
        Box::pin(self.step_async(id))
    }
}

/// What picks the next token from a GPU step's output.
fn next_of(out: GpuOutput) -> Result<Next> {
    match (out.token, out.logits) {
        (Some(id), _) => Ok(Next::Token(id)),
        (None, Some(l)) => Ok(Next::Logits(Tensor::from_vec(l.clone(), l.len(), &Device::Cpu)?)),
        _ => anyhow::bail!("the GPU step returned nothing"),
    }
}

/// Sequences that share a prompt and differ in their steering (Compare's unaltered and steered
/// answers), decoded side by side on the GPU: one KV cache holds them all; the prompt positions
/// before the first steered one run once and are copied to each sequence; every decode step is
/// one batch, each weight read once for all sequences still going.
pub struct GpuBatchSession<'a> {
    decoder: &'a GpuDecoder,
    cache: GpuCache,
    /// Sequence `s`'s steering, uploaded for it.
    steering: Vec<Option<GpuSteering>>,
    /// Sequence `s`'s intervention (which prompt positions the sequences share).
    interventions: Vec<Option<&'a Intervention>>,
    /// Sequences that have ended (for good).
    ended: Vec<bool>,
    prompt_len: usize,
    greedy: bool,
}

impl<'a> GpuBatchSession<'a> {
    /// One sequence per entry of `steering`, `capacity` positions each.
    pub fn new(
        decoder: &'a GpuDecoder,
        prompt_len: usize,
        capacity: usize,
        steering: &[Option<&'a Intervention>],
        greedy: bool,
    ) -> Result<Self> {
        let cache = decoder.new_batch_cache(steering.len(), capacity)?;
        let uploaded = steering
            .iter()
            .enumerate()
            .map(|(seq, s)| s.map(|s| decoder.prepare_steering_for(s, seq)).transpose())
            .collect::<Result<_>>()?;
        Ok(Self {
            decoder,
            cache,
            steering: uploaded,
            interventions: steering.to_vec(),
            ended: vec![false; steering.len()],
            prompt_len,
            greedy,
        })
    }

    fn readback(&self) -> Readback {
        if self.greedy {
            Readback::Argmax
        } else {
            Readback::Logits
        }
    }

    /// The prompt `embeds` `[1, T, H]` for every sequence.
    pub async fn prefill_all_async(&mut self, embeds: &Tensor) -> Result<Vec<Option<Next>>> {
        let h = embeds.dim(2)?;
        let data: Vec<f32> = embeds.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let shared = shared_prompt(&self.interventions, self.prompt_len, embeds.dim(1)?);
        if shared > 0 {
            let opts = GpuForwardOptions {
                steering: None,
                prompt_len: self.prompt_len,
                capture_layers: false,
                readback: Readback::Nothing,
            };
            self.decoder.forward_sequence(0, GpuInput::Embeds(&data[..shared * h]), &mut self.cache, &opts).await?;
            for seq in 1..self.steering.len() {
                self.decoder.copy_sequence(&mut self.cache, 0, seq, shared)?;
            }
        }
        let mut out = Vec::with_capacity(self.steering.len());
        for seq in 0..self.steering.len() {
            let opts = GpuForwardOptions {
                steering: self.steering[seq].as_ref(),
                prompt_len: self.prompt_len,
                capture_layers: false,
                readback: self.readback(),
            };
            let rest = GpuInput::Embeds(&data[shared * h..]);
            out.push(Some(next_of(self.decoder.forward_sequence(seq, rest, &mut self.cache, &opts).await?)?));
        }
        Ok(out)
    }

    /// `ids[s]` appended to sequence `s` (`None`: it has ended): the sequences still going, in
    /// runs of neighbours, each run one batched step.
    pub async fn step_all_async(&mut self, ids: &[Option<u32>]) -> Result<Vec<Option<Next>>> {
        anyhow::ensure!(ids.len() == self.steering.len(), "{} tokens for {} sequences", ids.len(), self.steering.len());
        if let Some(resumed) = (0..ids.len()).find(|&s| ids[s].is_some() && self.ended[s]) {
            anyhow::bail!("sequence {resumed} ended and cannot go on");
        }
        let mut out: Vec<Option<Next>> = (0..ids.len()).map(|_| None).collect();
        let mut seq = 0;
        while seq < ids.len() {
            if ids[seq].is_none() {
                self.ended[seq] = true;
                seq += 1;
                continue;
            }
            let run: Vec<u32> = ids[seq..].iter().take(GEMV_ROWS).map_while(|id| *id).collect();
            let readback = self.readback();
            let steering: Vec<&GpuSteering> = self.steering[seq..seq + run.len()].iter().flatten().collect();
            let outputs = self
                .decoder
                .forward_batch(&run, &mut self.cache, seq, &steering, self.prompt_len, readback)
                .await
                .context("GPU decode step failed")?;
            for (i, output) in outputs.into_iter().enumerate() {
                out[seq + i] = Some(next_of(output)?);
            }
            seq += run.len();
        }
        Ok(out)
    }
}

impl BatchSession for GpuBatchSession<'_> {
    fn prefill_all<'a>(&'a mut self, embeds: &'a Tensor) -> BatchFuture<'a> {
        Box::pin(async move { self.prefill_all_async(embeds).await.context("GPU prefill failed") })
    }
    fn step_all<'a>(&'a mut self, ids: &'a [Option<u32>]) -> BatchFuture<'a> {
        Box::pin(self.step_all_async(ids))
    }
}
