#![cfg(not(target_arch = "wasm32"))]
//! Parity with transformers for the anyres families, LLaVA-NeXT (`llava_next`) and
//! LLaVA-OneVision (`llava_onevision`), on the oracle's tiny checkpoints made with their own
//! classes (tests/fixtures/oracle/make_anyres.py): every image's tiles and packed features, then
//! prompts, forward passes and greedy answers, unaltered and steered.

mod common;

use cmrm::generate::Sampling;
use cmrm::steering::{Intervention, Positions, SteeringVectors};
use cmrm::{decode_image, PromptText, Vlm};
use common::*;
use serde_json::Value;

const MODELS: [&str; 2] = ["tiny-llava-next-clip-llama", "tiny-llava-onevision-siglip-qwen2"];
const TOL_FEATURES: f32 = 1e-4;
const TOL_STATES: f32 = 2e-4;

fn greedy(vlm: &Vlm, prepared: &cmrm::Prepared, rows: &[Option<&Intervention>]) -> Vec<(Vec<u32>, bool)> {
    let opts = vlm.default_generate_options(12, Sampling::Greedy);
    let answers = vlm.generate_batch(prepared, rows, &opts, &mut |_, _| true).unwrap();
    answers.into_iter().map(|g| (g.generated_ids, g.stopped_on_eos)).collect()
}

fn check_forward(c: &mut Checker, refs: &Refs, what: &str, probe: &cmrm::Probe, want: &Value) {
    for (field, got) in [("hidden_states", flat(&probe.hidden_states)), ("layer_outputs", flat(&probe.layer_outputs))] {
        c.close(what, field, &got, &refs.f32s(want[field].as_str().unwrap()), TOL_STATES);
    }
    c.close(what, "logits", &probe.logits, &refs.f32s(want["logits"].as_str().unwrap()), TOL_STATES);
}

