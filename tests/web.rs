//! The browser API in a real browser (wasm-bindgen-test, headless Chromium): the oracle's tiny
//! checkpoints loaded from bytes through `Session`, answered with greedy decoding, unaltered and
//! steered, must give exactly the oracle's `generated_ids` — the ids the native build is tested
//! against in tests/oracle_parity.rs, so this shows wasm == native == transformers.
//!
//! Run: `scripts/test-browser.sh`, or
//! `WASM_BINDGEN_TEST_TIMEOUT=600 CHROMEDRIVER=/usr/bin/chromedriver cargo test --target wasm32-unknown-unknown --release --test web`
#![cfg(target_arch = "wasm32")]

use cmrm::web::Session;
use serde::Serialize;
use serde_json::{json, Value};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

#[path = "corpus/mod.rs"]
mod corpus;

macro_rules! fixture {
    ($model:literal, $file:literal) => {
        (String::from($file), include_bytes!(concat!("fixtures/oracle/fixtures/", $model, "/", $file)).to_vec())
    };
}

macro_rules! model_files {
    ($model:literal) => {
        vec![
            fixture!($model, "config.json"),
            fixture!($model, "tokenizer.json"),
            fixture!($model, "tokenizer_config.json"),
            fixture!($model, "chat_template.jinja"),
            fixture!($model, "preprocessor_config.json"),
            fixture!($model, "processor_config.json"),
            fixture!($model, "generation_config.json"),
            fixture!($model, "model.safetensors"),
        ]
    };
}

macro_rules! refs {
    ($model:literal, $file:literal) => {
        include_bytes!(concat!("fixtures/oracle/refs/", $model, "/", $file)).as_slice()
    };
}

/// One oracle model: its files, refs.json, images and vector files.
struct Oracle {
    name: &'static str,
    files: Vec<(String, Vec<u8>)>,
    refs: Value,
    images: [(&'static str, &'static [u8]); 3],
    shift: &'static [u8],
    random: &'static [u8],
}

fn siglip_qwen2() -> Oracle {
    Oracle {
        name: "tiny-llava-siglip-qwen2",
        files: model_files!("tiny-llava-siglip-qwen2"),
        refs: serde_json::from_slice(refs!("tiny-llava-siglip-qwen2", "refs.json")).unwrap(),
        images: [
            ("red_square", refs!("tiny-llava-siglip-qwen2", "red_square.png")),
            ("gradient", refs!("tiny-llava-siglip-qwen2", "gradient.png")),
            ("checker", refs!("tiny-llava-siglip-qwen2", "checker.png")),
        ],
        shift: refs!("tiny-llava-siglip-qwen2", "shift_vectors.safetensors"),
        random: refs!("tiny-llava-siglip-qwen2", "steer_random.safetensors"),
    }
}

fn clip_llama() -> Oracle {
    Oracle {
        name: "tiny-llava-clip-llama",
        files: model_files!("tiny-llava-clip-llama"),
        refs: serde_json::from_slice(refs!("tiny-llava-clip-llama", "refs.json")).unwrap(),
        images: [
            ("red_square", refs!("tiny-llava-clip-llama", "red_square.png")),
            ("gradient", refs!("tiny-llava-clip-llama", "gradient.png")),
            ("checker", refs!("tiny-llava-clip-llama", "checker.png")),
        ],
        shift: refs!("tiny-llava-clip-llama", "shift_vectors.safetensors"),
        random: refs!("tiny-llava-clip-llama", "steer_random.safetensors"),
    }
}

/// The bundled page model's CMRM file (www/tools/make_bundled_vectors.py).
const BUNDLED_CMRM_VECTORS: &[u8] =
    include_bytes!("../www/assets/models/tiny-llava-siglip-qwen2/cmrm-vectors.safetensors");

fn oracle_image() -> &'static [u8] {
    include_bytes!("fixtures/oracle/refs/tiny-llava-siglip-qwen2/red_square.png")
}

fn file_of<'a>(files: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    &files.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1
}

/// The same checkpoint through the library API (no `Session`), in `format`.
fn library_vlm(files: &[(String, Vec<u8>)], format: cmrm::quant::WeightFormat) -> cmrm::Vlm {
    let text = |n: &str| String::from_utf8(file_of(files, n).to_vec()).unwrap();
    let config = cmrm::LlavaConfig::from_json_str(&text("config.json")).unwrap();
    let mut processor = cmrm::processor::ProcessorFiles::default();
    for (name, bytes) in files {
        processor.insert(name, bytes.clone()).unwrap();
    }
    let mut weights = cmrm::weights::Weights::empty();
    let safetensors = file_of(files, "model.safetensors").to_vec();
    weights.add_file("model.safetensors", cmrm::weights::FileBytes::Owned(safetensors)).unwrap();
    cmrm::Vlm::from_parts(config, format, &processor, Some(&text("generation_config.json")), weights).unwrap()
}

