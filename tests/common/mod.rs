//! Shared helpers for the native tests: fixture paths, oracle references, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde_json::Value;

pub const MODELS: [&str; 2] = ["tiny-llava-clip-llama", "tiny-llava-siglip-qwen2"];
/// tiny-llava-clip-llama's shapes with image features from vision layers [-1, 0, -2]
/// (`make_multilayer.py`).
pub const MULTILAYER_MODEL: &str = "tiny-llava-multilayer-clip-llama";

pub fn oracle_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle")
}

pub fn model_dir(model: &str) -> PathBuf {
    oracle_root().join("fixtures").join(model)
}

pub fn refs_dir(model: &str) -> PathBuf {
    oracle_root().join("refs").join(model)
}

/// `refs.json` and `refs.safetensors` of one oracle model.
pub struct Refs {
    pub json: Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Refs {
    pub fn load(model: &str) -> Self {
        let dir = refs_dir(model);
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("refs.json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("refs.safetensors"), &Device::Cpu).unwrap();
        Self { json, tensors }
    }

    pub fn tensor(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("refs.safetensors has no '{key}'"))
    }

    /// The tensor named by a JSON string field, flattened to f32.
    pub fn f32s(&self, key: &str) -> Vec<f32> {
        self.tensor(key).flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap()
    }
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn flat(rows: &[Vec<f32>]) -> Vec<f32> {
    rows.iter().flatten().copied().collect()
}

pub fn tensor_f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Collects mismatches and the worst difference per field, so one run reports everything.
#[derive(Default)]
pub struct Checker {
    pub failures: Vec<String>,
    pub worst: std::collections::BTreeMap<String, f32>,
}

impl Checker {
    pub fn close(&mut self, what: &str, field: &str, got: &[f32], want: &[f32], tol: f32) {
        if got.len() != want.len() {
            self.failures.push(format!("{what}: {field} has {} values, expected {}", got.len(), want.len()));
            return;
        }
        let d = max_abs_diff(got, want);
        let w = self.worst.entry(field.to_owned()).or_insert(0.0);
        *w = w.max(d);
        if d.is_nan() || d > tol {
            self.failures.push(format!("{what}: {field} max |diff| {d:e} > {tol:e}"));
        }
    }

    pub fn equal<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, field: &str, got: T, want: T) {
        if got != want {
            self.failures.push(format!("{what}: {field} = {got:?}, expected {want:?}"));
        }
    }

    pub fn finish(self, label: &str) {
        eprintln!("{label}: worst |diff| per field: {:?}", self.worst);
        assert!(self.failures.is_empty(), "{label}: {} mismatches:\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

/// A GPU context on whatever adapter wgpu finds (Mesa lavapipe on machines without a GPU), or
/// `None`, with a message, when no adapter exists at all (the GPU tests then skip).
pub fn gpu_ctx() -> Option<std::sync::Arc<cmrm::gpu::GpuContext>> {
    if let Some(info) = pollster::block_on(cmrm::gpu::context::probe_adapter()) {
        eprintln!("adapter: {} ({:?})", info.name, info.backend);
        let ctx = cmrm::gpu::new_blocking().expect("an adapter exists, so the GPU context must work");
        Some(std::sync::Arc::new(ctx))
    } else {
        eprintln!("SKIPPED: no WebGPU/Vulkan adapter on this machine (install mesa-vulkan-drivers for lavapipe)");
        None
    }
}
