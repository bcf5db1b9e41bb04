//! Image decode and preprocessing: bytes → RGB u8 → `pixel_values` `[1, 3, S, S]`.
//!
//! Matches the Hugging Face "slow" (PIL) `CLIPImageProcessor` / `SiglipImageProcessor`:
//! PIL's antialiased bicubic resize on u8 (fixed-point, bit-exact), center crop, rescale in f64
//! then f32, normalize in f32.

pub mod jpeg;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// An RGB image, 8 bits per channel, interleaved (`HWC`).
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` bytes, row-major, RGB interleaved.
    pub data: Vec<u8>,
    /// The colour PIL keeps as `info["transparency"]` after `convert("RGB")` (a PNG's single
    /// transparent palette entry or tRNS colour): the image processor's `convert_rgb` turns those
    /// pixels white.
    pub transparent_color: Option<[u8; 3]>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * 3 {
            bail!("RGB buffer has {} bytes, expected {width}×{height}×3", data.len());
        }
        Ok(Self { width, height, data, transparent_color: None })
    }

    /// A uniform image of one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        let data = rgb.iter().copied().cycle().take(width * height * 3).collect();
        Self { width, height, data, transparent_color: None }
    }
}

/// Largest image, in pixels, that [`decode_image`] accepts. A decoded 10000×10000 RGBA image needs
/// 400 MB, which would not fit beside a model in a browser tab; the page downscales with the
/// browser's own decoder before sending bytes, the CLI asks the user to.
pub const MAX_IMAGE_PIXELS: u64 = 40_000_000;

/// Longest side accepted (no camera or screen comes near it; a 1×10,000,000 strip would make
/// the resampler's coefficient tables, not the pixels, the cost).
pub const MAX_IMAGE_SIDE: u64 = 65_536;

/// Largest size an image processor may ask for (its `size`, `shortest_edge`, `crop_size`).
pub const MAX_PROCESSOR_SIZE: u64 = 8_192;

/// Decode PNG / JPEG / WebP / GIF bytes (any colour mode) into RGB, as transformers'
/// `load_image(path)` makes it: opened with PIL, turned upright (`ImageOps.exif_transpose`),
/// `convert("RGB")`.
///
/// JPEG goes through [`crate::image::jpeg`], which gives libjpeg-turbo's pixels exactly (the `image`
/// crate's decoder rounds differently). Then `convert("RGB")` as `load_image` does it: alpha
/// dropped, grayscale replicated, 16-bit channels reduced to 8 bits. The header is checked
/// before any pixel is decoded, so an oversized image costs no memory.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    use image::ImageReader;
    use std::io::Cursor;
    if crate::image::jpeg::is_jpeg(bytes) {
        let (w, h) =
            crate::image::jpeg::dimensions(bytes).context("cannot read the JPEG header: the file is corrupt")?;
        check_pixel_count(w as u64, h as u64)?;
        let jpeg =
            crate::image::jpeg::decode(bytes).with_context(|| format!("cannot decode the JPEG image ({w}×{h})"))?;
        let data = if jpeg.channels == 1 { jpeg.data.iter().flat_map(|&g| [g, g, g]).collect() } else { jpeg.data };
        let img = RgbImage { width: jpeg.width, height: jpeg.height, data, transparent_color: None };
        return Ok(apply_orientation(img, jpeg.orientation));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        anyhow::anyhow!(
            "not a supported image: the data is not PNG, JPEG, WebP or GIF ({} bytes{})",
            bytes.len(),
            describe_magic(bytes)
        )
    })?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::WebP | image::ImageFormat::Gif) {
        bail!("unsupported image format {format:?}: use PNG, JPEG, WebP or GIF");
    }
    // The size the file declares, checked before any decoder sizes a buffer from it (on wasm32,
    // a decoder's own limit would say "memory limit exceeded" instead).
    if let Some((w, h)) = declared_size(bytes) {
        check_pixel_count(w, h)?;
    }
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let (w, h) = reader
        .into_dimensions()
        .with_context(|| format!("cannot read the {format:?} header: the file is corrupt or truncated"))?;
    check_pixel_count(u64::from(w), u64::from(h))?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8 + (64 << 20));
    reader.limits(limits);
    let corrupt = || format!("cannot decode the {format:?} image ({w}×{h}): the file is corrupt or truncated");
    let mut decoder = reader.into_decoder().with_context(corrupt)?;
    // An unreadable EXIF block leaves the image as stored (PIL ignores it too).
    let orientation = image::ImageDecoder::orientation(&mut decoder)
        .ok()
        .and_then(|o| (1..=8).find(|&v| image::metadata::Orientation::from_exif(v) == Some(o)))
        .unwrap_or(1);
    let decoded = image::DynamicImage::from_decoder(decoder).with_context(corrupt)?;
    let mut rgb = to_rgb(decoded);
    if format == image::ImageFormat::Png {
        rgb.transparent_color = png_transparent_color(bytes);
    }
    Ok(apply_orientation(rgb, orientation))
}

/// Width and height as a PNG's IHDR or a GIF's logical screen declares them.
fn declared_size(bytes: &[u8]) -> Option<(u64, u64)> {
    let be = |at: usize| Some(u64::from(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?)));
    let le16 = |at: usize| Some(u64::from(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?)));
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.get(12..16) == Some(b"IHDR") {
        return Some((be(16)?, be(20)?));
    }
    if bytes.starts_with(b"GIF8") {
        return Some((le16(6)?, le16(8)?));
    }
    None
}

fn check_pixel_count(w: u64, h: u64) -> Result<()> {
    if w.max(h) > MAX_IMAGE_SIDE {
        bail!(
            "image is {w}×{h}: a side over {MAX_IMAGE_SIDE} pixels (an aspect ratio of {:.0}:1); crop or downscale it first",
            w.max(h) as f64 / w.min(h).max(1) as f64
        );
    }
    let pixels = w * h;
    if pixels > MAX_IMAGE_PIXELS {
        bail!(
            "image is {w}×{h} ({:.1} megapixels), over the {} megapixel limit; downscale it first (the model only sees a few hundred pixels per side)",
            pixels as f64 / 1e6,
            MAX_IMAGE_PIXELS / 1_000_000
        );
    }
    if pixels == 0 {
        bail!("image has zero size ({w}×{h})");
    }
    Ok(())
}

/// The colour Pillow records as a PNG's `transparency` and keeps through `convert("RGB")`: the
/// palette colour of the one fully transparent entry (a tRNS of 255s and a single 0; other
/// tables Pillow keeps as bytes and drops on conversion), or an 8-bit image's tRNS colour.
fn png_transparent_color(png: &[u8]) -> Option<[u8; 3]> {
    let mut pos = 8;
    let (mut color_type, mut depth, mut palette) = (None, 0u8, None);
    while pos + 8 <= png.len() {
        let len = u32::from_be_bytes(png[pos..pos + 4].try_into().ok()?) as usize;
        let kind = &png[pos + 4..pos + 8];
        let data = png.get(pos + 8..pos + 8 + len)?;
        match kind {
            b"IHDR" if len >= 10 => (depth, color_type) = (data[8], Some(data[9])),
            b"PLTE" => palette = Some(data),
            b"tRNS" => {
                return match color_type? {
                    3 => {
                        let zeros = data.iter().filter(|&&a| a == 0).count();
                        let simple = zeros == 1 && data.iter().all(|&a| a == 0 || a == 255);
                        let index = data.iter().position(|&a| a == 0).filter(|_| simple)?;
                        let rgb = palette?.get(index * 3..index * 3 + 3)?;
                        Some([rgb[0], rgb[1], rgb[2]])
                    }
                    0 if depth == 8 && data.len() >= 2 => Some([data[1]; 3]).filter(|_| data[0] == 0),
                    2 if depth == 8 && data.len() >= 6 => {
                        Some([data[1], data[3], data[5]]).filter(|_| data[0] == 0 && data[2] == 0 && data[4] == 0)
                    }
                    _ => None,
                };
            }
            b"IDAT" | b"IEND" => return None,
            _ => {}
        }
        pos += 12 + len;
    }
    None
}

/// Turn an image upright by its EXIF orientation (1–8), as PIL's `ImageOps.exif_transpose`:
/// 2 mirror, 3 rotate 180°, 4 flip, 5 transpose, 6 rotate 90° clockwise, 7 transverse,
/// 8 rotate 90° counter-clockwise.
pub fn apply_orientation(img: RgbImage, orientation: u8) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let swaps = orientation >= 5;
    let (out_w, out_h) = if swaps { (h, w) } else { (w, h) };
    // Source pixel of output pixel (x, y).
    let source = |x: usize, y: usize| -> (usize, usize) {
        match orientation {
            2 => (w - 1 - x, y),
            3 => (w - 1 - x, h - 1 - y),
            4 => (x, h - 1 - y),
            5 => (y, x),
            6 => (y, h - 1 - x),
            7 => (w - 1 - y, h - 1 - x),
            8 => (w - 1 - y, x),
            _ => (x, y),
        }
    };
    if !(2..=8).contains(&orientation) {
        return img;
    }
    let mut data = Vec::with_capacity(img.data.len());
    for y in 0..out_h {
        for x in 0..out_w {
            let (sx, sy) = source(x, y);
            data.extend_from_slice(&img.data[(sy * w + sx) * 3..][..3]);
        }
    }
    RgbImage { width: out_w, height: out_h, data, transparent_color: img.transparent_color }
}

fn describe_magic(bytes: &[u8]) -> String {
    let head: String = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
    if head.is_empty() {
        String::new()
    } else {
        format!(", starts with {head}")
    }
}

/// Any decoded image → RGB u8 as PIL's `convert("RGB")` makes it: grayscale replicated, alpha
/// dropped (transformers' `load_image` converts before the image processor sees the image, so
/// its alpha compositing never applies to a file).
///
/// 16-bit samples follow Pillow's PNG modes: RGB / RGBA / LA keep the high byte (`;16B` raw
/// modes), while 16-bit grayscale opens as `I;16`, which `convert` clips to 255.
fn to_rgb(img: image::DynamicImage) -> RgbImage {
    use image::DynamicImage as D;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let high = |v: &u16| (v >> 8) as u8;
    let data = match img {
        D::ImageLuma16(g) => g.as_raw().iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        D::ImageLumaA16(g) => g.as_raw().chunks_exact(2).flat_map(|p| [high(&p[0]); 3]).collect(),
        D::ImageRgb16(c) => c.as_raw().iter().map(high).collect(),
        D::ImageRgba16(c) => c.as_raw().chunks_exact(4).flat_map(|p| [high(&p[0]), high(&p[1]), high(&p[2])]).collect(),
        other => other.into_rgb8().into_raw(),
    };
    RgbImage { width, height, data, transparent_color: None }
}

impl RgbImage {
    /// An RGBA buffer (`width × height × 4`, e.g. a canvas' pixels) without its alpha, as
    /// `convert("RGB")` does.
    pub fn from_rgba(width: usize, height: usize, rgba: &[u8]) -> Result<Self> {
        check_pixel_count(width as u64, height as u64)?;
        let expected = width.checked_mul(height).and_then(|n| n.checked_mul(4));
        if expected != Some(rgba.len()) {
            bail!("RGBA buffer has {} bytes, expected {width}×{height}×4", rgba.len());
        }
        let data = rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
        Ok(Self { width, height, data, transparent_color: None })
    }
}

/// Resize rule of the checkpoint's image processor.
#[derive(Debug, Clone, PartialEq)]
pub enum ResizeRule {
    /// CLIP: short side → `shortest_edge`, long side scaled and truncated to an integer.
    ShortestEdge(usize),
    /// SigLIP: exact size, aspect ratio not kept.
    Exact { width: usize, height: usize },
}

/// `preprocessor_config.json` of a CLIP or SigLIP image processor.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePreprocessor {
    pub resize: Option<ResizeRule>,
    /// `(width, height)` of the center crop, if any.
    pub crop: Option<(usize, usize)>,
    pub rescale_factor: Option<f64>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    /// `do_convert_rgb` (the PIL processors' default `True`; an explicit `null` in the file means
    /// no conversion): for an image that is already RGB it only whitens a PNG's transparent colour.
    pub convert_rgb: bool,
}

impl ImagePreprocessor {
    /// Parse a `preprocessor_config.json` (or the `image_processor` object of a
    /// `processor_config.json`).
    pub fn from_value(v: &Value) -> Result<Self> {
        let resample = v.get("resample").and_then(Value::as_u64).unwrap_or(3);
        if resample != 3 {
            bail!("resample = {resample}: only bicubic (3) resizing is implemented");
        }
        let flag = |key: &str, default: bool| v.get(key).and_then(Value::as_bool).unwrap_or(default);
        let size = v.get("size");
        let in_range = |what: &str, v: u64| -> Result<usize> {
            if v == 0 || v > MAX_PROCESSOR_SIZE {
                bail!("{what} = {v}: an image size must be 1 to {MAX_PROCESSOR_SIZE} pixels");
            }
            Ok(v as usize)
        };
        let resize = if flag("do_resize", true) {
            let size = size.context("image processor has do_resize but no size")?;
            Some(if let Some(edge) = size.get("shortest_edge").and_then(Value::as_u64) {
                ResizeRule::ShortestEdge(in_range("size.shortest_edge", edge)?)
            } else {
                let width =
                    size.get("width").and_then(Value::as_u64).context("size needs shortest_edge or height+width")?;
                let height =
                    size.get("height").and_then(Value::as_u64).context("size needs shortest_edge or height+width")?;
                ResizeRule::Exact { width: in_range("size.width", width)?, height: in_range("size.height", height)? }
            })
        } else {
            None
        };
        let crop = if flag("do_center_crop", false) {
            let c = v.get("crop_size").context("do_center_crop without crop_size")?;
            let (w, h) = match c {
                Value::Number(n) => (n.as_u64().unwrap_or(0), n.as_u64().unwrap_or(0)),
                _ => (
                    c.get("width").and_then(Value::as_u64).unwrap_or(0),
                    c.get("height").and_then(Value::as_u64).unwrap_or(0),
                ),
            };
            Some((in_range("crop_size.width", w)?, in_range("crop_size.height", h)?))
        } else {
            None
        };
        let triple = |key: &str| -> Result<Option<[f32; 3]>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => {
                    let x = n.as_f64().unwrap_or(0.0) as f32;
                    Ok(Some([x; 3]))
                }
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x.as_f64().with_context(|| format!("{key} must hold numbers"))? as f32;
                    }
                    Ok(Some(out))
                }
                Some(other) => bail!("{key} must be a number or 3 numbers, got {other}"),
            }
        };
        let normalize = flag("do_normalize", true);
        let this = Self {
            resize,
            crop,
            rescale_factor: if flag("do_rescale", true) {
                Some(v.get("rescale_factor").and_then(Value::as_f64).unwrap_or(1.0 / 255.0))
            } else {
                None
            },
            mean: if normalize { triple("image_mean")? } else { None },
            std: if normalize { triple("image_std")? } else { None },
            convert_rgb: match v.get("do_convert_rgb") {
                None => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => false,
            },
        };
        if normalize && (this.mean.is_none() || this.std.is_none()) {
            bail!("do_normalize needs image_mean and image_std");
        }
        Ok(this)
    }

    /// The side of the square the vision tower receives, if the config determines it.
    pub fn output_size(&self) -> Option<(usize, usize)> {
        match (&self.crop, &self.resize) {
            (Some(c), _) => Some(*c),
            (None, Some(ResizeRule::Exact { width, height })) => Some((*width, *height)),
            _ => None,
        }
    }

    /// Resize and crop, in u8: the image the model sees before normalisation. Only the pixels
    /// that survive the center crop are computed (each exactly as PIL computes it), so a thin
    /// image whose shortest-edge resize would be gigapixels costs the crop's size.
    pub fn resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        let (out_w, out_h) = match &self.resize {
            None => (img.width, img.height),
            Some(ResizeRule::Exact { width, height }) => (*width, *height),
            Some(ResizeRule::ShortestEdge(edge)) => shortest_edge_size(img.width, img.height, *edge),
        };
        let (cw, ch) = self.crop.unwrap_or((out_w, out_h));
        // transformers' center_crop: offsets (w - cw) // 2, zero padding where the image is smaller.
        let left = (out_w as i64 - cw as i64).div_euclid(2);
        let top = (out_h as i64 - ch as i64).div_euclid(2);
        let visible = |offset: i64, len: usize, size: usize| {
            offset.clamp(0, size as i64) as usize..(offset + len as i64).clamp(0, size as i64) as usize
        };
        let (cols, rows) = (visible(left, cw, out_w), visible(top, ch, out_h));
        let window = if self.resize.is_none() {
            RgbImage {
                width: cols.len(),
                height: rows.len(),
                data: rows
                    .clone()
                    .flat_map(|y| img.data[(y * img.width + cols.start) * 3..][..cols.len() * 3].to_vec())
                    .collect(),
                transparent_color: None,
            }
        } else {
            resize_bicubic_window(img, (out_w, out_h), cols.clone(), rows.clone())
        };
        if (window.width, window.height) == (cw, ch) {
            return window;
        }
        let mut data = vec![0u8; cw * ch * 3];
        let (dx, dy) = ((cols.start as i64 - left) as usize, (rows.start as i64 - top) as usize);
        for y in 0..window.height {
            let dst = ((y + dy) * cw + dx) * 3;
            data[dst..dst + window.width * 3].copy_from_slice(&window.data[y * window.width * 3..][..window.width * 3]);
        }
        RgbImage { width: cw, height: ch, data, transparent_color: None }
    }

    /// Full preprocessing: `[3, S, S]` f32 CHW (the caller adds the batch dim).
    pub fn preprocess(&self, img: &RgbImage) -> (RgbImage, Vec<f32>) {
        let resized = self.resize_and_crop(&self.convert_rgb(img));
        let pixels = self.normalize(&resized);
        (resized, pixels)
    }

    /// `convert_to_rgb` on an image that is already RGB: a PNG's transparent colour (RGB +
    /// transparency → RGBA with alpha 0 there) composited over white.
    pub fn convert_rgb<'a>(&self, img: &'a RgbImage) -> std::borrow::Cow<'a, RgbImage> {
        match img.transparent_color.filter(|_| self.convert_rgb) {
            Some(color) => {
                let mut copy = img.clone();
                for px in copy.data.chunks_exact_mut(3) {
                    if px == color {
                        px.copy_from_slice(&[255; 3]);
                    }
                }
                copy.transparent_color = None;
                std::borrow::Cow::Owned(copy)
            }
            None => std::borrow::Cow::Borrowed(img),
        }
    }

    /// The normalisation mean as bytes, `int(mean · 255)` per channel (OneVision's padding
    /// colour); black without normalisation.
    pub fn mean_u8(&self) -> [u8; 3] {
        self.mean.map_or([0; 3], |m| m.map(|x| (f64::from(x) * 255.0) as u8))
    }

    /// The `(width, height)` an anyres image's base tile is resized to: `size` as a square of
    /// `shortest_edge`, or `height` × `width` (LLaVA-NeXT's `size_tuple`).
    pub fn base_tile_size(&self) -> Option<(usize, usize)> {
        match &self.resize {
            Some(ResizeRule::ShortestEdge(edge)) => Some((*edge, *edge)),
            Some(ResizeRule::Exact { width, height }) => Some((*width, *height)),
            None => None,
        }
    }

    /// Rescale (f64 product cast to f32, as numpy does) and normalize (f32), HWC u8 → CHW f32.
    pub fn normalize(&self, img: &RgbImage) -> Vec<f32> {
        let plane = img.width * img.height;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut x = match self.rescale_factor {
                    Some(f) => (f64::from(px[c]) * f) as f32,
                    None => f32::from(px[c]),
                };
                if let (Some(mean), Some(std)) = (self.mean, self.std) {
                    x = (x - mean[c]) / std[c];
                }
                out[c * plane + i] = x;
            }
        }
        out
    }
}

/// CLIP's `get_resize_output_image_size` with `default_to_square=False`.
pub fn shortest_edge_size(width: usize, height: usize, edge: usize) -> (usize, usize) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let new_long = ((edge * long) as f64 / short as f64) as usize;
    if width <= height {
        (edge, new_long)
    } else {
        (new_long, edge)
    }
}

/// PIL's bicubic kernel (a = −0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point fraction bits of PIL's 8-bit resampler.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index and integer weights (PIL `precompute_coeffs` +
/// `normalize_coeffs_8bpc`).
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    weights: Vec<Vec<i32>>,
}

/// `outputs`: the output indices wanted (each computed as if all were).
fn precompute_coeffs(in_size: usize, out_size: usize, outputs: std::ops::Range<usize>) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let mut bounds = Vec::with_capacity(outputs.len());
    let mut weights = Vec::with_capacity(outputs.len());
    for xx in outputs {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..n).map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            for w in &mut k {
                *w /= ww;
            }
        }
        let one = f64::from(1u32 << PRECISION_BITS);
        let ints = k.iter().map(|&w| if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 }).collect();
        bounds.push((xmin, n));
        weights.push(ints);
    }
    Coeffs { bounds, weights }
}

fn clip8(v: i32) -> u8 {
    let shifted = v >> PRECISION_BITS;
    shifted.clamp(0, 255) as u8
}

/// PIL `Image.resize((w, h), Image.BICUBIC)` on an RGB u8 image, bit-exact: two separable passes
/// in 22-bit fixed point. Pillow 13 runs the vertical pass first when it removes more rows than
/// twice the columns the horizontal pass removes (`in_h - out_h > 2·(in_w - out_w)`), else the
/// horizontal one; the order changes the rounding of the intermediate image, so it is kept.
/// The first pass computes only the rows (or columns) the second one reads.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    resize_bicubic_window(img, (out_w, out_h), 0..out_w, 0..out_h)
}

/// The `cols × rows` window of [`resize_bicubic`]`(img, out_w, out_h)`, computed alone (the pass
/// order is the full resize's).
pub fn resize_bicubic_window(
    img: &RgbImage,
    (out_w, out_h): (usize, usize),
    cols: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
) -> RgbImage {
    let (w, h) = (img.width, img.height);
    if (w, h) == (out_w, out_h) && (cols.len(), rows.len()) == (w, h) {
        return img.clone();
    }
    let horiz = precompute_coeffs(w, out_w, cols.clone());
    let vert = precompute_coeffs(h, out_h, rows.clone());
    let removed_rows = h as i64 - out_h as i64;
    let removed_cols = w as i64 - out_w as i64;
    let vertical_first = removed_rows > 0 && removed_rows > 2 * removed_cols;
    if out_w == w {
        return resample_vertical(&img.data, w, &vert, 0, cols);
    }
    if out_h == h {
        return resample_horizontal(&img.data, w, &horiz, rows);
    }
    if vertical_first {
        let in_cols = horiz.span();
        let tmp = resample_vertical(&img.data, w, &vert, 0, in_cols.clone());
        let shifted = horiz.shifted(in_cols.start);
        resample_horizontal(&tmp.data, tmp.width, &shifted, 0..rows.len())
    } else {
        let in_rows = vert.span();
        let tmp = resample_horizontal(&img.data, w, &horiz, in_rows.clone());
        resample_vertical(&tmp.data, cols.len(), &vert, in_rows.start, 0..cols.len())
    }
}

impl Coeffs {
    /// The input indices any output reads: `[first, last)`.
    fn span(&self) -> std::ops::Range<usize> {
        let first = self.bounds.first().map_or(0, |b| b.0);
        let last = self.bounds.last().map_or(0, |b| b.0 + b.1);
        first..last
    }

    fn shifted(&self, offset: usize) -> Coeffs {
        Coeffs { bounds: self.bounds.iter().map(|&(s, n)| (s - offset, n)).collect(), weights: self.weights.clone() }
    }
}

/// Horizontal pass over `rows` of `src` (`src_w` pixels wide): one output column per coefficient.
fn resample_horizontal(src: &[u8], src_w: usize, coeffs: &Coeffs, rows: std::ops::Range<usize>) -> RgbImage {
    let out_w = coeffs.bounds.len();
    let mut out = Vec::with_capacity(rows.len() * out_w * 3);
    for in_y in rows.clone() {
        for ((xmin, n), k) in coeffs.bounds.iter().zip(&coeffs.weights) {
            out.extend(weighted_sum(src, (in_y * src_w + xmin) * 3, 3, &k[..*n]));
        }
    }
    RgbImage { width: out_w, height: rows.len(), data: out, transparent_color: None }
}

/// Vertical pass over columns `cols` of `src` (`src_w` wide, its first row being input row
/// `row_offset`): one output row per coefficient.
fn resample_vertical(
    src: &[u8],
    src_w: usize,
    coeffs: &Coeffs,
    row_offset: usize,
    cols: std::ops::Range<usize>,
) -> RgbImage {
    let (out_w, out_h) = (cols.len(), coeffs.bounds.len());
    let mut out = Vec::with_capacity(out_h * out_w * 3);
    for ((ymin, n), k) in coeffs.bounds.iter().zip(&coeffs.weights) {
        for in_x in cols.clone() {
            out.extend(weighted_sum(src, ((ymin - row_offset) * src_w + in_x) * 3, src_w * 3, &k[..*n]));
        }
    }
    RgbImage { width: out_w, height: out_h, data: out, transparent_color: None }
}

/// One output pixel of a pass: the weighted sum of the RGB pixels at `start`, `start + stride`, …
/// (PIL's 8-bit accumulation: wrapping i32, rounding bias, clip).
fn weighted_sum(src: &[u8], start: usize, stride: usize, weights: &[i32]) -> [u8; 3] {
    let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
    for (i, &weight) in weights.iter().enumerate() {
        let p = &src[start + i * stride..][..3];
        for c in 0..3 {
            ss[c] = ss[c].wrapping_add(i32::from(p[c]).wrapping_mul(weight));
        }
    }
    ss.map(clip8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_truncates() {
        assert_eq!(shortest_edge_size(100, 60, 56), (93, 56));
        assert_eq!(shortest_edge_size(30, 45, 56), (56, 84));
    }

    #[test]
    fn resize_of_uniform_image_is_uniform() {
        let img = RgbImage::filled(37, 23, [10, 128, 250]);
        let r = resize_bicubic(&img, 11, 50);
        assert!(r.data.chunks(3).all(|p| p == [10, 128, 250]));
    }
}
