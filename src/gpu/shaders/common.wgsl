// Shared by every kernel that depends on the step (prepended to the kernel source).
// start: absolute position of the first row; t: rows in this step; prompt_len: for steering;
// last: t - 1.
struct Step {
    start: u32,
    t: u32,
    prompt_len: u32,
    last: u32,
}

const NEG_BIG: f32 = -3.0e38;

// Workgroup index when a 1-D grid was split over x and y (x ≤ 65535).
fn wg_linear(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}
