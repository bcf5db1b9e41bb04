#![cfg(not(target_arch = "wasm32"))]
//! Parity with Hugging Face transformers on the oracle's tiny checkpoints (tests/fixtures/oracle,
//! README there): every image, all 9 cases multimodal and text-only, and all 8 steering cases.

mod common;

use candle_core::Tensor;
use cmrm::generate::Sampling;
use cmrm::steering::{Intervention, Positions, SteeringVectors};
use cmrm::{decode_image, PromptText, Vlm};
use common::*;
use serde_json::Value;

const TOL_PIXELS: f32 = 1e-6;
const TOL_FEATURES: f32 = 1e-4;
const TOL_STATES: f32 = 2e-4;

fn load(model: &str) -> (Vlm, Refs) {
    (Vlm::load_dir(&model_dir(model)).expect("fixture loads"), Refs::load(model))
}

fn greedy_ids(vlm: &Vlm, prepared: &cmrm::Prepared, steering: Option<&Intervention>) -> (Vec<u32>, bool) {
    let opts = vlm.default_generate_options(12, Sampling::Greedy);
    let g = vlm.generate(prepared, steering, &opts, &mut |_| true).unwrap();
    (g.generated_ids, g.stopped_on_eos)
}

/// Decode each reference image from its PNG and return `(name, image_features)`.
fn check_images(vlm: &Vlm, refs: &Refs, c: &mut Checker) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for img in refs.json["images"].as_array().unwrap() {
        let name = img["name"].as_str().unwrap();
        let bytes =
            std::fs::read(refs_dir(refs.json["model"].as_str().unwrap()).join(img["file"].as_str().unwrap())).unwrap();
        let rgb = decode_image(&bytes).unwrap();
        let (tiles, pixel_values) = vlm.pixel_values(&rgb, 1).unwrap();
        let resized = &tiles.tiles[0];
        // resized_u8 is [3, S, S] (CHW); ours is HWC.
        let want_u8 = refs.tensor(img["resized_u8"].as_str().unwrap()).flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let plane = resized.width * resized.height;
        let got_u8: Vec<u8> =
            (0..3).flat_map(|ch| (0..plane).map(move |i| (ch, i))).map(|(ch, i)| resized.data[i * 3 + ch]).collect();
        let worst = got_u8.iter().zip(&want_u8).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        c.equal(name, "resized_u8 max grey-level diff", worst, 0);
        c.close(
            name,
            "pixel_values",
            &tensor_f32s(&pixel_values),
            &refs.f32s(img["pixel_values"].as_str().unwrap()),
            TOL_PIXELS,
        );

        let states = vlm.model.vision.all_hidden_states(&pixel_values).unwrap();
        let got_states: Vec<f32> = states.iter().flat_map(tensor_f32s).collect();
        c.close(
            name,
            "vision_hidden_states",
            &got_states,
            &refs.f32s(img["vision_hidden_states"].as_str().unwrap()),
            TOL_FEATURES,
        );
        let selected = vlm.model.select_vision_features(&pixel_values).unwrap();
        c.close(
            name,
            "vision_selected",
            &tensor_f32s(&selected),
            &refs.f32s(img["vision_selected"].as_str().unwrap()),
            TOL_FEATURES,
        );
        let features = vlm.encode_image(&rgb).unwrap();
        c.close(
            name,
            "image_features",
            &tensor_f32s(&features),
            &refs.f32s(img["image_features"].as_str().unwrap()),
            TOL_FEATURES,
        );
        out.push((name.to_owned(), features));
    }
    out
}

fn check_forward(c: &mut Checker, refs: &Refs, what: &str, probe: &cmrm::Probe, want: &Value) {
    c.close(
        what,
        "hidden_states",
        &flat(&probe.hidden_states),
        &refs.f32s(want["hidden_states"].as_str().unwrap()),
        TOL_STATES,
    );
    c.close(
        what,
        "layer_outputs",
        &flat(&probe.layer_outputs),
        &refs.f32s(want["layer_outputs"].as_str().unwrap()),
        TOL_STATES,
    );
    c.close(what, "logits", &probe.logits, &refs.f32s(want["logits"].as_str().unwrap()), TOL_STATES);
}

fn vectors_for(model: &str, file: &str) -> SteeringVectors {
    SteeringVectors::load(&refs_dir(model).join(file)).unwrap()
}

