#![cfg(not(target_arch = "wasm32"))]
//! The GPU decoder against the CPU decoder and the Hugging Face references on every oracle case
//! (both models, 9 cases, multimodal and text-only), unaltered and with every steering case
//! of the oracle plus `generated` positions: logits within 1e-3 of the CPU's (prefill and every
//! decode step), identical greedy tokens and EOS stops. Skips, with a message, only when no
//! WebGPU/Vulkan adapter exists at all (Mesa lavapipe is one).

mod common;

use std::sync::Arc;

use cmrm::backend::DecoderBackend;
use cmrm::generate::{CpuSession, DecodeSession, Next, Sampling};
use cmrm::gpu::session::GpuSession;
use cmrm::gpu::{GpuContext, GpuDecoder, GpuWeights};
use cmrm::steering::{Intervention, Positions, SteeringVectors};
use cmrm::text::ForwardOptions;
use cmrm::{decode_image, PromptText, Vlm};
use common::*;

const TOL_GPU_CPU: f32 = 1e-3;
const TOL_REFS: f32 = 1e-3;

fn ctx() -> Option<Arc<GpuContext>> {
    gpu_ctx()
}

fn logits_of(next: Next) -> Vec<f32> {
    match next {
        Next::Logits(l) => l.to_vec1().unwrap(),
        Next::Token(_) => panic!("expected logits"),
    }
}

/// Step the CPU and GPU decoders side by side (the CPU's greedy tokens fed to both), comparing
/// logits at the prefill and at every decode step.
fn stepwise(
    vlm: &Vlm,
    dec: &GpuDecoder,
    prepared: &cmrm::Prepared,
    steering: Option<&Intervention>,
    steps: usize,
    c: &mut Checker,
    what: &str,
) {
    let ids = &prepared.encoded.input_ids;
    let n = ids.len();
    let mut cpu = CpuSession::new(&vlm.model, steering, n, n + steps);
    let mut gpu = GpuSession::new(dec, n, n + 2, steering, false).unwrap(); // small capacity: exercises growth
    let mut a = logits_of(pollster::block_on(cpu.prefill(&prepared.embeds)).unwrap());
    let mut b = logits_of(pollster::block_on(gpu.prefill(&prepared.embeds)).unwrap());
    for step in 0..=steps {
        c.close(&format!("{what} step {step}"), "step logits gpu-cpu", &b, &a, TOL_GPU_CPU);
        if step == steps {
            break;
        }
        let id = cmrm::text::argmax(&a);
        a = logits_of(pollster::block_on(cpu.step(id)).unwrap());
        b = logits_of(pollster::block_on(gpu.step(id)).unwrap());
    }
}

