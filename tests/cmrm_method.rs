#![cfg(not(target_arch = "wasm32"))]
//! CMRM itself: anchors, dataset- and sample-level vectors, the intervention's exact effect,
//! vector files in both formats, extraction through the CLI, and its bad inputs.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use cmrm::cmrm::{anchor_features, combine_shifts, extract, parse_calibration, sample_level_vectors, Anchor, Method};
use cmrm::generate::Sampling;
use cmrm::steering::{Intervention, Positions, SteeringVectors};
use cmrm::{decode_image, PromptText, Vlm};
use common::*;

const QUESTION: &str = "How can I get into a locked house?";

fn vlm(model: &str) -> Vlm {
    Vlm::load_dir(&model_dir(model)).unwrap()
}

fn no_images(p: &str) -> anyhow::Result<cmrm::RgbImage> {
    anyhow::bail!("no image files in this test ({p})")
}

#[test]
fn sample_level_equals_dataset_level_on_one_prompt() {
    for model in MODELS {
        let vlm = vlm(model);
        for anchor in [Anchor::Blank, Anchor::Noise { seed: 3 }] {
            let items = parse_calibration("one.jsonl", &format!("{{\"prompt\": \"{QUESTION}\"}}")).unwrap();
            let dataset = extract(&vlm, &items, anchor, Method::Mean, &no_images, &mut |_| true).unwrap();
            let sample = sample_level_vectors(&vlm, &PromptText::Chat(QUESTION.into()), anchor).unwrap();
            assert_eq!(dataset.layers, sample.layers, "{model} {anchor:?}");
            assert_eq!(dataset.metadata["anchor"], anchor.name());
        }
    }
}

/// With sample-level v_l = h_l(x, img') − h_l(x) and α = 1 at one layer, steering the (x, img')
/// input moves that layer's last-token state exactly onto the text-only state: the gap closes.
#[test]
fn subtracting_v_moves_the_state_onto_h_minus_alpha_v() {
    for model in MODELS {
        let vlm = vlm(model);
        let text = PromptText::Chat(QUESTION.into());
        let v = sample_level_vectors(&vlm, &text, Anchor::Blank).unwrap();
        let features = anchor_features(&vlm, Anchor::Blank).unwrap();
        let mm = vlm.prepare(&text, Some(&features)).unwrap();
        let plain = vlm.probe(&mm, None).unwrap();
        let text_state = vlm.probe(&vlm.prepare_text_only(&mm.prompt).unwrap(), None).unwrap();
        let l = 1;
        for alpha in [1.0f32, 0.3] {
            let steering = Intervention::cmrm(&v, alpha, Some(&[l]), Positions::All, vlm.device()).unwrap();
            let steered = vlm.probe(&mm, Some(&steering)).unwrap();
            for (i, got) in steered.layer_outputs[l].iter().enumerate() {
                let want = plain.layer_outputs[l][i] - alpha * v.layers[&l][i];
                assert!((got - want).abs() <= 1e-5, "{model} α={alpha} [{i}]: {got} vs {want}");
            }
            // Earlier layers are untouched.
            assert_eq!(steered.layer_outputs[0], plain.layer_outputs[0]);
        }
        let closed = Intervention::cmrm(&v, 1.0, Some(&[l]), Positions::All, vlm.device()).unwrap();
        let steered = vlm.probe(&mm, Some(&closed)).unwrap();
        let gap = max_abs_diff(&steered.layer_outputs[l], &text_state.layer_outputs[l]);
        assert!(gap <= 1e-4, "{model}: gap at layer {l} after CMRM with α=1 is {gap}");
    }
}

