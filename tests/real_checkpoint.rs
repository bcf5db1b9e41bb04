//! The real llava-interleave-qwen-0.5b-hf files (config, processor, chat template with its
//! `{% generation %}` tag, generation config, special tokens; a derived tokenizer) with random
//! weights, against transformers 5.24 (tests/fixtures/real/refs.json, make_real_refs.py):
//! - the processor on the full-depth files: rendered prompts, input_ids, image tokens and span;
//! - a reduced-depth copy (2 text + 2 vision layers, everything else real) written by
//!   `cmrm::synthetic`: same weights as transformers' (sha256), then pixel values, image
//!   features, hidden states, logits and greedy ids, for a JPEG photo, a palette PNG and text.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cmrm::generate::Sampling;
use cmrm::{decode_image, PromptText, Vlm};
use serde_json::Value;

fn real_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real/llava-interleave-qwen-0.5b-hf")
}

fn refs() -> &'static Value {
    static REFS: OnceLock<Value> = OnceLock::new();
    REFS.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real/refs.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

fn image_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/files").join(name)
}

/// A checkpoint folder written once per digest (reused by later runs: 430 MB).
fn checkpoint(tag: &str, layers: Option<(usize, usize)>) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("cmrm-real-interleave-{tag}-{}", &refs()["reduced"]["weights_sha256"].as_str().unwrap()[..12]));
    if !dir.join("model.safetensors").exists() {
        cmrm::synthetic::write_checkpoint(&real_dir(), &dir, layers, None).unwrap();
    }
    dir
}

fn reduced() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let layers = &refs()["reduced"]["layers"];
        let layers =
            (layers["text_config"].as_u64().unwrap() as usize, layers["vision_config"].as_u64().unwrap() as usize);
        checkpoint("2layers", Some(layers))
    })
}

/// Small files only (no weights): what the processor needs.
fn full_small_files() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cmrm-real-interleave-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(real_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if let Some(plain) = name.strip_suffix(".gz") {
            let mut d = flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap());
            std::io::copy(&mut d, &mut std::fs::File::create(dir.join(plain)).unwrap()).unwrap();
        } else {
            std::fs::copy(&path, dir.join(name)).unwrap();
        }
    }
    dir
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn case(list: &Value, name: &str) -> Value {
    list.as_array().unwrap().iter().find(|c| c["case"] == name).unwrap().clone()
}

fn prompt_of(c: &Value) -> (PromptText, Option<String>) {
    (PromptText::Chat(c["question"].as_str().unwrap().to_owned()), c["image"].as_str().map(str::to_owned))
}

