#![cfg(not(target_arch = "wasm32"))]
//! Bad input gets a clear error naming the file and the problem — never a panic, a hang or an OOM.

mod common;

use std::path::{Path, PathBuf};

use cmrm::steering::{SteeringVectors, VECTORS_FORMAT};
use cmrm::{decode_image, PromptText, Vlm};
use common::*;

/// A copy of an oracle checkpoint in a temp folder, to break on purpose.
struct TempModel {
    dir: PathBuf,
}

impl TempModel {
    fn new(model: &str, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("cmrm-bad-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(model_dir(model)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        Self { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn load_err(dir: &Path) -> String {
    match Vlm::load_dir(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message lacks '{p}':\n{msg}");
    }
}

#[test]
fn missing_folder_and_missing_files() {
    let msg = load_err(Path::new("/nonexistent/cmrm-model"));
    assert_mentions(&msg, &["/nonexistent/cmrm-model", "not a folder"]);

    let m = TempModel::new(MODELS[0], "nocfg");
    std::fs::remove_file(m.path("config.json")).unwrap();
    assert_mentions(&load_err(&m.dir), &["config.json", "cannot read"]);

    let m = TempModel::new(MODELS[0], "noweights");
    std::fs::remove_file(m.path("model.safetensors")).unwrap();
    assert_mentions(&load_err(&m.dir), &["no model.safetensors"]);

    let m = TempModel::new(MODELS[0], "notok");
    std::fs::remove_file(m.path("tokenizer.json")).unwrap();
    assert_mentions(&load_err(&m.dir), &["tokenizer.json"]);
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let m = TempModel::new(MODELS[1], "trunc");
    let bytes = std::fs::read(m.path("model.safetensors")).unwrap();
    std::fs::write(m.path("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&load_err(&m.dir), &["model.safetensors", "not a valid safetensors file", "truncated"]);

    let m = TempModel::new(MODELS[1], "corrupt");
    let mut bytes = std::fs::read(m.path("model.safetensors")).unwrap();
    bytes[8..40].copy_from_slice(b"this is not the json header!!!!!");
    std::fs::write(m.path("model.safetensors"), &bytes).unwrap();
    assert_mentions(&load_err(&m.dir), &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn tensor_with_wrong_shape_names_file_and_tensor() {
    let m = TempModel::new(MODELS[0], "shape");
    // Claim a bigger MLP: the stored up_proj is [128, 64], the config now wants [256, 64].
    let cfg = std::fs::read_to_string(m.path("config.json")).unwrap();
    std::fs::write(m.path("config.json"), cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 256"))
        .unwrap();
    let msg = load_err(&m.dir);
    assert_mentions(&msg, &["model.safetensors", "has shape [128, 64]", "[256, 64]"]);
}

#[test]
fn unknown_model_type_and_unsupported_config() {
    let m = TempModel::new(MODELS[0], "mtype");
    let cfg = std::fs::read_to_string(m.path("config.json")).unwrap();
    std::fs::write(m.path("config.json"), cfg.replace("\"model_type\": \"llava\"", "\"model_type\": \"idefics3\""))
        .unwrap();
    assert_mentions(&load_err(&m.dir), &["config.json", "unknown model_type 'idefics3'"]);

    std::fs::write(m.path("config.json"), cfg.replace("\"model_type\": \"llama\"", "\"model_type\": \"gemma\""))
        .unwrap();
    assert_mentions(&load_err(&m.dir), &["unknown text model_type 'gemma'"]);

    std::fs::write(m.path("config.json"), cfg.replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\""))
        .unwrap();
    assert_mentions(&load_err(&m.dir), &["RoPE type 'yarn' is not supported"]);

    std::fs::write(m.path("config.json"), "{ not json").unwrap();
    assert_mentions(&load_err(&m.dir), &["config.json", "not valid JSON"]);
}

fn vectors_file(hidden: usize, layers: &[usize], meta: &[(&str, &str)]) -> Vec<u8> {
    let map = layers.iter().map(|&l| (l, vec![0.5f32; hidden])).collect();
    let mut v = SteeringVectors::new(hidden, map).unwrap();
    v.metadata = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    v.to_safetensors_bytes().unwrap()
}

#[test]
fn vectors_that_do_not_fit_the_model() {
    let vlm = Vlm::load_dir(&model_dir(MODELS[1])).unwrap(); // hidden 64, 3 layers
    let wrong_hidden =
        SteeringVectors::from_safetensors_bytes("v.safetensors", &vectors_file(32, &[0, 1], &[])).unwrap();
    let msg = wrong_hidden.validate_for("v.safetensors", vlm.config()).unwrap_err().to_string();
    assert_mentions(&msg, &["v.safetensors", "hidden size 32", "64", "another model"]);

    let too_many = SteeringVectors::from_safetensors_bytes("v.safetensors", &vectors_file(64, &[0, 3], &[])).unwrap();
    let msg = too_many.validate_for("v.safetensors", vlm.config()).unwrap_err().to_string();
    assert_mentions(&msg, &["layer.3", "only 3 decoder layers"]);

    let declared = SteeringVectors::from_safetensors_bytes(
        "v.safetensors",
        &vectors_file(64, &[0], &[("format", VECTORS_FORMAT), ("num_layers", "4")]),
    )
    .unwrap();
    let msg = declared.validate_for("v.safetensors", vlm.config()).unwrap_err().to_string();
    assert_mentions(&msg, &["4 layers", "this model has 3"]);

    // Same shapes, another architecture: the recorded fingerprint tells them apart.
    let other = SteeringVectors::from_safetensors_bytes(
        "v.safetensors",
        &vectors_file(64, &[0], &[("format", VECTORS_FORMAT), ("model", "llama-l3-h64-v642+clip-56px")]),
    )
    .unwrap();
    let msg = other.validate_for("v.safetensors", vlm.config()).unwrap_err().to_string();
    assert_mentions(&msg, &["extracted from model 'llama-l3-h64-v642+clip-56px'", vlm.config().fingerprint().as_str()]);
    let own = SteeringVectors::from_safetensors_bytes(
        "v.safetensors",
        &vectors_file(64, &[0], &[("format", VECTORS_FORMAT), ("model", vlm.config().fingerprint().as_str())]),
    )
    .unwrap();
    own.validate_for("v.safetensors", vlm.config()).unwrap();
}

#[test]
fn corrupt_vectors_files() {
    let msg = SteeringVectors::from_safetensors_bytes("v.safetensors", b"garbage bytes").unwrap_err().to_string();
    assert_mentions(&msg, &["v.safetensors", "not a valid safetensors"]);

    // NaN inside a vector.
    let mut bytes = vectors_file(8, &[0], &[]);
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    let msg = format!("{:#}", SteeringVectors::from_safetensors_bytes("nan.safetensors", &bytes).unwrap_err());
    assert_mentions(&msg, &["nan.safetensors", "layer.0", "non-finite"]);
    bytes[n - 4..].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
    let msg = format!("{:#}", SteeringVectors::from_safetensors_bytes("inf.safetensors", &bytes).unwrap_err());
    assert_mentions(&msg, &["inf.safetensors", "non-finite value (-inf)"]);
}

#[test]
fn non_image_and_truncated_image() {
    let msg = decode_image(b"%PDF-1.7 this is a pdf").unwrap_err().to_string();
    assert_mentions(&msg, &["not a supported image", "PNG, JPEG, WebP or GIF"]);

    let png = std::fs::read(refs_dir(MODELS[0]).join("gradient.png")).unwrap();
    let msg = format!("{:#}", decode_image(&png[..png.len() / 2]).unwrap_err());
    assert_mentions(&msg, &["corrupt or truncated"]);
}

#[test]
fn huge_image_is_refused_before_decoding() {
    // A real 10000×10000 PNG (1-bit, 25 KB on disk, 400 MB as RGBA).
    let bytes =
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/huge_10000x10000.png")).unwrap();
    let msg = decode_image(&bytes).unwrap_err().to_string();
    assert_mentions(&msg, &["10000×10000", "100.0 megapixels", "downscale"]);
}

#[test]
fn prompt_longer_than_the_context() {
    let vlm = Vlm::load_dir(&model_dir(MODELS[0])).unwrap(); // max_position_embeddings 512
    let long = "What is in the image? ".repeat(200);
    let msg = vlm.prepare(&PromptText::Chat(long), None).unwrap_err().to_string();
    assert_mentions(&msg, &["over the model's context of 512 tokens"]);
}

#[test]
fn image_placeholder_mismatch() {
    let vlm = Vlm::load_dir(&model_dir(MODELS[0])).unwrap();
    let msg = vlm.prepare(&PromptText::Raw("USER: <image>\nhi ASSISTANT:".into()), None).unwrap_err().to_string();
    assert_mentions(&msg, &["1 '<image>' placeholder(s) but 0 image(s)"]);
}

#[test]
fn empty_prompt_is_refused() {
    // Qwen2's tokenizer adds no BOS: an empty raw prompt is zero tokens.
    let vlm = Vlm::load_dir(&model_dir(MODELS[1])).unwrap();
    let msg = vlm.prepare(&PromptText::Raw(String::new()), None).unwrap_err().to_string();
    assert_mentions(&msg, &["the prompt is empty"]);
}
