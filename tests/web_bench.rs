//! Benchmark, not a test (`#[ignore]`d; figures, no assertions), by the same code natively and in
//! headless Chromium (wasm32 simd128, one thread); `scripts/test-browser.sh --bench` runs both and
//! prints the ratios. Each figure is one line `cmrm-bench NAME target=… threads=… VALUE`:
//! - `decode`: greedy decode tokens/s of the llava-interleave-qwen-0.5b decoder (random f32
//!   weights, `cmrm::bench` preset); `pair-decode`: the same for Compare's two answers decoded as
//!   one batch, tokens/s over both;
//! - `calibrate-tiny`: seconds per calibration prompt of dataset-level CMRM extraction
//!   (`cmrm::cmrm::Extraction`, what `cmrm extract` and the page's "compute vectors here" run) on
//!   the bundled model over the built-in set;
//! - `calibrate-0.5b`: seconds per calibration prompt on the 0.5B decoder — the two prefills one
//!   prompt costs (the anchor image's 729 tokens + 24 text tokens, and the 24 text tokens alone),
//!   keeping every layer's last-token state;
//! - `memory`: the whole llava-interleave-qwen-0.5b model (vision, projector, decoder) built from
//!   random weights in a format — peak memory (wasm memory size; natively peak RSS) and decode
//!   tokens/s.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use cmrm::text::{argmax, ForwardOptions, TextModel};
use cmrm::weights::RandomWeights;

const PROMPT_TOKENS: usize = 32;
const WARMUP_STEPS: usize = 3;
const TIMED_STEPS: usize = 16;

#[cfg(target_arch = "wasm32")]
fn now_seconds() -> f64 {
    let performance = js_sys::Reflect::get(&js_sys::global(), &"performance".into()).unwrap();
    let now: js_sys::Function = js_sys::Reflect::get(&performance, &"now".into()).unwrap().into();
    now.call0(&performance).unwrap().as_f64().unwrap() / 1000.0
}

#[cfg(not(target_arch = "wasm32"))]
fn now_seconds() -> f64 {
    cmrm::generate::now_seconds()
}

/// `(tokens/s of one answer, tokens/s of a Compare pair over both answers, threads)` over
/// `TIMED_STEPS` cached decode steps after a short prompt.
fn decode_tokens_per_s() -> (f64, f64, usize) {
    let cfg = cmrm::bench::preset_config("llava-interleave-qwen-0.5b").unwrap();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights { seed: 7 }), DType::F32, Device::Cpu);
    let text = TextModel::new(&cfg.text, cmrm::quant::WeightFormat::F32, vb).unwrap();
    (decode_on(&text), pair_decode_on(&text), candle_core::utils::get_num_threads())
}

/// Decode tokens/s of two answers decoded as one batch (Compare's unaltered and steered panes,
/// `TextModel::forward_batch`), counting both answers' tokens.
fn pair_decode_on(text: &TextModel) -> f64 {
    let prompt: Vec<u32> = (0..PROMPT_TOKENS as u32).map(|i| 1000 + i).collect();
    let mut cache = text.new_cache(PROMPT_TOKENS + WARMUP_STEPS + TIMED_STEPS + 1);
    let embeds = text.embed(&prompt).unwrap();
    let pair = candle_core::Tensor::cat(&[&embeds, &embeds], 0).unwrap();
    let mut logits = text.forward_batch(&pair, &mut cache, &[None, None], PROMPT_TOKENS).unwrap();
    let mut step = |logits: &candle_core::Tensor| {
        let ids: Vec<u32> = (0..2).map(|r| argmax(&logits.get(r).unwrap().to_vec1::<f32>().unwrap())).collect();
        let embeds = text.embed(&ids).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
        text.forward_batch(&embeds, &mut cache, &[None, None], PROMPT_TOKENS).unwrap()
    };
    for _ in 0..WARMUP_STEPS {
        logits = step(&logits);
    }
    let t0 = now_seconds();
    for _ in 0..TIMED_STEPS {
        logits = step(&logits);
    }
    2.0 * TIMED_STEPS as f64 / (now_seconds() - t0)
}

