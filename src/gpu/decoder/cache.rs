//! The decoder's per-sequence KV cache on the GPU: allocation and growth, and the RoPE and
//! attention bindings that point into it.

use anyhow::{bail, Result};

use super::GpuDecoder;
use crate::gpu::buffers::{scratch, uniform};
use crate::gpu::ops::{attention_params, AttnShape, KvLayout};
use crate::gpu::params::RopeKvParams;

/// Per-sequence KV cache on the GPU (`[kv_heads, capacity, head_dim]` per layer and K / V).
pub struct GpuCache {
    pub(super) len: usize,
    pub(super) cap: usize,
    pub(super) k: Vec<wgpu::Buffer>,
    pub(super) v: Vec<wgpu::Buffer>,
    pub(super) rope_binds: Vec<wgpu::BindGroup>,
    pub(super) attn_binds: Vec<wgpu::BindGroup>,
    pub(super) _params: Vec<wgpu::Buffer>,
    pub(super) owner: usize,
}

impl GpuCache {
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

impl GpuDecoder {
    /// A KV cache for `capacity` positions (it grows when exceeded).
    pub fn new_cache(&self, capacity: usize) -> Result<GpuCache> {
        let mut cache = GpuCache {
            len: 0,
            cap: 0,
            k: vec![],
            v: vec![],
            rope_binds: vec![],
            attn_binds: vec![],
            _params: vec![],
            owner: self.id,
        };
        self.allocate_cache(&mut cache, capacity.max(1), None)?;
        Ok(cache)
    }

    pub(super) fn allocate_cache(
        &self,
        cache: &mut GpuCache,
        cap: usize,
        encoder: Option<&mut wgpu::CommandEncoder>,
    ) -> Result<()> {
        let per_layer = (self.kvh * cap * self.d) as u64 * 4;
        if per_layer > self.ctx.max_binding() {
            bail!(
                "a KV cache of {cap} positions needs {per_layer} bytes per layer, over this adapter's largest storage binding ({} bytes)",
                self.ctx.max_binding()
            );
        }
        let k: Vec<wgpu::Buffer> = (0..self.layers.len())
            .map(|_| scratch(&self.ctx, "k_cache", self.kvh * cap * self.d))
            .collect::<Result<_>>()?;
        let v: Vec<wgpu::Buffer> = (0..self.layers.len())
            .map(|_| scratch(&self.ctx, "v_cache", self.kvh * cap * self.d))
            .collect::<Result<_>>()?;
        if let Some(enc) = encoder {
            let row = (self.d * 4) as u64;
            for (old, new) in cache.k.iter().zip(&k).chain(cache.v.iter().zip(&v)) {
                for head in 0..self.kvh {
                    let src = (head * cache.cap) as u64 * row;
                    let dst = (head * cap) as u64 * row;
                    enc.copy_buffer_to_buffer(old, src, new, dst, cache.len as u64 * row);
                }
            }
        }
        let shape = AttnShape { nh: self.nh, kvh: self.kvh, d: self.d };
        let p_rope = uniform(&self.ctx, &RopeKvParams::new(shape, cap, self.chunk_rows));
        // One attention uniform per layer: layers differ in their sliding window (0 = none).
        let p_att: Vec<_> = self
            .config()
            .sliding_windows
            .iter()
            .map(|window| {
                let window = window.map_or(0, |w| w.min(u32::MAX as usize) as u32);
                uniform(&self.ctx, &attention_params(shape, window, None, KvLayout::cache(cap, self.d)))
            })
            .collect();
        let kern = &self.ctx.kernels;
        let dev = &self.ctx.device;
        cache.rope_binds = (0..self.layers.len())
            .map(|l| kern.rope_kv.bind(dev, &[&self.step, &p_rope, &self.qkv, &self.rope, &k[l], &v[l]]))
            .collect();
        cache.attn_binds = (0..self.layers.len())
            .map(|l| kern.attention.bind(dev, &[&self.step, &p_att[l], &self.qkv, &k[l], &v[l], &self.attn]))
            .collect();
        cache.k = k;
        cache.v = v;
        cache.cap = cap;
        cache._params = std::iter::once(p_rope).chain(p_att).collect();
        Ok(())
    }
}