fn parity(model: &str, rows_per_invocation: Option<bool>) {
    let Some(mut ctx) = ctx() else { return };
    if let Some(v) = rows_per_invocation {
        Arc::get_mut(&mut ctx).unwrap().set_rows_per_invocation(v);
    }
    eprintln!("{model}: rows_per_invocation = {}", ctx.rows_per_invocation());
    let vlm = Vlm::load_dir(&model_dir(model)).unwrap();
    let refs = Refs::load(model);
    let dec = GpuDecoder::new_blocking(ctx.clone(), &vlm.model.text).unwrap();
    let backend = pollster::block_on(DecoderBackend::gpu_model(ctx, &vlm.model, GpuWeights::F32)).unwrap();
    let mut c = Checker::default();
    let opts = vlm.default_generate_options(12, Sampling::Greedy);

    let mut features = std::collections::HashMap::new();
    for img in refs.json["images"].as_array().unwrap() {
        let bytes = std::fs::read(refs_dir(model).join(img["file"].as_str().unwrap())).unwrap();
        features.insert(
            img["name"].as_str().unwrap().to_owned(),
            vlm.encode_image(&decode_image(&bytes).unwrap()).unwrap(),
        );
    }
    let steer_cases = refs.json["steer_cases"].as_array().unwrap().clone();
    let mut n_checked = 0;
    for case in refs.json["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let mm = vlm
            .prepare(
                &PromptText::Chat(case["question"].as_str().unwrap().into()),
                Some(&features[case["image"].as_str().unwrap()]),
            )
            .unwrap();
        let txt = vlm.prepare_text_only(&mm.prompt).unwrap();

        // (label, prompt, steering, reference entry)
        let mut runs: Vec<(String, &cmrm::Prepared, Option<Intervention>, Option<&serde_json::Value>)> = vec![
            (format!("{id} mm"), &mm, None, Some(&case["multimodal"])),
            (format!("{id} text"), &txt, None, Some(&case["text_only"])),
        ];
        for sc in &steer_cases {
            let name = sc["name"].as_str().unwrap();
            let vectors = SteeringVectors::load(&refs_dir(model).join(sc["vectors_file"].as_str().unwrap())).unwrap();
            let layers: Vec<usize> =
                sc["layers"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap() as usize).collect();
            let positions: Positions = sc["positions"].as_str().unwrap().parse().unwrap();
            let alpha = sc["alpha"].as_f64().unwrap() as f32;
            let iv = Intervention::add(&vectors, alpha, Some(&layers), positions, vlm.device()).unwrap();
            runs.push((format!("{id} steer {name}"), &mm, Some(iv), Some(&case["steered_multimodal"][name])));
        }
        // `generated` positions (not in the oracle): GPU against CPU only.
        let random = SteeringVectors::load(&refs_dir(model).join("steer_random.safetensors")).unwrap();
        let all_layers: Vec<usize> = (0..vlm.config().text.num_hidden_layers).collect();
        for (alpha, layers) in [(2.0f32, vec![1usize]), (-1.5, all_layers)] {
            let iv = Intervention::add(&random, alpha, Some(&layers), Positions::Generated, vlm.device()).unwrap();
            runs.push((format!("{id} steer generated a{alpha} l{layers:?}"), &mm, Some(iv), None));
        }

        for (what, prepared, steering, want) in &runs {
            let steering = steering.as_ref();
            let n = prepared.encoded.input_ids.len();
            // Prefill with captured layers: logits, block outputs and final norm vs the CPU.
            let cpu = vlm.probe(prepared, steering).unwrap();
            let mut cache = dec.new_cache(n).unwrap();
            let out = dec
                .forward_like_cpu_blocking(
                    &prepared.embeds,
                    &mut cache,
                    ForwardOptions { steering, prompt_len: n, capture_layers: true, logits: true },
                )
                .unwrap();
            let logits: Vec<f32> = out.logits.unwrap().to_vec1().unwrap();
            c.close(what, "prefill logits gpu-cpu", &logits, &cpu.logits, TOL_GPU_CPU);
            let layers: Vec<Vec<f32>> = out.layer_outputs.unwrap().iter().map(|t| t.to_vec1().unwrap()).collect();
            c.close(what, "layer_outputs gpu-cpu", &flat(&layers), &flat(&cpu.layer_outputs), TOL_GPU_CPU);
            c.close(
                what,
                "final_norm gpu-cpu",
                &out.final_norm.unwrap().to_vec1::<f32>().unwrap(),
                cpu.hidden_states.last().unwrap(),
                TOL_GPU_CPU,
            );

            // Greedy generation through the backend API (argmax on the GPU).
            let g = backend.generate(&vlm, prepared, steering, &opts, &mut |_| true).unwrap();
            let cpu_g = vlm.generate(prepared, steering, &opts, &mut |_| true).unwrap();
            c.equal(what, "generated_ids gpu-cpu", g.generated_ids.clone(), cpu_g.generated_ids.clone());
            c.equal(what, "stopped_on_eos gpu-cpu", g.stopped_on_eos, cpu_g.stopped_on_eos);
            if let Some(want) = want {
                c.close(
                    what,
                    "prefill logits gpu-refs",
                    &logits,
                    &refs.f32s(want["logits"].as_str().unwrap()),
                    TOL_REFS,
                );
                c.equal(what, "generated_ids gpu-refs", g.generated_ids.clone(), ids(&want["generated_ids"]));
                c.equal(what, "stopped_on_eos gpu-refs", g.stopped_on_eos, want["stopped_on_eos"].as_bool().unwrap());
            }
            // Every decode step's logits.
            stepwise(&vlm, &dec, prepared, steering, 12, &mut c, what);
            n_checked += 1;
        }
    }
    eprintln!("{model}: {n_checked} runs checked");
    assert!(n_checked >= 9 * 12);
    c.finish(model);
}

