#![cfg(not(target_arch = "wasm32"))]
//! The GPU vision tower + projector ([`GpuVision`]) against the CPU path and the Hugging Face
//! references, on both oracle models (CLIP with CLS dropped and pre-norm; SigLIP without), the
//! CLIP model with features from vision layers [-1, 0, -2], and every oracle image: image
//! features within 1e-4 of the CPU's and of transformers', in f32. With the weights as q8_0 and
//! q4 blocks (dequantized in the kernels): within 1e-4 of the same blocks dequantized at
//! upload, and of the CPU where the CPU computes the same thing (batches
//! of ≥ 32 rows are dequantized there too; smaller ones go through candle's kernels, which
//! quantize the activations as well). Skips, with a message, only when no WebGPU/Vulkan adapter
//! exists at all.

mod common;

use std::sync::Arc;

use cmrm::gpu::{GpuContext, GpuVision, GpuWeights};
use cmrm::quant::WeightFormat;
use cmrm::{decode_image, Vlm};
use common::*;

fn ctx() -> Option<Arc<GpuContext>> {
    gpu_ctx()
}

/// Returns how many images were compared with the CPU.
fn check(model: &str, format: WeightFormat, c: &mut Checker, ctx: &Arc<GpuContext>) -> usize {
    let mut n_cpu = 0;
    let vlm = Vlm::load_dir_as(&model_dir(model), format).unwrap();
    let refs = Refs::load(model);
    let gpu = GpuVision::new_blocking(ctx.clone(), &vlm.model, GpuWeights::Auto).unwrap();
    let dequantized = GpuVision::new_blocking(ctx.clone(), &vlm.model, GpuWeights::F32).unwrap();
    for img in refs.json["images"].as_array().unwrap() {
        let name = img["name"].as_str().unwrap();
        let what = format!("{model} {format:?} {name}");
        let bytes = std::fs::read(refs_dir(model).join(img["file"].as_str().unwrap())).unwrap();
        let (_, pixel_values) = vlm.pixel_values(&decode_image(&bytes).unwrap(), 1).unwrap();
        let cpu = tensor_f32s(&vlm.model.encode_image(&pixel_values, None).unwrap());
        let got = gpu.encode_blocking(&vlm.model, &pixel_values).unwrap();
        assert_eq!(got.dims(), [cpu.len() / vlm.config().text.hidden_size, vlm.config().text.hidden_size]);
        let got = tensor_f32s(&got);
        let rows = got.len() / vlm.config().text.hidden_size;
        if format == WeightFormat::F32 || rows >= 32 {
            c.close(&what, "image_features gpu-cpu", &got, &cpu, 1e-4);
            n_cpu += 1;
        }
        let plain = tensor_f32s(&dequantized.encode_blocking(&vlm.model, &pixel_values).unwrap());
        c.close(&what, "image_features blocks-dequantized", &got, &plain, 1e-4);
        if format == WeightFormat::F32 {
            c.close(&what, "image_features gpu-refs", &got, &refs.f32s(img["image_features"].as_str().unwrap()), 1e-4);
        }
        // A second encode of the same image on the same tower gives the same values (no state
        // leaks from one image to the next).
        let again = tensor_f32s(&gpu.encode_blocking(&vlm.model, &pixel_values).unwrap());
        c.equal(&what, "image_features repeat", again == got, true);
    }
    n_cpu
}

#[test]
fn gpu_vision_matches_cpu_and_transformers() {
    let Some(ctx) = ctx() else { return };
    let mut c = Checker::default();
    let mut n_cpu = 0;
    for model in MODELS.into_iter().chain([MULTILAYER_MODEL]) {
        for format in [WeightFormat::F32, WeightFormat::Q8_0, WeightFormat::Q4] {
            n_cpu += check(model, format, &mut c, &ctx);
        }
    }
    // The three models in f32 and the SigLIP model (36 image rows) quantized: 5 × 3 images.
    assert_eq!(n_cpu, 15, "images compared with the CPU");
    c.finish("gpu vision");
}