#[test]
fn the_real_processor_files_give_transformers_prompts_and_ids() {
    let dir = full_small_files();
    let config = cmrm::LlavaConfig::from_file(&dir.join("config.json")).unwrap();
    let processor = cmrm::processor::Processor::from_dir(&dir, &config).unwrap();
    for c in refs()["processor"]["cases"].as_array().unwrap() {
        let with_image = c["image"].is_string();
        let prompt = processor.chat_prompt(c["question"].as_str().unwrap(), usize::from(with_image)).unwrap();
        assert_eq!(prompt, c["prompt"].as_str().unwrap(), "{}: rendered prompt", c["case"]);
        let encoded = processor.encode(&prompt, &vec![config.tokens_per_tile(); usize::from(with_image)]).unwrap();
        assert_eq!(encoded.input_ids, common::ids(&c["input_ids"]), "{}: input_ids", c["case"]);
        assert_eq!(encoded.n_image_tokens() as u64, c["n_image_tokens"].as_u64().unwrap());
        let span = encoded.image_span().map(|(s, e)| serde_json::json!([s, e])).unwrap_or(Value::Null);
        assert_eq!(span, c["image_span"], "{}: image span", c["case"]);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn synthetic_weights_are_the_ones_transformers_used() {
    let r = &refs()["reduced"];
    let cfg = cmrm::LlavaConfig::from_file(&reduced().join("config.json")).unwrap();
    let specs = cmrm::synthetic::tensor_specs(&cfg).unwrap();
    assert_eq!(specs.len() as u64, r["tensors"].as_u64().unwrap(), "tensor count");
    let params: u64 = specs.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
    assert_eq!(params, r["n_params"].as_u64().unwrap(), "parameter count");
    assert_eq!(cmrm::synthetic::weights_digest(&cfg).unwrap(), r["weights_sha256"].as_str().unwrap());
    let check = f32s(&refs()["generator_check"]["language_model.model.norm.weight[0:3]"]);
    let mut v = [0f32; 3];
    cmrm::synthetic::fill("language_model.model.norm.weight", (1.0, 0.1), 0, &mut v);
    assert_eq!(v.to_vec(), check);
}

/// Largest |difference| relative to the reference's scale (max |value|, at least 1).
fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    common::max_abs_diff(got, want) / scale
}

#[test]
fn reduced_real_checkpoint_equals_transformers() {
    let vlm = Vlm::load_dir(reduced()).unwrap();
    let mut worst = std::collections::BTreeMap::<&str, f32>::new();
    let mut note = |field: &'static str, d: f32| {
        let w = worst.entry(field).or_insert(0.0);
        *w = w.max(d);
        d
    };
    for p in refs()["processor"]["cases"].as_array().unwrap() {
        let name = p["case"].as_str().unwrap();
        let r = case(&refs()["reduced"]["cases"], name);
        let (text, image) = prompt_of(p);
        let features = image.map(|f| {
            let img = decode_image(&std::fs::read(image_path(&f)).unwrap()).unwrap();
            let (_, pixels) = vlm.pixel_values(&img, 1).unwrap();
            let bytes: Vec<u8> = common::tensor_f32s(&pixels).iter().flat_map(|x| x.to_le_bytes()).collect();
            use sha2::Digest;
            let digest = format!("{:x}", sha2::Sha256::digest(&bytes));
            assert_eq!(digest, r["pixel_values_sha256"].as_str().unwrap(), "{name}: pixel_values");
            vlm.encode_image(&img).unwrap()
        });
        if let Some(f) = &features {
            let rows = f.dim(0).unwrap();
            let first = common::tensor_f32s(&f.get(0).unwrap());
            let last = common::tensor_f32s(&f.get(rows - 1).unwrap());
            let sum = common::tensor_f32s(&f.sum(0).unwrap());
            assert!(note("image_features", rel_diff(&first, &f32s(&r["image_features_first_row"]))) < 1e-4, "{name}");
            assert!(note("image_features", rel_diff(&last, &f32s(&r["image_features_last_row"]))) < 1e-4, "{name}");
            assert!(note("image_features", rel_diff(&sum, &f32s(&r["image_features_row_sum"]))) < 1e-4, "{name}");
        }
        let prepared = vlm.prepare(&text, features.as_ref()).unwrap();
        assert_eq!(prepared.prompt, p["prompt"].as_str().unwrap());
        assert_eq!(prepared.encoded.input_ids, common::ids(&p["input_ids"]), "{name}");
        let probe = vlm.probe(&prepared, None).unwrap();
        let hidden: Vec<f32> = probe.hidden_states.iter().flatten().copied().collect();
        let want_hidden: Vec<f32> = r["hidden_states_last"].as_array().unwrap().iter().flat_map(f32s).collect();
        assert!(note("hidden_states", rel_diff(&hidden, &want_hidden)) < 1e-4, "{name}: hidden states");
        assert!(note("logits", rel_diff(&probe.logits[..256], &f32s(&r["logits_head"]))) < 1e-4, "{name}");
        for pair in r["logits_top20"].as_array().unwrap() {
            let (id, value) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            assert!(
                note("logits", (probe.logits[id] - value).abs() / value.abs().max(1.0)) < 1e-4,
                "{name}: logit {id}"
            );
        }
        let opts = vlm.default_generate_options(10, Sampling::Greedy);
        let generation = vlm.generate(&prepared, None, &opts, &mut |_| true).unwrap();
        assert_eq!(generation.generated_ids, common::ids(&r["generated_ids"]), "{name}: greedy ids");
    }
    println!("real-files checkpoint (2+2 layers), worst relative |diff|: {worst:?}");
}
