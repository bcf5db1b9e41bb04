#![cfg(not(target_arch = "wasm32"))]
//! Generation behaviour beyond greedy parity: streaming, sampling with a seed, stopping, cancel.

mod common;

use cmrm::generate::Sampling;
use cmrm::{decode_image, PromptText, Vlm};
use common::*;

fn setup(model: &str) -> (Vlm, cmrm::Prepared) {
    let vlm = Vlm::load_dir(&model_dir(model)).unwrap();
    let img = decode_image(&std::fs::read(refs_dir(model).join("checker.png")).unwrap()).unwrap();
    let features = vlm.encode_image(&img).unwrap();
    let prepared = vlm.prepare(&PromptText::Chat("Describe the picture in detail.".into()), Some(&features)).unwrap();
    (vlm, prepared)
}

#[test]
fn streamed_text_adds_up_to_the_answer() {
    for model in MODELS {
        let (vlm, prepared) = setup(model);
        let mut streamed = String::new();
        let mut count = 0;
        let opts = vlm.default_generate_options(40, Sampling::Greedy);
        let g = vlm
            .generate(&prepared, None, &opts, &mut |ev| {
                assert_eq!(ev.index, count);
                count += 1;
                streamed.push_str(&ev.text);
                true
            })
            .unwrap();
        assert_eq!(count, g.generated_ids.len());
        assert!(g.text.starts_with(&streamed), "{model}: stream {streamed:?} vs text {:?}", g.text);
        assert!(g.text.len() - streamed.len() <= 9, "{model}: stream fell behind: {streamed:?} vs {:?}", g.text);
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let (vlm, prepared) = setup(MODELS[0]);
    let run = |seed| {
        let opts = vlm.default_generate_options(24, Sampling::TopP { temperature: 1.5, top_p: 0.95, seed });
        vlm.generate(&prepared, None, &opts, &mut |_| true).unwrap().generated_ids
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    let greedy =
        vlm.generate(&prepared, None, &vlm.default_generate_options(24, Sampling::Greedy), &mut |_| true).unwrap();
    assert_ne!(run(7), greedy.generated_ids);
}

#[test]
fn stops_on_eos_max_tokens_and_cancel() {
    // The oracle records a qwen2 case that stops on EOS: the EOS id ends the output.
    let model = MODELS[1];
    let refs = Refs::load(model);
    let vlm = Vlm::load_dir(&model_dir(model)).unwrap();
    let eos_case = refs.json["cases"].as_array().unwrap().iter().find(|c| {
        c["text_only"]["stopped_on_eos"].as_bool().unwrap() || c["multimodal"]["stopped_on_eos"].as_bool().unwrap()
    });
    if let Some(case) = eos_case {
        let which = if case["text_only"]["stopped_on_eos"].as_bool().unwrap() { "text_only" } else { "multimodal" };
        let want = ids(&case[which]["generated_ids"]);
        assert_eq!(*want.last().unwrap(), 642);
        let prompt = case[which]["prompt"].as_str().unwrap();
        let features = if which == "multimodal" {
            let img = decode_image(
                &std::fs::read(refs_dir(model).join(format!("{}.png", case["image"].as_str().unwrap()))).unwrap(),
            )
            .unwrap();
            Some(vlm.encode_image(&img).unwrap())
        } else {
            None
        };
        let prepared = vlm.prepare(&PromptText::Raw(prompt.into()), features.as_ref()).unwrap();
        let g =
            vlm.generate(&prepared, None, &vlm.default_generate_options(50, Sampling::Greedy), &mut |_| true).unwrap();
        assert!(g.stopped_on_eos);
        assert_eq!(g.generated_ids, want);
        // A caller that stops on the EOS token itself still gets `stopped_on_eos`.
        let opts = vlm.default_generate_options(50, Sampling::Greedy);
        let g = vlm.generate(&prepared, None, &opts, &mut |ev| ev.id != 642).unwrap();
        assert!(g.stopped_on_eos && !g.cancelled);
    } else {
        panic!("the oracle should record at least one EOS stop for qwen2");
    }

    let (vlm, prepared) = setup(MODELS[0]);
    let g = vlm.generate(&prepared, None, &vlm.default_generate_options(5, Sampling::Greedy), &mut |_| true).unwrap();
    assert_eq!(g.generated_ids.len(), 5);
    assert!(!g.stopped_on_eos);

    let mut seen = 0;
    let g = vlm
        .generate(&prepared, None, &vlm.default_generate_options(30, Sampling::Greedy), &mut |_| {
            seen += 1;
            seen < 3
        })
        .unwrap();
    assert!(g.cancelled);
    assert_eq!(g.generated_ids.len(), 3);
}

#[test]
fn generation_stops_at_the_context_end() {
    // max_position_embeddings is 512: asking for more tokens than fit stops at the context end.
    let (vlm, prepared) = setup(MODELS[0]);
    let prompt_len = prepared.encoded.input_ids.len();
    let mut opts = vlm.default_generate_options(2000, Sampling::Greedy);
    opts.eos_ids.clear();
    let g = vlm.generate(&prepared, None, &opts, &mut |_| true).unwrap();
    assert_eq!(prompt_len + g.generated_ids.len(), 512);
}
