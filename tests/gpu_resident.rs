#![cfg(not(target_arch = "wasm32"))]
//! GPU-resident loads (`cmrm::resident`): the blocks uploaded one by one and dropped from CPU
//! memory. On every oracle model and weight format, the resident model gives the same image
//! features, prefill logits, block outputs and greedy answers (unaltered and steered) as the GPU
//! backend built from a whole CPU model; its CPU shell holds no block and refuses a CPU forward
//! with a message; a streamed download absorbed chunk by chunk holds at most the shell and two
//! blocks' bytes at any time. Skips when no WebGPU/Vulkan adapter exists (lavapipe is one).

mod common;

use cmrm::backend::DecoderBackend;
use cmrm::generate::Sampling;
use cmrm::gpu::GpuWeights;
use cmrm::quant::{WeightChoice, WeightFormat};
use cmrm::resident::ResidentLoad;
use cmrm::steering::{Intervention, Positions, SteeringVectors};
use cmrm::streaming::WeightStream;
use cmrm::weights::Weights;
use cmrm::{decode_image, PromptText, Vlm};
use common::*;

/// Image features, probe (logits, block outputs) and greedy answers of `resident` against
/// `whole` (a GPU backend built from the whole CPU model `full`), on the first two cases.
fn compare_backends(
    model: &str,
    what: &str,
    (full, whole): (&Vlm, &DecoderBackend),
    (shell, resident): (&Vlm, &DecoderBackend),
    c: &mut Checker,
) {
    let refs = Refs::load(model);
    let random = SteeringVectors::load(&refs_dir(model).join("steer_random.safetensors")).unwrap();
    let opts = full.default_generate_options(8, Sampling::Greedy);
    for case in refs.json["cases"].as_array().unwrap().iter().take(2) {
        let what = format!("{what} {}", case["id"].as_str().unwrap());
        let image = refs.json["images"].as_array().unwrap().iter().find(|i| i["name"] == case["image"]).unwrap();
        let bytes = std::fs::read(refs_dir(model).join(image["file"].as_str().unwrap())).unwrap();
        let img = decode_image(&bytes).unwrap();
        let a = whole.encode_image(full, &img).unwrap().features;
        let b = resident.encode_image(shell, &img).unwrap().features;
        c.equal(&what, "image_features resident-whole", tensor_f32s(&b) == tensor_f32s(&a), true);
        let question = PromptText::Chat(case["question"].as_str().unwrap().into());
        let pa = whole.prepare(full, &question, &[&a]).unwrap();
        let pb = resident.prepare(shell, &question, &[&b]).unwrap();
        c.equal(&what, "input_ids", pb.encoded.input_ids.clone(), pa.encoded.input_ids.clone());
        c.equal(&what, "prompt embeds", tensor_f32s(&pb.embeds) == tensor_f32s(&pa.embeds), true);
        // Embedded on the GPU (the resident model has no table on the CPU): the CPU's rows.
        if full.model.text.has_ends() {
            let cpu = full.prepare(&question, Some(&a)).unwrap();
            c.close(&what, "prompt embeds gpu-cpu", &tensor_f32s(&pb.embeds), &tensor_f32s(&cpu.embeds), 1e-6);
        }
        let all: Vec<usize> = (0..full.config().text.num_hidden_layers).collect();
        let steer = Intervention::add(&random, 1.5, Some(&all), Positions::All, full.device()).unwrap();
        for steering in [None, Some(&steer)] {
            let what = format!("{what} {}", if steering.is_some() { "steered" } else { "unaltered" });
            let x = pollster::block_on(whole.probe_async(full, &pa, steering)).unwrap();
            let y = pollster::block_on(resident.probe_async(shell, &pb, steering)).unwrap();
            c.close(&what, "prefill logits", &y.logits, &x.logits, 0.0);
            c.close(&what, "layer_outputs", &flat(&y.layer_outputs), &flat(&x.layer_outputs), 0.0);
            let ga = whole.generate(full, &pa, steering, &opts, &mut |_| true).unwrap();
            let gb = resident.generate(shell, &pb, steering, &opts, &mut |_| true).unwrap();
            c.equal(&what, "generated_ids", gb.generated_ids, ga.generated_ids);
        }
    }
}

