const NEG_BIG: f32 = -3.0e38;

// Workgroup index when a 1-D grid was split over x and y (x ≤ 65535).
fn wg_linear(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// erf(x) to ~1.2e-7 (Numerical Recipes' erfc Chebyshev fit): WGSL has no erf.
fn erf_approx(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806
        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * exp(poly);
    return select(erfc - 1.0, 1.0 - erfc, x >= 0.0);
}

// The activations of config.rs `Activation`, by code: 0 SiLU, 1 GELU (tanh approximation),
// 2 GELU (exact, erf), 3 quick_gelu (x·sigmoid(1.702x)), 4 ReLU.
fn activate(x: f32, code: u32) -> f32 {
    switch code {
        case 0u: {
            return x / (exp(-x) + 1.0);
        }
        case 1u: {
            let inner = clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), -20.0, 20.0);
            return 0.5 * x * (1.0 + tanh(inner));
        }
        case 2u: {
            return 0.5 * x * (1.0 + erf_approx(x * 0.7071067811865476));
        }
        case 3u: {
            return x / (exp(-1.702 * x) + 1.0);
        }
        default: {
            return max(x, 0.0);
        }
    }
}