#[test]
fn gpu_parity_clip_llama() {
    parity("tiny-llava-clip-llama", None);
}

/// The other matmul kernels (tiled + cooperative GEMV, the GPU default) on this adapter too.
#[test]
fn gpu_parity_clip_llama_tiled_kernels() {
    parity("tiny-llava-clip-llama", Some(false));
}

#[test]
fn gpu_parity_siglip_qwen2() {
    parity("tiny-llava-siglip-qwen2", None);
}

/// `cpu` never touches the GPU; `webgpu` uses the adapter and reports it; `auto` picks a hardware
/// adapter, and falls back to the CPU (saying why) when the only adapter is a software rasterizer
/// such as lavapipe, whose shaders run slower than candle's CPU path.
#[test]
fn backend_choice_reports_adapter() {
    use cmrm::backend::BackendChoice;
    let vlm = Vlm::load_dir(&model_dir(MODELS[0])).unwrap();
    let (b, info) = DecoderBackend::select_blocking(BackendChoice::Cpu, &vlm.model, GpuWeights::F32).unwrap();
    assert!(matches!(b, DecoderBackend::Cpu));
    assert_eq!(info.backend, "cpu");
    let Some(adapter) = pollster::block_on(cmrm::gpu::context::probe_adapter()) else {
        eprintln!("SKIPPED (auto/webgpu part): no adapter");
        return;
    };
    let (b, info) = DecoderBackend::select_blocking(BackendChoice::Webgpu, &vlm.model, GpuWeights::F32).unwrap();
    assert!(matches!(b, DecoderBackend::Gpu(..)));
    assert_eq!(info.backend, "webgpu");
    assert!(info.adapter.as_deref().is_some_and(|a| !a.is_empty()));
    // GPU weights `auto`: f16 on a hardware GPU, f32 on a software rasterizer.
    let (_, info) = DecoderBackend::select_blocking(BackendChoice::Webgpu, &vlm.model, GpuWeights::Auto).unwrap();
    let software = adapter.device_type == wgpu::DeviceType::Cpu;
    assert_eq!(info.gpu_weights.as_deref(), Some(if software { "f32" } else { "f16" }));
    let (b, info) = DecoderBackend::select_blocking(BackendChoice::Auto, &vlm.model, GpuWeights::F32).unwrap();
    eprintln!("auto -> {}", serde_json::to_string(&info).unwrap());
    if adapter.device_type == wgpu::DeviceType::Cpu {
        assert!(matches!(b, DecoderBackend::Cpu));
        assert!(info.fallback_reason.as_deref().is_some_and(|r| r.contains("software rasterizer")));
    } else {
        assert!(matches!(b, DecoderBackend::Gpu(..)), "auto fell back: {:?}", info.fallback_reason);
    }
}

/// f16 storage of the decoder's matrices: half the bytes per token, and the logits stay close to
/// the CPU's f32 ones (the only change is each weight rounded to f16, relative error ≤ 2⁻¹¹), on
/// every oracle case's prompt, unaltered and steered; `info()` says f16.
#[test]
fn f16_weights_stay_close_to_f32() {
    use cmrm::backend::BackendChoice;
    let Some(_) = ctx() else { return };
    for model in MODELS {
        let vlm = Vlm::load_dir(&model_dir(model)).unwrap();
        let (half, info) = DecoderBackend::select_blocking(BackendChoice::Webgpu, &vlm.model, GpuWeights::F16).unwrap();
        assert_eq!(info.gpu_weights.as_deref(), Some("f16"));
        let (full, _) = DecoderBackend::select_blocking(BackendChoice::Webgpu, &vlm.model, GpuWeights::F32).unwrap();
        let (DecoderBackend::Gpu(half, _), DecoderBackend::Gpu(full, _)) = (&half, &full) else {
            panic!("not on the GPU")
        };
        assert!(
            half.weight_bytes_per_token() * 10 < full.weight_bytes_per_token() * 6,
            "f16 must read ~half the bytes"
        );
        let (mut worst, mut min_cos) = (0f32, 1f32);
        for_each_prompt(&vlm, model, |prepared, steering| {
            let cpu = vlm.probe(prepared, steering).unwrap().logits;
            let (diff, cos) = closeness(&gpu_logits(half, prepared, steering), &cpu);
            worst = worst.max(diff);
            min_cos = min_cos.min(cos);
        });
        eprintln!("{model}: f16 GPU weights vs f32 CPU: max |Δlogit|/max |logit| {worst:e}, min cosine {min_cos}");
        assert!(worst > 0.0 && worst < 5e-3, "{model}: {worst}");
        assert!(min_cos > 0.99999, "{model}: {min_cos}");
    }
}

