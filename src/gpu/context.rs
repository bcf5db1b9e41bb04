//! Adapter and device selection, error capture, read-back. (Which backend a request runs on is
//! `crate::backend`'s choice.)
//!
//! Natively wgpu uses Vulkan (Mesa lavapipe on machines without a GPU); on wasm32 it uses the
//! browser's WebGPU. Every wait is bounded: a lost device or a failed allocation becomes an
//! error, never a hang.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};

use super::kernels::Kernels;

/// Errors the device reported outside an error scope, and whether it was lost.
#[derive(Default)]
struct DeviceHealth {
    errors: Vec<String>,
    lost: Option<String>,
}

/// The error of a lost GPU device (a driver reset, `destroy`, the browser reclaiming it):
/// everything uploaded to it is gone, so the model must be loaded again (the page then loads it
/// on the CPU). Found with `anyhow::Error::downcast_ref` under any added context.
#[derive(Debug, Clone)]
pub struct DeviceLost(pub String);

impl std::fmt::Display for DeviceLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the GPU device was lost ({})", self.0)
    }
}

impl std::error::Error for DeviceLost {}

/// A wgpu device with its compiled kernels.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter_info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub(crate) kernels: Kernels,
    health: Arc<Mutex<DeviceHealth>>,
}

/// Seconds a single submission may take before we call the device hung (native only).
#[cfg(not(target_arch = "wasm32"))]
const WAIT_TIMEOUT_S: u64 = 300;