fn js<T: Serialize>(v: &T) -> JsValue {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).unwrap()
}

fn message(e: JsValue) -> String {
    e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())).unwrap_or_else(|| format!("{e:?}"))
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap_or_else(|| panic!("not an id list: {v}")).iter().map(|x| x.as_u64().unwrap()).collect()
}

async fn compare(session: &Session, options: Value) -> Result<Value, String> {
    let promise = session.compare(js(&options), None);
    let out = JsFuture::from(promise).await.map_err(message)?;
    Ok(serde_wasm_bindgen::from_value(out).unwrap())
}

/// A CMRM file (sign = subtract) from the oracle's shift (text − multimodal): v = −shift.
fn negated_cmrm_file(shift: &[u8], config_json: &[u8]) -> Vec<u8> {
    let mut v = cmrm::SteeringVectors::from_safetensors_bytes("shift", shift).unwrap();
    v.layers.values_mut().for_each(|x| x.iter_mut().for_each(|a| *a = -*a));
    v.metadata.insert("sign".into(), "subtract".into());
    v.metadata.insert("format".into(), "cmrm-vectors/1".into());
    let config = cmrm::LlavaConfig::from_json_str(std::str::from_utf8(config_json).unwrap()).unwrap();
    v.metadata.insert("model".into(), config.fingerprint());
    v.to_safetensors_bytes().unwrap()
}

/// Every case × every oracle steer case through `Session.compare`, plus the CMRM (subtract)
/// reading of the shift cases. Returns the number of comparisons checked.
async fn parity(oracle: Oracle, cmrm_file: Vec<u8>, backend: &str) -> usize {
    let session = Session::from_named_bytes(oracle.name, oracle.files).unwrap();
    let info: Value = serde_wasm_bindgen::from_value(
        session.set_backend(backend.into(), None).await.map_err(JsValue::from).map_err(message).unwrap(),
    )
    .unwrap();
    assert_eq!(info["backend"], backend, "{info}");
    let refs = &oracle.refs;
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in refs["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let image = oracle.images.iter().find(|(n, _)| *n == case["image"].as_str().unwrap()).unwrap().1;
        session.set_image(image.to_vec()).await.map_err(JsValue::from).map_err(message).unwrap();
        let want_unaltered = ids(&case["multimodal"]["generated_ids"]);
        for sc in refs["steer_cases"].as_array().unwrap() {
            let name = sc["name"].as_str().unwrap();
            let layers: Vec<String> = sc["layers"].as_array().unwrap().iter().map(|l| l.to_string()).collect();
            let want_steered = ids(&case["steered_multimodal"][name]["generated_ids"]);
            // The oracle's files carry no sign, so the page applies them as CMRM (h − α·v), like
            // the CLI; the oracle's steer() adds α·v, hence −α here.
            let file = if sc["vectors_file"] == "shift_vectors.safetensors" { oracle.shift } else { oracle.random };
            let mut runs = vec![(format!("{id} {name}"), file.to_vec(), -sc["alpha"].as_f64().unwrap())];
            if sc["vectors_file"] == "shift_vectors.safetensors" {
                // CMRM: h − α·v with v = multimodal − text = −shift gives the same states.
                runs.push((format!("{id} {name} (cmrm file)"), cmrm_file.clone(), sc["alpha"].as_f64().unwrap()));
            }
            for (what, bytes, alpha) in runs {
                session.set_vectors(name, &bytes).map_err(JsValue::from).map_err(message).unwrap();
                let options = json!({
                    "prompt": case["question"], "maxNewTokens": 12, "alpha": alpha,
                    "layers": layers.join(","), "positions": sc["positions"], "variant": "dataset",
                });
                let r = compare(&session, options).await.unwrap_or_else(|e| panic!("{what}: {e}"));
                if r["prompt"] != case["multimodal"]["prompt"] {
                    failures.push(format!("{what}: prompt {} != {}", r["prompt"], case["multimodal"]["prompt"]));
                }
                if ids(&r["unaltered"]["generatedIds"]) != want_unaltered {
                    failures.push(format!(
                        "{what}: unaltered {:?} != {:?}",
                        ids(&r["unaltered"]["generatedIds"]),
                        want_unaltered
                    ));
                }
                if ids(&r["steered"]["generatedIds"]) != want_steered {
                    failures.push(format!(
                        "{what}: steered {:?} != {:?}",
                        ids(&r["steered"]["generatedIds"]),
                        want_steered
                    ));
                }
                let eos = &case["steered_multimodal"][name]["stopped_on_eos"];
                if &r["steered"]["stoppedOnEos"] != eos {
                    failures.push(format!("{what}: stoppedOnEos {} != {eos}", r["steered"]["stoppedOnEos"]));
                }
                checked += 1;
            }
        }
    }
    assert!(failures.is_empty(), "{}: {} mismatches:\n{}", oracle.name, failures.len(), failures.join("\n"));
    checked
}