#[test]
fn resident_load_answers_as_the_whole_model() {
    let Some(ctx) = gpu_ctx() else { return };
    let mut c = Checker::default();
    for model in [
        "tiny-llava-clip-llama",
        "tiny-llava-siglip-qwen2",
        "tiny-llava-next-clip-llama",
        "tiny-llava-onevision-siglip-qwen2",
        MULTILAYER_MODEL,
    ] {
        for format in [WeightFormat::F32, WeightFormat::Q8_0, WeightFormat::Q4] {
            let what = format!("{model} {format:?}");
            let dir = model_dir(model);
            let full = Vlm::load_dir_as(&dir, format).unwrap();
            let whole =
                pollster::block_on(DecoderBackend::gpu_model(ctx.clone(), &full.model, GpuWeights::Auto)).unwrap();
            let (shell, resident, info) =
                cmrm::resident::load_dir(&dir, WeightChoice::Fixed(format), ctx.clone(), GpuWeights::Auto).unwrap();
            assert!(info.resident && info.backend == "webgpu", "{what}: {info:?}");
            assert_eq!(info.vision, "webgpu", "{what}: {info:?}");
            assert_eq!(info.gpu_weights, whole.info().gpu_weights, "{what}");
            // The shell holds nothing of the decoder (no block, no table, no lm_head), and a CPU
            // embedding or forward says where they are.
            assert!(!shell.model.runs_on_cpu() && full.model.runs_on_cpu());
            assert!(!shell.model.text.has_ends() && full.model.text.has_ends());
            assert_eq!(shell.model.text.weight_bytes(), 0, "{what}: the shell holds decoder weights");
            // Nor of the vision tower (the config alone cuts patches).
            assert!(shell.model.vision.weights().is_err() && shell.model.projector().is_err(), "{what}");
            let err = shell.prepare_text_only("Hello").unwrap_err();
            assert!(format!("{err:#}").contains("GPU only"), "{what}: {err:#}");
            let prepared = resident.prepare_text_only(&shell, "Hello").unwrap();
            let err = shell.probe(&prepared, None).unwrap_err();
            assert!(format!("{err:#}").contains("GPU only"), "{what}: {err:#}");
            compare_backends(model, &what, (&full, &whole), (&shell, &resident), &mut c);
        }
    }
    c.finish("resident vs whole");
}

/// A download streamed in small chunks: after each, the load uploads the blocks the stream has
/// moved past. The streamed bytes held never exceed the non-block tensors plus two blocks, and
/// the result answers as the load from files.
#[test]
fn streamed_resident_load_holds_a_block_at_a_time() {
    let Some(ctx) = gpu_ctx() else { return };
    let model = "tiny-llava-siglip-qwen2";
    let dir = model_dir(model);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let config = cmrm::LlavaConfig::from_file(&dir.join("config.json")).unwrap();
    for format in [WeightFormat::F32, WeightFormat::Q8_0] {
        let what = format!("{model} {format:?}");
        let mut load = ResidentLoad::new(ctx.clone(), &config, format, GpuWeights::Auto).unwrap();
        let mut stream =
            WeightStream::new("model.safetensors", Box::new(move |_, _| Ok(format))).with_slice_bytes(4096);
        let mut weights = Weights::empty();
        let mut peak = 0usize;
        for chunk in bytes.chunks(1000) {
            stream.push(chunk, &mut weights).unwrap();
            peak = peak.max(weights.held_bytes());
            load.absorb_stream(&stream, &weights).unwrap();
        }
        stream.finish().unwrap();
        let uploaded_while_streaming = load.uploaded();

        // What the whole model holds in this format, block by block.
        let whole = Weights::from_paths(&[dir.join("model.safetensors")]).unwrap();
        let sizes = held_sizes(&whole, format);
        let mut per_block = std::collections::HashMap::new();
        let mut rest = 0;
        for (name, n) in &sizes {
            match cmrm::resident::block_prefix(name) {
                Some(b) => *per_block.entry(b.to_owned()).or_insert(0) += n,
                None => rest += n,
            }
        }
        let biggest = per_block.values().copied().max().unwrap();
        let total: usize = sizes.iter().map(|(_, n)| n).sum();
        eprintln!(
            "{what}: peak streamed bytes held {peak} of {total} (non-block {rest}, largest block {biggest}), {} blocks, {uploaded_while_streaming} uploaded while streaming",
            per_block.len()
        );
        assert!(peak <= rest + 2 * biggest, "{what}: held {peak} > {rest} + 2 × {biggest}");
        let decoder_blocks = config.text.num_hidden_layers;
        assert!(
            uploaded_while_streaming + 1 >= decoder_blocks,
            "{what}: {uploaded_while_streaming} blocks went up while streaming"
        );

        let (model_shell, backend, info) = pollster::block_on(load.finish(weights)).unwrap();
        assert!(info.resident);
        let processor =
            cmrm::processor::Processor::from_files(&cmrm::processor::ProcessorFiles::read_dir(&dir).unwrap(), &config)
                .unwrap();
        let gen = std::fs::read_to_string(dir.join("generation_config.json")).ok();
        let shell = Vlm::with_model(model_shell, processor, gen.as_deref()).unwrap();
        let (files_shell, files_backend, _) =
            cmrm::resident::load_dir(&dir, WeightChoice::Fixed(format), ctx.clone(), GpuWeights::Auto).unwrap();
        let mut c = Checker::default();
        compare_backends(model, &what, (&files_shell, &files_backend), (&shell, &backend), &mut c);
        c.finish(&what);
    }
}

