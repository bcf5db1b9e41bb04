//! Benchmark, not a test (`#[ignore]`d; figures, no assertions): greedy decode tokens/s of the
//! llava-interleave-qwen-0.5b decoder (random f32 weights, `cmrm::bench` preset), by the same code
//! natively and in headless Chromium (wasm32 simd128, one thread). `scripts/test-browser.sh
//! --bench` runs both and prints the ratio. Each run prints one line:
//! `cmrm-bench decode target=… threads=… tokens_per_s=…`.

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

/// `(tokens/s, threads)` over `TIMED_STEPS` cached decode steps after a short prompt.
fn decode_tokens_per_s() -> (f64, usize) {
    let cfg = cmrm::bench::preset_config("llava-interleave-qwen-0.5b").unwrap();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights { seed: 7 }), DType::F32, Device::Cpu);
    let text = TextModel::new(&cfg.text, vb).unwrap();
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
    (TIMED_STEPS as f64 / (now_seconds() - t0), candle_core::utils::get_num_threads())
}

#[cfg(target_arch = "wasm32")]
mod wasm {
    use wasm_bindgen_test::*;
    wasm_bindgen_test_configure!(run_in_browser);

    #[wasm_bindgen_test]
    #[ignore]
    fn decode_benchmark() {
        let (tps, threads) = super::decode_tokens_per_s();
        console_log!("cmrm-bench decode target=wasm32 threads={threads} tokens_per_s={tps:.3}");
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore]
fn decode_benchmark() {
    let (tps, threads) = decode_tokens_per_s();
    println!("cmrm-bench decode target=native threads={threads} tokens_per_s={tps:.3}");
}
