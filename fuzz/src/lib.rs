//! One function per fuzz target (`fuzz_targets/*.rs` are one-line wrappers), each feeding its
//! bytes through the entry points the CLI and the page use for that kind of file. Every input
//! must end in `Ok` or a clean `Err`; a panic, an abort, a timeout or an allocation over
//! libFuzzer's limit is a finding. Where a parse succeeds, the functions also check what must
//! then hold (sizes agree, a round trip gives the same vectors).
//!
//! Targets read the tiny SigLIP + Qwen2 test model from `tests/fixtures` (compiled in), the model
//! a hostile weight or vector file is loaded against.

use candle_core::Device;
use cmrm::image::ImagePreprocessor;
use cmrm::weights::{FileBytes, Weights};
use cmrm::LlavaConfig;
use serde_json::Value;

const MODEL_CONFIG: &str = include_str!("../../tests/fixtures/oracle/fixtures/tiny-llava-siglip-qwen2/config.json");
const CLIP_PREPROCESSOR: &str =
    include_str!("../../tests/fixtures/oracle/fixtures/tiny-llava-clip-llama/preprocessor_config.json");
const SIGLIP_PREPROCESSOR: &str =
    include_str!("../../tests/fixtures/oracle/fixtures/tiny-llava-siglip-qwen2/preprocessor_config.json");

fn model_config() -> LlavaConfig {
    LlavaConfig::from_json_str(MODEL_CONFIG).expect("fixture config")
}

/// A chunk size for streamed reads that varies between inputs without taking bytes from them.
fn chunk_size(data: &[u8]) -> usize {
    1 + data.len() % 4093
}

/// A weight file, whole (the CLI, a page's cached file) and streamed (the page's download), then
/// the model built from the whole file's tensors.
fn weights(name: &str, data: &[u8]) {
    let config = model_config();
    let whole = (|| -> anyhow::Result<()> {
        let mut weights = Weights::empty();
        weights.add_file(name, FileBytes::Owned(data.to_vec()))?;
        let _ = weights.stored_format();
        let vb = weights.into_var_builder(&Device::Cpu);
        cmrm::models::llava::LlavaModel::new(&config, cmrm::quant::WeightFormat::F32, vb)?;
        Ok(())
    })();
    let streamed = (|| -> anyhow::Result<()> {
        let mut weights = Weights::empty();
        let mut stream = cmrm::streaming::WeightStream::new(name, Box::new(|_, stored| Ok(stored.unwrap_or_default())))
            .with_slice_bytes(1 + data.len() as u64 % 997);
        for chunk in data.chunks(chunk_size(data)) {
            stream.push(chunk, &mut weights)?;
        }
        stream.finish()?;
        Ok(())
    })();
    let _ = (whole, streamed);
}

/// `model.safetensors`: header parse, whole and streamed loads.
pub fn safetensors(data: &[u8]) {
    if data.len() >= 8 {
        let n = u64::from_le_bytes(data[..8].try_into().unwrap());
        if let Some(json) = usize::try_from(n).ok().and_then(|n| data.get(8..8usize.checked_add(n)?)) {
            if let Ok(tensors) = cmrm::weight_headers::parse_header("model.safetensors", json) {
                let _ = cmrm::weights::canonical_shapes(&tensors);
            }
        }
    }
    weights("model.safetensors", data);
}

/// `model.gguf` (weights): the header check fed in pieces must agree with the check of the
/// whole, then whole and streamed loads.
pub fn gguf(data: &[u8]) {
    let whole = cmrm::gguf::check_header("model.gguf", data);
    let mut scan = cmrm::gguf::HeaderScan::default();
    let mut resumed = Ok(false);
    let step = chunk_size(data);
    let mut end = 0;
    while end < data.len() {
        end = (end + step).min(data.len());
        resumed = scan.advance("model.gguf", &data[..end]);
        if !matches!(resumed, Ok(false)) {
            break;
        }
    }
    if data.is_empty() {
        resumed = scan.advance("model.gguf", data);
    }
    match (&whole, &resumed) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "header check whole vs resumed"),
        (Err(_), Err(_)) => {}
        _ => panic!("header check whole {whole:?} vs resumed {resumed:?}"),
    }
    let _ = cmrm::weight_headers::gguf_header_tensors("model.gguf", data);
    weights("model.gguf", data);
}

