#![cfg(not(target_arch = "wasm32"))]
//! Each WGSL kernel against candle (or the CPU code it replaces) on random shapes, including
//! sizes that are not multiples of any workgroup or tile. Runs on whatever adapter wgpu finds
//! (Mesa lavapipe on machines without a GPU); skips, with a message, only when none exists.

use candle_core::{Device, Tensor, D};
use cmrm::gpu::buffers::GpuMatrix;
use cmrm::gpu::ops::{self, AttnShape};
use cmrm::gpu::storage::WeightStorage;
use cmrm::gpu::GpuContext;
use cmrm::steering::{Intervention, Positions, SteeringVectors};

fn ctx() -> Option<GpuContext> {
    if let Some(info) = pollster::block_on(cmrm::gpu::context::probe_adapter()) {
        eprintln!("adapter: {} ({:?})", info.name, info.backend);
        Some(cmrm::gpu::new_blocking().expect("an adapter exists, so the GPU context must work"))
    } else {
        eprintln!("SKIPPED: no WebGPU/Vulkan adapter on this machine (install mesa-vulkan-drivers for lavapipe)");
        None
    }
}

/// Deterministic pseudo-random values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn flat(x: &Tensor) -> Vec<f32> {
    x.flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f32;
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let d = (a - b).abs();
        assert!(d <= tol * (1.0 + b.abs()), "{what}: element {i}: gpu {a} vs cpu {b}");
        worst = worst.max(d);
    }
    eprintln!("{what}: max |diff| {worst:e}");
}

/// Up to four rows take the GEMV kernels (several rows: a batched decode step, each weight read
/// once for all of them), more the tiled matmul; both GEMV variants; bias and residual.
#[test]
fn matmul_and_gemv_match_candle() {
    let Some(mut ctx) = ctx() else { return };
    for variant in [false, true] {
        ctx.set_rows_per_invocation(variant);
        eprintln!("rows_per_invocation = {variant}");
        matmul_cases(&ctx);
    }
}

fn matmul_cases(ctx: &GpuContext) {
    let shapes = [
        (1, 1, 1),
        (1, 37, 21),
        (3, 5, 7),
        (65, 67, 129),
        (7, 130, 3),
        (1, 300, 1000),
        (70, 33, 65),
        (2, 64, 64),
        (4, 131, 70),
        (129, 17, 200),
    ];
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        let x = rand_vec(m * k, 10 + i as u64);
        let w = rand_vec(n * k, 20 + i as u64);
        let b = rand_vec(n, 30 + i as u64);
        let r = rand_vec(m * n, 40 + i as u64);
        let xw = t(&x, &[m, k]).matmul(&t(&w, &[n, k]).t().unwrap()).unwrap();
        let with_bias = xw.broadcast_add(&t(&b, &[n])).unwrap();
        let got = pollster::block_on(ops::linear(ctx, &x, m, &w, None, n)).unwrap();
        assert_close(&format!("matmul {m}x{k}x{n}"), &got, &flat(&xw), 1e-5);
        let got = pollster::block_on(ops::linear(ctx, &x, m, &w, Some(&b), n)).unwrap();
        assert_close(&format!("matmul+bias {m}x{k}x{n}"), &got, &flat(&with_bias), 1e-5);
        let got = pollster::block_on(ops::linear_into(ctx, &x, m, &w, Some(&b), n, Some(&r))).unwrap();
        let want = (t(&r, &[m, n]) + &with_bias).unwrap();
        assert_close(&format!("residual+matmul+bias {m}x{k}x{n}"), &got, &flat(&want), 1e-5);
    }
}

#[test]
fn split_matrix_matches_whole() {
    let Some(mut ctx) = ctx() else { return };
    for variant in [false, true] {
        ctx.set_rows_per_invocation(variant);
        split_cases(&ctx);
    }
}

