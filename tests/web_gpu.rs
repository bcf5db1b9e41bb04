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
use cmrm::backend::DecoderBackend;
use cmrm::generate::Sampling;
use cmrm::gpu::{GpuContext, GpuDecoder};
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
    files: ProcessorFiles,
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
            special_tokens_map_json: None,
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
        let vlm = Vlm::from_parts(config, cmrm::quant::WeightFormat::F32, &files, Some(&generation), weights).unwrap();
        let refs: Value =
            serde_json::from_slice(include_bytes!(concat!("fixtures/oracle/refs/", $model, "/refs.json"))).unwrap();
        let tensors = candle_core::safetensors::load_buffer(
            include_bytes!(concat!("fixtures/oracle/refs/", $model, "/refs.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        Oracle {
            vlm,
            files,
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

/// The vision tower and projector on WebGPU (`GpuVision`, what a `webgpu` backend encodes
/// images with) on the three oracle layouts — CLIP with CLS dropped and pre-norm, SigLIP, and
/// CLIP with features from vision layers [-1, 0, -2] concatenated — every oracle image: image
/// features within 1e-4 of transformers', and the first case's greedy answer on the GPU backend
/// (features, prefill and decode on WebGPU) equal to transformers'.
#[wasm_bindgen_test]
async fn webgpu_vision_matches_transformers() {
    use cmrm::gpu::{GpuVision, GpuWeights};
    let Some(ctx) = context().await else { return };
    for o in [
        oracle!("tiny-llava-clip-llama"),
        oracle!("tiny-llava-siglip-qwen2"),
        oracle!("tiny-llava-multilayer-clip-llama"),
    ] {
        let vlm = &o.vlm;
        let model = &o.refs["model"];
        let vision = GpuVision::new(ctx.clone(), &vlm.model, GpuWeights::Auto).await.unwrap();
        for img in o.refs["images"].as_array().unwrap() {
            let file = img["file"].as_str().unwrap();
            let bytes = o.images.iter().find(|(n, _)| *n == file).unwrap().1;
            let (_, pixel_values) = vlm.pixel_values(&decode_image(bytes).unwrap(), 1).unwrap();
            let got: Vec<f32> =
                vision.encode(&vlm.model, &pixel_values).await.unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> =
                o.tensors[img["image_features"].as_str().unwrap()].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got.len(), want.len(), "{model} {file}");
            let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-4, "{model} {file}: image features differ from transformers' by {d:e}");
        }
        let backend = DecoderBackend::gpu_model(ctx.clone(), &vlm.model, GpuWeights::Auto).await.unwrap();
        assert_eq!(backend.info().vision, "webgpu", "{model}");
        let case = &o.refs["cases"][0];
        let file = format!("{}.png", case["image"].as_str().unwrap());
        let image = decode_image(o.images.iter().find(|(n, _)| *n == file).unwrap().1).unwrap();
        let features = backend.encode_image_async(vlm, &image).await.unwrap().features;
        let prepared =
            vlm.prepare(&PromptText::Chat(case["question"].as_str().unwrap().into()), Some(&features)).unwrap();
        let opts = vlm.default_generate_options(12, Sampling::Greedy);
        let g = backend.generate_async(vlm, &prepared, None, &opts, &mut |_| true).await.unwrap();
        assert_eq!(g.generated_ids, ids(&case["multimodal"]["generated_ids"]), "{model}");
        log(&format!("{model}: image features on WebGPU within 1e-4 of transformers', greedy ids equal"));
    }
}

/// Every quantized weight storage compiled by the browser's WGSL compiler (Tint) and run on its
/// WebGPU adapter: the three matmul kernels (one row per invocation, cooperative GEMV, tiled) and
/// the embedding kernel read Q8_0 / Q4_0 / Q4_K blocks as candle dequantizes them; and a Q4
/// decoder with 256-wide rows (Q4_K) gives the logits of its weights dequantized to f32.
#[wasm_bindgen_test]
async fn quantized_storages_in_the_browser() {
    use candle_core::quantized::QTensor;
    use candle_core::Tensor;
    use cmrm::gpu::buffers::GpuMatrix;
    use cmrm::gpu::storage::WeightStorage;
    use cmrm::gpu::{GpuForwardOptions, GpuInput, GpuWeights, Readback};
    if context().await.is_none() {
        return;
    }
    let cpu = &Device::Cpu;
    for rows_per_invocation in [true, false] {
        let mut ctx = GpuContext::new().await.unwrap();
        ctx.set_rows_per_invocation(rows_per_invocation);
        for (storage, (n, k)) in [
            (WeightStorage::Q8_0, (37usize, 96usize)),
            (WeightStorage::Q4_0, (37, 40)),
            (WeightStorage::Q4K, (21, 512)),
        ] {
            let dtype = storage.ggml().unwrap();
            let kp = k.div_ceil(dtype.block_size()) * dtype.block_size();
            let w = Tensor::randn(0f32, 1.0, (n, k), cpu).unwrap().pad_with_zeros(1, 0, kp - k).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let dequantized = q.dequantize(cpu).unwrap().narrow(1, 0, k).unwrap().contiguous().unwrap();
            let matrix = GpuMatrix::blocks(&ctx, "w", &q.data().unwrap(), (n, k), None, storage, 16).unwrap();
            for m in [1, 5] {
                let x = Tensor::randn(0f32, 1.0, (m, k), cpu).unwrap();
                let want: Vec<f32> =
                    x.matmul(&dequantized.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let got =
                    cmrm::gpu::ops::run_linear(&ctx, &matrix, &x.flatten_all().unwrap().to_vec1().unwrap(), m, None)
                        .await
                        .unwrap();
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{} m={m}: {a} vs {b}", storage.name());
                }
            }
            let ids = [0u32, (n - 1) as u32, 3];
            let rows = cmrm::gpu::ops::embed_rows(&ctx, &matrix, &ids).await.unwrap();
            let want: Vec<f32> = dequantized
                .index_select(&Tensor::new(&ids, cpu).unwrap(), 0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(rows, want, "{} embedding rows", storage.name());
        }
    }
    let ctx = context().await.unwrap();
    let mut cfg = cmrm::bench::preset_config("llava-interleave-qwen-0.5b").unwrap().text;
    (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) = (1000, 256, 768, 2);
    (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) = (4, 2, 64);
    let random = Box::new(cmrm::weights::RandomWeights { seed: 0 });
    let vb = candle_nn::VarBuilder::from_backend(random, candle_core::DType::F32, Device::Cpu);
    let text = cmrm::text::TextModel::new(&cfg, cmrm::quant::WeightFormat::Q4, vb).unwrap();
    let blocks = GpuDecoder::new_with(ctx.clone(), &text, GpuWeights::Auto).await.unwrap();
    let dense = GpuDecoder::new_with(ctx, &text, GpuWeights::F32).await.unwrap();
    assert_eq!(blocks.weights_name(), "q4k");
    let opts = GpuForwardOptions { steering: None, prompt_len: 4, capture_layers: false, readback: Readback::Logits };
    let (mut a, mut b) = (blocks.new_cache(8).unwrap(), dense.new_cache(8).unwrap());
    let la = blocks.forward(GpuInput::Tokens(&[3, 999, 0, 512]), &mut a, &opts).await.unwrap().logits.unwrap();
    let lb = dense.forward(GpuInput::Tokens(&[3, 999, 0, 512]), &mut b, &opts).await.unwrap().logits.unwrap();
    let spread = lb.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = la.iter().zip(&lb).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    log(&format!("Q4_K decoder on WebGPU: max |Δlogit| {worst:e} of {spread}"));
    assert!(worst <= 1e-4 * spread, "{worst} of {spread}");
}

/// A GPU-resident load in the browser (`cmrm::resident`, the page's WebGPU load): the weights
/// stream in small chunks, each block goes to WebGPU once the stream has moved past it and its
/// bytes are freed; the streamed bytes held never exceed half the model's, and the resident
/// model's image features, prefill logits and greedy answers (unaltered and steered) equal those
/// of the GPU backend built from the whole CPU model.
#[wasm_bindgen_test]
async fn resident_load_streams_blocks_to_webgpu() {
    use cmrm::gpu::GpuWeights;
    use cmrm::resident::ResidentLoad;
    use cmrm::streaming::WeightStream;
    let Some(ctx) = context().await else { return };
    let o = oracle!("tiny-llava-siglip-qwen2");
    let full = &o.vlm;
    let bytes = include_bytes!("fixtures/oracle/fixtures/tiny-llava-siglip-qwen2/model.safetensors");
    let format = cmrm::quant::WeightFormat::F32;
    let mut load = ResidentLoad::new(ctx.clone(), full.config(), format, GpuWeights::Auto).unwrap();
    let mut stream = WeightStream::new("model.safetensors", Box::new(move |_, _| Ok(format))).with_slice_bytes(4096);
    let mut weights = Weights::empty();
    let (mut peak, mut total) = (0usize, 0usize);
    for chunk in bytes.chunks(1000) {
        stream.push(chunk, &mut weights).unwrap();
        peak = peak.max(weights.held_bytes());
        load.absorb_stream(&stream, &weights).unwrap();
    }
    stream.finish().unwrap();
    for (name, shape) in weights.shapes() {
        total += cmrm::quant::estimate_model_bytes(format, std::iter::once((name, shape))) as usize;
    }
    log(&format!(
        "resident load in the browser: peak streamed bytes held {peak} of {total}, {} blocks uploaded while streaming",
        load.uploaded()
    ));
    assert!(peak * 2 <= total, "held {peak} of {total}");
    assert!(load.uploaded() >= full.config().text.num_hidden_layers);
    let (model, resident, info) = load.finish(weights).await.unwrap();
    assert!(info.resident && info.vision == "webgpu", "{info:?}");
    assert!(!model.runs_on_cpu());
    let shell =
        Vlm::with_model(model, cmrm::processor::Processor::from_files(&o.files, full.config()).unwrap(), None).unwrap();
    let whole = DecoderBackend::gpu_model(ctx, &full.model, GpuWeights::Auto).await.unwrap();
    let random = SteeringVectors::from_bytes("steer_random.safetensors", o.vectors[0].1).unwrap();
    let all: Vec<usize> = (0..full.config().text.num_hidden_layers).collect();
    let steer = Intervention::add(&random, 1.5, Some(&all), Positions::All, full.device()).unwrap();
    let opts = full.default_generate_options(8, Sampling::Greedy);
    let img = decode_image(o.images[0].1).unwrap();
    let a = whole.encode_image_async(full, &img).await.unwrap().features;
    let b = resident.encode_image_async(&shell, &img).await.unwrap().features;
    assert_eq!(b.flatten_all().unwrap().to_vec1::<f32>().unwrap(), a.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let question = PromptText::Chat(o.refs["cases"][0]["question"].as_str().unwrap().into());
    let pa = whole.prepare_async(full, &question, &[&a]).await.unwrap();
    // The shell has no embedding table: the prompt is embedded on the GPU, as the CPU would.
    assert!(!shell.model.text.has_ends());
    let pb = resident.prepare_async(&shell, &question, &[&b]).await.unwrap();
    let cpu = full.prepare(&question, Some(&a)).unwrap();
    assert_eq!(
        pb.embeds.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        cpu.embeds.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    for steering in [None, Some(&steer)] {
        let x = whole.probe_async(full, &pa, steering).await.unwrap();
        let y = resident.probe_async(&shell, &pb, steering).await.unwrap();
        assert_eq!(y.logits, x.logits, "prefill logits (steered: {})", steering.is_some());
        let ga = whole.generate_async(full, &pa, steering, &opts, &mut |_| true).await.unwrap();
        let gb = resident.generate_async(&shell, &pb, steering, &opts, &mut |_| true).await.unwrap();
        assert_eq!(gb.generated_ids, ga.generated_ids, "greedy ids (steered: {})", steering.is_some());
    }
    // A CPU forward on the shell says where the blocks are.
    let err = shell.probe(&pb, None).unwrap_err();
    assert!(format!("{err:#}").contains("GPU only"), "{err:#}");

    // The device lost (destroyed here): the next request fails with `DeviceLost`, the marker the
    // page turns into kind `gpu-lost` (and loads the model again on the CPU), and nothing panics.
    resident.gpu_context().unwrap().device.destroy();
    let tick = js_sys::Promise::new(&mut |resolve, _| {
        use wasm_bindgen::JsCast;
        let global = js_sys::global();
        let set_timeout: js_sys::Function =
            js_sys::Reflect::get(&global, &"setTimeout".into()).unwrap().unchecked_into();
        let _ = set_timeout.call2(&global, &resolve, &50.into());
    });
    wasm_bindgen_futures::JsFuture::from(tick).await.unwrap();
    let err = resident.generate_async(&shell, &pb, None, &opts, &mut |_| true).await.unwrap_err();
    assert!(err.downcast_ref::<cmrm::gpu::context::DeviceLost>().is_some(), "{err:#}");
}
