//! The wgpu attention kernel alone (`attention.wgsl`), timed on the shapes it runs in the real
//! models, beside candle's attention on the CPU for the same inputs (with the largest
//! difference). Not a timed test.
//!
//! cargo bench --bench gpu_attention
//! CMRM_BENCH_RUNS: runs per shape (default 3; the best is reported).

use std::sync::Arc;

use candle_core::{Device, Tensor, D};
use cmrm::generate::now_seconds;
use cmrm::gpu::ops::{self, AttnShape};

/// Deterministic inputs in [-0.5, 0.5).
fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + salt * 104729) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// Full attention of `rows` packed q|k|v rows on the CPU with candle: `[rows, nh·d]`.
fn candle_full(s: AttnShape, qkv: &[f32], rows: usize) -> anyhow::Result<Vec<f32>> {
    let packed = Tensor::from_slice(qkv, (rows, s.nh + 2 * s.kvh, s.d), &Device::Cpu)?;
    let head = |first: usize, h: usize| packed.narrow(1, first + h, 1).and_then(|t| t.squeeze(1));
    let mut outs = Vec::with_capacity(s.nh);
    for h in 0..s.nh {
        let g = h / (s.nh / s.kvh);
        let (q, k, v) = (head(0, h)?, head(s.nh, g)?, head(s.nh + s.kvh, g)?);
        let scores = (q.matmul(&k.t()?)? * (s.d as f64).powf(-0.5))?;
        outs.push(candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?);
    }
    Ok(Tensor::stack(&outs, 1)?.flatten_all()?.to_vec1()?)
}

fn main() -> anyhow::Result<()> {
    let Some(info) = pollster::block_on(cmrm::gpu::context::probe_adapter()) else {
        eprintln!("no WebGPU/Vulkan adapter: nothing to time");
        return Ok(());
    };
    let runs: usize = std::env::var("CMRM_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let ctx = Arc::new(cmrm::gpu::new_blocking()?);
    println!("adapter: {info:?}");
    let best = |f: &mut dyn FnMut() -> anyhow::Result<Vec<f32>>| -> anyhow::Result<(f64, Vec<f32>)> {
        let mut out = f()?; // warm-up
        let mut secs = f64::MAX;
        for _ in 0..runs {
            let t0 = now_seconds();
            out = f()?;
            secs = secs.min(now_seconds() - t0);
        }
        Ok((secs, out))
    };
    // The vision towers' full attention over every patch (heads of 72 and 64).
    for (label, s, rows) in [
        ("SigLIP-so400m/14-384, 729 rows", AttnShape { nh: 16, kvh: 16, d: 72 }, 729),
        ("CLIP ViT-L/14-336, 577 rows", AttnShape { nh: 16, kvh: 16, d: 64 }, 577),
    ] {
        let qkv = values(rows * (s.nh + 2 * s.kvh) * s.d, rows);
        let (gpu_s, gpu) = best(&mut || pollster::block_on(ops::full_attention(&ctx, s, &qkv, rows)))?;
        let (cpu_s, cpu) = best(&mut || candle_full(s, &qkv, rows))?;
        let diff = gpu.iter().zip(&cpu).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!(
            "cmrm-bench attention full {label}: wgpu {:.1} ms, candle {:.1} ms, wgpu / candle time {:.2}, max |diff| {diff:.1e}",
            gpu_s * 1e3,
            cpu_s * 1e3,
            gpu_s / cpu_s
        );
    }
    // The Qwen2-0.5B decoder's causal GQA attention (14 heads over 2 KV heads of 64): one decode
    // step over a 1000-position cache, and a 200-row prefill chunk (RoPE and cache write included).
    let s = AttnShape { nh: 14, kvh: 2, d: 64 };
    for (t, start) in [(1usize, 1000usize), (200, 0)] {
        let qkv = values(t * (s.nh + 2 * s.kvh) * s.d, t);
        let prior = values(s.kvh * start * s.d, start);
        let (cos, sin) = (vec![1f32; t * s.d / 2], vec![0f32; t * s.d / 2]);
        let (gpu_s, _) = best(&mut || {
            Ok(pollster::block_on(ops::rope_attention(&ctx, s, &qkv, t, start, &prior, &prior, &cos, &sin))?.1)
        })?;
        println!("cmrm-bench attention causal rows={t} cache={start}: wgpu {:.1} ms (uploads included)", gpu_s * 1e3);
    }
    Ok(())
}