fn split_cases(ctx: &GpuContext) {
    let (k, n) = (45, 61);
    let w = rand_vec(n * k, 1);
    let b = rand_vec(n, 2);
    for m in [1, 5] {
        let x = rand_vec(m * k, 3 + m as u64);
        let want =
            flat(&t(&x, &[m, k]).matmul(&t(&w, &[n, k]).t().unwrap()).unwrap().broadcast_add(&t(&b, &[n])).unwrap());
        for rows in [1, 7, 60, 61] {
            let matrix = ops::matrix_in_chunks(ctx, &w, (n, k), Some(&b), rows, WeightStorage::F32).unwrap();
            assert_eq!(matrix.chunks.len(), n.div_ceil(rows));
            let got = pollster::block_on(ops::run_linear(ctx, &matrix, &x, m, None)).unwrap();
            assert_close(&format!("split {rows} rows, m={m}"), &got, &want, 1e-5);
        }
    }
}

/// f16 weights (two per `u32`, unpacked in the kernel): every matmul kernel, on the shapes above
/// and split into chunks of odd row counts with an odd `k` (chunks that start mid-word are
/// padded), equals candle's product with the weights rounded to f16 — the only difference the
/// storage makes.
#[test]
fn f16_weights_match_candle_on_rounded_weights() {
    let Some(mut ctx) = ctx() else { return };
    let round = |w: &[f32]| w.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect::<Vec<_>>();
    for variant in [false, true] {
        ctx.set_rows_per_invocation(variant);
        for (i, &(m, k, n)) in [(1, 37, 21), (3, 5, 7), (65, 67, 129), (1, 300, 1000), (70, 33, 65)].iter().enumerate()
        {
            let x = rand_vec(m * k, 110 + i as u64);
            let w = rand_vec(n * k, 120 + i as u64);
            let b = rand_vec(n, 130 + i as u64);
            let want = flat(
                &t(&x, &[m, k])
                    .matmul(&t(&round(&w), &[n, k]).t().unwrap())
                    .unwrap()
                    .broadcast_add(&t(&b, &[n]))
                    .unwrap(),
            );
            for rows in [n, 7, 1] {
                let matrix = ops::matrix_in_chunks(&ctx, &w, (n, k), Some(&b), rows, WeightStorage::F16).unwrap();
                assert_stored_bytes(&matrix, WeightStorage::F16);
                let got = pollster::block_on(ops::run_linear(&ctx, &matrix, &x, m, None)).unwrap();
                assert_close(&format!("f16 {m}x{k}x{n} in chunks of {rows}"), &got, &want, 1e-5);
            }
        }
    }
}

/// A matrix holds `row_bytes(k)` per row, each chunk rounded up to whole words, plus its bias.
fn assert_stored_bytes(matrix: &GpuMatrix, storage: WeightStorage) {
    assert_eq!(matrix.storage, storage);
    let chunks: u64 =
        matrix.chunks.iter().map(|(_, rows, _)| (*rows as u64 * storage.row_bytes(matrix.k)).div_ceil(4) * 4).sum();
    let bias = if matrix.bias.is_some() { matrix.n as u64 * 4 } else { 0 };
    assert_eq!(matrix.bytes(), chunks + bias);
}