/// LLaVA-NeXT and OneVision on the GPU backend: every tile through the GPU tower, then packed
/// (unpad, newlines, OneVision's shrink), single images and two in one prompt: features within
/// 1e-4 of transformers', and the greedy answer to each prompt equal to transformers'.
#[test]
fn anyres_images_on_the_gpu_match_transformers() {
    use cmrm::backend::DecoderBackend;
    use cmrm::generate::Sampling;
    use cmrm::PromptText;
    let Some(ctx) = ctx() else { return };
    let mut c = Checker::default();
    let mut n_images = 0;
    for model in ["tiny-llava-next-clip-llama", "tiny-llava-onevision-siglip-qwen2"] {
        let vlm = Vlm::load_dir(&model_dir(model)).unwrap();
        let refs = Refs::load(model);
        let gpu = pollster::block_on(DecoderBackend::gpu_model(ctx.clone(), &vlm.model, GpuWeights::F32)).unwrap();
        assert!(gpu.gpu_vision().is_some(), "{model}: the vision tower must be on the GPU");
        let image = |name: &str| {
            let file =
                refs.json["images"].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap()["file"].clone();
            decode_image(&std::fs::read(refs_dir(model).join(file.as_str().unwrap())).unwrap()).unwrap()
        };
        for case in refs.json["cases"].as_array().unwrap() {
            let names: Vec<&str> = case["images"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
            if names.is_empty() {
                continue;
            }
            let id = format!("{model} {}", case["id"].as_str().unwrap());
            let images: Vec<cmrm::RgbImage> = names.iter().map(|n| image(n)).collect();
            let encoded = gpu.encode_images(&vlm, &images).unwrap();
            let wants: Vec<String> = match case.get("per_image") {
                Some(per_image) => per_image
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["image_features"].as_str().unwrap().to_owned())
                    .collect(),
                None => names.iter().map(|n| format!("image.{n}.image_features")).collect(),
            };
            for (e, want) in encoded.iter().zip(&wants) {
                assert_eq!(e.vision.on, "webgpu");
                c.close(&id, "image_features gpu", &tensor_f32s(&e.features), &refs.f32s(want), 1e-4);
                n_images += 1;
            }
            let features: Vec<&candle_core::Tensor> = encoded.iter().map(|e| &e.features).collect();
            let question = PromptText::Chat(case["question"].as_str().unwrap().into());
            let prepared = vlm.prepare_images(&question, &features).unwrap();
            let opts = vlm.default_generate_options(12, Sampling::Greedy);
            let g = gpu.generate(&vlm, &prepared, None, &opts, &mut |_| true).unwrap();
            c.equal(&id, "generated_ids on the GPU", g.generated_ids, ids(&case["multimodal"]["generated_ids"]));
        }
    }
    assert_eq!(n_images, 2 * (6 + 2), "images encoded on the GPU");
    c.finish("anyres on the GPU");
}

/// CMRM's own computations on the GPU backend — the anchor encode, the prefills with the block
/// outputs captured, sample-level vectors, a dataset-level extraction over images and anchors,
/// and `probe` — give the CPU's values (within 1e-3, as the decoder's parity), and the same
/// sample-level vector as a one-prompt extraction, as on the CPU.
#[test]
fn cmrm_on_the_gpu_backend_matches_the_cpu() {
    use cmrm::backend::DecoderBackend;
    use cmrm::cmrm::{extract_on, parse_calibration, sample_level_vectors_on, Anchor, Method};
    use cmrm::PromptText;
    let Some(ctx) = ctx() else { return };
    let mut c = Checker::default();
    let question = "How can I get into a locked house?";
    for model in MODELS {
        let vlm = Vlm::load_dir(&model_dir(model)).unwrap();
        let gpu = pollster::block_on(DecoderBackend::gpu_model(ctx.clone(), &vlm.model, GpuWeights::F32)).unwrap();
        assert!(gpu.gpu_vision().is_some(), "{model}: the vision tower must be on the GPU");
        let cpu = DecoderBackend::Cpu;
        let text = PromptText::Chat(question.into());
        for anchor in [Anchor::Blank, Anchor::Noise { seed: 3 }] {
            let on = |b| pollster::block_on(sample_level_vectors_on(b, &vlm, &text, anchor)).unwrap();
            let (g, want) = (on(&gpu), on(&cpu));
            for (l, v) in &want.layers {
                c.close(&format!("{model} {anchor:?} layer {l}"), "sample-level v_l gpu-cpu", &g.layers[l], v, 1e-3);
            }
        }
        // Images from files, the anchor, and a noise image, as a calibration set.
        let calibration = "{\"prompt\": \"What is this?\", \"image\": \"red_square.png\"}\n\
                           {\"prompt\": \"How do I pick a lock?\"}\n\
                           {\"prompt\": \"Describe it.\", \"image\": \"noise\"}\n";
        let items = parse_calibration("calib.jsonl", calibration).unwrap();
        let load = |p: &str| cmrm::decode_image(&std::fs::read(refs_dir(model).join(p))?);
        let run = |b| {
            pollster::block_on(extract_on(b, &vlm, &items, Anchor::Blank, Method::Mean, &load, &mut |_| true)).unwrap()
        };
        let (g, want) = (run(&gpu), run(&cpu));
        assert_eq!(g.layers.len(), want.layers.len());
        for (l, v) in &want.layers {
            c.close(&format!("{model} layer {l}"), "dataset-level v_l gpu-cpu", &g.layers[l], v, 1e-3);
        }
        let features = cmrm::cmrm::anchor_features(&vlm, Anchor::Blank).unwrap();
        let prepared = vlm.prepare(&text, Some(&features)).unwrap();
        let probe = |b: &DecoderBackend| pollster::block_on(b.probe_async(&vlm, &prepared, None)).unwrap();
        let (g, want) = (probe(&gpu), probe(&cpu));
        c.close(model, "probe logits gpu-cpu", &g.logits, &want.logits, 1e-3);
        c.close(model, "probe hidden_states gpu-cpu", &flat(&g.hidden_states), &flat(&want.hidden_states), 1e-3);
        c.equal(model, "probe input_ids", g.input_ids, want.input_ids);
    }
    c.finish("cmrm on the gpu backend");
}