#[wasm_bindgen_test]
async fn greedy_ids_match_oracle_siglip_qwen2() {
    let n = parity(siglip_qwen2(), BUNDLED_CMRM_VECTORS.to_vec(), "cpu").await;
    assert_eq!(n, 9 * (8 + 4));
}

#[wasm_bindgen_test]
async fn greedy_ids_match_oracle_clip_llama() {
    let oracle = clip_llama();
    let cmrm_file = negated_cmrm_file(oracle.shift, &oracle.files[0].1);
    assert_eq!(parity(oracle, cmrm_file, "cpu").await, 9 * (8 + 4));
}

/// LLaVA-NeXT and OneVision in the page: the same `Session` calls, each image tiled and packed
/// as transformers does. Every single-image case's unaltered answer, and the steered answer of the
/// oracle's steered case, equal transformers' greedy ids (native parity: tests/anyres_parity.rs).
async fn anyres_parity(
    name: &str,
    files: Vec<(String, Vec<u8>)>,
    refs: &[u8],
    images: &[(&str, &[u8])],
    random: &[u8],
) {
    let session = Session::from_named_bytes(name, files).unwrap();
    let refs: Value = serde_json::from_slice(refs).unwrap();
    let sc = &refs["steer_cases"][0];
    session.set_vectors("random", random).map_err(JsValue::from).map_err(message).unwrap();
    let layers: Vec<String> = sc["layers"].as_array().unwrap().iter().map(|l| l.to_string()).collect();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in refs["cases"].as_array().unwrap().iter().filter(|c| c["images"].as_array().unwrap().len() == 1) {
        let id = case["id"].as_str().unwrap();
        let image = images.iter().find(|(n, _)| *n == case["image"].as_str().unwrap()).unwrap().1;
        let info: Value = serde_wasm_bindgen::from_value(
            session.set_image(image.to_vec()).await.map_err(JsValue::from).map_err(message).unwrap(),
        )
        .unwrap();
        if info["imageTokens"] != case["multimodal"]["n_image_tokens"] {
            failures
                .push(format!("{id}: imageTokens {} != {}", info["imageTokens"], case["multimodal"]["n_image_tokens"]));
        }
        // The page applies a file as CMRM (h − α·v); the oracle adds α·v, hence −α.
        let options = json!({
            "prompt": case["question"], "maxNewTokens": 12, "alpha": -sc["alpha"].as_f64().unwrap(),
            "layers": layers.join(","), "positions": sc["positions"], "variant": "dataset",
        });
        let r = compare(&session, options).await.unwrap_or_else(|e| panic!("{name} {id}: {e}"));
        let mut check = |which: &str, want: &Value| {
            if ids(&r[which]["generatedIds"]) != ids(&want["generated_ids"]) {
                failures.push(format!(
                    "{id} {which}: {:?} != {:?}",
                    ids(&r[which]["generatedIds"]),
                    ids(&want["generated_ids"])
                ));
            }
            checked += 1;
        };
        check("unaltered", &case["multimodal"]);
        if let Some(steered) = case.get("steered_multimodal") {
            check("steered", &steered[sc["name"].as_str().unwrap()]);
        }
    }
    assert!(failures.is_empty(), "{name}: {} mismatches:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(checked, 6 + 1, "{name}: answers checked");
}

macro_rules! anyres_images {
    ($model:literal) => {
        [
            ("wide", refs!($model, "wide.png")),
            ("tall", refs!($model, "tall.png")),
            ("square", refs!($model, "square.png")),
            ("strip", refs!($model, "strip.png")),
            ("large", refs!($model, "large.png")),
            ("small", refs!($model, "small.png")),
        ]
    };
}

#[wasm_bindgen_test]
async fn llava_next_in_the_page_matches_transformers() {
    const M: &str = "tiny-llava-next-clip-llama";
    let images = anyres_images!("tiny-llava-next-clip-llama");
    let refs = refs!("tiny-llava-next-clip-llama", "refs.json");
    let random = refs!("tiny-llava-next-clip-llama", "steer_random.safetensors");
    anyres_parity(M, model_files!("tiny-llava-next-clip-llama"), refs, &images, random).await;
}

#[wasm_bindgen_test]
async fn llava_onevision_in_the_page_matches_transformers() {
    const M: &str = "tiny-llava-onevision-siglip-qwen2";
    let images = anyres_images!("tiny-llava-onevision-siglip-qwen2");
    let refs = refs!("tiny-llava-onevision-siglip-qwen2", "refs.json");
    let random = refs!("tiny-llava-onevision-siglip-qwen2", "steer_random.safetensors");
    anyres_parity(M, model_files!("tiny-llava-onevision-siglip-qwen2"), refs, &images, random).await;
}

/// Whether this browser has a WebGPU adapter (Chromium: `--enable-unsafe-webgpu`, webdriver.json).
async fn has_webgpu() -> bool {
    let found = cmrm::gpu::context::probe_adapter().await.is_some();
    if !found {
        console_log!("SKIPPED: this browser exposes no WebGPU adapter (Chromium needs --enable-unsafe-webgpu)");
    }
    found
}

/// The page's `Session` with its decoder on WebGPU: every comparison of the CPU parity above on
/// the bundled model, same ids as the transformers refs (tests/web_gpu.rs covers the GPU decoder
/// on both oracle models).
#[wasm_bindgen_test]
async fn greedy_ids_match_oracle_on_webgpu() {
    if !has_webgpu().await {
        return;
    }
    assert_eq!(parity(siglip_qwen2(), BUNDLED_CMRM_VECTORS.to_vec(), "webgpu").await, 9 * (8 + 4));
}

/// `auto` skips a software adapter (SwiftShader is slower than the wasm CPU path) and says why;
/// a bad choice is a readable error that keeps the backend in use.
#[wasm_bindgen_test]
async fn backend_choice_is_reported() {
    let oracle = siglip_qwen2();
    let session = Session::from_named_bytes(oracle.name, oracle.files).unwrap();
    let info = |v: JsValue| -> Value { serde_wasm_bindgen::from_value(v).unwrap() };
    let cpu = info(session.info().map_err(JsValue::from).unwrap());
    assert_eq!(cpu["backend"], "cpu");
    let e = message(session.set_backend("tpu".into(), None).await.map_err(JsValue::from).unwrap_err());
    assert!(e.contains("backend must be auto, webgpu or cpu"), "{e}");
    if !has_webgpu().await {
        return;
    }
    let auto = info(session.set_backend("auto".into(), None).await.map_err(JsValue::from).unwrap());
    let adapter = cmrm::gpu::context::probe_adapter().await.unwrap();
    if adapter.device_type == wgpu::DeviceType::Cpu {
        assert_eq!(auto["backend"], "cpu", "{auto}");
        assert!(auto["backendFallbackReason"].as_str().unwrap().contains("software"), "{auto}");
    } else {
        assert_eq!(auto["backend"], "webgpu", "{auto}");
    }
    let gpu = info(session.set_backend("webgpu".into(), None).await.map_err(JsValue::from).unwrap());
    assert_eq!(gpu["backend"], "webgpu");
    assert!(gpu["backendDetail"].as_str().unwrap().starts_with("WebGPU: "), "{gpu}");
    // f16 weights on WebGPU: reported, and the answer's first token (decided by the prompt's
    // logits, which f16 rounding moves by ~1e-3 of their range) is the f32 one.
    let question = json!({"prompt": "What is in the image?", "maxNewTokens": 4, "variant": "sample"});
    session.set_image(oracle_image().to_vec()).await.map_err(JsValue::from).unwrap();
    let f32_answer = compare(&session, question.clone()).await.unwrap();
    let e = message(session.set_backend("webgpu".into(), Some("f8".into())).await.map_err(JsValue::from).unwrap_err());
    assert!(e.contains("f32 or f16"), "{e}");
    let half = info(session.set_backend("webgpu".into(), Some("f16".into())).await.map_err(JsValue::from).unwrap());
    assert!(half["backendDetail"].as_str().unwrap().ends_with("f16 weights"), "{half}");
    let f16_answer = compare(&session, question).await.unwrap();
    for pane in ["unaltered", "steered"] {
        assert_eq!(ids(&f16_answer[pane]["generatedIds"])[0], ids(&f32_answer[pane]["generatedIds"])[0], "{pane}");
    }
}

/// The prefill kernel's SIMD128 lanes (the native tests run its tiling with portable lanes)
/// against candle's product, on shapes with every kind of remainder and a `K` over one pass.
#[wasm_bindgen_test]
fn prefill_kernel_equals_candle_in_wasm() {
    use candle_core::{Device, Tensor};
    for (m, n, k) in [(5, 1, 1), (7, 11, 3), (33, 17, 70), (131, 12, 1100)] {
        let x = Tensor::randn(0f32, 1f32, (1, m, k), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1f32, (n, k), &Device::Cpu).unwrap();
        let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let got = cmrm::prefill_kernels::matmul_many_rows(&x, &w).unwrap().expect("wasm uses the kernel");
        let diff: f32 =
            (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(diff <= 1e-4 * (k as f32).sqrt(), "{m}×{k} · {n}×{k}: max diff {diff}");
    }
}

#[wasm_bindgen_test]
fn bundled_vectors_are_the_negated_oracle_shift() {
    let bundled = cmrm::SteeringVectors::from_safetensors_bytes("bundled", BUNDLED_CMRM_VECTORS).unwrap();
    let shift = cmrm::SteeringVectors::from_safetensors_bytes("shift", siglip_qwen2().shift).unwrap();
    assert_eq!(bundled.sign(), "subtract");
    assert_eq!(bundled.metadata.get("format").map(String::as_str), Some("cmrm-vectors/1"));
    for (l, v) in &shift.layers {
        let negated: Vec<f32> = v.iter().map(|x| -x).collect();
        assert_eq!(bundled.layers[l], negated, "layer {l}");
    }
}

/// Sample-level vectors (computed in the browser for the prompt) steer exactly like the same
/// vectors handed over as a file; stop and errors leave the session usable.
#[wasm_bindgen_test]
async fn sample_level_stop_and_errors() {
    let oracle = siglip_qwen2();
    let session = Session::from_named_bytes(oracle.name, oracle.files).unwrap();
    let question = "What is in the image?";

    // Errors are readable and change nothing.
    let e = message(session.set_image(b"GIF? no, plain text".to_vec()).await.map_err(JsValue::from).unwrap_err());
    assert!(e.contains("not a supported image"), "{e}");
    let e = message(session.set_vectors("llama.safetensors", clip_llama().shift).map_err(JsValue::from).unwrap_err());
    assert!(e.contains("layer.3") && e.contains("3 decoder layers"), "{e}");
    let e = compare(&session, json!({"prompt": question, "variant": "dataset"})).await.unwrap_err();
    assert!(e.contains("no steering vectors are loaded"), "{e}");
    let e = compare(&session, json!({"prompt": question, "variant": "sample", "layers": "0-7"})).await.unwrap_err();
    assert!(e.contains("out of range"), "{e}");

    session.set_image(oracle.images[0].1.to_vec()).await.map_err(JsValue::from).unwrap();
    let options =
        json!({"prompt": question, "maxNewTokens": 12, "alpha": 1.0, "layers": "1", "variant": "sample", "gap": true});
    let sample = compare(&session, options).await.unwrap();
    assert_eq!(sample["vectors"]["variant"], "sample");
    let gap = &sample["gap"];
    assert_eq!(gap["before"].as_array().unwrap().len(), 3);
    assert!(gap["after"].as_array().unwrap().iter().all(|x| x.as_f64().unwrap().is_finite()));

    // The same vectors, computed by the library directly and loaded as a CMRM file.
    let vlm_side = {
        let native = library_vlm(&siglip_qwen2().files, cmrm::quant::WeightFormat::F32);
        cmrm::cmrm::sample_level_vectors(&native, &cmrm::PromptText::Chat(question.into()), cmrm::cmrm::Anchor::Blank)
            .unwrap()
    };
    session
        .set_vectors("sample.safetensors", &vlm_side.to_safetensors_bytes().unwrap())
        .map_err(JsValue::from)
        .unwrap();
    let file = compare(
        &session,
        json!({"prompt": question, "maxNewTokens": 12, "alpha": 1.0, "layers": "1", "variant": "dataset"}),
    )
    .await
    .unwrap();
    assert_eq!(file["steered"]["generatedIds"], sample["steered"]["generatedIds"]);
    assert_eq!(file["unaltered"]["generatedIds"], sample["unaltered"]["generatedIds"]);

    // stop() right after compare(): both panes end at once, cancelled, and the session goes on.
    let promise = session.compare(js(&json!({"prompt": question, "maxNewTokens": 12})), None);
    session.stop();
    let stopped: Value = serde_wasm_bindgen::from_value(JsFuture::from(promise).await.unwrap()).unwrap();
    assert_eq!(stopped["unaltered"]["cancelled"], true);
    assert!(ids(&stopped["steered"]["generatedIds"]).len() < 12);
    let again =
        compare(&session, json!({"prompt": question, "maxNewTokens": 12, "alpha": 1.0, "layers": "1"})).await.unwrap();
    assert_eq!(again["steered"]["generatedIds"], file["steered"]["generatedIds"]);
}

const BUILTIN_CALIBRATION: &str = include_str!("../www/assets/calibration/builtin-v1.jsonl");
const NATIVE_CALIBRATION: &[u8] = include_bytes!("fixtures/calibration/builtin-v1.tiny-llava-siglip-qwen2.safetensors");

async fn calibrate(session: &Session, options: Value) -> Result<Value, String> {
    let events = std::rc::Rc::new(std::cell::RefCell::new(Vec::<Value>::new()));
    let sink = events.clone();
    let on_event = wasm_bindgen::closure::Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
        sink.borrow_mut().push(serde_wasm_bindgen::from_value(e).unwrap());
    });
    let promise = session.calibrate(js(&options), Some(on_event.as_ref().unchecked_ref::<js_sys::Function>().clone()));
    let out = JsFuture::from(promise).await.map_err(message)?;
    let mut result: Value = serde_wasm_bindgen::from_value(out).unwrap();
    result["events"] = Value::Array(events.borrow().clone());
    Ok(result)
}