/// Quantized weights (GGML blocks made by candle, repacked for the GPU or as they are): every
/// matmul kernel, in whole and split matrices, and the embedding kernel equal candle's product /
/// rows with the weights `QTensor::dequantize`d — the GPU reads exactly candle's values. Rows
/// whose `k` is not whole blocks are padded with zero columns, as the model pads them.
#[test]
fn quantized_weights_match_candle_dequantized() {
    use candle_core::quantized::QTensor;
    let Some(mut ctx) = ctx() else { return };
    let q8_shapes: [(usize, usize, usize); 5] = [(1, 64, 21), (3, 40, 7), (65, 96, 129), (1, 300, 1000), (70, 32, 65)];
    let q4k_shapes = [(1, 256, 21), (3, 300, 7), (65, 512, 129), (1, 768, 300), (70, 256, 65)];
    for variant in [false, true] {
        ctx.set_rows_per_invocation(variant);
        for (storage, shapes) in
            [(WeightStorage::Q8_0, q8_shapes), (WeightStorage::Q4_0, q8_shapes), (WeightStorage::Q4K, q4k_shapes)]
        {
            let dtype = storage.ggml().unwrap();
            for (i, &(m, k, n)) in shapes.iter().enumerate() {
                let kp = k.div_ceil(dtype.block_size()) * dtype.block_size();
                let x = rand_vec(m * k, 210 + i as u64);
                let w = t(&rand_vec(n * k, 220 + i as u64), &[n, k]).pad_with_zeros(1, 0, kp - k).unwrap();
                let b = rand_vec(n, 230 + i as u64);
                let q = QTensor::quantize(&w, dtype).unwrap();
                let dequantized = q.dequantize(&Device::Cpu).unwrap().narrow(1, 0, k).unwrap().contiguous().unwrap();
                let want = flat(
                    &t(&x, &[m, k]).matmul(&dequantized.t().unwrap()).unwrap().broadcast_add(&t(&b, &[n])).unwrap(),
                );
                let data = q.data().unwrap();
                for rows in [n, 7, 1] {
                    let what = format!("{} {m}x{k}x{n} in chunks of {rows}", storage.name());
                    let matrix = GpuMatrix::blocks(&ctx, "w", &data, (n, k), Some(&b), storage, rows).unwrap();
                    assert_stored_bytes(&matrix, storage);
                    let got = pollster::block_on(ops::run_linear(&ctx, &matrix, &x, m, None)).unwrap();
                    assert_close(&what, &got, &want, 1e-5);
                    if variant {
                        let ids = [0, (n - 1) as u32, (n / 2) as u32, 0];
                        let got = pollster::block_on(ops::embed_rows(&ctx, &matrix, &ids)).unwrap();
                        let ids_t = Tensor::new(&ids, &Device::Cpu).unwrap();
                        let rows_want = flat(&dequantized.index_select(&ids_t, 0).unwrap());
                        assert_eq!(got, rows_want, "{what}: embedding rows");
                    }
                }
            }
        }
    }
}

/// Matrices over the 4 MiB upload piece (written to the GPU a piece of rows at a time): odd row
/// counts, f16 rows ending mid-word, Q8_0 rows with an odd number of scales — the same product
/// as candle's.
#[test]
fn large_matrices_upload_in_pieces() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let Some(ctx) = ctx() else { return };
    let (n, k) = (4099, 1056);
    let x = rand_vec(k, 301);
    let w = t(&rand_vec(n * k, 302), &[n, k]);
    let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    let matrix =
        GpuMatrix::blocks(&ctx, "w", &q.data().unwrap(), (n, k), None, WeightStorage::Q8_0, usize::MAX).unwrap();
    assert!(matrix.bytes() > 4 << 20);
    let want = flat(&t(&x, &[1, k]).matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap()).unwrap());
    let got = pollster::block_on(ops::run_linear(&ctx, &matrix, &x, 1, None)).unwrap();
    assert_close("q8_0 4099x1056 in pieces", &got, &want, 1e-5);

    let (n, k) = (4099, 1001);
    let w = rand_vec(n * k, 303);
    let rounded: Vec<f32> = w.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
    let matrix = ops::matrix_in_chunks(&ctx, &w, (n, k), None, usize::MAX, WeightStorage::F16).unwrap();
    assert!(matrix.bytes() > 4 << 20);
    let x = rand_vec(k, 304);
    let want = flat(&t(&x, &[1, k]).matmul(&t(&rounded, &[n, k]).t().unwrap()).unwrap());
    let got = pollster::block_on(ops::run_linear(&ctx, &matrix, &x, 1, None)).unwrap();
    assert_close("f16 4099x1001 in pieces", &got, &want, 1e-5);
}