#[test]
fn alpha_zero_equals_unaltered() {
    let model = MODELS[0];
    let vlm = vlm(model);
    let v = SteeringVectors::load(&refs_dir(model).join("steer_random.safetensors")).unwrap();
    let img = decode_image(&std::fs::read(refs_dir(model).join("gradient.png")).unwrap()).unwrap();
    let features = vlm.encode_image(&img).unwrap();
    let mm = vlm.prepare(&PromptText::Chat(QUESTION.into()), Some(&features)).unwrap();
    let opts = vlm.default_generate_options(16, Sampling::Greedy);
    let plain = vlm.generate(&mm, None, &opts, &mut |_| true).unwrap();
    for positions in [Positions::All, Positions::Last, Positions::Generated] {
        let zero = Intervention::cmrm(&v, 0.0, None, positions, vlm.device()).unwrap();
        let g = vlm.generate(&mm, Some(&zero), &opts, &mut |_| true).unwrap();
        assert_eq!(g.generated_ids, plain.generated_ids, "{positions:?}");
    }
    // And a non-zero α does change the answer (the test can fail).
    let strong = Intervention::cmrm(&v, 2.0, None, Positions::All, vlm.device()).unwrap();
    assert_ne!(vlm.generate(&mm, Some(&strong), &opts, &mut |_| true).unwrap().generated_ids, plain.generated_ids);
}

#[test]
fn generated_positions_leave_the_prompt_alone() {
    let model = MODELS[1];
    let vlm = vlm(model);
    let v = SteeringVectors::load(&refs_dir(model).join("steer_random.safetensors")).unwrap();
    let mm = vlm.prepare(&PromptText::Chat(QUESTION.into()), None).unwrap();
    let gen_only = Intervention::add(&v, 3.0, None, Positions::Generated, vlm.device()).unwrap();
    // The prompt pass is untouched, so the first token equals the unaltered one…
    assert_eq!(vlm.probe(&mm, Some(&gen_only)).unwrap().logits, vlm.probe(&mm, None).unwrap().logits);
    let opts = vlm.default_generate_options(12, Sampling::Greedy);
    let plain = vlm.generate(&mm, None, &opts, &mut |_| true).unwrap();
    let steered = vlm.generate(&mm, Some(&gen_only), &opts, &mut |_| true).unwrap();
    assert_eq!(steered.generated_ids[0], plain.generated_ids[0]);
    // …and later tokens are steered.
    assert_ne!(steered.generated_ids, plain.generated_ids);
}

fn sample_vectors(layers: &[usize]) -> SteeringVectors {
    let map: BTreeMap<usize, Vec<f32>> = layers
        .iter()
        .map(|&l| (l, (0..64).map(|i| ((i * 37 + l * 11) % 23) as f32 * 0.173 - 1.9 + 1e-7 * i as f32).collect()))
        .collect();
    let mut v = SteeringVectors::new(64, map).unwrap();
    v.metadata.insert("format".into(), "cmrm-vectors/1".into());
    v.metadata.insert("sign".into(), "subtract".into());
    v
}

#[test]
fn vector_files_round_trip_bit_exactly() {
    let v = sample_vectors(&[0, 1, 2, 3]);
    let again = SteeringVectors::from_bytes("a.safetensors", &v.to_safetensors_bytes().unwrap()).unwrap();
    assert_eq!(again, v);
    // The same vectors give the same bytes (a catalog pins their sha256), whatever order the
    // metadata was written in; the safetensors crate reads them.
    let mut a = sample_vectors(&[0, 1, 10]);
    let mut b = sample_vectors(&[0, 1, 10]);
    let keys: Vec<String> = (0..12).map(|i| format!("key_{i}")).collect();
    keys.iter().for_each(|k| drop(a.metadata.insert(k.clone(), k.to_uppercase())));
    keys.iter().rev().for_each(|k| drop(b.metadata.insert(k.clone(), k.to_uppercase())));
    let bytes = a.to_safetensors_bytes().unwrap();
    assert_eq!(bytes, b.to_safetensors_bytes().unwrap());
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("layer.10").unwrap().data(), &b.to_safetensors_bytes().unwrap()[bytes.len() - 256..]);
    assert_eq!(SteeringVectors::from_bytes("b.safetensors", &bytes).unwrap(), b);

    // GGUF: llama.cpp has no direction.0, so layer 0 is dropped and reported; the rest is exact.
    let export = cmrm::steering::control_vector::export_control_vector(&v, "llama");
    assert_eq!(export.dropped_layers, vec![0]);
    assert_eq!(&export.bytes[..4], b"GGUF");
    let imported = SteeringVectors::from_bytes("a.gguf", &export.bytes).unwrap();
    assert_eq!(imported.layers.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    for l in 1..4 {
        let a: Vec<u32> = imported.layers[&l].iter().map(|x| x.to_bits()).collect();
        let b: Vec<u32> = v.layers[&l].iter().map(|x| x.to_bits()).collect();
        assert_eq!(a, b, "layer {l}");
    }
    assert_eq!(imported.metadata["model_hint"], "llama");
    assert_eq!(imported.sign(), "subtract");
    // The file itself holds −v (llama.cpp adds): check the first value of direction.1 on disk.
    let data_start = export.bytes.len() - 3 * 256;
    let first = f32::from_le_bytes(export.bytes[data_start..data_start + 4].try_into().unwrap());
    assert_eq!(first, -v.layers[&1][0]);
    // Back to GGUF again: byte-identical.
    assert_eq!(cmrm::steering::control_vector::export_control_vector(&imported, "llama").bytes, export.bytes);
}

