//! config.json resolved as transformers resolves it: every key its config classes default is
//! filled with their default (tests/fixtures/configs/refs.json, made by make_config_refs.py with
//! transformers 5.24): the Hub's llava-1.5-7b-hf and llava-interleave-qwen-0.5b-hf files and edge
//! cases (no sub-configs at all, a minimal Mistral, Qwen2 sliding layers, an explicit head_dim).

use std::path::PathBuf;

use cmrm::config::{resolve, Activation, FeatureSelect, TextKind, VisionKind};
use cmrm::LlavaConfig;
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs")
}

fn u(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

#[test]
fn every_config_resolves_as_transformers_does() {
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("refs.json")).unwrap()).unwrap();
    let refs = refs.as_object().unwrap();
    assert!(refs.len() >= 6);
    for (name, want) in refs {
        let raw: Value = serde_json::from_str(&std::fs::read_to_string(dir().join(name)).unwrap()).unwrap();
        let cfg = LlavaConfig::from_value(&raw).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let (t, wt) = (&cfg.text, &want["text"]);
        let kind = match t.kind {
            TextKind::Llama => "llama",
            TextKind::Qwen2 => "qwen2",
            TextKind::Mistral => "mistral",
        };
        assert_eq!(kind, wt["model_type"], "{name}");
        for (got, key) in [
            (t.vocab_size, "vocab_size"),
            (t.hidden_size, "hidden_size"),
            (t.intermediate_size, "intermediate_size"),
            (t.num_hidden_layers, "num_hidden_layers"),
            (t.num_attention_heads, "num_attention_heads"),
            (t.num_key_value_heads, "num_key_value_heads"),
            (t.head_dim, "head_dim"),
            (t.max_position_embeddings, "max_position_embeddings"),
        ] {
            assert_eq!(got, u(&wt[key]), "{name}: text_config.{key}");
        }
        assert_eq!(t.rms_norm_eps, wt["rms_norm_eps"].as_f64().unwrap(), "{name}");
        assert_eq!(t.rope_theta, wt["rope_theta"].as_f64().unwrap(), "{name}");
        assert_eq!(t.hidden_act, Activation::from_hf(wt["hidden_act"].as_str().unwrap()).unwrap(), "{name}");
        assert_eq!(t.bos_token_id.map(u64::from), wt["bos_token_id"].as_u64(), "{name}: bos");
        let eos: Vec<u32> =
            wt["eos_token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(t.eos_token_ids, eos, "{name}: eos");
        let windows: Vec<Option<usize>> =
            wt["sliding_windows"].as_array().unwrap().iter().map(|w| w.as_u64().map(|w| w as usize)).collect();
        assert_eq!(t.sliding_windows, windows, "{name}: sliding windows");
        assert_eq!(t.tie_word_embeddings, want["tie_word_embeddings"].as_bool().unwrap(), "{name}: tie");

        let (v, wv) = (&cfg.vision, &want["vision"]);
        let vkind = if v.kind == VisionKind::Clip { "clip_vision_model" } else { "siglip_vision_model" };
        assert_eq!(vkind, wv["model_type"], "{name}");
        for (got, key) in [
            (v.hidden_size, "hidden_size"),
            (v.intermediate_size, "intermediate_size"),
            (v.num_hidden_layers, "num_hidden_layers"),
            (v.num_attention_heads, "num_attention_heads"),
            (v.image_size, "image_size"),
            (v.patch_size, "patch_size"),
        ] {
            assert_eq!(got, u(&wv[key]), "{name}: vision_config.{key}");
        }
        assert_eq!(v.layer_norm_eps, wv["layer_norm_eps"].as_f64().unwrap(), "{name}");
        assert_eq!(v.hidden_act, Activation::from_hf(wv["hidden_act"].as_str().unwrap()).unwrap(), "{name}");

        assert_eq!(u64::from(cfg.image_token_id), want["image_token_id"].as_u64().unwrap(), "{name}");
        assert_eq!(cfg.projector_act, Activation::from_hf(want["projector_hidden_act"].as_str().unwrap()).unwrap());
        assert_eq!(cfg.projector_bias, want["multimodal_projector_bias"].as_bool().unwrap());
        let strategy = if cfg.feature_select == FeatureSelect::Default { "default" } else { "full" };
        assert_eq!(strategy, want["vision_feature_select_strategy"], "{name}");
        let layers: Vec<i64> = match &want["vision_feature_layer"] {
            Value::Array(a) => a.iter().map(|x| x.as_i64().unwrap()).collect(),
            x => vec![x.as_i64().unwrap()],
        };
        let expected: Vec<usize> = layers
            .iter()
            .map(|&l| if l < 0 { (v.num_hidden_layers as i64 + 1 + l) as usize } else { l as usize })
            .collect();
        assert_eq!(cfg.vision_feature_layers, expected, "{name}: feature layers");

        // The tensors cmrm's checkpoint writer lists are the model transformers builds.
        let specs = cmrm::synthetic::tensor_specs(&cfg).unwrap();
        let params: u64 = specs.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
        assert_eq!(params, want["n_params"].as_u64().unwrap(), "{name}: parameters");
    }
}

#[test]
fn defaulted_keys_are_listed() {
    let raw: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("llava-1.5-7b-hf.json")).unwrap()).unwrap();
    let resolved = resolve(&raw).unwrap();
    for key in [
        "text_config.hidden_size",
        "text_config.num_hidden_layers",
        "text_config.num_key_value_heads",
        "text_config.head_dim",
        "vision_config.hidden_act",
        "multimodal_projector_bias",
    ] {
        assert!(resolved.defaulted.iter().any(|k| k == key), "{key} not marked: {:?}", resolved.defaulted);
    }
    for key in ["text_config.vocab_size", "text_config.rms_norm_eps", "vision_config.hidden_size", "image_token_index"]
    {
        assert!(!resolved.defaulted.iter().any(|k| k == key), "{key} was in the file");
    }
    assert_eq!(resolved.config["text_config"]["hidden_size"], 4096);
    // Before: "missing hidden_size". Now only what transformers refuses is an error.
    let mut bad = raw.clone();
    bad["text_config"]["num_attention_heads"] = 7.into();
    let err = LlavaConfig::from_value(&bad).unwrap_err();
    assert!(format!("{err:#}").contains("not divisible"), "{err:#}");
}