/// Blocks that do not match their shape are refused with the sizes, not read out of bounds.
#[test]
fn mismatched_blocks_are_refused() {
    let Some(ctx) = ctx() else { return };
    let err = GpuMatrix::blocks(&ctx, "down_proj", &[0u8; 100], (2, 64), None, WeightStorage::Q8_0, usize::MAX)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("100 bytes of q8_0 blocks for 2 rows of 64 values"), "{err:#}");
    let err = GpuMatrix::blocks(&ctx, "w", &[0u8; 4], (1, 2), None, WeightStorage::F16, usize::MAX).err().unwrap();
    assert!(format!("{err:#}").contains("not a block format"), "{err:#}");
}

#[test]
fn rms_norm_matches_candle() {
    let Some(ctx) = ctx() else { return };
    for (i, &(rows, h, eps)) in [(1, 1, 1e-5), (5, 63, 1e-6), (67, 130, 1e-5), (2, 896, 1e-6)].iter().enumerate() {
        let x = rand_vec(rows * h, 50 + i as u64).iter().map(|v| v * 7.0).collect::<Vec<_>>();
        let w = rand_vec(h, 60 + i as u64);
        let want = candle_nn::ops::rms_norm(&t(&x, &[rows, h]), &t(&w, &[h]), eps).unwrap();
        let got = pollster::block_on(ops::rms_norm(&ctx, &x, rows, &w, eps)).unwrap();
        assert_close(&format!("rms_norm {rows}x{h}"), &got, &flat(&want), 1e-5);
    }
}

/// RoPE tables as TextModel computes them.
fn rope_tables(d: usize, theta: f32, start: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32)).collect();
    let (mut c, mut s) = (vec![], vec![]);
    for pos in start..start + n {
        for f in &inv {
            c.push((pos as f32 * f).cos());
            s.push((pos as f32 * f).sin());
        }
    }
    (c, s)
}