/// Tiles (u8, exactly), packed features and their count for every reference image.
fn check_images(vlm: &Vlm, refs: &Refs, model: &str, c: &mut Checker) -> Vec<(String, candle_core::Tensor)> {
    let mut out = Vec::new();
    for img in refs.json["images"].as_array().unwrap() {
        let name = img["name"].as_str().unwrap();
        let bytes = std::fs::read(refs_dir(model).join(img["file"].as_str().unwrap())).unwrap();
        let rgb = decode_image(&bytes).unwrap();
        let (tiles, _) = vlm.pixel_values(&rgb, 1).unwrap();
        let grid = tiles.grid.expect("an anyres model tiles every single image");
        let rows_cols = img["grid_rows_cols"].as_array().unwrap();
        c.equal(
            name,
            "grid",
            [grid.rows as u64, grid.cols as u64],
            [rows_cols[0].as_u64().unwrap(), rows_cols[1].as_u64().unwrap()],
        );
        // pixel_u8: [n_tiles, 3, S, S] (CHW per tile); ours are HWC tiles.
        let want_u8 = refs.tensor(img["pixel_u8"].as_str().unwrap()).flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let got_u8: Vec<u8> = tiles
            .tiles
            .iter()
            .flat_map(|t| {
                let plane = t.width * t.height;
                (0..3).flat_map(move |ch| (0..plane).map(move |i| t.data[i * 3 + ch]))
            })
            .collect();
        c.equal(name, "tile count", tiles.tiles.len() as u64, img["n_tiles"].as_u64().unwrap());
        if got_u8.len() == want_u8.len() {
            let worst = got_u8.iter().zip(&want_u8).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
            c.equal(name, "tiles u8 max grey-level diff", worst, 0);
        }
        let features = vlm.encode_image(&rgb).unwrap();
        let n = img["n_image_tokens"].as_u64().unwrap() as usize;
        c.equal(name, "packed rows", features.dim(0).unwrap(), n);
        c.equal(name, "image_tokens(size)", vlm.config().image_tokens((rgb.height, rgb.width)), n);
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

fn parity(model: &str) {
    let vlm = Vlm::load_dir(&model_dir(model)).expect("fixture loads");
    let refs = Refs::load(model);
    assert_eq!(vlm.config().family.model_type(), refs.json["config"]["model_type"].as_str().unwrap());
    let mut c = Checker::default();
    let features = check_images(&vlm, &refs, model, &mut c);
    let feature_of = |name: &str| &features.iter().find(|(n, _)| n == name).unwrap().1;
    let steer_cases = refs.json["steer_cases"].as_array().unwrap().clone();
    let mut single_image_cases = 0;
    for case in refs.json["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let question = PromptText::Chat(case["question"].as_str().unwrap().into());
        let images = case["images"].as_array().unwrap();
        let (prepared, want) = match images.len() {
            1 => (vlm.prepare(&question, Some(feature_of(images[0].as_str().unwrap()))).unwrap(), &case["multimodal"]),
            // CMRM's text-only counterpart: the image prompt with its placeholder removed.
            0 => {
                let with_image = vlm.prompt_text(&question, 1).unwrap();
                (vlm.prepare_text_only(&with_image).unwrap(), &case["text_only"])
            }
            // Several images in one prompt: each encoded knowing it is one of several.
            _ => {
                let decoded: Vec<cmrm::RgbImage> = images
                    .iter()
                    .map(|name| {
                        let img = refs.json["images"].as_array().unwrap().iter().find(|i| i["name"] == *name).unwrap();
                        let bytes = std::fs::read(refs_dir(model).join(img["file"].as_str().unwrap())).unwrap();
                        decode_image(&bytes).unwrap()
                    })
                    .collect();
                let encoded = vlm.encode_images(&decoded).unwrap();
                for (i, (features, want)) in encoded.iter().zip(case["per_image"].as_array().unwrap()).enumerate() {
                    let what = format!("{id} image {i}");
                    let (tiles, _) = vlm.pixel_values(&decoded[i], decoded.len()).unwrap();
                    let want_u8 = refs.tensor(want["pixel_u8"].as_str().unwrap()).flatten_all().unwrap();
                    let got_u8: Vec<u8> = tiles
                        .tiles
                        .iter()
                        .flat_map(|t| (0..3).flat_map(move |ch| t.data.iter().skip(ch).step_by(3).copied()))
                        .collect();
                    c.equal(&what, "tiles u8", got_u8, want_u8.to_vec1::<u8>().unwrap());
                    let n = want["n_image_tokens"].as_u64().unwrap() as usize;
                    let hw = (decoded[i].height, decoded[i].width);
                    c.equal(&what, "image_tokens_among", vlm.config().image_tokens_among(hw, decoded.len()), n);
                    let want_features = refs.f32s(want["image_features"].as_str().unwrap());
                    c.close(&what, "image_features", &tensor_f32s(features), &want_features, TOL_FEATURES);
                }
                let refs: Vec<&candle_core::Tensor> = encoded.iter().collect();
                (vlm.prepare_images(&question, &refs).unwrap(), &case["multimodal"])
            }
        };
        single_image_cases += usize::from(images.len() == 1);
        c.equal(id, "prompt", prepared.prompt.as_str(), want["prompt"].as_str().unwrap());
        c.equal(id, "input_ids", prepared.encoded.input_ids.clone(), ids(&want["input_ids"]));
        let spans: Vec<(usize, usize)> = want["image_token_spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s[0].as_u64().unwrap() as usize, s[1].as_u64().unwrap() as usize))
            .collect();
        c.equal(id, "image span", prepared.encoded.image_span(), spans.first().copied());
        check_forward(&mut c, &refs, id, &vlm.probe(&prepared, None).unwrap(), want);

        let mut rows: Vec<Option<Intervention>> = vec![None];
        let mut wants = vec![want];
        for sc in &steer_cases {
            let Some(steered) = case.get("steered_multimodal").and_then(|s| s.get(sc["name"].as_str().unwrap())) else {
                continue;
            };
            let vectors = SteeringVectors::load(&refs_dir(model).join(sc["vectors_file"].as_str().unwrap())).unwrap();
            let layers: Vec<usize> =
                sc["layers"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap() as usize).collect();
            let positions: Positions = sc["positions"].as_str().unwrap().parse().unwrap();
            let alpha = sc["alpha"].as_f64().unwrap() as f32;
            let steering = Intervention::add(&vectors, alpha, Some(&layers), positions, vlm.device()).unwrap();
            check_forward(
                &mut c,
                &refs,
                &format!("{id} steered"),
                &vlm.probe(&prepared, Some(&steering)).unwrap(),
                steered,
            );
            rows.push(Some(steering));
            wants.push(steered);
        }
        // The unaltered answer and every steered one, decoded as one batch (Compare's pair).
        let rows: Vec<Option<&Intervention>> = rows.iter().map(Option::as_ref).collect();
        for (i, (gen, eos)) in greedy(&vlm, &prepared, &rows).into_iter().enumerate() {
            let what = format!("{id} row {i}");
            c.equal(&what, "generated_ids", gen, ids(&wants[i]["generated_ids"]));
            c.equal(&what, "stopped_on_eos", eos, wants[i]["stopped_on_eos"].as_bool().unwrap());
        }
    }
    assert!(single_image_cases >= 5, "{model}: only {single_image_cases} image cases checked");
    c.finish(model);
}

#[test]
fn parity_llava_next() {
    parity(MODELS[0]);
}

#[test]
fn parity_llava_onevision() {
    parity(MODELS[1]);
}