/// Every oracle case's prompt (text only), unaltered and steered (random vectors, α 1.5, all
/// layers).
fn for_each_prompt(vlm: &Vlm, model: &str, mut f: impl FnMut(&cmrm::Prepared, Option<&Intervention>)) {
    let refs = Refs::load(model);
    let vectors = SteeringVectors::load(&refs_dir(model).join("steer_random.safetensors")).unwrap();
    let steer = Intervention::add(&vectors, 1.5, None, Positions::All, vlm.device()).unwrap();
    for case in refs.json["cases"].as_array().unwrap() {
        let prepared = vlm.prepare_text_only(case["multimodal"]["prompt"].as_str().unwrap()).unwrap();
        for steering in [None, Some(&steer)] {
            f(&prepared, steering);
        }
    }
}

/// The last position's logits of one prefill of `prepared` on `dec`.
fn gpu_logits(dec: &GpuDecoder, prepared: &cmrm::Prepared, steering: Option<&Intervention>) -> Vec<f32> {
    let n = prepared.encoded.input_ids.len();
    let opts = ForwardOptions { steering, prompt_len: n, capture_layers: false, logits: true };
    let mut cache = dec.new_cache(n).unwrap();
    let out = dec.forward_like_cpu_blocking(&prepared.embeds, &mut cache, opts).unwrap();
    out.logits.unwrap().to_vec1().unwrap()
}

/// `(max |a − b| / max |b|, cosine(a, b))`.
fn closeness(a: &[f32], b: &[f32]) -> (f32, f32) {
    let spread = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    (max_abs_diff(a, b) / spread, dot / norm(a) / norm(b))
}