/// Decode tokens/s of `text` over `TIMED_STEPS` cached steps after a short prompt.
fn decode_on(text: &TextModel) -> f64 {
    let prompt: Vec<u32> = (0..PROMPT_TOKENS as u32).map(|i| 1000 + i).collect();
    let mut cache = text.new_cache(PROMPT_TOKENS + WARMUP_STEPS + TIMED_STEPS + 1);
    let opts = ForwardOptions { steering: None, prompt_len: PROMPT_TOKENS, capture_layers: false, logits: true };
    let mut logits = text.forward(&text.embed(&prompt).unwrap(), &mut cache, opts).unwrap().logits.unwrap();
    let mut step = |logits: &candle_core::Tensor| {
        let id = argmax(&logits.to_vec1::<f32>().unwrap());
        text.forward(&text.embed(&[id]).unwrap(), &mut cache, opts).unwrap().logits.unwrap()
    };
    for _ in 0..WARMUP_STEPS {
        logits = step(&logits);
    }
    let t0 = now_seconds();
    for _ in 0..TIMED_STEPS {
        logits = step(&logits);
    }
    TIMED_STEPS as f64 / (now_seconds() - t0)
}

/// Seconds per prompt of a full extraction on the bundled model over the built-in set (best of 3).
fn calibrate_tiny_seconds_per_prompt() -> f64 {
    macro_rules! bundled {
        ($file:literal) => {
            include_bytes!(concat!("../www/assets/models/tiny-llava-siglip-qwen2/", $file)).as_slice()
        };
    }
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    let mut files = cmrm::processor::ProcessorFiles::default();
    for (name, bytes) in [
        ("tokenizer.json", bundled!("tokenizer.json")),
        ("tokenizer_config.json", bundled!("tokenizer_config.json")),
        ("chat_template.jinja", bundled!("chat_template.jinja")),
        ("preprocessor_config.json", bundled!("preprocessor_config.json")),
        ("processor_config.json", bundled!("processor_config.json")),
    ] {
        files.insert(name, bytes.to_vec()).unwrap();
    }
    let mut weights = cmrm::weights::Weights::empty();
    weights
        .add_file("model.safetensors", cmrm::weights::FileBytes::Owned(bundled!("model.safetensors").to_vec()))
        .unwrap();
    let config = cmrm::LlavaConfig::from_json_str(&text(bundled!("config.json"))).unwrap();
    let generation = text(bundled!("generation_config.json"));
    let vlm =
        cmrm::Vlm::from_parts(config, cmrm::quant::WeightFormat::F32, &files, Some(&generation), weights).unwrap();
    let set = include_str!("../www/assets/calibration/builtin-v1.jsonl");
    let items = cmrm::cmrm::parse_calibration("builtin-v1", set).unwrap();
    let no_images = |p: &str| -> anyhow::Result<cmrm::RgbImage> { anyhow::bail!("no images ({p})") };
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = now_seconds();
        let (anchor, method) = (cmrm::cmrm::Anchor::Blank, cmrm::cmrm::Method::Mean);
        cmrm::cmrm::extract(&vlm, &items, anchor, method, &no_images, &mut |_| true).unwrap();
        best = best.min((now_seconds() - t0) / items.len() as f64);
    }
    best
}

