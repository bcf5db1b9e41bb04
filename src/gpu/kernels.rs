//! The WGSL kernels (`shaders/*.wgsl`), compiled once per device, and the helpers to bind and
//! dispatch them. Each kernel's source is its parameter blocks' WGSL (`params.rs`: `Step` and
//! its own `P`), `common.wgsl`, then its file.

use super::params::{
    ActParams, ArgmaxParams, AttentionParams, CopyRowsParams, EmbedRowsParams, KernelParams, LayerNormParams,
    LinearParams, RmsNormParams, RopeKvParams, SteerParams, Step,
};
use super::storage::WeightStorage;

const COMMON: &str = include_str!("shaders/common.wgsl");

/// Workgroups per dimension a dispatch may use (WebGPU's default limit).
pub const MAX_GROUPS_PER_DIM: u32 = 65535;

/// One compiled kernel.
pub struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// The kernels reading a weight matrix, for one [`WeightStorage`].
pub struct MatmulKernels {
    /// Tiled matmul (several rows).
    pub matmul: Kernel,
    /// One row, cooperative reduction (hardware GPUs).
    pub gemv: Kernel,
    /// One row, one output per invocation (CPU-backed adapters).
    pub gemv_rows: Kernel,
    /// Token-embedding rows (the table is a weight matrix in the same storage).
    pub embed_rows: Kernel,
}

pub struct Kernels {
    device: wgpu::Device,
    /// Per [`WeightStorage`] (index in `WeightStorage::ALL`), compiled on first use: a model
    /// compiles only the storages it holds.
    by_storage: [std::sync::OnceLock<MatmulKernels>; WeightStorage::ALL.len()],
    /// Use `gemv_rows` (not the cooperative `gemv`) for few-row matmuls.
    pub rows_per_invocation: bool,
    pub rmsnorm: Kernel,
    pub rope_kv: Kernel,
    pub attention: Kernel,
    pub act_mul: Kernel,
    pub act: Kernel,
    pub layernorm: Kernel,
    pub steer: Kernel,
    pub copy_rows: Kernel,
    pub argmax: Kernel,
}

/// Compile a kernel whose parameter block is `P`.
fn kernel<P: KernelParams>(device: &wgpu::Device, name: &str, body: &str) -> Kernel {
    let source = format!("{}{}{COMMON}\n{body}", Step::wgsl("Step"), P::wgsl("P"));
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(name),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(name),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let layout = pipeline.get_bind_group_layout(0);
    Kernel { pipeline, layout }
}

impl MatmulKernels {
    fn new(device: &wgpu::Device, storage: WeightStorage) -> Self {
        /// A kernel whose weight reads come from `storage` (its WGSL appended).
        fn with_storage<P: KernelParams>(
            device: &wgpu::Device,
            storage: WeightStorage,
            name: &str,
            body: &str,
        ) -> Kernel {
            kernel::<P>(device, &format!("{name}_{}", storage.name()), &format!("{body}\n{}", storage.wgsl()))
        }
        /// A linear kernel: linear.wgsl (bindings, output rule) then `body`.
        fn linear(device: &wgpu::Device, storage: WeightStorage, name: &str, body: &str) -> Kernel {
            with_storage::<LinearParams>(
                device,
                storage,
                name,
                &format!("{}\n{body}", include_str!("shaders/linear.wgsl")),
            )
        }
        Self {
            matmul: linear(device, storage, "matmul", include_str!("shaders/matmul.wgsl")),
            gemv: linear(device, storage, "gemv", include_str!("shaders/gemv.wgsl")),
            gemv_rows: linear(device, storage, "gemv_rows", include_str!("shaders/gemv_rows.wgsl")),
            embed_rows: with_storage::<EmbedRowsParams>(
                device,
                storage,
                "embed_rows",
                include_str!("shaders/embed_rows.wgsl"),
            ),
        }
    }
}

impl Kernels {
    /// `cpu_adapter`: the adapter runs on the CPU (lavapipe, SwiftShader), where one output row
    /// per invocation beats a cooperative reduction. `CMRM_GEMV=rows|coop` overrides (native).
    pub fn new(device: &wgpu::Device, cpu_adapter: bool) -> Self {
        #[cfg(not(target_arch = "wasm32"))]
        let rows_per_invocation = match std::env::var("CMRM_GEMV").as_deref() {
            Ok("rows") => true,
            Ok("coop") => false,
            _ => cpu_adapter,
        };
        #[cfg(target_arch = "wasm32")]
        let rows_per_invocation = cpu_adapter;
        Self {
            device: device.clone(),
            by_storage: Default::default(),
            rows_per_invocation,
            rmsnorm: kernel::<RmsNormParams>(device, "rmsnorm", include_str!("shaders/rmsnorm.wgsl")),
            rope_kv: kernel::<RopeKvParams>(device, "rope_kv", include_str!("shaders/rope_kv.wgsl")),
            attention: kernel::<AttentionParams>(device, "attention", include_str!("shaders/attention.wgsl")),
            act_mul: kernel::<ActParams>(device, "act_mul", include_str!("shaders/act_mul.wgsl")),
            act: kernel::<ActParams>(device, "act", include_str!("shaders/act.wgsl")),
            layernorm: kernel::<LayerNormParams>(device, "layernorm", include_str!("shaders/layernorm.wgsl")),
            steer: kernel::<SteerParams>(device, "steer", include_str!("shaders/steer.wgsl")),
            copy_rows: kernel::<CopyRowsParams>(device, "copy_rows", include_str!("shaders/copy_rows.wgsl")),
            argmax: kernel::<ArgmaxParams>(device, "argmax", include_str!("shaders/argmax.wgsl")),
        }
    }

    /// The matmul and embedding kernels for weights in `storage` (compiled on the first call).
    pub fn matmul_kernels(&self, storage: WeightStorage) -> &MatmulKernels {
        let slot = WeightStorage::ALL.iter().position(|&s| s == storage).expect("every storage is in ALL");
        self.by_storage[slot].get_or_init(|| MatmulKernels::new(&self.device, storage))
    }
}

impl Kernel {
    /// A bind group with `buffers[i]` at binding `i` (whole buffers).
    pub fn bind(&self, device: &wgpu::Device, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
            .collect();
        device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &self.layout, entries: &entries })
    }
}

/// `groups` workgroups as an (x, y) grid within the per-dimension limit (kernels recover the
/// linear index with `wg_linear`; extra workgroups exit on their bounds checks).
pub fn grid(groups: u32) -> (u32, u32) {
    let groups = groups.max(1);
    if groups <= MAX_GROUPS_PER_DIM {
        (groups, 1)
    } else {
        let y = groups.div_ceil(MAX_GROUPS_PER_DIM);
        (groups.div_ceil(y), y)
    }
}

/// Record one dispatch into an open compute pass.
pub fn dispatch(pass: &mut wgpu::ComputePass<'_>, k: &Kernel, bind: &wgpu::BindGroup, groups: (u32, u32)) {
    pass.set_pipeline(&k.pipeline);
    pass.set_bind_group(0, bind, &[]);
    pass.dispatch_workgroups(groups.0, groups.1, 1);
}
