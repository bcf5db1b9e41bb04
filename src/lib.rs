//! cmrm — a LLaVA-style vision-language model in Rust (native and wasm32) with CMRM steering.
//!
//! The data path, one module per stage:
//! `image` (decode, preprocess) → `vision` (CLIP / SigLIP tower) → `projector` → `llava` (merge)
//! → `text` (decoder layers + the `steering` hook) → `generate` (sample, stop, stream).
//! `config`, `weights` and `processor` read a Hugging Face checkpoint; `pipeline::Vlm` ties it
//! together for the CLI (`src/bin/cmrm.rs`) and the browser (`web`).

#[cfg(not(target_arch = "wasm32"))]
pub mod atomic_file;
pub mod backend;
pub mod bench;
pub mod catalog;
pub mod chat_template;
pub mod checkpoint;
pub mod cmrm;
pub mod config;
pub mod decode_kernels;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod gpu;
#[cfg(not(target_arch = "wasm32"))]
pub mod hub;
pub mod image;
pub mod models;
pub mod pipeline;
#[cfg(not(target_arch = "wasm32"))]
pub mod plot;
pub mod prefill_kernels;
pub mod processor;
pub mod projector;
pub mod quant;
pub mod quant_export;
pub mod resident;
pub mod steering;
pub mod streaming;
pub mod synthetic;
pub mod text;
pub mod vision;
#[cfg(target_arch = "wasm32")]
pub mod web;
pub mod weight_headers;
pub mod weights;

pub use config::LlavaConfig;
pub use generate::{GenerateOptions, Generation, Sampling, TokenEvent};
pub use image::{decode_image, RgbImage};
pub use pipeline::{Prepared, Probe, PromptText, Vlm};
pub use steering::{Intervention, Positions, SteeringVectors};
