//! Steering on the GPU: an [`crate::steering::Intervention`]'s per-layer deltas uploaded once and
//! bound to the decoder's residual stream.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::{f32s, GpuDecoder};
use crate::gpu::buffers::{uniform, upload};
use crate::gpu::params::SteerParams;
use crate::steering::{Intervention, Positions};

/// An [`Intervention`]'s deltas uploaded once, bound to one decoder's residual stream and to
/// one sequence of a KV cache (the rows of other sequences pass through).
pub struct GpuSteering {
    pub(super) layers: BTreeMap<usize, (wgpu::Buffer, wgpu::BindGroup)>,
    pub(super) _params: wgpu::Buffer,
    pub(super) owner: usize,
    /// The cache's sequence it steers.
    pub(super) seq: usize,
}

impl GpuDecoder {
    /// Upload an intervention's deltas (once per generation, not per step), for a cache's
    /// first (or only) sequence.
    pub fn prepare_steering(&self, steering: &Intervention) -> Result<GpuSteering> {
        self.prepare_steering_for(steering, 0)
    }

    /// [`Self::prepare_steering`] for the cache's sequence `seq` of several decoded side by side.
    pub fn prepare_steering_for(&self, steering: &Intervention, seq: usize) -> Result<GpuSteering> {
        let mode = crate::gpu::ops::steer_mode(steering.positions);
        // `apply` on a zero row that the positions rule selects gives exactly `delta_l`.
        let prompt_len = if steering.positions == Positions::Last { 1 } else { 0 };
        let zeros = Tensor::zeros((1, 1, self.h), DType::F32, &Device::Cpu)?;
        let params = uniform(&self.ctx, &SteerParams { h: self.h as u32, mode, seq: seq as u32 });
        let mut layers = BTreeMap::new();
        for l in steering.layers() {
            if l >= self.layers.len() {
                bail!("steering names layer {l}, the model has {} layers", self.layers.len());
            }
            let delta = f32s(&steering.apply(l, &zeros, 0, prompt_len)?)?;
            let buf = upload(&self.ctx, "steering", &delta)?;
            let bind = self.ctx.kernels.steer.bind(&self.ctx.device, &[&self.step, &params, &self.x, &buf]);
            layers.insert(l, (buf, bind));
        }
        Ok(GpuSteering { layers, _params: params, owner: self.id, seq })
    }
}