/// `(canonical name, bytes held in `format`)` of every tensor a streamed load converts.
fn held_sizes(weights: &Weights, format: WeightFormat) -> Vec<(String, usize)> {
    weights
        .shapes()
        .map(|(name, shape)| {
            let n = cmrm::quant::estimate_model_bytes(format, std::iter::once((name, shape))) as usize;
            (name.to_owned(), n)
        })
        .collect()
}

/// `auto` on a software rasterizer loads the whole model on the CPU (and says why); `webgpu`
/// loads GPU-resident through the CLI's entry point; the CPU backend is never resident.
#[test]
fn load_dir_on_picks_residency_by_backend() {
    use cmrm::backend::BackendChoice;
    let dir = model_dir(MODELS[0]);
    let (vlm, backend, info) =
        cmrm::resident::load_dir_on(&dir, WeightChoice::Auto, BackendChoice::Cpu, GpuWeights::Auto).unwrap();
    assert!(vlm.model.runs_on_cpu() && matches!(backend, DecoderBackend::Cpu) && !info.resident);
    let Some(ctx) = gpu_ctx() else { return };
    let software = ctx.adapter_info.device_type == wgpu::DeviceType::Cpu;
    let (vlm, backend, info) =
        cmrm::resident::load_dir_on(&dir, WeightChoice::Auto, BackendChoice::Auto, GpuWeights::Auto).unwrap();
    if software {
        assert!(vlm.model.runs_on_cpu() && matches!(backend, DecoderBackend::Cpu), "{info:?}");
        assert!(info.fallback_reason.unwrap().contains("software rasterizer"));
    } else {
        assert!(!vlm.model.runs_on_cpu() && info.resident);
    }
    let (vlm, backend, info) =
        cmrm::resident::load_dir_on(&dir, WeightChoice::Auto, BackendChoice::Webgpu, GpuWeights::Auto).unwrap();
    assert!(!vlm.model.runs_on_cpu() && info.resident && matches!(backend, DecoderBackend::Gpu(..)));
}

/// A lost device (here destroyed) fails the next request with `DeviceLost` under any context,
/// the marker the page turns into kind `gpu-lost` (it then loads the model again on the CPU).
#[test]
fn a_lost_device_is_reported_as_lost() {
    let Some(ctx) = gpu_ctx() else { return };
    let dir = model_dir(MODELS[1]);
    let (vlm, backend, _) = cmrm::resident::load_dir(&dir, WeightChoice::Auto, ctx.clone(), GpuWeights::Auto).unwrap();
    let prepared = backend.prepare_text_only(&vlm, "Hello").unwrap();
    let opts = vlm.default_generate_options(2, Sampling::Greedy);
    backend.generate(&vlm, &prepared, None, &opts, &mut |_| true).unwrap();
    ctx.device.destroy();
    let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
    let err = backend.generate(&vlm, &prepared, None, &opts, &mut |_| true).unwrap_err();
    assert!(err.downcast_ref::<cmrm::gpu::context::DeviceLost>().is_some(), "{err:#}");
    assert!(format!("{err:#}").contains("the GPU device was lost"), "{err:#}");
}

/// A folder missing the embedding table or an untied lm_head: the resident load names the
/// tensor, and the error is the file's (not marked as the GPU's, so `auto` does not retry it on
/// the CPU).
#[test]
fn a_missing_table_or_head_is_named_and_not_blamed_on_the_gpu() {
    let Some(ctx) = gpu_ctx() else { return };
    let src = model_dir(MODELS[0]); // tie_word_embeddings = false
    for (tag, dropped, named) in [("head", "lm_head", "lm_head.weight"), ("table", "embed_tokens", "embed_tokens")] {
        let dir = std::env::temp_dir().join(format!("cmrm-resident-no-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        let mut tensors =
            candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
        let before = tensors.len();
        tensors.retain(|k, _| !k.contains(dropped));
        assert_eq!(tensors.len() + 1, before, "{tag}");
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        let err = match cmrm::resident::load_dir(&dir, WeightChoice::Auto, ctx.clone(), GpuWeights::Auto) {
            Ok(_) => panic!("{tag}: loaded without {dropped}"),
            Err(e) => e,
        };
        assert!(format!("{err:#}").contains(named), "{tag}: {err:#}");
        assert!(err.downcast_ref::<cmrm::resident::GpuUploadFailed>().is_none(), "{tag}: blamed on the GPU: {err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
