//! The GPU decoder in a real browser through WebGPU (headless Chromium, SwiftShader with
//! `--enable-unsafe-webgpu`, see webdriver.json): on the oracle checkpoints, greedy tokens must
//! equal the Hugging Face references and prefill logits stay within 1e-3 of them, unaltered and
//! with every oracle steering case. Skips (with a console message) only when the browser
//! exposes no WebGPU adapter.
//!
//! Run: `WASM_BINDGEN_TEST_TIMEOUT=900 CHROMEDRIVER=/usr/bin/chromedriver \
//!       cargo test --target wasm32-unknown-unknown --release --test web_gpu`
#![cfg(target_arch = "wasm32")]

use std::sync::Arc;

use candle_core::Device;
use cmrm::generate::Sampling;
use cmrm::gpu::{DecoderBackend, GpuContext, GpuDecoder};
use cmrm::processor::ProcessorFiles;
use cmrm::steering::{Intervention, Positions, SteeringVectors};
use cmrm::text::ForwardOptions;
use cmrm::weights::{FileBytes, Weights};
use cmrm::{decode_image, LlavaConfig, PromptText, Vlm};
use serde_json::Value;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

struct Oracle {
    vlm: Vlm,
    refs: Value,
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
    images: Vec<(&'static str, &'static [u8])>,
    vectors: Vec<(&'static str, &'static [u8])>,
}