fn parity(model: &str) {
    let (vlm, refs) = load(model);
    let mut c = Checker::default();
    let features = check_images(&vlm, &refs, &mut c);
    let feature_of = |name: &str| &features.iter().find(|(n, _)| n == name).unwrap().1;
    let steer_cases = refs.json["steer_cases"].as_array().unwrap().clone();

    for case in refs.json["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let question = case["question"].as_str().unwrap();
        let mm = &case["multimodal"];
        let txt = &case["text_only"];

        // Multimodal: the chat template must produce the reference prompt.
        let image_features = feature_of(case["image"].as_str().unwrap());
        let prepared = vlm.prepare(&PromptText::Chat(question.into()), Some(image_features)).unwrap();
        c.equal(id, "mm prompt", prepared.prompt.as_str(), mm["prompt"].as_str().unwrap());
        c.equal(id, "mm input_ids", prepared.encoded.input_ids.clone(), ids(&mm["input_ids"]));
        c.equal(
            id,
            "mm n_image_tokens",
            prepared.encoded.n_image_tokens() as u64,
            mm["n_image_tokens"].as_u64().unwrap(),
        );
        let span = mm["image_token_span"].as_array().unwrap();
        let want_span = (span[0].as_u64().unwrap() as usize, span[1].as_u64().unwrap() as usize);
        c.equal(id, "mm image_token_span", prepared.encoded.image_span(), Some(want_span));
        let probe = vlm.probe(&prepared, None).unwrap();
        check_forward(&mut c, &refs, &format!("{id} mm"), &probe, mm);
        let (gen, eos) = greedy_ids(&vlm, &prepared, None);
        c.equal(id, "mm generated_ids", gen, ids(&mm["generated_ids"]));
        c.equal(id, "mm stopped_on_eos", eos, mm["stopped_on_eos"].as_bool().unwrap());

        if let Some(full_key) = mm.get("hidden_states_full").and_then(Value::as_str) {
            let (states, logits) = vlm.model.text.forward_full(&prepared.embeds).unwrap();
            c.close(id, "mm hidden_states_full", &tensor_f32s(&states), &refs.f32s(full_key), TOL_STATES);
            c.close(
                id,
                "mm logits_full",
                &tensor_f32s(&logits),
                &refs.f32s(mm["logits_full"].as_str().unwrap()),
                TOL_STATES,
            );
        }

        // Text-only counterpart: the same prompt with the placeholder removed.
        let text_only = vlm.prepare_text_only(&prepared.prompt).unwrap();
        c.equal(id, "text prompt", text_only.prompt.as_str(), txt["prompt"].as_str().unwrap());
        c.equal(id, "text input_ids", text_only.encoded.input_ids.clone(), ids(&txt["input_ids"]));
        let probe = vlm.probe(&text_only, None).unwrap();
        check_forward(&mut c, &refs, &format!("{id} text"), &probe, txt);
        let (gen, eos) = greedy_ids(&vlm, &text_only, None);
        c.equal(id, "text generated_ids", gen, ids(&txt["generated_ids"]));
        c.equal(id, "text stopped_on_eos", eos, txt["stopped_on_eos"].as_bool().unwrap());

        // Steering: the library API adds alpha·v (the oracle's convention).
        let mut steered = Vec::new();
        for sc in &steer_cases {
            let name = sc["name"].as_str().unwrap();
            let vectors = vectors_for(model, sc["vectors_file"].as_str().unwrap());
            let layers: Vec<usize> =
                sc["layers"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap() as usize).collect();
            let positions: Positions = sc["positions"].as_str().unwrap().parse().unwrap();
            let alpha = sc["alpha"].as_f64().unwrap() as f32;
            let steering = Intervention::add(&vectors, alpha, Some(&layers), positions, vlm.device()).unwrap();
            let want = &case["steered_multimodal"][name];
            let what = format!("{id} steer {name}");
            let probe = vlm.probe(&prepared, Some(&steering)).unwrap();
            check_forward(&mut c, &refs, &what, &probe, want);
            let (gen, eos) = greedy_ids(&vlm, &prepared, Some(&steering));
            c.equal(&what, "generated_ids", gen, ids(&want["generated_ids"]));
            c.equal(&what, "stopped_on_eos", eos, want["stopped_on_eos"].as_bool().unwrap());
            // Compare's pair: unaltered and steered as one batch, the prompt shared up to the
            // first steered position.
            let pair = side_by_side(&vlm, &prepared, &[None, Some(&steering)]);
            c.equal(&what, "pair: unaltered generated_ids", pair[0].clone(), ids(&mm["generated_ids"]));
            c.equal(&what, "pair: steered generated_ids", pair[1].clone(), ids(&want["generated_ids"]));
            steered.push((steering, ids(&want["generated_ids"])));
        }
        // Every steer case and the unaltered answer in one batch (as `cmrm eval` sweeps α),
        // each row steered its own way.
        let rows: Vec<Option<&Intervention>> =
            std::iter::once(None).chain(steered.iter().map(|(s, _)| Some(s))).collect();
        let batch = side_by_side(&vlm, &prepared, &rows);
        let want: Vec<Vec<u32>> =
            std::iter::once(ids(&mm["generated_ids"])).chain(steered.iter().map(|(_, w)| w.clone())).collect();
        c.equal(id, "batch of every steer case: generated_ids", batch, want);
    }
    c.finish(model);
}

