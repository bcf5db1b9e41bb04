//! The WGSL kernels (`shaders/*.wgsl`), compiled once per device, and the helpers to bind and
//! dispatch them.

const COMMON: &str = include_str!("shaders/common.wgsl");

/// Workgroups per dimension a dispatch may use (WebGPU's default limit).
pub const MAX_GROUPS_PER_DIM: u32 = 65535;

/// One compiled kernel.
pub struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

pub struct Kernels {
    pub matmul: Kernel,
    pub gemv: Kernel,
    /// One row per invocation (CPU-backed adapters).
    pub gemv_rows: Kernel,
    /// The same three reading f16 weights (two per `u32`, unpacked to f32 in the kernel).
    pub matmul_f16: Kernel,
    pub gemv_f16: Kernel,
    pub gemv_rows_f16: Kernel,
    /// Use `gemv_rows` for single-row matmuls.
    pub rows_per_invocation: bool,
    pub rmsnorm: Kernel,
    pub rope_kv: Kernel,
    pub attention: Kernel,
    pub act_mul: Kernel,
    pub steer: Kernel,
    pub copy_row: Kernel,
    pub argmax: Kernel,
}

fn kernel(device: &wgpu::Device, name: &str, body: &str) -> Kernel {
    let source = format!("{COMMON}\n{body}");
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

/// A matmul kernel's source reading f16 weights: the `f32` array `w` becomes `w_half`, two f16
/// values per `u32` (element `i` in the low half of word `i / 2` when `i` is even), and every
/// `w[i]` becomes `w_at(i)`, which unpacks. Core WGSL (`unpack2x16float`): no `shader-f16`
/// feature needed; arithmetic stays f32.
pub fn half_weights(source: &str) -> String {
    const DECL: &str = "var<storage, read> w: array<f32>;";
    assert!(source.contains(DECL), "a matmul kernel declares `{DECL}`");
    let source = source.replace(DECL, "var<storage, read> w_half: array<u32>;");
    let mut out = String::with_capacity(source.len() + 256);
    let mut depth_stack: Vec<usize> = Vec::new(); // bracket depths where a `w[` opened
    let mut depth = 0usize;
    let chars: Vec<char> = source.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let starts_w = c == 'w'
            && chars.get(i + 1) == Some(&'[')
            && !i.checked_sub(1).and_then(|j| chars.get(j)).is_some_and(|p| p.is_alphanumeric() || *p == '_');
        if starts_w {
            out.push_str("w_at(");
            depth += 1;
            depth_stack.push(depth);
            i += 2;
            continue;
        }
        match c {
            '[' => {
                depth += 1;
                out.push(c);
            }
            ']' if depth_stack.last() == Some(&depth) => {
                depth_stack.pop();
                depth -= 1;
                out.push(')');
            }
            ']' => {
                depth = depth.saturating_sub(1);
                out.push(c);
            }
            _ => out.push(c),
        }
        i += 1;
    }
    out.push_str(
        "\nfn w_at(i: u32) -> f32 {\n    let pair = unpack2x16float(w_half[i >> 1u]);\n    return select(pair.x, pair.y, (i & 1u) == 1u);\n}\n",
    );
    out
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
        let (matmul, gemv, gemv_rows) = (
            include_str!("shaders/matmul.wgsl"),
            include_str!("shaders/gemv.wgsl"),
            include_str!("shaders/gemv_rows.wgsl"),
        );
        Self {
            matmul_f16: kernel(device, "matmul_f16", &half_weights(matmul)),
            gemv_f16: kernel(device, "gemv_f16", &half_weights(gemv)),
            gemv_rows_f16: kernel(device, "gemv_rows_f16", &half_weights(gemv_rows)),
            rows_per_invocation,
            gemv_rows: kernel(device, "gemv_rows", gemv_rows),
            matmul: kernel(device, "matmul", matmul),
            gemv: kernel(device, "gemv", gemv),
            rmsnorm: kernel(device, "rmsnorm", include_str!("shaders/rmsnorm.wgsl")),
            rope_kv: kernel(device, "rope_kv", include_str!("shaders/rope_kv.wgsl")),
            attention: kernel(device, "attention", include_str!("shaders/attention.wgsl")),
            act_mul: kernel(device, "act_mul", include_str!("shaders/act_mul.wgsl")),
            steer: kernel(device, "steer", include_str!("shaders/steer.wgsl")),
            copy_row: kernel(device, "copy_row", include_str!("shaders/copy_row.wgsl")),
            argmax: kernel(device, "argmax", include_str!("shaders/argmax.wgsl")),
        }
    }
}

impl Kernels {
    /// `(matmul, gemv, gemv_rows)` for f32 or f16 (`half`) weights.
    pub fn matmul_kernels(&self, half: bool) -> (&Kernel, &Kernel, &Kernel) {
        if half {
            (&self.matmul_f16, &self.gemv_f16, &self.gemv_rows_f16)
        } else {
            (&self.matmul, &self.gemv, &self.gemv_rows)
        }
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

/// `[u32; 8]` parameter blocks (32 bytes: every kernel's uniform `P` struct).
pub fn params(values: &[u32]) -> [u32; 8] {
    let mut p = [0u32; 8];
    p[..values.len()].copy_from_slice(values);
    p
}