/// A model loaded quantized decodes on the GPU from its own blocks (`auto`: Q8_0; Q4 = Q4_0 and,
/// where rows are whole 256-blocks, Q4_K), reading a fraction of the f32 bytes per token, with
/// the logits of the same weights dequantized to f32 on the GPU (the kernels read exactly
/// candle's values), and close to candle's quantized CPU path, which also quantizes the
/// activations (Q8_0 / Q8_K) — on every oracle prompt, unaltered and steered.
#[test]
fn quantized_weights_decode_on_the_gpu() {
    use cmrm::backend::BackendChoice;
    use cmrm::quant::WeightFormat;
    let Some(_) = ctx() else { return };
    for model in MODELS {
        let exact_vlm = Vlm::load_dir(&model_dir(model)).unwrap();
        for format in [WeightFormat::Q8_0, WeightFormat::Q4] {
            let vlm = Vlm::load_dir_as(&model_dir(model), format).unwrap();
            let model_ref = &vlm.model;
            let (blocks, info) =
                DecoderBackend::select_blocking(BackendChoice::Webgpu, model_ref, GpuWeights::Auto).unwrap();
            let (dense, dense_info) =
                DecoderBackend::select_blocking(BackendChoice::Webgpu, model_ref, GpuWeights::F32).unwrap();
            let (DecoderBackend::Gpu(blocks, _), DecoderBackend::Gpu(dense, _)) = (&blocks, &dense) else {
                panic!("not on the GPU")
            };
            let stored = info.gpu_weights.unwrap();
            assert_eq!(dense_info.gpu_weights.as_deref(), Some("f32"));
            let ratio = blocks.weight_bytes_per_token() as f64 / dense.weight_bytes_per_token() as f64;
            let (mut exact, mut vs_cpu, mut min_cos, mut first, mut n) = (0f32, 0f32, 1f32, 0, 0);
            // Against the unquantized model: the GPU's and candle's quantized paths.
            let (mut gpu_vs_f32, mut cpu_vs_f32) = (1f32, 1f32);
            for_each_prompt(&vlm, model, |prepared, steering| {
                let on_blocks = gpu_logits(blocks, prepared, steering);
                exact = exact.max(closeness(&on_blocks, &gpu_logits(dense, prepared, steering)).0);
                let cpu = vlm.probe(prepared, steering).unwrap().logits;
                let (diff, cos) = closeness(&on_blocks, &cpu);
                vs_cpu = vs_cpu.max(diff);
                min_cos = min_cos.min(cos);
                first += usize::from(cmrm::text::argmax(&on_blocks) == cmrm::text::argmax(&cpu));
                n += 1;
                let unquantized = exact_vlm.probe(prepared, steering).unwrap().logits;
                gpu_vs_f32 = gpu_vs_f32.min(closeness(&on_blocks, &unquantized).1);
                cpu_vs_f32 = cpu_vs_f32.min(closeness(&cpu, &unquantized).1);
            });
            eprintln!(
                "{model} {format:?}: GPU {stored} weights, {ratio:.3}× the f32 bytes per token; vs the same weights dequantized on the GPU: max |Δlogit|/max |logit| {exact:e}; vs candle's quantized CPU path: {vs_cpu:.4}, min cosine {min_cos:.5}, first token {first}/{n}; min cosine to the F32 model: GPU {gpu_vs_f32:.5}, CPU {cpu_vs_f32:.5}"
            );
            let expected = match format {
                WeightFormat::Q8_0 => "q8_0",
                _ => "q4",
            };
            assert!(stored.starts_with(expected) || stored.contains(expected), "{model} {format:?}: {stored}");
            assert!(exact < 1e-4, "{model} {format:?}: blocks vs dequantized {exact}");
            assert!(min_cos > 0.995, "{model} {format:?}: cosine to candle's quantized path {min_cos}");
            match format {
                WeightFormat::Q8_0 => {
                    assert!(ratio < 0.28, "{model}: Q8_0 reads {ratio}× the f32 bytes");
                    assert!(first + 1 >= n, "{model}: Q8_0 first tokens {first}/{n}");
                    assert!(gpu_vs_f32 > 0.995, "{model}: Q8_0 cosine to F32 {gpu_vs_f32}");
                }
                _ => {
                    assert!(ratio < 0.16, "{model}: Q4 reads {ratio}× the f32 bytes");
                    assert!(gpu_vs_f32 > cpu_vs_f32 - 0.03, "{model}: Q4 cosine to F32 {gpu_vs_f32} vs {cpu_vs_f32}");
                }
            }
        }
    }
}

/// Q4_K at decoder scale (the oracle models' rows are too short for 256-blocks): a random
/// Qwen2-shaped decoder with 256-multiple widths, loaded as Q4, decodes on the GPU from its Q4_K
/// blocks with the logits of the same weights dequantized to f32 on the GPU, prefill and steps.
#[test]
fn q4k_decoder_matches_its_dequantized_weights() {
    use cmrm::gpu::{GpuForwardOptions, GpuInput, Readback};
    let Some(ctx) = ctx() else { return };
    let mut cfg = cmrm::gpu::bench::preset("small").unwrap();
    (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) = (1000, 256, 768, 2);
    (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) = (4, 2, 64);
    let text = cmrm::gpu::bench::random_text_model(&cfg, cmrm::quant::WeightFormat::Q4).unwrap();
    let blocks = pollster::block_on(GpuDecoder::new_with(ctx.clone(), &text, GpuWeights::Auto)).unwrap();
    let dense = pollster::block_on(GpuDecoder::new_with(ctx, &text, GpuWeights::F32)).unwrap();
    assert_eq!(blocks.weights_name(), "q4k");
    let opts = GpuForwardOptions { steering: None, prompt_len: 5, capture_layers: false, readback: Readback::Logits };
    let (mut a, mut b) = (blocks.new_cache(8).unwrap(), dense.new_cache(8).unwrap());
    let mut input = vec![3u32, 999, 0, 512, 77];
    for step in 0..4 {
        let la = blocks.forward_blocking(GpuInput::Tokens(&input), &mut a, &opts).unwrap().logits.unwrap();
        let lb = dense.forward_blocking(GpuInput::Tokens(&input), &mut b, &opts).unwrap().logits.unwrap();
        let (diff, _) = closeness(&la, &lb);
        eprintln!("q4k step {step}: max |Δlogit|/max |logit| {diff:e}");
        assert!(diff < 1e-4, "step {step}: {diff}");
        input = vec![cmrm::text::argmax(&la)];
    }
}