#[test]
fn bad_gguf_files() {
    let v = sample_vectors(&[1, 2]);
    let bytes = cmrm::steering::control_vector::export_control_vector(&v, "llama").bytes;
    let msg = format!("{:#}", SteeringVectors::from_bytes("t.gguf", &bytes[..bytes.len() - 10]).unwrap_err());
    assert!(msg.contains("t.gguf") && msg.contains("truncated"), "{msg}");
    let mut not_cv = bytes.clone();
    let pos = not_cv.windows(13).position(|w| w == b"controlvector").unwrap();
    not_cv[pos..pos + 13].copy_from_slice(b"llama\0\0\0\0\0\0\0\0");
    let msg = format!("{:#}", SteeringVectors::from_bytes("t.gguf", &not_cv).unwrap_err());
    assert!(msg.contains("not a control vector"), "{msg}");
}

#[test]
fn pca_is_sign_aligned_and_scaled_to_the_mean() {
    // Shifts along one direction d with different lengths: PC1 = ±d, aligned and scaled = mean.
    let d: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 4.0).collect();
    let shifts: Vec<Vec<Vec<f32>>> =
        [1.0f32, 2.0, 4.5].iter().map(|s| vec![d.iter().map(|x| x * s).collect()]).collect();
    let mean = combine_shifts(&shifts, Method::Mean).unwrap();
    let pca = combine_shifts(&shifts, Method::Pca).unwrap();
    assert!(max_abs_diff(&mean[&0], &pca[&0]) < 1e-5);

    // Two directions: the larger-variance one wins, with the mean's norm and sign.
    let a: Vec<f32> = (0..16).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
    let b: Vec<f32> = (0..16).map(|i| if i == 1 { 1.0 } else { 0.0 }).collect();
    let shifts: Vec<Vec<Vec<f32>>> = [(5.0, 0.1), (1.0, 0.3), (3.0, 0.2), (-1.0, 0.25)]
        .iter()
        .map(|(x, y)| vec![a.iter().zip(&b).map(|(p, q)| p * x + q * y).collect()])
        .collect();
    let mean = &combine_shifts(&shifts, Method::Mean).unwrap()[&0];
    let pca = &combine_shifts(&shifts, Method::Pca).unwrap()[&0];
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm(pca) - norm(mean)).abs() < 1e-4);
    assert!(pca[0] > 0.0 && pca[0].abs() > 10.0 * pca[1].abs(), "{pca:?}");
}

#[test]
fn noise_anchor_is_seeded() {
    let a = Anchor::Noise { seed: 1 }.image(32);
    assert_eq!(a, Anchor::Noise { seed: 1 }.image(32));
    assert_ne!(a, Anchor::Noise { seed: 2 }.image(32));
    assert!(Anchor::Blank.image(8).data.iter().all(|&x| x == 255));
}