/// A steering-vector file (cmrm safetensors or llama.cpp GGUF control vector): parse, check
/// against the model, and round-trip what parses through both writers.
pub fn vectors(data: &[u8]) {
    let Ok(vectors) = cmrm::SteeringVectors::from_bytes("vectors", data) else { return };
    let _ = vectors.validate_for("vectors", &model_config());
    let bytes = vectors.to_safetensors_bytes().expect("parsed vectors serialize");
    let again = cmrm::SteeringVectors::from_bytes("again.safetensors", &bytes).expect("own file parses");
    assert_eq!((again.hidden_size, &again.layers), (vectors.hidden_size, &vectors.layers));
    let export = cmrm::steering::control_vector::export_control_vector(&vectors, "qwen2");
    let kept = vectors.layers.keys().filter(|l| !export.dropped_layers.contains(l)).count();
    if kept > 0 {
        let imported = cmrm::SteeringVectors::from_bytes("again.gguf", &export.bytes).expect("own GGUF parses");
        assert_eq!(imported.layers.len(), kept);
    }
}

/// An uploaded image through decode and two real preprocessors (CLIP: shortest edge + crop;
/// SigLIP: exact size). An input starting with `{` is a preprocessor config, a NUL byte, then
/// the image: hostile processor and image together.
pub fn image(data: &[u8]) {
    let (processors, image_bytes) = match data.iter().position(|&b| b == 0) {
        Some(nul) if data.first() == Some(&b'{') => {
            let Ok(value) = serde_json::from_slice::<Value>(&data[..nul]) else { return };
            let Ok(processor) = ImagePreprocessor::from_value(&value) else { return };
            (vec![processor], &data[nul + 1..])
        }
        _ => {
            let parse = |text| ImagePreprocessor::from_value(&serde_json::from_str(text).unwrap()).unwrap();
            (vec![parse(CLIP_PREPROCESSOR), parse(SIGLIP_PREPROCESSOR)], data)
        }
    };
    let Ok(img) = cmrm::decode_image(image_bytes) else { return };
    assert_eq!(img.data.len(), img.width * img.height * 3, "decoded buffer vs size");
    for processor in processors {
        let (resized, pixels) = processor.preprocess(&img);
        assert_eq!(pixels.len(), 3 * resized.width * resized.height);
        if let Some(size) = processor.output_size() {
            assert_eq!((resized.width, resized.height), size);
        }
    }
}

/// `config.json` (resolved with transformers' defaults, then the model's shapes as `inspect`
/// counts them), `preprocessor_config.json`, `generation_config.json` and a shard index.
pub fn configs(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = cmrm::config::eos_ids_from_generation_config(&text);
    let _ = cmrm::checkpoint::shard_names_from_index(&text);
    if let Ok(config) = LlavaConfig::from_json_str(&text) {
        let _ = config.fingerprint();
        let _ = cmrm::config::eos_ids(&config, None);
        let _ = cmrm::generate::kv_bytes_per_token(&config.text);
        if let Ok(specs) = cmrm::synthetic::tensor_specs(&config) {
            let _: u128 = specs.iter().map(|(_, shape)| shape.iter().map(|&d| d as u128).product::<u128>()).sum();
        }
    }
    let Ok(value) = serde_json::from_str::<Value>(&text) else { return };
    let _ = cmrm::config::resolve(&value);
    let _ = ImagePreprocessor::from_value(&value);
    let _ = cmrm::chat_template::template_from_config(&value);
}

/// A chat template (then a NUL byte and the question), rendered as the processor renders it.
pub fn chat_template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (source, question) = text.split_once('\0').unwrap_or((&text, "What is in the image?"));
    let Ok(template) = cmrm::chat_template::ChatTemplate::with_clock(source, || {
        cmrm::chat_template::CivilTime::from_unix(1_764_460_800)
    }) else {
        return;
    };
    let messages = minijinja::Value::from_serialize(serde_json::json!([{
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": question}],
    }]));
    let variables = [("bos_token".to_owned(), minijinja::Value::from("<s>"))];
    for add_generation_prompt in [true, false] {
        if let Ok(prompt) = template.render(&messages, add_generation_prompt, &variables) {
            assert!(prompt.len() <= 4 << 20, "rendered {} bytes", prompt.len());
        }
    }
}

/// A vectors catalog: parse, look up, verify bytes against each entry.
pub fn catalog(data: &[u8]) {
    let Ok(catalog) = cmrm::catalog::Catalog::from_json("catalog.json", &String::from_utf8_lossy(data)) else {
        return;
    };
    for entry in &catalog.entries {
        let _ = catalog.entries_for(&entry.model, &entry.revision).count();
        let _ = entry.verify(data);
    }
}
