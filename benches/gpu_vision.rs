//! Image encode (vision tower + projector) on the CPU (candle) and the wgpu engine, on the same
//! random-weight model in one run, with the ratio and the largest difference of the features.
//! Not a timed test.
//!
//! cargo bench --bench gpu_vision                        # llava-interleave-qwen-0.5b's SigLIP (729 patches)
//! CMRM_BENCH_PRESET=llava-1.5-7b cargo bench --bench gpu_vision   # CLIP ViT-L/14-336 (576 patches)
//! CMRM_BENCH_WEIGHTS=q8_0|q4: the model is loaded quantized (the GPU keeps the blocks).
//! CMRM_BENCH_RUNS: encodes per backend (default 3; the best is reported).
//! CMRM_BENCH_VISION_LAYERS=N: the tower cut to N encoder layers (lavapipe runs the whole 0.5B
//! tower in minutes; the ratio per layer is what matters there).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use cmrm::generate::now_seconds;

fn main() -> anyhow::Result<()> {
    let Some(info) = pollster::block_on(cmrm::gpu::context::probe_adapter()) else {
        eprintln!("no WebGPU/Vulkan adapter: nothing to compare");
        return Ok(());
    };
    let preset = std::env::var("CMRM_BENCH_PRESET").unwrap_or_else(|_| "llava-interleave-qwen-0.5b".into());
    let format: cmrm::quant::WeightFormat = std::env::var("CMRM_BENCH_WEIGHTS").as_deref().unwrap_or("f32").parse()?;
    let runs: usize = std::env::var("CMRM_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut cfg = cmrm::bench::preset_config(&preset)?;
    // The decoder plays no part: one small layer keeps the random model quick to build.
    (cfg.text.num_hidden_layers, cfg.text.vocab_size) = (1, 1024);
    cfg.text.sliding_windows.truncate(1);
    if let Some(n) = std::env::var("CMRM_BENCH_VISION_LAYERS").ok().and_then(|v| v.parse::<usize>().ok()) {
        cfg.vision.num_hidden_layers = n.max(1);
        cfg.vision_feature_layers = vec![n.max(1) - 1];
    }
    let vb = VarBuilder::from_backend(Box::new(cmrm::weights::RandomWeights { seed: 0 }), DType::F32, Device::Cpu);
    let model = cmrm::models::llava::LlavaModel::new(&cfg, format, vb)?;
    let s = cfg.vision.image_size;
    let pixel_values = Tensor::rand(-1f32, 1f32, (1, 3, s, s), &Device::Cpu)?;
    let ctx = Arc::new(cmrm::gpu::new_blocking()?);
    let gpu = cmrm::gpu::GpuVision::new_blocking(ctx, &model, cmrm::gpu::GpuWeights::Auto)?;
    let best = |f: &mut dyn FnMut() -> anyhow::Result<Tensor>| -> anyhow::Result<(f64, Tensor)> {
        let mut out = (f64::INFINITY, Tensor::zeros(1, DType::F32, &Device::Cpu)?);
        for _ in 0..runs {
            let t0 = now_seconds();
            let features = f()?;
            let secs = now_seconds() - t0;
            if secs < out.0 {
                out = (secs, features);
            }
        }
        Ok(out)
    };
    gpu.encode_blocking(&model, &pixel_values)?; // warm-up: pipelines, first-use costs
    let (gpu_s, gpu_features) = best(&mut || gpu.encode_blocking(&model, &pixel_values))?;
    let (cpu_s, cpu_features) = best(&mut || Ok(model.encode_image(&pixel_values, None)?))?;
    let diff = (&gpu_features - &cpu_features)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let threads = candle_core::utils::get_num_threads();
    println!(
        "{preset} vision ({} weights, {} of {} layers run, {} patches → {} image tokens); adapter: {} ({:?}, {:?})",
        format.name(),
        cfg.vision_feature_layers[0],
        cfg.vision.num_hidden_layers,
        cfg.vision.num_patches(),
        gpu_features.dim(0)?,
        info.name,
        info.backend,
        info.device_type
    );
    println!(
        "image encode: cpu {cpu_s:.3} s ({threads} threads)  webgpu {gpu_s:.3} s  (cpu/webgpu = {:.2}); max |diff| {diff:e}",
        cpu_s / gpu_s
    );
    println!(
        "{}",
        serde_json::json!({"preset": preset, "weights": format.name(), "layers_run": cfg.vision_feature_layers[0], "adapter": info.name, "threads": threads,
                           "cpu_encode_s": cpu_s, "gpu_encode_s": gpu_s, "max_abs_diff": diff})
    );
    Ok(())
}