impl GpuContext {
    /// A device on `adapter` with the adapter's own limits, the kernels compiled. Not yet checked
    /// by the self-test: [`GpuContext::new`] / [`GpuContext::from_adapter`] (in `gpu/mod.rs`)
    /// open the context and run it.
    pub(crate) async fn open(adapter: wgpu::Adapter) -> Result<Self> {
        let adapter_info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("cmrm"),
                required_features: wgpu::Features::empty(),
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| anyhow!("{}: cannot open a device: {e}", adapter_label(&adapter_info)))?;
        let health = Arc::new(Mutex::new(DeviceHealth::default()));
        {
            let h = health.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                if let Ok(mut h) = h.lock() {
                    h.errors.push(e.to_string());
                }
            }));
            let h = health.clone();
            device.set_device_lost_callback(move |reason, msg| {
                if let Ok(mut h) = h.lock() {
                    h.lost = Some(format!("{reason:?}: {msg}"));
                }
            });
        }
        let features = device.features();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let kernels = Kernels::new(&device, adapter_info.device_type == wgpu::DeviceType::Cpu);
        if let Some(e) = scope.pop().await {
            bail!("{}: the WGSL kernels do not compile: {e}", adapter_label(&adapter_info));
        }
        Ok(Self { device, queue, adapter_info, limits, features, kernels, health })
    }

    /// Matmul kernels: `true` = one output per invocation (default on CPU-backed adapters),
    /// `false` = tiled matmul + cooperative GEMV (default on GPUs). Both give the same results
    /// within float rounding; tests run both.
    pub fn set_rows_per_invocation(&mut self, on: bool) {
        self.kernels.rows_per_invocation = on;
    }

    pub fn rows_per_invocation(&self) -> bool {
        self.kernels.rows_per_invocation
    }

    /// Run `build` (buffers, bind groups, kernels compiled on first use) inside validation and
    /// out-of-memory error scopes: what the device reports becomes an error about `what`, and a
    /// lost device is caught before the result is used.
    pub async fn scoped_build<T>(&self, what: &str, build: impl FnOnce() -> Result<T>) -> Result<T> {
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let built = build();
        let oom = oom.pop().await;
        let invalid = validation.pop().await;
        let built = built?;
        if let Some(e) = oom {
            bail!("the GPU ran out of memory while uploading {what}: {e}");
        }
        if let Some(e) = invalid {
            bail!("the GPU rejected the kernels or buffers of {what}: {e}");
        }
        self.check_health().with_context(|| format!("uploading {what}"))?;
        Ok(built)
    }

    /// Largest buffer one storage binding may cover (and one buffer may be).
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size) & !3
    }

    /// Fail if the device was lost or reported an error since the last check.
    pub fn check_health(&self) -> Result<()> {
        let mut h = self.health.lock().map_err(|_| anyhow!("GPU error state poisoned"))?;
        if let Some(lost) = &h.lost {
            return Err(DeviceLost(lost.clone()).into());
        }
        if !h.errors.is_empty() {
            let errs = std::mem::take(&mut h.errors);
            bail!("GPU error: {}", errs.join("; "));
        }
        Ok(())
    }

    /// Submit `encoder` after copying `src[..bytes]` into a fresh MAP_READ buffer, wait, and
    /// return the bytes.
    pub async fn submit_and_read(
        &self,
        encoder: wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<Vec<u8>> {
        let mut parts = self.submit_and_read_many(encoder, &[(src, bytes)]).await?;
        Ok(parts.remove(0))
    }

    /// As [`Self::submit_and_read`] for several `(buffer, bytes)` regions (each from offset 0),
    /// through one staging buffer and one wait.
    pub async fn submit_and_read_many(
        &self,
        mut encoder: wgpu::CommandEncoder,
        srcs: &[(&wgpu::Buffer, u64)],
    ) -> Result<Vec<Vec<u8>>> {
        let total: u64 = srcs.iter().map(|(_, b)| b.next_multiple_of(4)).sum();
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: total.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut offset = 0;
        for (src, bytes) in srcs {
            encoder.copy_buffer_to_buffer(src, 0, &staging, offset, *bytes);
            offset += bytes.next_multiple_of(4);
        }
        self.queue.submit([encoder.finish()]);
        let data = self.read_mapped(&staging, total.max(4)).await?;
        let mut out = Vec::with_capacity(srcs.len());
        let mut offset = 0usize;
        for (_, bytes) in srcs {
            out.push(data[offset..offset + *bytes as usize].to_vec());
            offset += bytes.next_multiple_of(4) as usize;
        }
        Ok(out)
    }

    /// Submit without reading anything back.
    pub fn submit(&self, encoder: wgpu::CommandEncoder) {
        self.queue.submit([encoder.finish()]);
    }

    async fn read_mapped(&self, staging: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.slice(..bytes).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        {
            let poll = self.device.poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: Some(std::time::Duration::from_secs(WAIT_TIMEOUT_S)),
            });
            if let Err(e) = poll {
                self.check_health()?;
                bail!("the GPU did not finish ({e}); the device may be lost or hung");
            }
        }
        let mapped = rx.await.map_err(|_| anyhow!("the GPU dropped a read-back (device lost?)"))?;
        if let Err(e) = mapped {
            self.check_health()?;
            bail!("GPU read-back failed: {e}");
        }
        let data = {
            let view = staging.slice(..bytes).get_mapped_range().map_err(|e| anyhow!("GPU read-back failed: {e:?}"))?;
            view.to_vec()
        };
        staging.unmap();
        self.check_health()?;
        Ok(data)
    }
}

/// The high-performance adapter of a new instance (fallback adapters allowed).
pub(crate) async fn request_adapter() -> std::result::Result<wgpu::Adapter, wgpu::RequestAdapterError> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        })
        .await
}

/// An adapter's name for reports: browsers often withhold it (WebGPU's `description` may be
/// empty), so say what is known instead.
pub fn adapter_label(info: &wgpu::AdapterInfo) -> String {
    match (info.name.trim(), info.device_type) {
        ("", wgpu::DeviceType::Cpu) => "unnamed software adapter (fallback)".into(),
        ("", _) => "unnamed browser adapter".into(),
        (name, _) => name.to_owned(),
    }
}

/// The adapter wgpu would use, if any exists at all (no device is opened).
pub async fn probe_adapter() -> Option<wgpu::AdapterInfo> {
    let adapter = request_adapter().await.ok()?;
    Some(adapter.get_info())
}
