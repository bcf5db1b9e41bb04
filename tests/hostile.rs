#![cfg(not(target_arch = "wasm32"))]
//! Hostile files: every input of the bad-input corpus (tests/corpus) gives its clear error,
//! within a few seconds and without a memory spike, through the entry points the CLI and the
//! page use (processor files, config, weights whole and streamed, vector files, catalogs,
//! images). A row per input is printed: time and peak memory.

mod common;
#[path = "corpus/mod.rs"]
mod corpus;

use std::time::Instant;

use cmrm::processor::{Processor, ProcessorFiles};
use cmrm::weights::{FileBytes, Weights};
use cmrm::LlavaConfig;
use corpus::Target;

fn model_file(name: &str) -> String {
    std::fs::read_to_string(common::model_dir(common::MODELS[1]).join(name)).unwrap()
}

/// Peak resident memory since the last reset, in bytes (Linux: VmHWM, reset through clear_refs).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn processor_files() -> ProcessorFiles {
    ProcessorFiles::read_dir(&common::model_dir(common::MODELS[1])).unwrap()
}

/// Run one input through the entry points its kind reaches; the error messages (every path must
/// fail).
fn run(case: &corpus::Case, config: &LlavaConfig) -> Vec<String> {
    let message = |r: anyhow::Result<()>| -> String {
        match r {
            Ok(()) => "(no error)".to_owned(),
            Err(e) => format!("{e:#}"),
        }
    };
    let bytes = &case.bytes;
    match &case.target {
        Target::Image => {
            let processor = Processor::from_files(&processor_files(), config).unwrap();
            vec![message(cmrm::decode_image(bytes).map(|img| drop(processor.preprocess_image(&img, 1))))]
        }
        Target::Preprocessor | Target::Template => {
            let mut files = processor_files();
            let name = if case.target == Target::Template { "chat_template.jinja" } else { "preprocessor_config.json" };
            files.insert(name, bytes.clone()).unwrap();
            vec![message(Processor::from_files(&files, config).map(drop))]
        }
        Target::Config => vec![message(LlavaConfig::from_json_str(&String::from_utf8_lossy(bytes)).map(drop))],
        Target::Weights(name) => {
            let whole = (|| {
                let mut weights = Weights::empty();
                weights.add_file(name, FileBytes::Owned(bytes.clone()))?;
                let vb = weights.into_var_builder(&candle_core::Device::Cpu);
                cmrm::models::llava::LlavaModel::new(config, cmrm::quant::WeightFormat::F32, vb)?;
                Ok(())
            })();
            let streamed = (|| {
                let mut weights = Weights::empty();
                let mut stream = cmrm::streaming::WeightStream::new(name, Box::new(|_, _| Ok(Default::default())));
                for chunk in bytes.chunks(64 << 10) {
                    stream.push(chunk, &mut weights)?;
                }
                stream.finish()?;
                Ok(())
            })();
            vec![message(whole), message(streamed)]
        }
        Target::Vectors => vec![message(
            cmrm::SteeringVectors::from_bytes(case.name, bytes).and_then(|v| v.validate_for(case.name, config)),
        )],
        Target::Catalog => {
            vec![message(cmrm::catalog::Catalog::from_json(case.name, &String::from_utf8_lossy(bytes)).map(drop))]
        }
    }
}