/// Greedy ids of one answer per steering row, decoded as one batch.
fn side_by_side(vlm: &Vlm, prepared: &cmrm::Prepared, rows: &[Option<&Intervention>]) -> Vec<Vec<u32>> {
    let opts = vlm.default_generate_options(12, Sampling::Greedy);
    let answers = vlm.generate_batch(prepared, rows, &opts, &mut |_, _| true).unwrap();
    answers.into_iter().map(|g| g.generated_ids).collect()
}

#[test]
fn parity_clip_llama() {
    parity("tiny-llava-clip-llama");
}

#[test]
fn parity_siglip_qwen2() {
    parity("tiny-llava-siglip-qwen2");
}

/// Image features from several vision layers (`vision_feature_layer` [-1, 0, -2]: out of order,
/// and the encoder input), concatenated as transformers does.
#[test]
fn parity_multilayer_clip_llama() {
    parity(MULTILAYER_MODEL);
}

/// The oracle's `shift_vectors.safetensors` = mean text-only − mean multimodal last-token block
/// outputs over its 8 calibration pairs; recomputed here from our own forward passes.
#[test]
fn shift_vectors_reproduce_from_calibration_pairs() {
    for model in MODELS {
        let (vlm, refs) = load(model);
        let mut images = std::collections::HashMap::new();
        for img in refs.json["images"].as_array().unwrap() {
            let bytes = std::fs::read(refs_dir(model).join(img["file"].as_str().unwrap())).unwrap();
            images.insert(
                img["name"].as_str().unwrap().to_owned(),
                vlm.encode_image(&decode_image(&bytes).unwrap()).unwrap(),
            );
        }
        let pairs = refs.json["calibration"]["pairs"].as_array().unwrap();
        let l = vlm.config().text.num_hidden_layers;
        let h = vlm.config().text.hidden_size;
        let mut sum_text = vec![vec![0f32; h]; l];
        let mut sum_mm = vec![vec![0f32; h]; l];
        for pair in pairs {
            let features = &images[pair["image"].as_str().unwrap()];
            let mm = vlm.prepare(&PromptText::Chat(pair["question"].as_str().unwrap().into()), Some(features)).unwrap();
            assert_eq!(mm.encoded.input_ids, ids(&pair["multimodal"]["input_ids"]));
            let text = vlm.prepare_text_only(&mm.prompt).unwrap();
            assert_eq!(text.encoded.input_ids, ids(&pair["text_only"]["input_ids"]));
            for (sum, prepared) in [(&mut sum_mm, &mm), (&mut sum_text, &text)] {
                let probe = vlm.probe(prepared, None).unwrap();
                for (acc, row) in sum.iter_mut().zip(&probe.layer_outputs) {
                    for (a, x) in acc.iter_mut().zip(row) {
                        *a += x;
                    }
                }
            }
        }
        let n = pairs.len() as f32;
        let want = vectors_for(model, "shift_vectors.safetensors");
        assert_eq!(want.layers.len(), l);
        for layer in 0..l {
            let got: Vec<f32> = sum_text[layer].iter().zip(&sum_mm[layer]).map(|(t, m)| t / n - m / n).collect();
            let d = max_abs_diff(&got, &want.layers[&layer]);
            assert!(d <= 1e-4, "{model} layer.{layer}: max |diff| {d:e}");
        }
    }
}

/// CMRM's sign: `Intervention::cmrm(v, α)` equals the additive API with −α.
#[test]
fn cmrm_sign_subtracts() {
    let model = MODELS[0];
    let (vlm, refs) = load(model);
    let vectors = vectors_for(model, "shift_vectors.safetensors");
    let bytes = std::fs::read(refs_dir(model).join("red_square.png")).unwrap();
    let features = vlm.encode_image(&decode_image(&bytes).unwrap()).unwrap();
    let prepared =
        vlm.prepare(&PromptText::Chat(refs.json["questions"][0].as_str().unwrap().into()), Some(&features)).unwrap();
    let plain = vlm.probe(&prepared, None).unwrap();
    let subtract = Intervention::cmrm(&vectors, 0.5, Some(&[2]), Positions::All, vlm.device()).unwrap();
    let add_neg = Intervention::add(&vectors, -0.5, Some(&[2]), Positions::All, vlm.device()).unwrap();
    let a = vlm.probe(&prepared, Some(&subtract)).unwrap();
    let b = vlm.probe(&prepared, Some(&add_neg)).unwrap();
    assert_eq!(a.logits, b.logits);
    // At the steered layer, the state moved by exactly −α·v.
    for (i, (s, p)) in a.layer_outputs[2].iter().zip(&plain.layer_outputs[2]).enumerate() {
        let expected = p - 0.5 * vectors.layers[&2][i];
        assert!((s - expected).abs() <= 1e-5, "component {i}: {s} vs {expected}");
    }
}
