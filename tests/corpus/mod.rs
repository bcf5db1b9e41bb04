//! The bad-input corpus: files anyone could publish or upload, each with the error cmrm must give
//! (a phrase of it). Shared by the native run (tests/hostile.rs: library and CLI entry points,
//! time and peak memory per input) and the browser run (tests/web.rs: the page's `Session`).
//! Built in code (no files), so the same bytes reach both.
#![allow(dead_code)]

/// Where an input goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// An uploaded image.
    Image,
    /// `preprocessor_config.json` of the tiny SigLIP + Qwen2 model.
    Preprocessor,
    /// `config.json`.
    Config,
    /// `chat_template.jinja`.
    Template,
    /// A weight file of this name (`model.safetensors`, `model.gguf`).
    Weights(&'static str),
    /// A steering-vector file (safetensors or GGUF control vector).
    Vectors,
    /// A vectors catalog (JSON).
    Catalog,
}

pub struct Case {
    pub name: &'static str,
    pub target: Target,
    pub bytes: Vec<u8>,
    /// A phrase the error message must contain.
    pub expect: &'static str,
}

fn case(name: &'static str, target: Target, bytes: Vec<u8>, expect: &'static str) -> Case {
    Case { name, target, bytes, expect }
}

/// A PNG of `w × h` grey pixels.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(w, h, image::Luma([128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A PNG claiming `w × h` whose image data is one empty chunk (its header reads, its pixels do not).
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        let body = [kind, data].concat();
        out.extend((data.len() as u32).to_be_bytes());
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    };
    chunk(b"IHDR", &[w.to_be_bytes().as_slice(), &h.to_be_bytes(), &[8, 0, 0, 0, 0]].concat());
    chunk(b"IDAT", &[]);
    chunk(b"IEND", &[]);
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A JPEG of segments: SOI, then each `(marker, body)`, then EOI.
fn jpeg(segments: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    for (marker, body) in segments {
        out.extend([0xFF, *marker]);
        out.extend(((body.len() + 2) as u16).to_be_bytes());
        out.extend(body);
    }
    out.extend([0xFF, 0xD9]);
    out
}

/// A start-of-frame body: precision, height, width, components `(id, sampling, table)`.
fn sof(precision: u8, h: u16, w: u16, comps: &[(u8, u8, u8)]) -> Vec<u8> {
    let mut b = vec![precision];
    b.extend(h.to_be_bytes());
    b.extend(w.to_be_bytes());
    b.push(comps.len() as u8);
    for &(id, s, t) in comps {
        b.extend([id, s, t]);
    }
    b
}

fn dqt() -> Vec<u8> {
    let mut b = vec![0];
    b.extend([1u8; 64]);
    b
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s.as_bytes());
    b
}

/// A GGUF v3 file: `n_tensors`, metadata `(key, type, raw value bytes)`, then `tail` bytes.
fn gguf(n_tensors: u64, kvs: &[(&str, u32, Vec<u8>)], tail: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (key, kind, value) in kvs {
        b.extend(gguf_string(key));
        b.extend(kind.to_le_bytes());
        b.extend(value);
    }
    b.extend(tail);
    b
}

const GGUF_U32: u32 = 4;
const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;

/// `depth` nested GGUF arrays, each holding the next (12 bytes a level).
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(depth * 12 + 12);
    for _ in 0..depth {
        b.extend(GGUF_ARRAY.to_le_bytes());
        b.extend(1u64.to_le_bytes());
    }
    b.extend(GGUF_U32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b
}

/// A safetensors file of one header (JSON) and `data` bytes.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(data);
    b
}

/// The bundled model's config.json (tiny SigLIP + Qwen2) with `edit` applied to its JSON.
fn config_with(base: &str, edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_str(base).unwrap();
    edit(&mut v);
    serde_json::to_vec(&v).unwrap()
}