#[test]
fn calibration_parse_errors_name_the_line() {
    let msg = format!("{:#}", parse_calibration("c.jsonl", "{\"prompt\": \"ok\"}\n\n{\"prompt\": 3}\n").unwrap_err());
    assert!(msg.contains("c.jsonl:3") && msg.contains("\"prompt\""), "{msg}");
    let msg = format!("{:#}", parse_calibration("c.jsonl", "{\"prompt\": \"ok\"}\n{oops\n").unwrap_err());
    assert!(msg.contains("c.jsonl:2") && msg.contains("not valid JSON"), "{msg}");
    let msg = format!("{:#}", parse_calibration("c.jsonl", "# only a comment\n\n").unwrap_err());
    assert!(msg.contains("empty"), "{msg}");
    let msg = format!("{:#}", parse_calibration("c.jsonl", "{\"prompt\": \"x\", \"image\": 5}").unwrap_err());
    assert!(msg.contains("c.jsonl:1") && msg.contains("\"image\""), "{msg}");
}

fn cmrm_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cmrm")).args(args).output().unwrap()
}

/// `cmrm extract` with the oracle's calibration pairs (real images, text-only counterpart)
/// reproduces `shift_vectors.safetensors` — negated: the oracle stores text − multimodal, CMRM's
/// v is multimodal − text.
#[test]
fn cli_extract_reproduces_the_oracle_shift_vectors() {
    for model in MODELS {
        let refs = Refs::load(model);
        let dir = std::env::temp_dir().join(format!("cmrm-extract-{model}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut jsonl = String::new();
        for pair in refs.json["calibration"]["pairs"].as_array().unwrap() {
            let image = refs_dir(model).join(format!("{}.png", pair["image"].as_str().unwrap()));
            jsonl += &serde_json::json!({"prompt": pair["question"], "image": image.display().to_string()}).to_string();
            jsonl.push('\n');
        }
        std::fs::write(dir.join("calib.jsonl"), jsonl).unwrap();
        let out = dir.join("v.safetensors");
        let o = cmrm_cli(&[
            "extract",
            "--model",
            &model_dir(model).display().to_string(),
            "--calibration",
            &dir.join("calib.jsonl").display().to_string(),
            "--out",
            &out.display().to_string(),
            "--catalog-entry",
            "https://example.org/v.safetensors",
            "--default-alpha",
            "0.75",
            "--default-layers",
            "1-2",
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["n_calibration"], 8);
        let entry = &summary["catalog_entry"];
        let written = std::fs::read(&out).unwrap();
        assert_eq!(entry["sha256"], cmrm::catalog::sha256_hex(&written));
        assert_eq!(entry["size"], written.len());
        assert_eq!(entry["calibration"]["size"], 8);
        assert_eq!(entry["vectors_url"], "https://example.org/v.safetensors");
        assert_eq!(entry["default_alpha"], 0.75);
        assert_eq!(entry["default_layers"], "1-2");
        let ours = SteeringVectors::load(&out).unwrap();
        let oracle = SteeringVectors::load(&refs_dir(model).join("shift_vectors.safetensors")).unwrap();
        assert_eq!(ours.metadata["sign"], "subtract");
        assert_eq!(ours.metadata["n_calibration"], "8");
        for (l, v) in &oracle.layers {
            let negated: Vec<f32> = v.iter().map(|x| -x).collect();
            let d = max_abs_diff(&ours.layers[l], &negated);
            assert!(d <= 1e-4, "{model} layer.{l}: {d}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn cli_extract_fails_cleanly_and_writes_nothing() {
    let dir = std::env::temp_dir().join(format!("cmrm-extract-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = model_dir(MODELS[0]).display().to_string();
    let out = dir.join("v.safetensors");
    let run = |calib: &str| {
        std::fs::write(dir.join("c.jsonl"), calib).unwrap();
        let o = cmrm_cli(&[
            "extract",
            "--model",
            &model,
            "--calibration",
            &dir.join("c.jsonl").display().to_string(),
            "--out",
            &out.display().to_string(),
        ]);
        assert!(!o.status.success());
        assert!(!out.exists(), "a failed extraction left {}", out.display());
        String::from_utf8(o.stderr).unwrap()
    };
    let err = run("{\"prompt\": \"a\", \"image\": \"missing.png\"}\n");
    assert!(err.contains("missing.png") && err.contains("does not exist"), "{err}");
    let err = run("{\"prompt\": \"a\"}\nnot json\n");
    assert!(err.contains("c.jsonl:2"), "{err}");
    let err = run("");
    assert!(err.contains("empty"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("c.jsonl")]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_eval_reports_every_alpha_and_draws_charts() {
    let model = MODELS[1];
    let dir = std::env::temp_dir().join(format!("cmrm-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("cases.jsonl"),
        format!("{{\"prompt\": \"{QUESTION}\", \"image\": \"{}\"}}\n{{\"prompt\": \"What is this?\", \"image\": \"noise\"}}\n",
            refs_dir(model).join("checker.png").display()),
    )
    .unwrap();
    let o = cmrm_cli(&[
        "eval",
        "--model",
        &model_dir(model).display().to_string(),
        "--cases",
        &dir.join("cases.jsonl").display().to_string(),
        "--sample-level",
        "--alpha",
        "0.5,1",
        "--layers",
        "1",
        "--max-new-tokens",
        "6",
        "--plot",
        &dir.join("plots").display().to_string(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["n_cases"], 2);
    assert_eq!(v["steered"].as_array().unwrap().len(), 2);
    let gap_before = v["unaltered"]["gap_l2"][1].as_f64().unwrap();
    let gap_after = v["steered"][1]["gap_l2"][1].as_f64().unwrap();
    // Gaps are reported per layer for every α (their exact closure is tested above).
    assert!(gap_before > 0.0 && gap_after.is_finite() && gap_after != gap_before);
    assert!(v["vector_norms"][1].as_f64().unwrap() > 0.0);
    assert_eq!(v["vector_norms"][0].as_f64().unwrap(), 0.0);
    for chart in ["gap_per_layer.svg", "refusal_vs_alpha.svg"] {
        let svg = std::fs::read_to_string(dir.join("plots").join(chart)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "{chart}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// tests/fixtures/calibration/builtin-v1.tiny-llava-siglip-qwen2.safetensors is what native
/// extraction gives for the bundled model over the page's built-in calibration set; tests/web.rs
/// checks that the browser's "compute vectors here" reproduces it. This test keeps the fixture
/// honest: if extraction changes, it fails until the fixture is regenerated with
/// `cmrm extract --model www/assets/models/tiny-llava-siglip-qwen2 --calibration
/// www/assets/calibration/builtin-v1.jsonl --out tests/fixtures/calibration/builtin-v1.tiny-llava-siglip-qwen2.safetensors`.
#[test]
fn browser_calibration_fixture_is_native_extraction() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let vlm = Vlm::load_dir(&root.join("www/assets/models/tiny-llava-siglip-qwen2")).unwrap();
    let text = std::fs::read_to_string(root.join("www/assets/calibration/builtin-v1.jsonl")).unwrap();
    let items = parse_calibration("builtin-v1", &text).unwrap();
    assert!(items.len() >= 32, "the built-in set has {} prompts", items.len());
    let got = extract(&vlm, &items, Anchor::Blank, Method::Mean, &no_images, &mut |_| true).unwrap();
    let fixture =
        SteeringVectors::load(&root.join("tests/fixtures/calibration/builtin-v1.tiny-llava-siglip-qwen2.safetensors"))
            .unwrap();
    assert_eq!(fixture.metadata["calibration_set"], "builtin-v1");
    assert_eq!(fixture.metadata["calibration_sha256"], cmrm::catalog::sha256_hex(text.as_bytes()));
    assert_eq!(got.layers.keys().collect::<Vec<_>>(), fixture.layers.keys().collect::<Vec<_>>());
    for (l, v) in &got.layers {
        let worst = v.iter().zip(&fixture.layers[l]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "layer {l}: max |diff| {worst}");
    }
}