/// Seconds per calibration prompt on the 0.5B decoder: the multimodal and the text-only prefill,
/// capturing every layer (best of 2).
fn calibrate_05b_seconds_per_prompt() -> f64 {
    const TEXT_TOKENS: usize = 24;
    let cfg = cmrm::bench::preset_config("llava-interleave-qwen-0.5b").unwrap();
    let image_tokens = cfg.tokens_per_tile();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights { seed: 7 }), DType::F32, Device::Cpu);
    let text = TextModel::new(&cfg.text, cmrm::quant::WeightFormat::F32, vb).unwrap();
    let text_ids: Vec<u32> = (0..TEXT_TOKENS as u32).map(|i| 1000 + i).collect();
    let text_embeds = text.embed(&text_ids).unwrap();
    // Stand-in image features: the decoder's cost does not depend on their values.
    // Stand-in image features (`[1, tokens, hidden]` like `embed`): the cost does not depend on them.
    let image_embeds =
        candle_core::Tensor::rand(-1f32, 1f32, (1, image_tokens, cfg.text.hidden_size), &Device::Cpu).unwrap();
    let head = text_embeds.narrow(1, 0, 4).unwrap();
    let tail = text_embeds.narrow(1, 4, TEXT_TOKENS - 4).unwrap();
    let mm_embeds = candle_core::Tensor::cat(&[&head, &image_embeds, &tail], 1).unwrap();
    let states = |embeds: &candle_core::Tensor| {
        let len = embeds.dim(1).unwrap();
        let mut cache = text.new_cache(len);
        let opts = ForwardOptions { steering: None, prompt_len: len, capture_layers: true, logits: false };
        text.forward(embeds, &mut cache, opts).unwrap().layer_outputs.unwrap()
    };
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        let t0 = now_seconds();
        states(&mm_embeds);
        states(&text_embeds);
        best = best.min(now_seconds() - t0);
    }
    best
}

fn print_calibration(target: &str) {
    let threads = candle_core::utils::get_num_threads();
    let tiny = calibrate_tiny_seconds_per_prompt();
    println_or_log(&format!(
        "cmrm-bench calibrate-tiny target={target} threads={threads} seconds_per_prompt={tiny:.6}"
    ));
    let big = calibrate_05b_seconds_per_prompt();
    println_or_log(&format!("cmrm-bench calibrate-0.5b target={target} threads={threads} seconds_per_prompt={big:.3}"));
}

/// Memory in use: wasm memory size (it only grows), or natively the peak RSS (VmHWM).
fn memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        use wasm_bindgen::JsCast;
        let memory = wasm_bindgen::memory().unchecked_into::<js_sys::WebAssembly::Memory>();
        memory.buffer().unchecked_into::<js_sys::ArrayBuffer>().byte_length() as u64
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        cmrm::bench::peak_rss_bytes().unwrap_or(0)
    }
}

/// Memory after building the full model in `format` (one format per process natively: peak RSS
/// is per process), and its decode speed.
fn print_memory(target: &str, formats: &[cmrm::quant::WeightFormat]) {
    let base = cmrm::bench::preset_config("llava-interleave-qwen-0.5b").unwrap();
    let before = memory_bytes();
    for &format in formats {
        let cfg = base.clone();
        let vb = VarBuilder::from_backend(Box::new(RandomWeights { seed: 7 }), DType::F32, Device::Cpu);
        let t0 = now_seconds();
        let model = cmrm::models::llava::LlavaModel::new(&cfg, format, vb).unwrap();
        let build_s = now_seconds() - t0;
        let after_build = memory_bytes();
        let tps = decode_on(&model.text);
        println_or_log(&format!(
            "cmrm-bench memory target={target} weights={} build_s={build_s:.1} decoder_weight_bytes={} \
             decode_tokens_per_s={tps:.3} start_bytes={before} peak_bytes={after_build}",
            format.name(),
            model.text.weight_bytes(),
        ));
    }
}

#[cfg(target_arch = "wasm32")]
fn println_or_log(line: &str) {
    wasm_bindgen_test::console_log!("{line}");
}

#[cfg(not(target_arch = "wasm32"))]
fn println_or_log(line: &str) {
    println!("{line}");
}

#[cfg(target_arch = "wasm32")]
mod wasm {
    use wasm_bindgen_test::*;
    wasm_bindgen_test_configure!(run_in_browser);

    #[wasm_bindgen_test]
    #[ignore]
    fn decode_benchmark() {
        let (tps, pair, threads) = super::decode_tokens_per_s();
        console_log!("cmrm-bench decode target=wasm32 threads={threads} tokens_per_s={tps:.3}");
        console_log!("cmrm-bench pair-decode target=wasm32 threads={threads} tokens_per_s={pair:.3}");
    }

