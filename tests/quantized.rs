#![cfg(not(target_arch = "wasm32"))]
//! Quantize on load (Q8_0, 4-bit) vs F32 on the oracle fixtures: logits within a documented
//! tolerance and greedy agreement.

mod common;

use cmrm::generate::Sampling;
use cmrm::quant::WeightFormat;
use cmrm::{decode_image, PromptText, Vlm};
use common::*;

/// Greedy generations (12 tokens) and last-token logits of all 9 oracle cases.
fn run_cases(vlm: &Vlm, model: &str) -> Vec<(Vec<u32>, Vec<f32>)> {
    let refs = Refs::load(model);
    refs.json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let file = refs_dir(model).join(format!("{}.png", case["image"].as_str().unwrap()));
            let features = vlm.encode_image(&decode_image(&std::fs::read(file).unwrap()).unwrap()).unwrap();
            let prepared =
                vlm.prepare(&PromptText::Chat(case["question"].as_str().unwrap().into()), Some(&features)).unwrap();
            let opts = vlm.default_generate_options(12, Sampling::Greedy);
            let ids = vlm.generate(&prepared, None, &opts, &mut |_| true).unwrap().generated_ids;
            (ids, vlm.probe(&prepared, None).unwrap().logits)
        })
        .collect()
}

/// How close a quantized model stays to F32 over the 9 cases.
struct Agreement {
    /// Max |Δlogit| ÷ max |logit| (last prompt token).
    worst_relative: f32,
    /// Smallest cosine similarity of the last-token logits.
    min_cosine: f32,
    /// Cases whose first greedy token (the argmax of those logits) agrees.
    first_token: usize,
    /// Cases whose 12 greedy tokens all agree.
    all_tokens: usize,
}

fn compare(model: &str, format: WeightFormat) -> Agreement {
    let exact = run_cases(&Vlm::load_dir(&model_dir(model)).unwrap(), model);
    let quant = run_cases(&Vlm::load_dir_as(&model_dir(model), format).unwrap(), model);
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let mut a = Agreement { worst_relative: 0.0, min_cosine: 1.0, first_token: 0, all_tokens: 0 };
    for ((ids_f, logits_f), (ids_q, logits_q)) in exact.iter().zip(&quant) {
        let spread = logits_f.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.worst_relative = a.worst_relative.max(max_abs_diff(logits_f, logits_q) / spread);
        let cos = logits_f.iter().zip(logits_q).map(|(x, y)| x * y).sum::<f32>() / norm(logits_f) / norm(logits_q);
        a.min_cosine = a.min_cosine.min(cos);
        a.first_token += usize::from(ids_f[0] == ids_q[0]);
        a.all_tokens += usize::from(ids_f == ids_q);
    }
    eprintln!(
        "{model} {format:?}: max |Δlogit|/max |logit| {:.4}, min cosine {:.5}, first token {}/9, all 12 tokens {}/9",
        a.worst_relative, a.min_cosine, a.first_token, a.all_tokens
    );
    a
}

/// The oracle models are random and chaotic by design (greedy margins down to 1e-3), so whole
/// 12-token sequences drift apart under any 8-bit rounding after a few tokens; the first token,
/// decided by the prompt's logits, must agree.
#[test]
fn q8_0_matches_f32() {
    for model in MODELS {
        let a = compare(model, WeightFormat::Q8_0);
        assert!(a.worst_relative > 0.0, "{model}: Q8_0 changed nothing — not quantized?");
        assert!(a.worst_relative < 0.1, "{model}: Q8_0 logits off by {} of their range", a.worst_relative);
        assert!(a.min_cosine > 0.995, "{model}: Q8_0 logits cosine {}", a.min_cosine);
        assert!(a.first_token >= 8, "{model}: Q8_0 first-token agreement {}/9", a.first_token);
    }
}

#[test]
fn q4_stays_correlated() {
    for model in MODELS {
        let a = compare(model, WeightFormat::Q4);
        assert!(a.worst_relative > 0.0, "{model}: 4-bit changed nothing");
        assert!(a.min_cosine > 0.7, "{model}: 4-bit logits cosine {}", a.min_cosine);
    }
}

#[test]
fn quantized_models_are_smaller() {
    let model = MODELS[1];
    let f32_bytes = Vlm::load_dir(&model_dir(model)).unwrap().model.text.bytes_read_per_token();
    let q8 = Vlm::load_dir_as(&model_dir(model), WeightFormat::Q8_0).unwrap().model.text.bytes_read_per_token();
    let q4 = Vlm::load_dir_as(&model_dir(model), WeightFormat::Q4).unwrap().model.text.bytes_read_per_token();
    // 8.5 and 4.5 bits per weight vs 32.
    assert!((q8 as f64) < f32_bytes as f64 * 0.28, "{q8} vs {f32_bytes}");
    assert!((q4 as f64) < f32_bytes as f64 * 0.15, "{q4} vs {f32_bytes}");
}

