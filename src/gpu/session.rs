//! One sequence decoded on the GPU: its KV cache and uploaded steering, behind the
//! [`DecodeSession`](crate::generate::DecodeSession) trait that generation drives.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use super::decoder::{GpuCache, GpuDecoder, GpuForwardOptions, GpuInput, GpuSteering, Readback};
use crate::generate::{Next, StepFuture};
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
        let out = self.decoder.forward(input, &mut self.cache, &opts).await?;
        match (out.token, out.logits) {
            (Some(id), _) => Ok(Next::Token(id)),
            (None, Some(l)) => Ok(Next::Logits(Tensor::from_vec(l.clone(), l.len(), &Device::Cpu)?)),
            _ => anyhow::bail!("the GPU step returned nothing"),
        }
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