/// "Compute vectors here": the browser's calibration over the built-in set equals native
/// `cmrm extract` on the same model and set (the fixture, checked natively in
/// tests/cmrm_method.rs) within 1e-4 per element; it reports progress, is cached, can be
/// cancelled, and exports as safetensors and GGUF.
#[wasm_bindgen_test]
async fn in_browser_calibration_equals_native_extract() {
    let oracle = siglip_qwen2();
    let session = Session::from_named_bytes(oracle.name, oracle.files).unwrap();
    let set_url = format!("data:text/plain;charset=utf-8,{}", js_sys::encode_uri_component(BUILTIN_CALIBRATION));
    let options = json!({"calibration": set_url, "name": "builtin-v1", "force": true});

    // Cancelled at once: an error that says so, and no vectors in use.
    let promise = session.calibrate(js(&options), None);
    session.stop();
    let error = JsFuture::from(promise).await.unwrap_err();
    assert_eq!(js_sys::Reflect::get(&error, &"kind".into()).unwrap().as_string().as_deref(), Some("cancelled"));
    let e = message(error);
    assert!(e.starts_with("calibration cancelled after 0 of 40"), "{e}");
    let error = session.export_vectors("safetensors").map_err(JsValue::from).unwrap_err();
    assert_eq!(js_sys::Reflect::get(&error, &"kind".into()).unwrap().as_string().as_deref(), Some("error"));
    let e = message(error);
    assert!(e.contains("no dataset-level vectors"), "{e}");

    let computed = calibrate(&session, options.clone()).await.unwrap();
    assert_eq!(computed["fromCache"], false);
    assert_eq!(computed["cached"], true, "{computed}");
    assert_eq!(computed["prompts"], 40);
    let events = computed["events"].as_array().unwrap();
    assert_eq!(events.len(), 40, "one progress event per prompt");
    assert_eq!(events.last().unwrap()["done"], 40);
    assert!(computed["vectors"]["name"].as_str().unwrap().contains("builtin-v1"));

    let native = cmrm::SteeringVectors::from_safetensors_bytes("native", NATIVE_CALIBRATION).unwrap();
    let exported = session.export_vectors("safetensors").map_err(JsValue::from).unwrap().to_vec();
    let browser = cmrm::SteeringVectors::from_safetensors_bytes("browser", &exported).unwrap();
    assert_eq!(browser.layers.keys().collect::<Vec<_>>(), native.layers.keys().collect::<Vec<_>>());
    let mut worst = 0f32;
    for (l, v) in &native.layers {
        for (a, b) in v.iter().zip(&browser.layers[l]) {
            worst = worst.max((a - b).abs());
        }
    }
    console_log!("in-browser calibration vs native extract: max |diff| {worst:e}");
    assert!(worst <= 1e-4, "max |diff| {worst}");
    for key in ["calibration_set", "calibration_sha256", "method", "anchor", "model", "n_calibration"] {
        assert_eq!(browser.metadata[key], native.metadata[key], "{key}");
    }

    // GGUF: a llama.cpp control vector, negated, without layer 0.
    let gguf = session.export_vectors("gguf").map_err(JsValue::from).unwrap().to_vec();
    let imported = cmrm::SteeringVectors::from_bytes("browser.gguf", &gguf).unwrap();
    assert_eq!(imported.layers.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(imported.layers[&2], browser.layers[&2]);
    assert_eq!(imported.metadata["model_hint"], "qwen2");
    // The page steers with it as it is: the file's own layers (no layer 0) are the default.
    session.set_vectors("browser.gguf", &gguf).map_err(JsValue::from).map_err(message).unwrap();
    let steered = compare(&session, json!({"prompt": "What is in the image?", "maxNewTokens": 4})).await.unwrap();
    assert_eq!(steered["layers"], json!([1, 2]), "{steered}");
    let e = message(session.export_vectors("npy").map_err(JsValue::from).unwrap_err());
    assert!(e.contains("safetensors or gguf"), "{e}");

    // The second time comes from the cache, identical; they steer a comparison.
    session.clear_vectors();
    let again = calibrate(&session, json!({"calibration": set_url, "name": "builtin-v1"})).await.unwrap();
    assert_eq!(again["fromCache"], true, "{again}");
    assert_eq!(session.export_vectors("safetensors").map_err(JsValue::from).unwrap().to_vec(), exported);
    session.set_image(oracle.images[0].1.to_vec()).await.map_err(JsValue::from).unwrap();
    let answer = compare(&session, json!({"prompt": "What is in the image?", "maxNewTokens": 6})).await.unwrap();
    assert!(!ids(&answer["steered"]["generatedIds"]).is_empty());
    // A set that is not calibration JSONL is refused with the line.
    let e = calibrate(&session, json!({"calibration": "data:text/plain,{\"question\": 1}", "name": "bad"}))
        .await
        .unwrap_err();
    assert!(e.contains("bad:1") && e.contains("prompt"), "{e}");
}

/// A `cmrm quantize` copy (one Q8_0 GGUF instead of the safetensors) loads in the browser in its
/// own format and answers exactly as the safetensors quantized on load.
#[wasm_bindgen_test]
async fn quantized_gguf_copy_loads_as_q8_0() {
    let oracle = siglip_qwen2();
    let safetensors = file_of(&oracle.files, "model.safetensors").to_vec();
    let mut weights = cmrm::weights::Weights::empty();
    weights.add_file("model.safetensors", cmrm::weights::FileBytes::Owned(safetensors.clone())).unwrap();
    let gguf = cmrm::quant_export::quantize_to_gguf(&weights, cmrm::quant::WeightFormat::Q8_0).unwrap();
    assert!(gguf.len() < safetensors.len());
    let files: Vec<(String, Vec<u8>)> =
        oracle
            .files
            .iter()
            .map(|(n, b)| {
                if n == "model.safetensors" {
                    ("model.gguf".to_owned(), gguf.clone())
                } else {
                    (n.clone(), b.clone())
                }
            })
            .collect();
    let session = Session::from_named_bytes("gguf copy", files).unwrap();
    let info: Value = serde_wasm_bindgen::from_value(session.info().map_err(JsValue::from).unwrap()).unwrap();
    assert_eq!(info["weights"], "q8_0", "{info}");
    session.set_image(oracle.images[0].1.to_vec()).await.map_err(JsValue::from).unwrap();
    session.set_vectors("v", BUNDLED_CMRM_VECTORS).map_err(JsValue::from).unwrap();
    let question = "What is in the image?";
    let from_gguf = compare(&session, json!({"prompt": question, "maxNewTokens": 12})).await.unwrap();

    // The same checkpoint from safetensors, quantized to Q8_0 on load (library API).
    let on_load = {
        let vlm = library_vlm(&oracle.files, cmrm::quant::WeightFormat::Q8_0);
        let features = vlm.encode_image(&cmrm::decode_image(oracle.images[0].1).unwrap()).unwrap();
        let prepared = vlm.prepare(&cmrm::PromptText::Chat(question.into()), Some(&features)).unwrap();
        let opts = vlm.default_generate_options(12, cmrm::Sampling::Greedy);
        vlm.generate(&prepared, None, &opts, &mut |_| true).unwrap().generated_ids
    };
    let got: Vec<u32> = ids(&from_gguf["unaltered"]["generatedIds"]).into_iter().map(|x| x as u32).collect();
    assert_eq!(got, on_load);

    // On WebGPU the Q8_0 blocks are the GPU's weights (dequantized in the kernels): the answers
    // equal those of the same weights dequantized to f32 at upload.
    if !has_webgpu().await {
        return;
    }
    let info = |v: JsValue| -> Value { serde_wasm_bindgen::from_value(v).unwrap() };
    let blocks = info(session.set_backend("webgpu".into(), None).await.map_err(JsValue::from).unwrap());
    assert!(blocks["backendDetail"].as_str().unwrap().ends_with("q8_0 weights"), "{blocks}");
    let on_blocks = compare(&session, json!({"prompt": question, "maxNewTokens": 12})).await.unwrap();
    let dense = info(session.set_backend("webgpu".into(), Some("f32".into())).await.map_err(JsValue::from).unwrap());
    assert!(dense["backendDetail"].as_str().unwrap().ends_with("f32 weights"), "{dense}");
    let on_dense = compare(&session, json!({"prompt": question, "maxNewTokens": 12})).await.unwrap();
    for pane in ["unaltered", "steered"] {
        let blocks_ids = ids(&on_blocks[pane]["generatedIds"]);
        assert!(!blocks_ids.is_empty(), "{pane}");
        assert_eq!(blocks_ids, ids(&on_dense[pane]["generatedIds"]), "{pane}");
    }
}

/// The bad-input corpus (tests/corpus) through the page's API in the browser: every input gives
/// its error as an `Error` named CmrmError (a report, not a crash: the worker keeps its instance),
/// and the session answers afterwards as before.
#[wasm_bindgen_test]
async fn corpus_inputs_give_their_errors_in_the_browser() {
    use corpus::Target;
    let oracle = siglip_qwen2();
    let text_of = |name: &str| String::from_utf8(file_of(&oracle.files, name).to_vec()).unwrap();
    let cases = corpus::cases(&text_of("config.json"), &text_of("preprocessor_config.json"));
    let session = Session::from_named_bytes(oracle.name, oracle.files.clone()).unwrap();
    let js_error = |e: JsValue| {
        let name = e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.name())).unwrap_or_default();
        assert_eq!(name, "CmrmError", "{}", message(e.clone()));
        message(e)
    };
    let mut failures = Vec::new();
    for case in &cases {
        let file_with = |name: &str| -> Vec<(String, Vec<u8>)> {
            let mut files: Vec<_> = oracle
                .files
                .iter()
                .filter(|(n, _)| n != name && !(name.ends_with(".gguf") && n == "model.safetensors"))
                .cloned()
                .collect();
            files.push((name.to_owned(), case.bytes.clone()));
            files
        };
        let got = match &case.target {
            Target::Image => session.set_image(case.bytes.clone()).await.map(drop).map_err(js_error),
            Target::Vectors => session.set_vectors(case.name, &case.bytes).map(drop).map_err(js_error),
            Target::Catalog => cmrm::catalog::Catalog::from_json(case.name, &String::from_utf8_lossy(&case.bytes))
                .map(drop)
                .map_err(|e| format!("{e:#}")),
            Target::Preprocessor => Session::from_named_bytes("bad", file_with("preprocessor_config.json"))
                .map(drop)
                .map_err(|e| format!("{e:#}")),
            Target::Config => {
                Session::from_named_bytes("bad", file_with("config.json")).map(drop).map_err(|e| format!("{e:#}"))
            }
            Target::Template => Session::from_named_bytes("bad", file_with("chat_template.jinja"))
                .map(drop)
                .map_err(|e| format!("{e:#}")),
            Target::Weights(name) => {
                Session::from_named_bytes("bad", file_with(name)).map(drop).map_err(|e| format!("{e:#}"))
            }
        };
        match got {
            Err(m) if m.contains(case.expect) => {}
            other => failures.push(format!("{}: expected {:?}, got {other:?}", case.name, case.expect)),
        }
    }
    assert!(failures.is_empty(), "{} of {}:\n{}", failures.len(), cases.len(), failures.join("\n"));
    // Still usable: the oracle's first case answers with its ids.
    session.set_image(oracle.images[0].1.to_vec()).await.unwrap();
    let case0 = &oracle.refs["cases"][0];
    let out =
        compare(&session, json!({"prompt": case0["question"], "maxNewTokens": 12, "variant": "sample"})).await.unwrap();
    assert_eq!(ids(&out["unaltered"]["generatedIds"]), ids(&case0["multimodal"]["generated_ids"]));
}