/// The memory estimate the browser uses before (and while) loading matches what loading takes:
/// exactly for the decoder, whose bytes the model reports.
#[test]
fn memory_estimate_matches_the_loaded_decoder() {
    for model in MODELS {
        let weights = cmrm::checkpoint::load_weights(&model_dir(model)).unwrap();
        for format in [WeightFormat::F32, WeightFormat::Q8_0, WeightFormat::Q4] {
            let decoder_only = weights.shapes().filter(|(n, _)| n.starts_with("lm.") || n.starts_with("lm_head."));
            let estimate = cmrm::quant::estimate_model_bytes(format, decoder_only);
            let vlm = Vlm::load_dir_as(&model_dir(model), format).unwrap();
            let norms: u64 = weights
                .shapes()
                .filter(|(n, s)| n.starts_with("lm.") && s.len() == 1)
                .map(|(_, s)| s[0] as u64 * 4)
                .sum();
            assert_eq!(estimate, vlm.model.text.weight_bytes() as u64 + norms, "{model} {format:?}");
        }
        let all = |f| cmrm::quant::estimate_model_bytes(f, weights.shapes());
        assert!(all(WeightFormat::Q4) < all(WeightFormat::Q8_0) && all(WeightFormat::Q8_0) < all(WeightFormat::F32));
    }
}

fn cmrm_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cmrm")).args(args).output().unwrap()
}