    #[wasm_bindgen_test]
    #[ignore]
    fn calibration_benchmark() {
        super::print_calibration("wasm32");
    }

    /// Ascending sizes: wasm memory only grows, so each figure is that build's peak. F32 (about
    /// 3.5 GB of parameters) does not fit wasm32's 4 GiB.
    #[wasm_bindgen_test]
    #[ignore]
    fn memory_benchmark() {
        use cmrm::quant::WeightFormat;
        super::print_memory("wasm32", &[WeightFormat::Q4, WeightFormat::Q8_0]);
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore]
fn decode_benchmark() {
    let (tps, pair, threads) = decode_tokens_per_s();
    println!("cmrm-bench decode target=native threads={threads} tokens_per_s={tps:.3}");
    println!("cmrm-bench pair-decode target=native threads={threads} tokens_per_s={pair:.3}");
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore]
fn calibration_benchmark() {
    print_calibration("native");
}

/// One format per run (`CMRM_BENCH_WEIGHTS=q4|q8_0|f32`, default q8_0): peak RSS is per process.
#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore]
fn memory_benchmark() {
    let format = std::env::var("CMRM_BENCH_WEIGHTS").unwrap_or_else(|_| "q8_0".into()).parse().unwrap();
    print_memory("native", &[format]);
}

/// Where the streamed-load benchmark writes its real-size checkpoint folder.
#[cfg(not(target_arch = "wasm32"))]
fn bench_model_dir() -> std::path::PathBuf {
    std::env::var_os("CMRM_BENCH_MODEL_DIR")
        .map(Into::into)
        .unwrap_or_else(|| std::env::temp_dir().join("cmrm-bench-llava-interleave-qwen-0.5b"))
}

/// Peak memory of a streamed load of a real-size checkpoint: the real llava-interleave-qwen-0.5b-hf
/// files with `cmrm::synthetic` BF16 weights (~1.7 GB, in the temp folder), read back
/// in 1 MiB chunks through `WeightStream` (what the page does with a download) in
/// `CMRM_BENCH_WEIGHTS` (default q8_0), and the model built from it. Prints peak RSS (one format
/// per process) next to the file size.
#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore]
fn streamed_load_memory_benchmark() {
    use std::io::Read;
    let format: cmrm::quant::WeightFormat =
        std::env::var("CMRM_BENCH_WEIGHTS").unwrap_or_else(|_| "q8_0".into()).parse().unwrap();
    let dir = bench_model_dir();
    let path = dir.join("model.safetensors");
    let cfg = if path.exists() {
        cmrm::LlavaConfig::from_file(&dir.join("config.json")).unwrap()
    } else {
        // The real llava-interleave-qwen-0.5b-hf files at full depth with synthetic BF16 weights:
        // a complete folder, so the page can load it too (tests/e2e/bench.mjs).
        let real =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real/llava-interleave-qwen-0.5b-hf");
        cmrm::synthetic::write_checkpoint(&real, &dir, None, None).unwrap()
    };
    let file_bytes = std::fs::metadata(&path).unwrap().len();
    let before = memory_bytes();
    let t0 = now_seconds();
    let mut weights = cmrm::weights::Weights::empty();
    let mut stream = cmrm::streaming::WeightStream::new("model.safetensors", Box::new(move |_, _| Ok(format)));
    let mut file = std::fs::File::open(&path).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        stream.push(&chunk[..n], &mut weights).unwrap();
    }
    stream.finish().unwrap();
    let after_stream = memory_bytes();
    let model = cmrm::models::llava::LlavaModel::new(&cfg, format, weights.into_var_builder(&Device::Cpu)).unwrap();
    let seconds = now_seconds() - t0;
    println_or_log(&format!(
        "cmrm-bench streamed-load target=native weights={} file_bytes={file_bytes} seconds={seconds:.1} \
         decoder_weight_bytes={} start_bytes={before} peak_after_stream_bytes={after_stream} peak_bytes={}",
        format.name(),
        model.text.weight_bytes(),
        memory_bytes()
    ));
}
