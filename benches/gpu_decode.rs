//! Decode tokens/s on the CPU (candle) and the wgpu engine, on the same model in one run, and
//! the memory-bandwidth bound. Not a timed test.
//!
//! cargo bench --bench gpu_decode                      # synthetic "small" model (random weights)
//! CMRM_BENCH_PRESET=llava-interleave-qwen-0.5b cargo bench --bench gpu_decode   # its Qwen1.5-0.5B, ~1.9 GB f32
//! CMRM_BENCH_MODEL=path/to/checkpoint cargo bench --bench gpu_decode
//! (CMRM_BENCH_PROMPT / CMRM_BENCH_TOKENS: prompt and decode lengths; CMRM_BENCH_WEIGHTS=q8_0|q4:
//! the model is loaded quantized (both backends; the GPU keeps the blocks); CMRM_BENCH_GPU_WEIGHTS=
//! auto|f32|f16: how the GPU stores the matrices, default f32, or auto for a quantized model.)

use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let prompt = env("CMRM_BENCH_PROMPT", 32);
    let tokens = env("CMRM_BENCH_TOKENS", 16);
    let Some(info) = pollster::block_on(cmrm::gpu::context::probe_adapter()) else {
        eprintln!("no WebGPU/Vulkan adapter: nothing to compare");
        return Ok(());
    };
    let ctx = Arc::new(cmrm::gpu::new_blocking()?);
    let format: cmrm::quant::WeightFormat = std::env::var("CMRM_BENCH_WEIGHTS").as_deref().unwrap_or("f32").parse()?;
    let (label, text) = if let Ok(dir) = std::env::var("CMRM_BENCH_MODEL") {
        let vlm = cmrm::Vlm::load_dir_as(std::path::Path::new(&dir), format)?;
        (dir, vlm.model.text)
    } else {
        let preset = std::env::var("CMRM_BENCH_PRESET").unwrap_or_else(|_| "small".into());
        let cfg = cmrm::gpu::bench::preset(&preset)
            .ok_or_else(|| anyhow::anyhow!("unknown preset {preset} (small, llava-interleave-qwen-0.5b)"))?;
        (format!("synthetic {preset}"), cmrm::gpu::bench::random_text_model(&cfg, format)?)
    };
    println!(
        "model: {label} ({} weights); adapter: {} ({:?}, {:?})",
        format.name(),
        info.name,
        info.backend,
        info.device_type
    );
    let default_storage = if format == cmrm::quant::WeightFormat::F32 { "f32" } else { "auto" };
    let weights: cmrm::gpu::GpuWeights =
        std::env::var("CMRM_BENCH_GPU_WEIGHTS").as_deref().unwrap_or(default_storage).parse()?;
    let report = cmrm::gpu::bench::run(&text, ctx, prompt, tokens, weights)?;
    println!("{report}");
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
