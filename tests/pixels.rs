//! Pixels as transformers + PIL make them, for the images users upload: JPEG of every sampling
//! (decoded as libjpeg-turbo does), progressive and restart intervals, EXIF orientations, PNG
//! colour modes, and resizes up, down and mixed. References: tests/fixtures/images (made by
//! make_images.py with Pillow 13 / libjpeg-turbo 3.2 and transformers' PIL image processors).

use std::path::PathBuf;

use candle_core::Device;
use cmrm::image::{decode_image, resize_bicubic, ImagePreprocessor, RgbImage};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

struct Refs {
    json: Value,
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
}

fn refs() -> Refs {
    let json = serde_json::from_str(&std::fs::read_to_string(root().join("refs.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(root().join("refs.safetensors"), &Device::Cpu).unwrap();
    Refs { json, tensors }
}

impl Refs {
    fn u8s(&self, key: &str) -> Vec<u8> {
        let t = self.tensors.get(key).unwrap_or_else(|| panic!("no {key}"));
        t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
    }
    fn f32s(&self, key: &str) -> Vec<f32> {
        let t = self.tensors.get(key).unwrap_or_else(|| panic!("no {key}"));
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
    fn images(&self) -> Vec<(String, String)> {
        self.json["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["file"].as_str().unwrap().to_owned(), e["note"].as_str().unwrap().to_owned()))
            .collect()
    }
}

fn decode(name: &str) -> RgbImage {
    decode_image(&std::fs::read(root().join("files").join(name)).unwrap()).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

/// Count of differing bytes and the largest difference.
fn diff(got: &[u8], want: &[u8]) -> (usize, u8) {
    got.iter().zip(want).filter(|(a, b)| a != b).fold((0, 0), |(n, m), (a, b)| (n + 1, m.max(a.abs_diff(*b))))
}

#[test]
fn decoded_pixels_equal_pil_for_every_image() {
    let refs = refs();
    let mut failures = Vec::new();
    let images = refs.images();
    assert!(images.len() >= 30, "the fixture lists {} images", images.len());
    for (name, note) in &images {
        let img = decode(name);
        let want = refs.u8s(&format!("decoded.{name}"));
        let entry = refs.json["images"].as_array().unwrap().iter().find(|e| e["file"] == name.as_str()).unwrap();
        let (w, h) = (entry["width"].as_u64().unwrap() as usize, entry["height"].as_u64().unwrap() as usize);
        if (img.width, img.height) != (w, h) {
            failures.push(format!("{name} ({note}): {}×{} instead of {w}×{h}", img.width, img.height));
            continue;
        }
        let (n, max) = diff(&img.data, &want);
        if n > 0 {
            failures.push(format!("{name} ({note}): {n} of {} samples differ, by up to {max}", want.len()));
        }
    }
    assert!(failures.is_empty(), "decoded pixels differ from PIL:\n{}", failures.join("\n"));
}

#[test]
fn pixel_values_equal_transformers_for_every_image_and_processor() {
    let refs = refs();
    let mut worst = 0f32;
    let mut failures = Vec::new();
    let processors = refs.json["processors"].as_object().unwrap();
    assert_eq!(processors.len(), 2);
    for (proc_name, config) in processors {
        let processor = ImagePreprocessor::from_value(config).unwrap();
        for (name, note) in refs.images() {
            let (_, pixels) = processor.preprocess(&decode(&name));
            let want = refs.f32s(&format!("pv.{proc_name}.{name}"));
            if pixels.len() != want.len() {
                failures.push(format!("{proc_name} {name}: {} values, expected {}", pixels.len(), want.len()));
                continue;
            }
            let d = pixels.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            worst = worst.max(d);
            if d > 1e-6 {
                failures.push(format!("{proc_name} {name} ({note}): max |diff| {d}"));
            }
        }
    }
    println!("pixel_values: worst |diff| {worst:e} over {} images × 2 processors", refs.images().len());
    assert!(failures.is_empty(), "pixel_values differ from transformers:\n{}", failures.join("\n"));
}

#[test]
fn bicubic_resize_equals_pil_on_every_axis_combination() {
    let refs = refs();
    let cases = refs.json["resize_cases"].as_array().unwrap();
    let (mut up, mut down, mut mixed) = (0, 0, 0);
    for (i, case) in cases.iter().enumerate() {
        let dims = |k: &str| -> (usize, usize) {
            (case[k][0].as_u64().unwrap() as usize, case[k][1].as_u64().unwrap() as usize)
        };
        let ((w, h), (ow, oh)) = (dims("in"), dims("out"));
        let src = RgbImage::new(w, h, refs.u8s(&format!("resize.{i}.in"))).unwrap();
        let got = resize_bicubic(&src, ow, oh);
        let want = refs.u8s(&format!("resize.{i}.out"));
        assert_eq!(diff(&got.data, &want), (0, 0), "resize case {i}: {w}×{h} → {ow}×{oh}");
        match (ow > w, oh > h) {
            (true, true) => up += 1,
            (false, false) => down += 1,
            _ => mixed += 1,
        }
    }
    assert!(up > 5 && down > 5 && mixed > 10, "cases: {up} up, {down} down, {mixed} mixed");
}

#[test]
fn unsupported_jpegs_are_refused_with_what_they_are() {
    let refs = refs();
    for (name, kind) in refs.json["refused"].as_object().unwrap() {
        let err = decode_image(&std::fs::read(root().join("files").join(name)).unwrap()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(kind.as_str().unwrap()), "{name}: {msg}");
    }
}

#[test]
fn truncated_and_corrupted_jpegs_give_errors_not_panics() {
    let bytes = std::fs::read(root().join("files/p420_photo_257x311.jpg")).unwrap();
    // Every prefix length class and a byte flipped in every region: an image or an error.
    for cut in [3, 4, 10, 20, 100, 300, 600, bytes.len() / 2, bytes.len() - 2] {
        let _ = decode_image(&bytes[..cut]);
    }
    let mut seed = 7u64;
    for _ in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..4 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let at = (seed >> 33) as usize % b.len();
            b[at] = (seed >> 17) as u8;
        }
        if let Ok(img) = decode_image(&b) {
            assert_eq!(img.data.len(), img.width * img.height * 3);
        }
    }
}

/// Why cmrm decodes JPEG itself: the `image` crate's decoder (zune-jpeg) gives other pixels than
/// libjpeg-turbo on these same files, so this suite would fail with it.
#[test]
fn the_image_crate_decoder_would_not_match_pil() {
    let refs = refs();
    let mut differing = 0;
    let jpegs: Vec<String> = refs.images().into_iter().map(|(n, _)| n).filter(|n| n.ends_with(".jpg")).collect();
    for name in &jpegs {
        let bytes = std::fs::read(root().join("files").join(name)).unwrap();
        let img = image::load_from_memory(&bytes).unwrap().into_rgb8();
        if img.as_raw() != &refs.u8s(&format!("decoded.{name}")) {
            differing += 1;
        }
    }
    println!("image crate: {differing} of {} JPEGs decode differently from PIL", jpegs.len());
    assert!(differing * 2 > jpegs.len(), "only {differing} of {} differ", jpegs.len());
}
