//! A compact wgpu compute engine for the decoder hot path (WebGPU in the browser, Vulkan
//! natively), selected at load time behind the same model API; candle on the CPU stays the
//! fallback.
//!
//! - [`context`]: adapter / device selection, error capture, read-back (the self-test that
//!   opening one runs is [`ops::self_test`]);
//! - [`kernels`] + `shaders/*.wgsl`: tiled matmul, GEMV and token-embedding rows (one set per
//!   weight storage, compiled on first use), RMSNorm, LayerNorm, RoPE + KV-cache write, GQA
//!   attention (causal over the cache, or full over packed rows), activations (gated or not),
//!   steering add, argmax;
//! - [`storage`] + `shaders/storage/*.wgsl`: weights as f32, f16, or GGML Q8_0 / Q4_0 / Q4_K
//!   blocks (dequantized in the kernels), and the repacking from candle's blocks;
//! - [`buffers`]: uploads within the adapter's binding limits (large matrices split by rows);
//! - [`decoder`]: [`GpuDecoder`], the same outputs as `TextModel::forward`;
//! - [`vision`]: [`GpuVision`], the vision tower and projector: the same image features as
//!   `LlavaModel::encode_image`;
//! - [`session`]: sequences decoded on the GPU: one ([`GpuSession`]) or several that differ in
//!   their steering, as one batch ([`GpuBatchSession`]); the choice of backend a request runs
//!   on is `crate::backend`;
//! - [`params`]: each kernel's parameter block, one `#[repr(C)]` struct that also writes its WGSL;
//! - [`ops`]: single kernels on host data (the self-test and per-kernel tests);
//! - [`bench`]: decode tokens/s on CPU and GPU, and the memory-bandwidth bound.

// wgpu's handles are Send + Sync natively but not on wasm32 (one thread there); the shared
// `Arc`s serve the native multi-threaded case.
#![cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]

#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod buffers;
pub mod context;
pub mod decoder;
pub mod kernels;
pub mod ops;
pub mod params;
pub mod session;
pub mod storage;
pub mod vision;

pub use context::GpuContext;

impl GpuContext {
    /// Request the best adapter (high performance, fallback adapters allowed) and a device with
    /// the adapter's own limits, compile the kernels and run the self-test.
    pub async fn new() -> anyhow::Result<Self> {
        let adapter = context::request_adapter().await.map_err(|e| anyhow::anyhow!("no WebGPU/Vulkan adapter: {e}"))?;
        Self::from_adapter(adapter).await
    }

    /// [`GpuContext::new`] on a given adapter: a broken driver or a kernel miscompile fails the
    /// self-test ([`ops::self_test`]) here instead of producing wrong text later.
    pub async fn from_adapter(adapter: wgpu::Adapter) -> anyhow::Result<Self> {
        let ctx = Self::open(adapter).await?;
        let label = context::adapter_label(&ctx.adapter_info);
        ops::self_test(&ctx).await.map_err(|e| anyhow::anyhow!("{label}: GPU self-test failed: {e:#}"))?;
        Ok(ctx)
    }
}

/// Blocking [`GpuContext::new`] (native).
#[cfg(not(target_arch = "wasm32"))]
pub fn new_blocking() -> anyhow::Result<GpuContext> {
    pollster::block_on(GpuContext::new())
}
pub use decoder::{GpuCache, GpuDecoder, GpuForwardOptions, GpuInput, GpuOutput, GpuSteering, GpuWeights, Readback};
pub use session::{GpuBatchSession, GpuSession};
pub use vision::GpuVision;
