#![cfg(not(target_arch = "wasm32"))]
//! The `cmrm` binary's contract (DESIGN.md §4): flags, `--json` fields, CMRM's sign, errors.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn cmrm(args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cmrm")).args(args).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let json = if out.status.success() {
        assert_eq!(stdout.lines().count(), 1, "--json must print exactly one line:\n{stdout}");
        serde_json::from_str(&stdout).unwrap()
    } else {
        Value::Null
    };
    (out.status.success(), json, stderr)
}

fn s(p: std::path::PathBuf) -> String {
    p.display().to_string()
}

#[test]
fn generate_json_matches_the_oracle() {
    for model in MODELS {
        let refs = Refs::load(model);
        let case = &refs.json["cases"][4]; // img1_q1
        let image = s(refs_dir(model).join(format!("{}.png", case["image"].as_str().unwrap())));
        let (ok, v, err) = cmrm(&[
            "generate",
            "--model",
            &s(model_dir(model)),
            "--image",
            &image,
            "--prompt",
            case["question"].as_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--json",
        ]);
        assert!(ok, "{err}");
        assert_eq!(ids(&v["input_ids"]), ids(&case["multimodal"]["input_ids"]));
        assert_eq!(ids(&v["generated_ids"]), ids(&case["multimodal"]["generated_ids"]));
        assert_eq!(v["stopped_on_eos"], case["multimodal"]["stopped_on_eos"]);
        assert!(v["text"].is_string());
        assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(v["decode_tokens_per_s"].as_f64().unwrap() >= 0.0);
    }
}