#[test]
fn every_corpus_input_gives_its_clear_error_quickly_and_without_a_memory_spike() {
    let config_text = model_file("config.json");
    let config = LlavaConfig::from_json_str(&config_text).unwrap();
    let cases = corpus::cases(&config_text, &model_file("preprocessor_config.json"));
    assert!(cases.len() >= 40, "the corpus has {} inputs", cases.len());
    let mut failures = Vec::new();
    println!("{:<52} {:>8} {:>9}  error", "input", "seconds", "peak MB");
    for case in &cases {
        reset_peak();
        let t0 = Instant::now();
        let messages = run(case, &config);
        let seconds = t0.elapsed().as_secs_f64();
        let peak = peak_bytes() as f64 / 1e6;
        println!("{:<52} {seconds:>8.3} {peak:>9.0}  {}", case.name, messages.join(" | "));
        for m in &messages {
            if !m.contains(case.expect) {
                failures.push(format!("{}: expected an error with {:?}, got {m:?}", case.name, case.expect));
            }
        }
        if seconds > 5.0 {
            failures.push(format!("{}: took {seconds:.1} s", case.name));
        }
        // The model here is under 1 MB; a few hundred MB would mean an input made us allocate.
        if peak > 400.0 {
            failures.push(format!("{}: peak memory {peak:.0} MB", case.name));
        }
    }
    assert!(failures.is_empty(), "{} of {} inputs:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// A thin image that is within bounds decodes, and its CLIP preprocessing (shortest edge, then a
/// center crop) computes only the crop: fast and small although the full resize would be 22 G
/// pixels.
#[test]
fn thin_image_within_bounds_is_cheap() {
    let img = cmrm::decode_image(&corpus::png(1, 65_000)).unwrap();
    let clip = cmrm::image::ImagePreprocessor::from_value(&serde_json::json!({
        "size": {"shortest_edge": 336}, "do_center_crop": true, "crop_size": {"height": 336, "width": 336},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]
    }))
    .unwrap();
    reset_peak();
    let t0 = Instant::now();
    let (resized, pixels) = clip.preprocess(&img);
    assert_eq!((resized.width, resized.height, pixels.len()), (336, 336, 3 * 336 * 336));
    assert!(t0.elapsed().as_secs_f64() < 2.0, "{:?}", t0.elapsed());
    assert!(peak_bytes() < 400 << 20, "{} bytes", peak_bytes());
}

#[test]
fn kv_cache_is_limited_to_the_memory_left() {
    let config = LlavaConfig::from_json_str(&model_file("config.json")).unwrap();
    let per_token = cmrm::generate::kv_bytes_per_token(&config.text);
    assert_eq!(per_token, 2 * 3 * 2 * 16 * 4);
    let (n, notice) = cmrm::generate::max_new_tokens_within(512, 100, 64, per_token, 2, 1 << 30);
    assert_eq!((n, notice), (64, None));
    let (n, notice) = cmrm::generate::max_new_tokens_within(1 << 20, 100, 100_000, per_token, 2, 40 << 20);
    assert_eq!(n as u64, (40u64 << 20) / per_token / 2 - 100);
    assert!(notice.unwrap().contains("lowered from 100000"));
}

/// Writes the seed corpora of the fuzz targets (`fuzz/`) into `$CMRM_FUZZ_SEEDS/<target>/`:
/// every corpus input of its kind plus the valid files of the fixtures (models, a GGUF copy of
/// a model, vector files in both formats, images, configs, templates, the page's catalog).
/// Run by `scripts/fuzz.sh`.
#[test]
#[ignore = "writes files; run by scripts/fuzz.sh"]
fn write_fuzz_seeds() {
    use std::path::{Path, PathBuf};
    let out = PathBuf::from(std::env::var("CMRM_FUZZ_SEEDS").expect("set CMRM_FUZZ_SEEDS=DIR"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        let name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let config_text = model_file("config.json");
    for case in corpus::cases(&config_text, &model_file("preprocessor_config.json")) {
        let target = match case.target {
            Target::Image => "image",
            Target::Preprocessor | Target::Config => "configs",
            Target::Template => "chat_template",
            Target::Weights(name) if name.ends_with(".gguf") => "gguf",
            Target::Weights(_) => "safetensors",
            Target::Vectors => "vectors",
            Target::Catalog => "catalog",
        };
        put(target, case.name, &case.bytes);
    }
    let mut files: Vec<PathBuf> = Vec::new();
    let mut walk = vec![root.join("tests/fixtures")];
    while let Some(dir) = walk.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    for path in &files {
        let name = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let size = std::fs::metadata(path).unwrap().len();
        let bytes = || std::fs::read(path).unwrap();
        match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
            "png" | "jpg" | "gif" | "webp" if size < 64 << 10 => put("image", &name, &bytes()),
            "jinja" => put("chat_template", &name, &bytes()),
            "json" if size < 16 << 10 && !file.starts_with("tokenizer.") => {
                put("configs", &name, &bytes());
                if file == "chat_template.json" {
                    put("chat_template", &name, &bytes());
                }
            }
            "safetensors" if name.contains("siglip-qwen2/model.") => put("safetensors", &name, &bytes()),
            "safetensors" if size < 16 << 10 => {
                let bytes = bytes();
                put("vectors", &name, &bytes);
                let vectors = cmrm::SteeringVectors::from_bytes(&name, &bytes).unwrap();
                put(
                    "vectors",
                    &format!("{name}.gguf"),
                    &cmrm::steering::control_vector::export_control_vector(&vectors, "qwen2").bytes,
                );
            }
            _ => {}
        }
    }
    let weights = cmrm::checkpoint::load_weights(&common::model_dir(common::MODELS[1])).unwrap();
    for format in [cmrm::quant::WeightFormat::Q8_0, cmrm::quant::WeightFormat::Q4] {
        let gguf = cmrm::quant_export::quantize_to_gguf(&weights, format).unwrap();
        put("gguf", &format!("tiny-siglip-qwen2.{}.gguf", format.name()), &gguf);
    }
    put("catalog", "www-catalog.json", &std::fs::read(root.join("www/vectors/catalog.json")).unwrap());
}