/// Compare's sequences as one batch on the GPU (one KV cache, one batched step for the
/// sequences still going) give what each sequence gives alone: the same logits at the prefill
/// and at every step (bit for bit; within 1e-4 when a shared prompt prefix — `last` or
/// `generated` positions — runs once and is copied to each sequence), when a sequence ends early (also one in the middle of
/// three: the others then step as two runs), for both GEMV kernels, and the greedy argmax equals
/// the logits' argmax. The CPU's batch gives the same first tokens.
#[test]
fn batched_sequences_equal_each_sequence_alone() {
    use cmrm::generate::{BatchSession, CpuSession};
    use cmrm::gpu::GpuBatchSession;
    for (model, rows_per_invocation) in [(MODELS[0], Some(false)), (MODELS[0], Some(true)), (MODELS[1], None)] {
        let Some(mut ctx) = ctx() else { return };
        if let Some(v) = rows_per_invocation {
            Arc::get_mut(&mut ctx).unwrap().set_rows_per_invocation(v);
        }
        let vlm = Vlm::load_dir(&model_dir(model)).unwrap();
        let dec = GpuDecoder::new_blocking(ctx, &vlm.model.text).unwrap();
        let vectors = SteeringVectors::load(&refs_dir(model).join("steer_random.safetensors")).unwrap();
        let steer = |alpha: f32, positions| Intervention::add(&vectors, alpha, None, positions, vlm.device()).unwrap();
        let (all, last, generated) =
            (steer(1.5, Positions::All), steer(-2.0, Positions::Last), steer(2.5, Positions::Generated));
        let img = decode_image(&std::fs::read(refs_dir(model).join("gradient.png")).unwrap()).unwrap();
        let features = vlm.encode_image(&img).unwrap();
        let prepared = vlm.prepare(&PromptText::Chat("What is in the picture?".into()), Some(&features)).unwrap();
        let n = prepared.encoded.input_ids.len();
        let steps = 6;
        // (steerings, step at which each sequence ends: None = runs to the end)
        type Case<'a> = (Vec<Option<&'a Intervention>>, Vec<Option<usize>>);
        let cases: Vec<Case> = vec![
            (vec![None, Some(&all)], vec![None, None]),
            (vec![None, Some(&last)], vec![Some(2), None]),
            (vec![Some(&generated), None], vec![None, Some(3)]),
            (vec![None, Some(&all), Some(&last)], vec![None, Some(1), None]),
        ];
        for (case, (steering, ends)) in cases.iter().enumerate() {
            let what = format!("{model} rows_per_invocation {rows_per_invocation:?} case {case}");
            // Each sequence alone: its logits at the prefill and every step (fed its own argmax).
            let alone: Vec<Vec<Vec<f32>>> = steering
                .iter()
                .zip(ends)
                .map(|(s, end)| {
                    let mut gpu = GpuSession::new(&dec, n, n + 1, *s, false).unwrap();
                    let mut logits = vec![logits_of(pollster::block_on(gpu.prefill(&prepared.embeds)).unwrap())];
                    for _ in 0..end.unwrap_or(steps) {
                        let id = cmrm::text::argmax(logits.last().unwrap());
                        logits.push(logits_of(pollster::block_on(gpu.step(id)).unwrap()));
                    }
                    logits
                })
                .collect();
            // With a shared prompt prefix, the rest of the prompt runs in other chunks (the
            // attention's tiles and key blocks fall elsewhere): equal to rounding, not bit for bit.
            let shared = cmrm::generate::shared_prompt(steering, n, n);
            let mut worst = 0f32;
            for greedy in [false, true] {
                let mut batch = GpuBatchSession::new(&dec, n, n + 1, steering, greedy).unwrap(); // grows
                let mut outs = pollster::block_on(batch.prefill_all(&prepared.embeds)).unwrap();
                #[allow(clippy::needless_range_loop)] // `step` indexes every sequence's logits and the ends
                for step in 0..=steps {
                    let mut ids = Vec::new();
                    for (seq, out) in outs.iter_mut().enumerate() {
                        let ended = ends[seq].is_some_and(|end| step > end);
                        assert_eq!(out.is_some(), !ended, "{what} step {step} seq {seq}: an output iff going");
                        let Some(out) = out.take() else {
                            ids.push(None);
                            continue;
                        };
                        let want = &alone[seq][step];
                        let id = match out {
                            Next::Logits(l) => {
                                let l = l.to_vec1::<f32>().unwrap();
                                if shared == 0 {
                                    assert_eq!(l, *want, "{what} step {step} seq {seq} logits");
                                } else {
                                    let diff = max_abs_diff(&l, want);
                                    worst = worst.max(diff);
                                    assert!(diff < 1e-4, "{what} step {step} seq {seq}: logits differ by {diff}");
                                }
                                cmrm::text::argmax(want)
                            }
                            Next::Token(id) => {
                                assert_eq!(id, cmrm::text::argmax(want), "{what} step {step} seq {seq} argmax");
                                id
                            }
                        };
                        ids.push(if ends[seq] == Some(step) { None } else { Some(id) });
                    }
                    if step == steps {
                        break;
                    }
                    outs = pollster::block_on(batch.step_all(&ids)).unwrap();
                }
            }
            eprintln!("{what}: shared prompt {shared} of {n}, largest logit difference {worst:e}");
            // The CPU's batch: the same first token for each sequence.
            let mut cpu = CpuSession::batch(&vlm.model, steering.clone(), n, n + steps + 1);
            let outs = pollster::block_on(cpu.prefill_all(&prepared.embeds)).unwrap();
            for (seq, out) in outs.into_iter().enumerate() {
                let cpu_id = cmrm::text::argmax(&logits_of(out.unwrap()));
                assert_eq!(cpu_id, cmrm::text::argmax(&alone[seq][0]), "{what} seq {seq}: the CPU's first token");
            }
        }
        eprintln!("{model}: batched = alone on {} cases", cases.len());
    }
}