/// LLaVA-NeXT and OneVision through the same flags: one image (tiled), and two images in one
/// prompt (`--image` twice), greedy ids equal to transformers'.
#[test]
fn anyres_families_generate_through_the_same_flags() {
    for model in ["tiny-llava-next-clip-llama", "tiny-llava-onevision-siglip-qwen2"] {
        let refs = Refs::load(model);
        for case in
            refs.json["cases"].as_array().unwrap().iter().filter(|c| c["id"] == "img4_q0" || c["id"] == "two_images")
        {
            let mut args = vec!["generate".to_owned(), "--model".to_owned(), s(model_dir(model))];
            for image in case["images"].as_array().unwrap() {
                args.extend([
                    "--image".to_owned(),
                    s(refs_dir(model).join(format!("{}.png", image.as_str().unwrap()))),
                ]);
            }
            args.extend(
                ["--prompt", case["question"].as_str().unwrap(), "--max-new-tokens", "12", "--json"].map(String::from),
            );
            let (ok, v, err) = cmrm(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(ok, "{model} {}: {err}", case["id"]);
            assert_eq!(ids(&v["input_ids"]), ids(&case["multimodal"]["input_ids"]), "{model} {}", case["id"]);
            assert_eq!(ids(&v["generated_ids"]), ids(&case["multimodal"]["generated_ids"]), "{model} {}", case["id"]);
            assert!(v["stages"]["vision"]["seconds"].as_f64().unwrap() > 0.0);
        }
        // A `cmrm quantize` copy keeps image_newline and the anyres settings: it loads and its
        // first tokens are the f32 model's.
        let out = std::env::temp_dir().join(format!("cmrm-anyres-q8-{}-{model}", std::process::id()));
        let (ok, _, err) = cmrm(&[
            "quantize",
            "--model",
            &s(model_dir(model)),
            "--format",
            "q8_0",
            "--out",
            &s(out.clone()),
            "--json",
        ]);
        assert!(ok, "{err}");
        let case = refs.json["cases"].as_array().unwrap().iter().find(|c| c["id"] == "img0_q0").unwrap();
        let image = s(refs_dir(model).join(format!("{}.png", case["image"].as_str().unwrap())));
        let prompt = case["question"].as_str().unwrap();
        let (ok, v, err) = cmrm(&[
            "generate",
            "--model",
            &s(out.clone()),
            "--image",
            &image,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "3",
            "--json",
        ]);
        assert!(ok, "{model} q8_0: {err}");
        assert_eq!(ids(&v["generated_ids"])[..2], ids(&case["multimodal"]["generated_ids"])[..2], "{model} q8_0");
        std::fs::remove_dir_all(out).unwrap();
    }
}

/// The oracle's `shift` vectors hold text − multimodal and its cases *add* α·v. The CLI is CMRM:
/// `h ← h − α·v`, so `--alpha −0.5` must reproduce the oracle's `shift_mid_a0.5` case.
#[test]
fn cli_alpha_subtracts() {
    let model = MODELS[1];
    let refs = Refs::load(model);
    let case = &refs.json["cases"][0];
    let want = &case["steered_multimodal"]["shift_mid_a0.5"];
    let image = s(refs_dir(model).join("red_square.png"));
    let vectors = s(refs_dir(model).join("shift_vectors.safetensors"));
    let base = ["--model", &s(model_dir(model)), "--image", &image, "--prompt", case["question"].as_str().unwrap()];
    let steer = ["--vectors", &vectors, "--alpha=-0.5", "--layers", "1"];

    let mut args = vec!["generate"];
    args.extend(base);
    args.extend(steer);
    args.extend(["--max-new-tokens", "12", "--compare", "--json"]);
    let (ok, v, err) = cmrm(&args);
    assert!(ok, "{err}");
    assert_eq!(ids(&v["steered"]["generated_ids"]), ids(&want["generated_ids"]));
    assert_eq!(ids(&v["unaltered"]["generated_ids"]), ids(&case["multimodal"]["generated_ids"]));
    assert_eq!(v["steering"]["alpha"].as_f64().unwrap(), -0.5);
    assert_eq!(v["steering"]["layers"], serde_json::json!([1]));

    let mut args = vec!["probe"];
    args.extend(base);
    args.extend(steer);
    args.push("--json");
    let (ok, v, err) = cmrm(&args);
    assert!(ok, "{err}");
    let logits: Vec<f32> = v["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let d = max_abs_diff(&logits, &refs.f32s(want["logits"].as_str().unwrap()));
    assert!(d <= 2e-4, "steered logits differ by {d}");
}

#[test]
fn probe_json_fields() {
    let model = MODELS[0];
    let refs = Refs::load(model);
    let case = &refs.json["cases"][0];
    let (ok, v, err) = cmrm(&[
        "probe",
        "--model",
        &s(model_dir(model)),
        "--image",
        &s(refs_dir(model).join("red_square.png")),
        "--prompt",
        case["question"].as_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(v["n_image_tokens"], 16);
    assert_eq!(v["hidden_states"].as_array().unwrap().len(), 5);
    assert_eq!(v["layer_outputs"].as_array().unwrap().len(), 4);
    assert_eq!(v["logits"].as_array().unwrap().len(), 642);
    let hs: Vec<f32> = v["hidden_states"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
        .collect();
    let d = max_abs_diff(&hs, &refs.f32s(case["multimodal"]["hidden_states"].as_str().unwrap()));
    assert!(d <= 2e-4, "{d}");
}

#[test]
fn raw_prompt_is_used_as_is() {
    let model = MODELS[0];
    let refs = Refs::load(model);
    let case = &refs.json["cases"][0];
    let (ok, v, err) = cmrm(&[
        "generate",
        "--model",
        &s(model_dir(model)),
        "--raw-prompt",
        "--prompt",
        case["text_only"]["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(ids(&v["input_ids"]), ids(&case["text_only"]["input_ids"]));
    assert_eq!(ids(&v["generated_ids"]), ids(&case["text_only"]["generated_ids"]));
}

#[test]
fn errors_are_one_clear_line() {
    let model = s(model_dir(MODELS[0]));
    let (ok, _, err) = cmrm(&["generate", "--model", &model, "--prompt", "hi", "--image", "/nonexistent.png"]);
    assert!(!ok);
    assert!(err.contains("cannot read /nonexistent.png"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let (ok, _, err) = cmrm(&["generate", "--model", &model, "--prompt", "hi", "--weights", "q3"]);
    assert!(!ok);
    assert!(err.contains("weight format must be f32, q8_0 or q4"), "{err}");
    let (ok, v, err) = cmrm(&["generate", "--model", &model, "--prompt", "hi", "--weights", "q8_0", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(v["backend"]["backend"], "cpu", "quantized weights run on the CPU path");

    let (ok, _, err) = cmrm(&["generate", "--model", &model, "--prompt", "hi", "--alpha", "1"]);
    assert!(!ok);
    assert!(err.contains("--alpha/--layers/--positions need --vectors FILE or --sample-level"), "{err}");

    let vectors = s(refs_dir(MODELS[0]).join("steer_random.safetensors"));
    let (ok, _, err) = cmrm(&["generate", "--model", &model, "--prompt", "hi", "--vectors", &vectors, "--layers", "9"]);
    assert!(!ok);
    assert!(err.contains("layer 9 is out of range"), "{err}");

    let (ok, _, err) =
        cmrm(&["generate", "--model", &model, "--prompt", "hi", "--vectors", &vectors, "--positions", "first"]);
    assert!(!ok);
    assert!(err.contains("positions must be all, last, generated or last+generated"), "{err}");
}

/// `--model owner/name` resolves from a pre-populated Hugging Face cache with the network off.
#[test]
fn hub_repo_id_from_the_offline_cache() {
    let model = MODELS[1];
    let home = std::env::temp_dir().join(format!("cmrm-hf-home-{}", std::process::id()));
    let repo = home.join("hub/models--tiny--llava-siglip-qwen2");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for e in std::fs::read_dir(model_dir(model)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snapshot.join(e.file_name())).unwrap();
    }
    let run = |spec: &str| {
        Command::new(env!("CARGO_BIN_EXE_cmrm"))
            .args(["generate", "--model", spec, "--prompt", "What is in the image?", "--max-new-tokens", "4", "--json"])
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .env("HTTPS_PROXY", "http://127.0.0.1:9") // any network use would fail loudly
            .output()
            .unwrap()
    };
    let out = run("tiny/llava-siglip-qwen2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 4);

    // A revision that is not cached, and a missing weight file, are named.
    let out = run("tiny/llava-siglip-qwen2@v2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("config.json of tiny/llava-siglip-qwen2@v2"), "{err}");
    assert!(err.contains("huggingface-cli download tiny/llava-siglip-qwen2 --revision v2"), "{err}");
    std::fs::remove_file(snapshot.join("model.safetensors")).unwrap();
    let out = run("tiny/llava-siglip-qwen2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("model.safetensors of tiny/llava-siglip-qwen2@main"), "{err}");
    let _ = std::fs::remove_dir_all(&home);
}

/// `--backend webgpu` (wgpu on lavapipe here: vision tower, projector and decoder) and
/// `--backend cpu` answer identically, and the chosen backend is reported, stage by stage;
/// `auto` never picks a software rasterizer over the CPU path.
#[test]
fn backends_agree_and_are_reported() {
    let model = MODELS[0];
    let refs = Refs::load(model);
    let case = &refs.json["cases"][2];
    let image = s(refs_dir(model).join(format!("{}.png", case["image"].as_str().unwrap())));
    // `command` (generate or probe) on the case's image and question, on `backend`.
    let on = |command: &str, backend: &str, extra: &[&str]| {
        let model_dir = s(model_dir(model));
        let mut args = vec![command, "--model", &model_dir, "--image", &image];
        args.extend(["--prompt", case["question"].as_str().unwrap(), "--backend", backend, "--json"]);
        args.extend(extra);
        let (ok, v, err) = cmrm(&args);
        assert!(ok, "{command} {backend}: {err}");
        v
    };
    let run = |backend: &str| on("generate", backend, &["--max-new-tokens", "12"]);
    let cpu = run("cpu");
    let gpu = run("webgpu");
    assert_eq!(cpu["backend"]["backend"], "cpu");
    assert_eq!(gpu["backend"]["backend"], "webgpu");
    assert!(gpu["backend"]["adapter"].is_string());
    assert_eq!(ids(&gpu["generated_ids"]), ids(&case["multimodal"]["generated_ids"]));
    assert_eq!(cpu["generated_ids"], gpu["generated_ids"]);
    // Every stage says where it ran: all on the CPU, or all on the GPU (the vision tower and the
    // projector too), with its seconds.
    assert_eq!(gpu["backend"]["vision"], "webgpu", "{}", gpu["backend"]);
    // Loaded GPU-resident: the blocks went to the GPU one by one and the CPU kept none.
    assert_eq!(gpu["backend"]["resident"], true, "{}", gpu["backend"]);
    assert!(cpu["backend"].get("resident").is_none(), "{}", cpu["backend"]);
    for (v, on) in [(&cpu, "cpu"), (&gpu, "webgpu")] {
        for stage in ["vision", "projector", "prefill", "decode"] {
            assert_eq!(v["stages"][stage]["on"], on, "{stage}: {}", v["stages"]);
            assert!(v["stages"][stage]["seconds"].as_f64().unwrap() >= 0.0, "{stage}: {}", v["stages"]);
        }
    }
    // `probe` on either backend: the same states (within the decoder's GPU tolerance).
    let probe = |backend: &str| on("probe", backend, &[]);
    let (cpu_probe, gpu_probe) = (probe("cpu"), probe("webgpu"));
    assert_eq!(gpu_probe["backend"]["backend"], "webgpu");
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let d = max_abs_diff(&floats(&gpu_probe["logits"]), &floats(&cpu_probe["logits"]));
    assert!(d <= 1e-3, "probe logits webgpu vs cpu: {d}");
    assert_eq!(gpu_probe["input_ids"], cpu_probe["input_ids"]);
    let auto = run("auto");
    if gpu["backend"]["adapter"].as_str().unwrap().contains("llvmpipe") {
        assert_eq!(auto["backend"]["backend"], "cpu");
        assert!(auto["backend"]["fallback_reason"].as_str().unwrap().contains("software rasterizer"));
    }
}

/// `--temperature 0` is greedy decoding (not a division by zero).
#[test]
fn temperature_zero_is_greedy() {
    let model = MODELS[0];
    let refs = Refs::load(model);
    let case = &refs.json["cases"][0];
    let (ok, v, err) = cmrm(&[
        "generate",
        "--model",
        &s(model_dir(model)),
        "--raw-prompt",
        "--prompt",
        case["text_only"]["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(ids(&v["generated_ids"]), ids(&case["text_only"]["generated_ids"]));
}

/// `synthesize --format q8_0 | q4` writes, byte for byte, the GGUF that `quantize` makes of the
/// BF16 checkpoint `synthesize` writes: the 7B-shaped benchmark model needs no 14 GB of BF16.
#[test]
fn synthesize_straight_to_gguf_equals_quantize() {
    let files = s(model_dir("tiny-llava-clip-llama"));
    let work = std::env::temp_dir().join(format!("cmrm-synth-gguf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let bf16 = s(work.join("bf16"));
    let (ok, _, err) = cmrm(&["synthesize", "--files", &files, "--out", &bf16, "--layers", "2,1", "--json"]);
    assert!(ok, "{err}");
    for format in ["q8_0", "q4"] {
        let (quantized, direct) =
            (s(work.join(format!("quantized-{format}"))), s(work.join(format!("direct-{format}"))));
        let (ok, _, err) = cmrm(&["quantize", "--model", &bf16, "--format", format, "--out", &quantized, "--json"]);
        assert!(ok, "{err}");
        let (ok, v, err) =
            cmrm(&["synthesize", "--files", &files, "--out", &direct, "--layers", "2,1", "--format", format, "--json"]);
        assert!(ok, "{err}");
        let a = std::fs::read(work.join(format!("quantized-{format}/model.gguf"))).unwrap();
        let b = std::fs::read(work.join(format!("direct-{format}/model.gguf"))).unwrap();
        assert_eq!(v["weights_bytes"].as_u64(), Some(b.len() as u64));
        // The folder holds one weight file (the input folder's own was not copied).
        let names: Vec<String> = std::fs::read_dir(work.join(format!("direct-{format}")))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors") || n.ends_with(".gguf"))
            .collect();
        assert_eq!(names, ["model.gguf"]);
        assert!(
            a == b,
            "{format}: {} vs {} bytes, first difference at {:?}",
            a.len(),
            b.len(),
            a.iter().zip(&b).position(|(x, y)| x != y)
        );
    }
    let _ = std::fs::remove_dir_all(&work);
}