#[test]
fn rope_and_causal_gqa_attention_match_candle() {
    let Some(ctx) = ctx() else { return };
    // (nh, kvh, d, t, start)
    let cases = [
        (4, 2, 16, 5, 0),
        (3, 1, 10, 1, 70),
        (2, 2, 130, 3, 66),
        (6, 3, 8, 67, 5),
        (14, 2, 64, 1, 130),
        (4, 4, 256, 2, 1),
    ];
    for (ci, &(nh, kvh, d, tt, start)) in cases.iter().enumerate() {
        let s = AttnShape { nh, kvh, d };
        let width = (nh + 2 * kvh) * d;
        let qkv = rand_vec(tt * width, 100 + ci as u64);
        let prior_k = rand_vec(kvh * start * d, 200 + ci as u64);
        let prior_v = rand_vec(kvh * start * d, 300 + ci as u64);
        let total = start + tt;
        let (cos, sin) = rope_tables(d, 10000.0, start, tt);
        let (roped, attn) =
            pollster::block_on(ops::rope_attention(&ctx, s, &qkv, tt, start, &prior_k, &prior_v, &cos, &sin)).unwrap();

        // candle reference: [1, heads, t, d] tensors.
        let rows = t(&qkv, &[tt, nh + 2 * kvh, d]);
        let heads = |a: usize, n: usize| {
            rows.narrow(1, a, n).unwrap().transpose(0, 1).unwrap().contiguous().unwrap().unsqueeze(0).unwrap()
        };
        let (ct, st) = (t(&cos, &[tt, d / 2]), t(&sin, &[tt, d / 2]));
        let q = candle_nn::rotary_emb::rope(&heads(0, nh), &ct, &st).unwrap();
        let k_new = candle_nn::rotary_emb::rope(&heads(nh, kvh), &ct, &st).unwrap();
        let v_new = heads(nh + kvh, kvh);
        let want_q = flat(&q.squeeze(0).unwrap().transpose(0, 1).unwrap().contiguous().unwrap());
        let got_q: Vec<f32> = roped.chunks(width).flat_map(|r| r[..nh * d].to_vec()).collect();
        assert_close(&format!("rope q case {ci}"), &got_q, &want_q, 1e-5);

        let k_all = Tensor::cat(&[t(&prior_k, &[1, kvh, start, d]), k_new], 2).unwrap();
        let v_all = Tensor::cat(&[t(&prior_v, &[1, kvh, start, d]), v_new], 2).unwrap();
        let mask: Vec<f32> = (0..tt)
            .flat_map(|i| (0..total).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = t(&mask, &[tt, total]);
        let rep = nh / kvh;
        let mut outs = vec![];
        for h in 0..nh {
            let qh = q.get(0).unwrap().get(h).unwrap();
            let kh = k_all.get(0).unwrap().get(h / rep).unwrap();
            let vh = v_all.get(0).unwrap().get(h / rep).unwrap();
            let scores =
                (qh.matmul(&kh.t().unwrap()).unwrap() * (d as f64).powf(-0.5)).unwrap().broadcast_add(&mask).unwrap();
            let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
            outs.push(p.matmul(&vh).unwrap()); // [t, d]
        }
        let want = Tensor::stack(&outs, 1).unwrap(); // [t, nh, d]
        assert_close(
            &format!("attention case {ci} (nh {nh}, kvh {kvh}, d {d}, t {tt}, start {start})"),
            &attn,
            &flat(&want),
            1e-5,
        );
    }
}

#[test]
fn gated_activation_matches_candle() {
    let Some(ctx) = ctx() else { return };
    for (i, &(rows, m)) in [(1, 1), (3, 65), (70, 129)].iter().enumerate() {
        let gu: Vec<f32> = rand_vec(rows * 2 * m, 70 + i as u64).iter().map(|v| v * 6.0).collect();
        let x = t(&gu, &[rows, 2 * m]);
        let (g, u) = (x.narrow(1, 0, m).unwrap(), x.narrow(1, m, m).unwrap());
        let got = pollster::block_on(ops::act_mul(&ctx, &gu, rows, m, 0)).unwrap();
        assert_close(&format!("silu*up {rows}x{m}"), &got, &flat(&(g.silu().unwrap() * &u).unwrap()), 1e-5);
        let got = pollster::block_on(ops::act_mul(&ctx, &gu, rows, m, 1)).unwrap();
        assert_close(&format!("gelu_tanh*up {rows}x{m}"), &got, &flat(&(g.gelu().unwrap() * &u).unwrap()), 1e-5);
    }
}

#[test]
fn steering_add_matches_intervention_apply_exactly() {
    let Some(ctx) = ctx() else { return };
    let h = 67;
    let v = rand_vec(h, 5);
    let vectors = SteeringVectors::new(h, [(1usize, v.clone())].into_iter().collect()).unwrap();
    for positions in [Positions::All, Positions::Last, Positions::Generated, Positions::LastAndGenerated] {
        let iv = Intervention::add(&vectors, -1.75, Some(&[1]), positions, &Device::Cpu).unwrap();
        // (rows, start, prompt_len): prefill, prefill in chunks, decode steps.
        for (rows, start, prompt_len) in [(9, 0, 9), (5, 4, 9), (4, 0, 9), (1, 9, 9), (1, 8, 9), (1, 12, 9), (3, 7, 9)]
        {
            let x = rand_vec(rows * h, rows as u64 * 31 + start as u64);
            let want = flat(&iv.apply(1, &t(&x, &[1, rows, h]), start, prompt_len).unwrap());
            let zero = Tensor::zeros((1, 1, h), candle_core::DType::F32, &Device::Cpu).unwrap();
            let delta = flat(&iv.apply(1, &zero, 0, usize::from(positions == Positions::Last)).unwrap());
            let mode = ops::steer_mode(positions);
            let got = pollster::block_on(ops::steer(&ctx, &x, rows, &delta, mode, start, prompt_len)).unwrap();
            assert_eq!(got, want, "{positions:?} rows {rows} start {start} prompt_len {prompt_len}");
        }
    }
}

#[test]
fn argmax_matches_cpu_tie_rule() {
    let Some(ctx) = ctx() else { return };
    for (i, n) in [1usize, 2, 255, 256, 257, 1000, 151936].into_iter().enumerate() {
        let mut v = rand_vec(n, 900 + i as u64);
        // Ties: the maximum appears twice; the first index must win.
        if n > 3 {
            v[n / 3] = 5.0;
            v[n - 1] = 5.0;
        }
        let got = pollster::block_on(ops::argmax(&ctx, &v)).unwrap();
        assert_eq!(got, cmrm::text::argmax(&v), "n = {n}");
    }
}

#[test]
fn full_attention_matches_candle() {
    let Some(ctx) = ctx() else { return };
    // (nh, kvh, d, rows): the vision tower's shapes (kvh = nh), odd row counts, GQA too.
    for (ci, &(nh, kvh, d, rows)) in [(2, 2, 16, 5), (4, 4, 72, 67), (3, 1, 8, 130), (1, 1, 64, 1)].iter().enumerate() {
        let s = AttnShape { nh, kvh, d };
        let width = (nh + 2 * kvh) * d;
        let qkv: Vec<f32> = rand_vec(rows * width, 900 + ci as u64).iter().map(|v| v * 3.0).collect();
        let got = pollster::block_on(ops::full_attention(&ctx, s, &qkv, rows)).unwrap();
        let packed = t(&qkv, &[rows, nh + 2 * kvh, d]);
        let head = |first: usize, h: usize| packed.narrow(1, first + h, 1).unwrap().squeeze(1).unwrap();
        let outs: Vec<Tensor> = (0..nh)
            .map(|h| {
                let (q, k, v) = (head(0, h), head(nh, h / (nh / kvh)), head(nh + kvh, h / (nh / kvh)));
                let scores = (q.matmul(&k.t().unwrap()).unwrap() * (d as f64).powf(-0.5)).unwrap();
                candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(&v).unwrap()
            })
            .collect();
        let want = Tensor::stack(&outs, 1).unwrap(); // [rows, nh, d]
        assert_close(
            &format!("full attention case {ci} (nh {nh}, kvh {kvh}, d {d}, rows {rows})"),
            &got,
            &flat(&want),
            1e-5,
        );
    }
}

#[test]
fn layer_norm_matches_candle() {
    let Some(ctx) = ctx() else { return };
    for (i, &(rows, h)) in [(1, 8), (5, 64), (70, 130), (3, 1152)].iter().enumerate() {
        // An offset and a scale, as real activations have: the mean must really be removed.
        let x: Vec<f32> = rand_vec(rows * h, 40 + i as u64).iter().map(|v| 3.0 + 5.0 * v).collect();
        let (w, b) = (rand_vec(h, 50 + i as u64), rand_vec(h, 60 + i as u64));
        let got = pollster::block_on(ops::layer_norm(&ctx, &x, rows, &w, &b, 1e-5)).unwrap();
        let norm = candle_nn::LayerNorm::new(t(&w, &[h]), t(&b, &[h]), 1e-5);
        let want = candle_core::Module::forward(&norm, &t(&x, &[rows, h])).unwrap();
        assert_close(&format!("layer norm {rows}×{h}"), &got, &flat(&want), 1e-5);
    }
}

#[test]
fn activations_match_the_cpu_path() {
    use cmrm::config::Activation;
    let Some(ctx) = ctx() else { return };
    let (rows, m) = (3, 347);
    let x: Vec<f32> = rand_vec(rows * m, 77).iter().map(|v| v * 8.0).collect();
    for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu, Activation::QuickGelu, Activation::Relu] {
        let got = pollster::block_on(ops::activate(&ctx, &x, rows, m, ops::activation_code(act))).unwrap();
        let want = act.apply(&t(&x, &[rows, m])).unwrap();
        assert_close(&format!("{act:?}"), &got, &flat(&want), 1e-5);
    }
}