/// A batched step refuses what it cannot do, with a message: sequences of different lengths,
/// steering prepared for a sequence outside the step, more sequences than the cache holds.
#[test]
fn batched_step_refuses_mismatched_sequences() {
    use cmrm::gpu::decoder::{GpuInput, Readback};
    let Some(ctx) = ctx() else { return };
    let vlm = Vlm::load_dir(&model_dir(MODELS[0])).unwrap();
    let dec = GpuDecoder::new_blocking(ctx, &vlm.model.text).unwrap();
    let vectors = SteeringVectors::load(&refs_dir(MODELS[0]).join("steer_random.safetensors")).unwrap();
    let iv = Intervention::add(&vectors, 1.0, None, Positions::All, vlm.device()).unwrap();
    let mut cache = dec.new_batch_cache(2, 8).unwrap();
    let opts = cmrm::gpu::decoder::GpuForwardOptions {
        steering: None,
        prompt_len: 2,
        capture_layers: false,
        readback: Readback::Nothing,
    };
    pollster::block_on(dec.forward_sequence(0, GpuInput::Tokens(&[1, 2]), &mut cache, &opts)).unwrap();
    let err = |r: anyhow::Result<Vec<cmrm::gpu::decoder::GpuOutput>>| format!("{:#}", r.expect_err("an error"));
    let uneven = err(pollster::block_on(dec.forward_batch(&[3, 3], &mut cache, 0, &[], 2, Readback::Argmax)));
    assert!(uneven.contains("one length"), "{uneven}");
    let steering = dec.prepare_steering_for(&iv, 1).unwrap();
    let outside = err(pollster::block_on(dec.forward_batch(&[3], &mut cache, 0, &[&steering], 2, Readback::Argmax)));
    assert!(outside.contains("steering for sequence 1"), "{outside}");
    let too_many = err(pollster::block_on(dec.forward_batch(&[3, 3, 3], &mut cache, 0, &[], 2, Readback::Argmax)));
    assert!(too_many.contains("sequences"), "{too_many}");
    // The refused steps left the cache as it was: sequence 0 can still go on alone.
    assert_eq!((cache.sequence_len(0), cache.sequence_len(1)), (2, 0));
    let one = pollster::block_on(dec.forward_batch(&[3], &mut cache, 0, &[], 2, Readback::Argmax)).unwrap();
    assert!(one[0].token.is_some());
}
