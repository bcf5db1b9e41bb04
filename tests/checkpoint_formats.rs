#![cfg(not(target_arch = "wasm32"))]
//! Checkpoint variants load to the same model: shards with an index, F16/BF16 weights, the
//! transformers-5 key layout, and a tied model without lm_head.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use cmrm::{decode_image, PromptText, Vlm};
use common::*;

fn copy_model(model: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cmrm-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(model_dir(model)).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "model.safetensors" {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    dir
}

fn tensors(model: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(model_dir(model).join("model.safetensors"), &Device::Cpu).unwrap()
}

fn logits(dir: &Path, model: &str) -> Vec<f32> {
    let vlm = Vlm::load_dir(dir).unwrap();
    let img = decode_image(&std::fs::read(refs_dir(model).join("gradient.png")).unwrap()).unwrap();
    let features = vlm.encode_image(&img).unwrap();
    let prepared = vlm.prepare(&PromptText::Chat("What is in the image?".into()), Some(&features)).unwrap();
    vlm.probe(&prepared, None).unwrap().logits
}

#[test]
fn sharded_checkpoint_with_index() {
    for model in MODELS {
        let all = tensors(model);
        let dir = copy_model(model, &format!("shard-{model}"));
        let (lm, rest): (HashMap<_, _>, HashMap<_, _>) =
            all.into_iter().partition(|(k, _)| k.starts_with("language_model."));
        candle_core::safetensors::save(&lm, dir.join("model-00001-of-00002.safetensors")).unwrap();
        candle_core::safetensors::save(&rest, dir.join("model-00002-of-00002.safetensors")).unwrap();
        let mut weight_map = serde_json::Map::new();
        for k in lm.keys() {
            weight_map.insert(k.clone(), "model-00001-of-00002.safetensors".into());
        }
        for k in rest.keys() {
            weight_map.insert(k.clone(), "model-00002-of-00002.safetensors".into());
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        assert_eq!(logits(&dir, model), logits(&model_dir(model), model), "{model}");

        // A missing shard is named in the error.
        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
        let msg = format!("{:#}", Vlm::load_dir(&dir).err().unwrap());
        assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn half_precision_weights_compute_in_f32() {
    let model = MODELS[0];
    for dtype in [DType::BF16, DType::F16] {
        let half: HashMap<String, Tensor> =
            tensors(model).into_iter().map(|(k, t)| (k, t.to_dtype(dtype).unwrap())).collect();
        // The same values, rounded to half precision, stored as F32.
        let rounded: HashMap<String, Tensor> =
            half.iter().map(|(k, t)| (k.clone(), t.to_dtype(DType::F32).unwrap())).collect();
        let half_dir = copy_model(model, &format!("{dtype:?}"));
        let rounded_dir = copy_model(model, &format!("{dtype:?}-f32"));
        candle_core::safetensors::save(&half, half_dir.join("model.safetensors")).unwrap();
        candle_core::safetensors::save(&rounded, rounded_dir.join("model.safetensors")).unwrap();
        let from_half = logits(&half_dir, model);
        assert_eq!(from_half, logits(&rounded_dir, model), "{dtype:?}");
        // Rounding the weights does change the model a little (the test can tell formats apart).
        let d = max_abs_diff(&from_half, &logits(&model_dir(model), model));
        assert!(d > 0.0 && d < 0.5, "{dtype:?}: {d}");
        let _ = std::fs::remove_dir_all(&half_dir);
        let _ = std::fs::remove_dir_all(&rounded_dir);
    }
}

#[test]
fn transformers5_key_layout() {
    for model in MODELS {
        let renamed: HashMap<String, Tensor> = tensors(model)
            .into_iter()
            .map(|(k, t)| {
                let k = if let Some(rest) = k.strip_prefix("language_model.model.") {
                    format!("model.language_model.{rest}")
                } else if let Some(rest) = k.strip_prefix("language_model.lm_head.") {
                    format!("lm_head.{rest}")
                } else if let Some(rest) = k.strip_prefix("vision_tower.vision_model.") {
                    format!("model.vision_tower.{rest}")
                } else {
                    format!("model.{k}")
                };
                (k, t)
            })
            .collect();
        assert!(renamed.keys().all(|k| !k.contains("vision_model.")));
        let dir = copy_model(model, &format!("t5-{model}"));
        candle_core::safetensors::save(&renamed, dir.join("model.safetensors")).unwrap();
        assert_eq!(logits(&dir, model), logits(&model_dir(model), model), "{model}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn untied_model_needs_its_lm_head() {
    let model = MODELS[0]; // tie_word_embeddings = false
    let without: HashMap<String, Tensor> = tensors(model).into_iter().filter(|(k, _)| !k.contains("lm_head")).collect();
    let dir = copy_model(model, "nohead");
    candle_core::safetensors::save(&without, dir.join("model.safetensors")).unwrap();
    let msg = format!("{:#}", Vlm::load_dir(&dir).err().unwrap());
    assert!(msg.contains("lm_head.weight") && msg.contains("missing"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}
