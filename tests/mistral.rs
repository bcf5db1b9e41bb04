#![cfg(not(target_arch = "wasm32"))]
//! The Mistral backbone (bakLlava's) and its sliding attention window, against transformers 5.24
//! on a tiny CLIP + Mistral checkpoint whose window (12) is shorter than every prompt
//! (tests/fixtures/mistral, make_mistral.py): logits and hidden states at the last prompt token,
//! 16 greedy tokens (generation runs past the window), on the CPU and on the WebGPU decoder
//! (lavapipe here). The refs also hold what the model answers without the window, which differs.

mod common;

use std::path::PathBuf;

use cmrm::backend::DecoderBackend;
use cmrm::generate::Sampling;
use cmrm::gpu::GpuWeights;
use cmrm::{decode_image, PromptText, Vlm};
use common::{ids, max_abs_diff};
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mistral")
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn prepared(vlm: &Vlm, case: &Value) -> cmrm::Prepared {
    let features = case["image"].as_str().map(|f| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/files").join(f);
        vlm.encode_image(&decode_image(&std::fs::read(path).unwrap()).unwrap()).unwrap()
    });
    let prepared =
        vlm.prepare(&PromptText::Chat(case["question"].as_str().unwrap().to_owned()), features.as_ref()).unwrap();
    assert_eq!(prepared.prompt, case["prompt"].as_str().unwrap());
    assert_eq!(prepared.encoded.input_ids, ids(&case["input_ids"]));
    prepared
}

fn refs() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("refs.json")).unwrap()).unwrap()
}

#[test]
fn mistral_sliding_window_equals_transformers_on_cpu() {
    let refs = refs();
    let vlm = Vlm::load_dir(&fixture().join("tiny-llava-clip-mistral")).unwrap();
    let window = refs["sliding_window"].as_u64().unwrap() as usize;
    assert!(vlm.config().text.sliding_windows.iter().all(|w| *w == Some(window)));
    let (mut worst_logits, mut worst_hidden) = (0f32, 0f32);
    for case in refs["cases"].as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let p = prepared(&vlm, case);
        assert!(p.encoded.input_ids.len() > window, "{name}: the prompt must outgrow the window");
        let probe = vlm.probe(&p, None).unwrap();
        worst_logits = worst_logits.max(max_abs_diff(&probe.logits, &f32s(&case["logits"])));
        let hidden: Vec<f32> = probe.hidden_states.concat();
        let want: Vec<f32> = case["hidden_states_last"].as_array().unwrap().iter().flat_map(f32s).collect();
        worst_hidden = worst_hidden.max(max_abs_diff(&hidden, &want));
        let opts = vlm.default_generate_options(16, Sampling::Greedy);
        let g = vlm.generate(&p, None, &opts, &mut |_| true).unwrap();
        assert_eq!(g.generated_ids, ids(&case["generated_ids"]), "{name}: greedy ids");
        assert_ne!(g.generated_ids, ids(&case["without_window_generated_ids"]), "{name}: the window must matter");
    }
    println!("mistral: worst |logits diff| {worst_logits:e}, |hidden diff| {worst_hidden:e}");
    assert!(worst_logits < 2e-4 && worst_hidden < 2e-4, "{worst_logits} {worst_hidden}");
}

#[test]
fn mistral_sliding_window_on_the_gpu_decoder() {
    let Some(ctx) = common::gpu_ctx() else { return };
    let refs = refs();
    let vlm = Vlm::load_dir(&fixture().join("tiny-llava-clip-mistral")).unwrap();
    let backend = pollster::block_on(DecoderBackend::gpu_model(ctx, &vlm.model, GpuWeights::F32)).unwrap();
    let opts = vlm.default_generate_options(16, Sampling::Greedy);
    for case in refs["cases"].as_array().unwrap() {
        let p = prepared(&vlm, case);
        let g = backend.generate(&vlm, &p, None, &opts, &mut |_| true).unwrap();
        assert_eq!(g.generated_ids, ids(&case["generated_ids"]), "{}: greedy ids on the GPU", case["case"]);
    }
}
