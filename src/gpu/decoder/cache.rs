//! The decoder's KV cache on the GPU (one sequence or several side by side): allocation,
//! growth and prefix copies, and the RoPE and attention bindings that point into it.

use anyhow::{bail, Result};

use super::GpuDecoder;
use crate::gpu::buffers::{scratch, uniform};
use crate::gpu::ops::{attention_params, AttnShape, KvLayout};
use crate::gpu::params::RopeKvParams;

/// KV cache on the GPU for one sequence or several decoded side by side
/// (`[sequences, kv_heads, capacity, head_dim]` per layer and K / V: one binding serves every
/// sequence; `Step::seq0` and `Step::seq_rows` say which rows belong to which).
pub struct GpuCache {
    /// Positions each sequence holds.
    pub(super) lens: Vec<usize>,
    pub(super) cap: usize,
    pub(super) k: Vec<wgpu::Buffer>,
    pub(super) v: Vec<wgpu::Buffer>,
    pub(super) rope_binds: Vec<wgpu::BindGroup>,
    pub(super) attn_binds: Vec<wgpu::BindGroup>,
    pub(super) _params: Vec<wgpu::Buffer>,
    pub(super) owner: usize,
}

impl GpuCache {
    /// Positions already in the cache (its first sequence).
    pub fn len(&self) -> usize {
        self.lens[0]
    }
    pub fn is_empty(&self) -> bool {
        self.lens[0] == 0
    }
    /// Positions sequence `seq` holds.
    pub fn sequence_len(&self, seq: usize) -> usize {
        self.lens[seq]
    }
    /// Sequences the cache holds.
    pub fn sequences(&self) -> usize {
        self.lens.len()
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

impl GpuDecoder {
    /// A KV cache for `capacity` positions (it grows when exceeded).
    pub fn new_cache(&self, capacity: usize) -> Result<GpuCache> {
        self.new_batch_cache(1, capacity)
    }

    /// A KV cache for `sequences` sequences of `capacity` positions each (it grows when exceeded).
    pub fn new_batch_cache(&self, sequences: usize, capacity: usize) -> Result<GpuCache> {
        if sequences == 0 {
            bail!("a KV cache needs at least one sequence");
        }
        let mut cache = GpuCache {
            lens: vec![0; sequences],
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

    /// Copy sequence `from`'s first `len` positions to sequence `to` (whose length becomes
    /// `len`): a prompt prefix the sequences share, run once.
    pub fn copy_sequence(&self, cache: &mut GpuCache, from: usize, to: usize, len: usize) -> Result<()> {
        let n = cache.lens.len();
        if from >= n || to >= n || len > cache.lens[from] {
            bail!("cannot copy {len} positions of sequence {from} to {to}: the cache holds {:?}", cache.lens);
        }
        if len == 0 || from == to {
            cache.lens[to] = len;
            return Ok(());
        }
        // WebGPU copies never have the same buffer at both ends: through a staging buffer.
        let bytes = len as u64 * (self.d * 4) as u64;
        let staging = scratch(&self.ctx, "kv_prefix", len * self.d)?;
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        for buf in cache.k.iter().chain(&cache.v) {
            for head in 0..self.kvh {
                let at = |seq: usize| ((seq * self.kvh + head) * cache.cap) as u64 * (self.d * 4) as u64;
                enc.copy_buffer_to_buffer(buf, at(from), &staging, 0, bytes);
                enc.copy_buffer_to_buffer(&staging, 0, buf, at(to), bytes);
            }
        }
        self.ctx.submit(enc);
        cache.lens[to] = len;
        Ok(())
    }

    pub(super) fn allocate_cache(
        &self,
        cache: &mut GpuCache,
        cap: usize,
        encoder: Option<&mut wgpu::CommandEncoder>,
    ) -> Result<()> {
        let seqs = cache.lens.len();
        let per_layer = (seqs * self.kvh * cap * self.d) as u64 * 4;
        if per_layer > self.ctx.max_binding() {
            bail!(
                "a KV cache of {seqs} × {cap} positions needs {per_layer} bytes per layer, over this adapter's largest storage binding ({} bytes)",
                self.ctx.max_binding()
            );
        }
        let k: Vec<wgpu::Buffer> = (0..self.layers.len())
            .map(|_| scratch(&self.ctx, "k_cache", seqs * self.kvh * cap * self.d))
            .collect::<Result<_>>()?;
        let v: Vec<wgpu::Buffer> = (0..self.layers.len())
            .map(|_| scratch(&self.ctx, "v_cache", seqs * self.kvh * cap * self.d))
            .collect::<Result<_>>()?;
        if let Some(enc) = encoder {
            let row = (self.d * 4) as u64;
            for (old, new) in cache.k.iter().zip(&k).chain(cache.v.iter().zip(&v)) {
                for (seq, &len) in cache.lens.iter().enumerate() {
                    for head in 0..self.kvh {
                        let src = ((seq * self.kvh + head) * cache.cap) as u64 * row;
                        let dst = ((seq * self.kvh + head) * cap) as u64 * row;
                        enc.copy_buffer_to_buffer(old, src, new, dst, len as u64 * row);
                    }
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