macro_rules! oracle {
    ($model:literal) => {{
        let f = |s: &[u8]| String::from_utf8(s.to_vec()).unwrap();
        let config = LlavaConfig::from_json_str(&f(include_bytes!(concat!(
            "fixtures/oracle/fixtures/",
            $model,
            "/config.json"
        ))))
        .unwrap();
        let files = ProcessorFiles {
            tokenizer_json: include_bytes!(concat!("fixtures/oracle/fixtures/", $model, "/tokenizer.json")).to_vec(),
            tokenizer_config_json: Some(f(include_bytes!(concat!(
                "fixtures/oracle/fixtures/",
                $model,
                "/tokenizer_config.json"
            )))),
            chat_template_jinja: Some(f(include_bytes!(concat!(
                "fixtures/oracle/fixtures/",
                $model,
                "/chat_template.jinja"
            )))),
            chat_template_json: None,
            preprocessor_config_json: Some(f(include_bytes!(concat!(
                "fixtures/oracle/fixtures/",
                $model,
                "/preprocessor_config.json"
            )))),
            processor_config_json: Some(f(include_bytes!(concat!(
                "fixtures/oracle/fixtures/",
                $model,
                "/processor_config.json"
            )))),
        };
        let generation = f(include_bytes!(concat!("fixtures/oracle/fixtures/", $model, "/generation_config.json")));
        let mut weights = Weights::empty();
        weights
            .add_file(
                "model.safetensors",
                FileBytes::Owned(
                    include_bytes!(concat!("fixtures/oracle/fixtures/", $model, "/model.safetensors")).to_vec(),
                ),
            )
            .unwrap();
        let vlm = Vlm::from_parts(config, &files, Some(&generation), weights).unwrap();
        let refs: Value =
            serde_json::from_slice(include_bytes!(concat!("fixtures/oracle/refs/", $model, "/refs.json"))).unwrap();
        let tensors = candle_core::safetensors::load_buffer(
            include_bytes!(concat!("fixtures/oracle/refs/", $model, "/refs.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        Oracle {
            vlm,
            refs,
            tensors,
            images: vec![
                (
                    "red_square.png",
                    include_bytes!(concat!("fixtures/oracle/refs/", $model, "/red_square.png")).as_slice(),
                ),
                ("gradient.png", include_bytes!(concat!("fixtures/oracle/refs/", $model, "/gradient.png")).as_slice()),
                ("checker.png", include_bytes!(concat!("fixtures/oracle/refs/", $model, "/checker.png")).as_slice()),
            ],
            vectors: vec![
                (
                    "steer_random.safetensors",
                    include_bytes!(concat!("fixtures/oracle/refs/", $model, "/steer_random.safetensors")).as_slice(),
                ),
                (
                    "shift_vectors.safetensors",
                    include_bytes!(concat!("fixtures/oracle/refs/", $model, "/shift_vectors.safetensors")).as_slice(),
                ),
            ],
        }
    }};
}

fn log(s: &str) {
    web_sys::console::log_1(&s.into());
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

async fn context() -> Option<Arc<GpuContext>> {
    if cmrm::gpu::context::probe_adapter().await.is_none() {
        log("SKIPPED: this browser exposes no WebGPU adapter (Chromium needs --enable-unsafe-webgpu)");
        return None;
    }
    Some(Arc::new(GpuContext::new().await.expect("a WebGPU adapter exists, so the GPU context must work")))
}

async fn parity(o: Oracle, ctx: Arc<GpuContext>) {
    let vlm = &o.vlm;
    let dec = GpuDecoder::new(ctx.clone(), &vlm.model.text).await.unwrap();
    let backend = DecoderBackend::gpu(ctx, &vlm.model.text).await.unwrap();
    let opts = vlm.default_generate_options(12, Sampling::Greedy);
    let mut features = std::collections::HashMap::new();
    for img in o.refs["images"].as_array().unwrap() {
        let file = img["file"].as_str().unwrap();
        let bytes = o.images.iter().find(|(n, _)| *n == file).unwrap().1;
        features
            .insert(img["name"].as_str().unwrap().to_owned(), vlm.encode_image(&decode_image(bytes).unwrap()).unwrap());
    }
    let refs_f32 = |key: &str| -> Vec<f32> { o.tensors[key].flatten_all().unwrap().to_vec1().unwrap() };
    let mut failures = Vec::new();
    let mut worst = 0f32;
    let mut runs = 0;
    for case in o.refs["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let mm = vlm
            .prepare(
                &PromptText::Chat(case["question"].as_str().unwrap().into()),
                Some(&features[case["image"].as_str().unwrap()]),
            )
            .unwrap();
        let txt = vlm.prepare_text_only(&mm.prompt).unwrap();
        let mut todo = vec![
            (format!("{id} mm"), &mm, None, &case["multimodal"]),
            (format!("{id} text"), &txt, None, &case["text_only"]),
        ];
        for sc in o.refs["steer_cases"].as_array().unwrap() {
            let name = sc["name"].as_str().unwrap();
            let file = sc["vectors_file"].as_str().unwrap();
            let bytes = o.vectors.iter().find(|(n, _)| *n == file).unwrap().1;
            let vectors = SteeringVectors::from_safetensors_bytes(file, bytes).unwrap();
            let layers: Vec<usize> =
                sc["layers"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap() as usize).collect();
            let positions: Positions = sc["positions"].as_str().unwrap().parse().unwrap();
            let iv = Intervention::add(
                &vectors,
                sc["alpha"].as_f64().unwrap() as f32,
                Some(&layers),
                positions,
                &Device::Cpu,
            )
            .unwrap();
            todo.push((format!("{id} steer {name}"), &mm, Some(iv), &case["steered_multimodal"][name]));
        }
        for (what, prepared, steering, want) in &todo {
            let n = prepared.encoded.input_ids.len();
            let mut cache = dec.new_cache(n).unwrap();
            let out = dec
                .forward_like_cpu(
                    &prepared.embeds,
                    &mut cache,
                    ForwardOptions { steering: steering.as_ref(), prompt_len: n, capture_layers: false, logits: true },
                )
                .await
                .unwrap();
            let logits: Vec<f32> = out.logits.unwrap().to_vec1().unwrap();
            let d = logits
                .iter()
                .zip(refs_f32(want["logits"].as_str().unwrap()))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            worst = worst.max(d);
            if d.is_nan() || d > 1e-3 {
                failures.push(format!("{what}: logits differ from the refs by {d:e}"));
            }
            let g = backend.generate_async(vlm, prepared, steering.as_ref(), &opts, &mut |_| true).await.unwrap();
            if g.generated_ids != ids(&want["generated_ids"])
                || g.stopped_on_eos != want["stopped_on_eos"].as_bool().unwrap()
            {
                failures.push(format!(
                    "{what}: generated {:?}, expected {:?}",
                    g.generated_ids,
                    ids(&want["generated_ids"])
                ));
            }
            runs += 1;
        }
    }
    log(&format!(
        "{}: {runs} runs on {:?}, worst logits |diff| vs refs {worst:e}",
        o.refs["model"],
        backend.info().adapter
    ));
    assert!(runs >= 9 * 10);
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[wasm_bindgen_test]
async fn webgpu_parity_clip_llama() {
    let Some(ctx) = context().await else { return };
    parity(oracle!("tiny-llava-clip-llama"), ctx).await;
}

#[wasm_bindgen_test]
async fn webgpu_parity_siglip_qwen2() {
    let Some(ctx) = context().await else { return };
    parity(oracle!("tiny-llava-siglip-qwen2"), ctx).await;
}