/// Every case. `config` and `preprocessor` are the tiny SigLIP + Qwen2 model's files (the
/// variants are edits of them, so each case has one fault).
pub fn cases(config: &str, preprocessor: &str) -> Vec<Case> {
    use serde_json::json;
    use Target::*;
    let pre = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(preprocessor).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let thin = png(1, 70_000);
    let mut truncated_png = png(40, 40);
    truncated_png.truncate(60);
    let (y, cb) = (0x11u8, 0x11u8);
    vec![
        // Images.
        case("empty file", Image, vec![], "not a supported image"),
        case("a text file", Image, b"hello, this is not a picture\n".to_vec(), "not a supported image"),
        case("a PDF", Image, b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n".to_vec(), "not a supported image"),
        case("truncated PNG", Image, truncated_png, "corrupt or truncated"),
        case("PNG header claiming 65535 x 65535", Image, png_header(65_535, 65_535), "megapixel limit"),
        case("thin PNG 1 x 70000", Image, thin, "a side over 65536 pixels"),
        case("PNG header of zero width", Image, png_header(0, 10), "zero size"),
        case(
            "12-bit JPEG",
            Image,
            jpeg(&[(0xDB, dqt()), (0xC1, sof(12, 8, 8, &[(1, y, 0), (2, cb, 0), (3, cb, 0)]))]),
            "12-bit JPEG is not supported",
        ),
        case(
            "JPEG of 65535 x 65535",
            Image,
            jpeg(&[(0xC0, sof(8, 65_535, 65_535, &[(1, y, 0), (2, cb, 0), (3, cb, 0)]))]),
            "megapixel limit",
        ),
        case(
            "JPEG with zero height",
            Image,
            jpeg(&[(0xC0, sof(8, 0, 16, &[(1, y, 0), (2, cb, 0), (3, cb, 0)]))]),
            "zero size",
        ),
        case(
            "JPEG with sampling factor 0",
            Image,
            jpeg(&[(0xC0, sof(8, 8, 8, &[(1, 0x00, 0), (2, cb, 0), (3, cb, 0)]))]),
            "sampling factors",
        ),
        case(
            "JPEG with 3:2 chroma sampling",
            Image,
            jpeg(&[(0xC0, sof(8, 8, 8, &[(1, 0x31, 0), (2, 0x21, 0), (3, 0x11, 0)]))]),
            "fractional chroma sampling",
        ),
        case("lossless JPEG", Image, jpeg(&[(0xC3, sof(8, 8, 8, &[(1, y, 0)]))]), "lossless JPEG"),
        case("arithmetic JPEG", Image, jpeg(&[(0xC9, sof(8, 8, 8, &[(1, y, 0)]))]), "arithmetic-coded"),
        case("CMYK JPEG", Image, jpeg(&[(0xC0, sof(8, 8, 8, &[(1, y, 0), (2, y, 0), (3, y, 0), (4, y, 0)]))]), "CMYK"),
        case(
            "JPEG with an over-subscribed Huffman table",
            Image,
            jpeg(&[(0xC0, sof(8, 8, 8, &[(1, y, 0)])), (0xC4, {
                let mut b = vec![0x00, 3];
                b.extend([0u8; 15]);
                b.extend([1, 2, 3]);
                b
            })]),
            "invalid Huffman table",
        ),
        case(
            "JPEG scan before its frame",
            Image,
            jpeg(&[(0xDA, vec![1, 1, 0, 0, 63, 0])]),
            "no frame header before the image data",
        ),
        case(
            "JPEG scan naming a component twice (fuzzer)",
            Image,
            jpeg(&[(0xDB, dqt()), (0xC0, sof(8, 8, 8, &[(1, y, 0), (2, cb, 0), (3, cb, 0)])), (0xDA, vec![2, 1, 0, 1, 0, 0, 63, 0])]),
            "names component 1 twice",
        ),
        case("JPEG without a frame", Image, jpeg(&[(0xDB, dqt())]), "no frame header"),
        case("JPEG frame without a scan", Image, jpeg(&[(0xDB, dqt()), (0xC0, sof(8, 8, 8, &[(1, y, 0)]))]), "no image data"),
        case("GIF garbage", Image, b"GIF89a\x10\x00\x10\x00garbage".to_vec(), "corrupt or truncated"),
        case("WebP without image data", Image, b"RIFF\x24\x00\x00\x00WEBPVP8 ".to_vec(), "corrupt or truncated"),
        // Image processor settings.
        case("shortest_edge 0", Preprocessor, pre(&|v| v["size"] = json!({"shortest_edge": 0})), "must be 1 to 8192"),
        case(
            "a size of a billion pixels",
            Preprocessor,
            pre(&|v| v["size"] = json!({"height": 1_000_000_000u64, "width": 48})),
            "must be 1 to 8192",
        ),
        case(
            "crop_size 0",
            Preprocessor,
            pre(&|v| {
                v["do_center_crop"] = json!(true);
                v["crop_size"] = json!({"height": 0, "width": 0});
            }),
            "must be 1 to 8192",
        ),
        case("bilinear resampling", Preprocessor, pre(&|v| v["resample"] = json!(2)), "only bicubic"),
        case("two image means", Preprocessor, pre(&|v| v["image_mean"] = json!([0.5, 0.5])), "3 numbers"),
        case("not JSON", Preprocessor, b"{ size: 48".to_vec(), "not valid JSON"),
        // Model configs.
        case("config: not JSON", Config, b"{ not json".to_vec(), "not valid JSON"),
        case("config: not an object", Config, b"[1, 2, 3]".to_vec(), "not a JSON object"),
        case(
            "config: unknown model type",
            Config,
            config_with(config, |v| v["model_type"] = json!("idefics3")),
            "unknown model_type 'idefics3'",
        ),
        case(
            "config: unknown text backbone",
            Config,
            config_with(config, |v| v["text_config"]["model_type"] = json!("gemma")),
            "unknown text model_type 'gemma'",
        ),
        case(
            "config: heads do not divide the hidden size",
            Config,
            config_with(config, |v| {
                v["text_config"]["num_attention_heads"] = json!(5);
                v["text_config"]["num_key_value_heads"] = json!(5);
            }),
            "not divisible",
        ),
        case(
            "config: zero layers",
            Config,
            config_with(config, |v| v["text_config"]["num_hidden_layers"] = json!(0)),
            "num_hidden_layers is 0",
        ),
        case(
            "config: RoPE scaling",
            Config,
            config_with(config, |v| v["text_config"]["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0})),
            "RoPE type 'yarn'",
        ),
        case(
            "config: a feature layer past the tower",
            Config,
            config_with(config, |v| v["vision_feature_layer"] = json!(99)),
            "out of range",
        ),
        case(
            "config: KV heads that do not divide the heads",
            Config,
            config_with(config, |v| v["text_config"]["num_key_value_heads"] = json!(3)),
            "not a multiple",
        ),
        case(
            "config: a patch larger than the image",
            Config,
            config_with(config, |v| v["vision_config"]["patch_size"] = json!(1000)),
            "does not fit",
        ),
        case(
            "config: a negative image token",
            Config,
            config_with(config, |v| v["image_token_index"] = json!(-1)),
            "non-negative integer",
        ),
        case(
            "config: a sliding window of 0",
            Config,
            config_with(config, |v| {
                v["text_config"]["use_sliding_window"] = json!(true);
                v["text_config"]["sliding_window"] = json!(0);
            }),
            "sliding_window must be a positive integer",
        ),
        // Chat templates.
        case("template that does not parse", Template, b"{% for m in messages %}{{ m.role }".to_vec(), "does not parse"),
        case(
            "template that never ends",
            Template,
            b"{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}x{% endfor %}{% endfor %}{% endfor %}"
                .to_vec(),
            "budget",
        ),
        case("template with a huge padding", Template, b"{{ '%999999999s'|format('x') }}".to_vec(), "field width"),
        case("template padding after repeated flags (fuzzer)", Template, b"{{ '%----------20000000000044424s'|format('x') }}".to_vec(), "field width"),
        case("template padding after flags mixed with zeros (fuzzer)", Template, b"{{ '%--00--0010001000044428s'|format('x') }}".to_vec(), "field width"),
        case("template with a huge precision", Template, b"{{ '%.99999999f'|format(1.5) }}".to_vec(), "field precision"),
        case("template with a huge indent", Template, b"{{ 'x'|indent(999999999, true) }}".to_vec(), "indent wider"),
        case("template repeating a string", Template, b"{{ 'x' * 200000000 }}".to_vec(), "too large"),
        case(
            "template writing 20 MB",
            Template,
            b"{% for i in range(2000) %}{{ 'y' * 10000 }}{% endfor %}".to_vec(),
            "MiB limit",
        ),
        case("template tag of overlapping marks {%} (fuzzer)", Template, b"{%}{% endif %}".to_vec(), "does not parse"),
        case("template str.format field of non-ASCII (fuzzer)", Template, "{{ '{é}'.format('x') }}".as_bytes().to_vec(), "non-ASCII"),
        case("template |format with a '%*' field and non-ASCII text (fuzzer)", Template, "{{ '%%* é'|format('x') }}".as_bytes().to_vec(), "non-ASCII"),
        case("template that raises", Template, b"{{ raise_exception('no images, please') }}".to_vec(), "no images, please"),
        case("template without the image", Template, b"{{ 'hello' }}".to_vec(), "did not place the image token"),
        // Weight files.
        case(
            "GGUF of arrays nested 200000 deep",
            Weights("model.gguf"),
            gguf(0, &[("general.nested", GGUF_ARRAY, nested_arrays(200_000))], &[]),
            "nested more than",
        ),
        case(
            "GGUF with a 2^60-string array",
            Weights("model.gguf"),
            gguf(0, &[("tokens", GGUF_ARRAY, [GGUF_STRING.to_le_bytes().to_vec(), (1u64 << 60).to_le_bytes().to_vec()].concat())], &[]),
            "truncated",
        ),
        case(
            "GGUF with alignment 0",
            Weights("model.gguf"),
            gguf(0, &[("general.alignment", GGUF_U32, 0u32.to_le_bytes().to_vec())], &[]),
            "power of two",
        ),
        case("GGUF claiming 2^40 tensors", Weights("model.gguf"), gguf(1 << 40, &[], &[]), "implausible GGUF header"),
        case(
            "GGUF tensor with 9 dimensions",
            Weights("model.gguf"),
            gguf(1, &[], &[gguf_string("t"), 9u32.to_le_bytes().to_vec()].concat()),
            "dimensions",
        ),
        case(
            "GGUF tensor of 2^63 F32 values (fuzzer)",
            Weights("model.gguf"),
            gguf(1, &[], &{
                let mut info = gguf_string("t");
                info.extend(2u32.to_le_bytes());
                info.extend((1u64 << 32).to_le_bytes());
                info.extend((1u64 << 31).to_le_bytes());
                info.extend(0u32.to_le_bytes()); // F32
                info.extend(0u64.to_le_bytes());
                info.resize(info.len() + 64, 0);
                info
            }),
            "impossible size",
        ),
        case("GGUF version 7", Weights("model.gguf"), {
            let mut b = gguf(0, &[], &[]);
            b[4] = 7;
            b
        }, "version 7"),
        case("safetensors header of 2^40 bytes", Weights("model.safetensors"), (1u64 << 40).to_le_bytes().to_vec(), "not a safetensors file"),
        case(
            "safetensors with an I64 tensor",
            Weights("model.safetensors"),
            safetensors(r#"{"a":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#, &[0; 16]),
            "dtype I64",
        ),
        case(
            "safetensors shape whose size overflows",
            Weights("model.safetensors"),
            safetensors(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,64]}}"#, &[0; 64]),
            "impossible shape",
        ),
        case(
            "safetensors offsets that disagree with the shape",
            Weights("model.safetensors"),
            safetensors(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#, &[0; 16]),
            "bytes for shape",
        ),
        case(
            "safetensors header that is not JSON",
            Weights("model.safetensors"),
            safetensors("{not json}", &[]),
            "not a valid safetensors header",
        ),
        // Vector files.
        case(
            "vectors with NaN",
            Vectors,
            safetensors(
                r#"{"layer.0":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}}"#,
                &[f32::NAN.to_le_bytes(); 64].concat(),
            ),
            "NaN",
        ),
        case(
            "vectors of another hidden size",
            Vectors,
            safetensors(r#"{"layer.0":{"dtype":"F32","shape":[32],"data_offsets":[0,128]}}"#, &[0; 128]),
            "hidden size",
        ),
        case(
            "vectors for a layer the model lacks",
            Vectors,
            safetensors(r#"{"layer.7":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}}"#, &[0; 256]),
            "layer",
        ),
        case(
            "control vector whose shape overflows",
            Vectors,
            gguf(
                1,
                &[("general.architecture", GGUF_STRING, gguf_string("controlvector"))],
                &[gguf_string("direction.1"), 2u32.to_le_bytes().to_vec(), u64::MAX.to_le_bytes().to_vec(), 4u64.to_le_bytes().to_vec(), 0u32.to_le_bytes().to_vec(), 0u64.to_le_bytes().to_vec()].concat(),
            ),
            "implausible shape",
        ),
        case(
            "control vector of nested arrays",
            Vectors,
            gguf(0, &[("general.nested", GGUF_ARRAY, nested_arrays(100_000))], &[]),
            "nested more than",
        ),
        case("vectors file of random bytes", Vectors, b"\x00\x01\x02\x03 random".to_vec(), "safetensors"),
        // Catalogs.
        case("catalog: not JSON", Catalog, b"<html>captive portal</html>".to_vec(), "not a valid vectors catalog"),
        case("catalog: another format", Catalog, br#"{"format": "something-else/9", "entries": []}"#.to_vec(), "format"),
        case(
            "catalog: an entry without sha256",
            Catalog,
            br#"{"format": "cmrm-catalog/1", "entries": [{"model": "a/b", "revision": "main", "fingerprint": "f",
                 "vectors_url": "v.safetensors", "size": 1, "method": "mean", "anchor": "blank",
                 "calibration": {"name": "c", "size": 1}, "default_alpha": 1.0, "default_layers": "all"}]}"#
                .to_vec(),
            "sha256",
        ),
    ]
}