/// `cmrm quantize`: a folder with one GGUF (linears in the block format, embedding F16) and the
/// other files; loading it gives the same model as quantizing the safetensors on load — bit for
/// bit for Q8_0 (Q8_0 blocks survive dequantize → re-quantize exactly) — in the GGUF's format by
/// default, and the copy is smaller.
#[test]
fn quantize_writes_a_gguf_copy_that_loads_as_the_same_model() {
    for model in MODELS {
        let src = model_dir(model);
        for format in [WeightFormat::Q8_0, WeightFormat::Q4] {
            let out =
                std::env::temp_dir().join(format!("cmrm-quantize-{model}-{}-{}", format.name(), std::process::id()));
            let _ = std::fs::remove_dir_all(&out);
            let o = cmrm_cli(&[
                "quantize",
                "--model",
                src.to_str().unwrap(),
                "--format",
                format.name(),
                "--out",
                out.to_str().unwrap(),
                "--json",
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert!(!out.join("model.safetensors").exists());
            for file in ["config.json", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"] {
                assert_eq!(std::fs::read(out.join(file)).unwrap(), std::fs::read(src.join(file)).unwrap(), "{file}");
            }
            let gguf_bytes = std::fs::metadata(out.join("model.gguf")).unwrap().len();
            assert_eq!(report["gguf_bytes"], gguf_bytes);
            let input = std::fs::metadata(src.join("model.safetensors")).unwrap().len();
            assert!(gguf_bytes < input, "{model} {format:?}: {gguf_bytes} vs {input} bytes");

            let weights = cmrm::checkpoint::load_weights(&out).unwrap();
            assert_eq!(weights.stored_format(), Some(format));
            // The blocks are offered as stored (loaded without re-quantizing).
            let block = format.ggml_type(64).unwrap();
            let vb = cmrm::checkpoint::load_weights(&out).unwrap().into_var_builder(&candle_core::Device::Cpu);
            assert!(vb.contains_tensor(&cmrm::quant::block_key("lm.embed_tokens.weight", block)), "{model} {format:?}");
            assert!(!vb.contains_tensor(&cmrm::quant::block_key("lm.norm.weight", block)));
            let from_gguf = Vlm::load_dir_choice(&out, cmrm::quant::WeightChoice::Auto).unwrap();
            assert_eq!(from_gguf.weight_format(), format);
            let on_load = Vlm::load_dir_as(&src, format).unwrap();
            let (a, b) = (run_cases(&from_gguf, model), run_cases(&on_load, model));
            let worst = a.iter().zip(&b).map(|((_, la), (_, lb))| max_abs_diff(la, lb)).fold(0f32, f32::max);
            let same_ids = a.iter().zip(&b).filter(|((ia, _), (ib, _))| ia == ib).count();
            eprintln!(
                "{model} {format:?}: GGUF copy vs quantize-on-load: max |Δlogit| {worst:e}, ids equal {same_ids}/9"
            );
            if format == WeightFormat::Q8_0 {
                assert_eq!(worst, 0.0, "{model}: Q8_0 from GGUF must equal Q8_0 on load");
                assert_eq!(same_ids, 9);
            } else {
                let spread = b.iter().flat_map(|(_, l)| l).fold(0f32, |m, x| m.max(x.abs()));
                assert!(worst / spread < 0.1, "{model}: 4-bit GGUF copy off by {worst} (spread {spread})");
            }
            // Asked for F32, the copy is dequantized: the same model up to the arithmetic.
            let dequantized = run_cases(&Vlm::load_dir_as(&out, WeightFormat::F32).unwrap(), model);
            let cos = dequantized
                .iter()
                .zip(&a)
                .map(|((_, x), (_, y))| {
                    let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
                    dot / (x.iter().map(|p| p * p).sum::<f32>().sqrt() * y.iter().map(|q| q * q).sum::<f32>().sqrt())
                })
                .fold(1f32, f32::min);
            assert!(cos > 0.99, "{model} {format:?}: dequantized copy vs quantized, logits cosine {cos}");
            // F32 tensors (norms, biases) are stored as they were.
            let src_weights = cmrm::checkpoint::load_weights(&src).unwrap();
            let norm = "lm.norm.weight";
            let dev = candle_core::Device::Cpu;
            let (x, y) = (weights.load(norm, &dev).unwrap(), src_weights.load(norm, &dev).unwrap());
            assert_eq!(x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
}

/// A truncated GGUF, a bad format and writing over the input are refused with clear messages.
#[test]
fn quantize_and_gguf_bad_inputs() {
    let src = model_dir(MODELS[1]);
    let out = std::env::temp_dir().join(format!("cmrm-quantize-bad-{}", std::process::id()));
    let o = cmrm_cli(&["quantize", "--model", src.to_str().unwrap(), "--format", "q5", "--out", out.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("weight format must be f32, q8_0 or q4"));
    let o =
        cmrm_cli(&["quantize", "--model", src.to_str().unwrap(), "--format", "q8_0", "--out", src.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--out must be another folder"), "{o:?}");

    let o =
        cmrm_cli(&["quantize", "--model", src.to_str().unwrap(), "--format", "q8_0", "--out", out.to_str().unwrap()]);
    assert!(o.status.success());
    let gguf = std::fs::read(out.join("model.gguf")).unwrap();
    let mut weights = cmrm::weights::Weights::empty();
    let e = weights
        .add_file("model.gguf", cmrm::weights::FileBytes::Owned(gguf[..gguf.len() / 2].to_vec()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.gguf") && e.contains("past the end of the file"), "{e}");
    let mut weights = cmrm::weights::Weights::empty();
    let e =
        weights.add_file("model.gguf", cmrm::weights::FileBytes::Owned(gguf[..40].to_vec())).unwrap_err().to_string();
    assert!(e.contains("ends inside its GGUF header"), "{e}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// A safetensors file fed in chunks (as a download arrives) and converted tensor by tensor gives
/// exactly the model that loading the whole file gives, in every format; a truncated stream is
/// an error that says so.
#[test]
fn streamed_load_equals_loading_the_file() {
    use cmrm::streaming::WeightStream;
    for model in MODELS {
        let dir = model_dir(model);
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let config = cmrm::LlavaConfig::from_file(&dir.join("config.json")).unwrap();
        let files = cmrm::processor::ProcessorFiles::read_dir(&dir).unwrap();
        let generation = std::fs::read_to_string(dir.join("generation_config.json")).ok();
        for format in [WeightFormat::F32, WeightFormat::Q8_0, WeightFormat::Q4] {
            let want = run_cases(&Vlm::load_dir_as(&dir, format).unwrap(), model);
            // Chunks of 7 bytes converted a few rows at a time (slices of 200 bytes), chunks of
            // 64 KiB, and the whole file at once.
            for (chunk, slice) in [(7, 200), (65536, 1 << 24), (bytes.len(), 1 << 24)] {
                let mut weights = cmrm::weights::Weights::empty();
                let mut stream =
                    WeightStream::new("model.safetensors", Box::new(move |_, _| Ok(format))).with_slice_bytes(slice);
                for c in bytes.chunks(chunk) {
                    stream.push(c, &mut weights).unwrap();
                }
                assert_eq!(stream.finish().unwrap(), format);
                let vlm = Vlm::from_parts(config.clone(), format, &files, generation.as_deref(), weights).unwrap();
                let got = run_cases(&vlm, model);
                assert_eq!(got, want, "{model} {format:?} in chunks of {chunk}");
            }
        }
        let mut weights = cmrm::weights::Weights::empty();
        let mut stream = WeightStream::new("model.safetensors", Box::new(|_, _| Ok(WeightFormat::Q8_0)));
        stream.push(&bytes[..bytes.len() / 2], &mut weights).unwrap();
        let e = stream.finish().unwrap_err().to_string();
        assert!(e.contains("the download stopped after") && e.contains("missing"), "{e}");
    }
}

/// A `cmrm quantize` GGUF fed in chunks (the page's download of a hosted copy) keeps its blocks
/// and gives exactly the model that loading the whole file gives; the stream names the GGUF's own
/// format to the format decision (what `auto` takes); a truncated or corrupt GGUF is an error
/// that says so.
#[test]
fn streamed_gguf_equals_loading_the_file() {
    use cmrm::streaming::WeightStream;
    use cmrm::weights::{FileBytes, Weights};
    for model in MODELS {
        let dir = model_dir(model);
        let config = cmrm::LlavaConfig::from_file(&dir.join("config.json")).unwrap();
        let files = cmrm::processor::ProcessorFiles::read_dir(&dir).unwrap();
        let generation = std::fs::read_to_string(dir.join("generation_config.json")).ok();
        let mut source = Weights::empty();
        source
            .add_file("model.safetensors", FileBytes::Owned(std::fs::read(dir.join("model.safetensors")).unwrap()))
            .unwrap();
        let build = |weights: Weights, format: WeightFormat| {
            Vlm::from_parts(config.clone(), format, &files, generation.as_deref(), weights).unwrap()
        };
        for format in [WeightFormat::Q8_0, WeightFormat::Q4] {
            let gguf = cmrm::quant_export::quantize_to_gguf(&source, format).unwrap();
            let mut whole = Weights::empty();
            whole.add_file("model.gguf", FileBytes::Owned(gguf.clone())).unwrap();
            let want = run_cases(&build(whole, format), model);
            for (chunk, slice) in [(7, 200), (65536, 1 << 24)] {
                let mut weights = Weights::empty();
                let mut stream = WeightStream::new(
                    "model.gguf",
                    Box::new(move |_, stored| {
                        assert_eq!(stored, Some(format));
                        Ok(format)
                    }),
                )
                .with_slice_bytes(slice);
                for c in gguf.chunks(chunk) {
                    stream.push(c, &mut weights).unwrap();
                }
                assert_eq!(stream.finish().unwrap(), format);
                assert_eq!(run_cases(&build(weights, format), model), want, "{model} {format:?} in chunks of {chunk}");
            }
            let mut weights = Weights::empty();
            let mut stream = WeightStream::new("model.gguf", Box::new(|_, stored| Ok(stored.unwrap())));
            stream.push(&gguf[..gguf.len() * 2 / 3], &mut weights).unwrap();
            let e = stream.finish().unwrap_err().to_string();
            assert!(e.contains("the download stopped after") && e.contains("missing"), "{e}");
            // Corrupt headers: an unknown version, a string claiming 2⁶⁰ bytes, alignment 0 (candle
            // would abort on the last two): errors as soon as the header says so, streamed or whole.
            let mut version = gguf.clone();
            version[4..8].copy_from_slice(&99u32.to_le_bytes());
            let mut long_key = gguf.clone();
            long_key[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes()); // the first key's length
            let mut alignment = gguf[..24].to_vec();
            alignment[16..24].copy_from_slice(&1u64.to_le_bytes()); // one metadata entry:
            alignment.extend(17u64.to_le_bytes());
            alignment.extend(b"general.alignment");
            alignment.extend(4u32.to_le_bytes()); // u32
            alignment.extend(0u32.to_le_bytes());
            for (bad, want) in [
                (version, "GGUF version 99"),
                (long_key, "implausible string length"),
                (alignment, "general.alignment must be a power of two"),
            ] {
                let mut stream = WeightStream::new("model.gguf", Box::new(|_, stored| Ok(stored.unwrap())));
                let e = stream.push(&bad[..bad.len().min(4096)], &mut Weights::empty()).unwrap_err().to_string();
                assert!(e.contains("model.gguf") && e.contains(want), "{e}");
                let e = Weights::empty().add_file("model.gguf", FileBytes::Owned(bad)).unwrap_err().to_string();
                assert!(e.contains(want), "{e}");
            }
        }
    }
}
