//! Image decode and preprocessing: bytes → RGB u8 → `pixel_values` `[1, 3, S, S]`.
//!
//! Matches the Hugging Face "slow" (PIL) `CLIPImageProcessor` / `SiglipImageProcessor`:
//! PIL's antialiased bicubic resize on u8 (fixed-point, bit-exact), center crop, rescale in f64
//! then f32, normalize in f32.

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// An RGB image, 8 bits per channel, interleaved (`HWC`).
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` bytes, row-major, RGB interleaved.
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * 3 {
            bail!("RGB buffer has {} bytes, expected {width}×{height}×3", data.len());
        }
        Ok(Self { width, height, data })
    }

    /// A uniform image of one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        let data = rgb.iter().copied().cycle().take(width * height * 3).collect();
        Self { width, height, data }
    }
}

/// Largest image, in pixels, that [`decode_image`] accepts. A decoded 10000×10000 RGBA image needs
/// 400 MB, which would not fit beside a model in a browser tab; the page downscales with the
/// browser's own decoder before sending bytes, the CLI asks the user to.
pub const MAX_IMAGE_PIXELS: u64 = 40_000_000;

/// Decode PNG / JPEG / WebP / GIF bytes (any colour mode) into RGB.
///
/// Transparent images are composited onto white (as transformers 5's `convert_rgb` does with PIL's
/// `alpha_composite`); grayscale is replicated to RGB; 16-bit channels are reduced to 8 bits.
/// The header is checked before any pixel is decoded, so an oversized image costs no memory.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    use image::ImageReader;
    use std::io::Cursor;
    let format = image::guess_format(bytes).map_err(|_| {
        anyhow::anyhow!(
            "not a supported image: the data is not PNG, JPEG, WebP or GIF ({} bytes{})",
            bytes.len(),
            describe_magic(bytes)
        )
    })?;
    if !matches!(
        format,
        image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP | image::ImageFormat::Gif
    ) {
        bail!("unsupported image format {format:?}: use PNG, JPEG, WebP or GIF");
    }
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let (w, h) = reader
        .into_dimensions()
        .with_context(|| format!("cannot read the {format:?} header: the file is corrupt or truncated"))?;
    let pixels = u64::from(w) * u64::from(h);
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
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8 + (64 << 20));
    reader.limits(limits);
    let decoded = reader
        .decode()
        .with_context(|| format!("cannot decode the {format:?} image ({w}×{h}): the file is corrupt or truncated"))?;
    Ok(to_rgb(decoded))
}

fn describe_magic(bytes: &[u8]) -> String {
    let head: String = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
    if head.is_empty() {
        String::new()
    } else {
        format!(", starts with {head}")
    }
}

/// Any decoded image → RGB u8, alpha composited onto white.
fn to_rgb(img: image::DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    if !img.color().has_alpha() {
        return RgbImage { width, height, data: img.into_rgb8().into_raw() };
    }
    let rgba = img.into_rgba8();
    let mut data = Vec::with_capacity(width * height * 3);
    for px in rgba.pixels() {
        let [r, g, b, a] = px.0;
        for c in [r, g, b] {
            data.push(composite_over_white(c, a));
        }
    }
    RgbImage { width, height, data }
}

/// PIL `Image.alpha_composite(white, src)` for one channel (libImaging/AlphaComposite.c, with an
/// opaque white destination): fixed point with 7 fractional bits and a rounded division by 255.
fn composite_over_white(src: u8, alpha: u8) -> u8 {
    if alpha == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    let a = u32::from(alpha);
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = u32::from(src) * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS) as u8
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
        let resize = if flag("do_resize", true) {
            let size = size.context("image processor has do_resize but no size")?;
            Some(if let Some(edge) = size.get("shortest_edge").and_then(Value::as_u64) {
                ResizeRule::ShortestEdge(edge as usize)
            } else {
                let width =
                    size.get("width").and_then(Value::as_u64).context("size needs shortest_edge or height+width")?;
                let height =
                    size.get("height").and_then(Value::as_u64).context("size needs shortest_edge or height+width")?;
                ResizeRule::Exact { width: width as usize, height: height as usize }
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
            if w == 0 || h == 0 {
                bail!("invalid crop_size {c}");
            }
            Some((w as usize, h as usize))
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

    /// Resize and crop, in u8: the image the model sees before normalisation.
    pub fn resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        let resized = match &self.resize {
            None => img.clone(),
            Some(ResizeRule::Exact { width, height }) => resize_bicubic(img, *width, *height),
            Some(ResizeRule::ShortestEdge(edge)) => {
                let (w, h) = shortest_edge_size(img.width, img.height, *edge);
                resize_bicubic(img, w, h)
            }
        };
        match self.crop {
            Some((cw, ch)) => center_crop(&resized, cw, ch),
            None => resized,
        }
    }

    /// Full preprocessing: `[3, S, S]` f32 CHW (the caller adds the batch dim).
    pub fn preprocess(&self, img: &RgbImage) -> (RgbImage, Vec<f32>) {
        let resized = self.resize_and_crop(img);
        let pixels = self.normalize(&resized);
        (resized, pixels)
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

/// transformers' `center_crop`: offsets `(w - cw) // 2`, zero padding where the image is smaller.
pub fn center_crop(img: &RgbImage, cw: usize, ch: usize) -> RgbImage {
    if img.width == cw && img.height == ch {
        return img.clone();
    }
    let left = (img.width as i64 - cw as i64).div_euclid(2);
    let top = (img.height as i64 - ch as i64).div_euclid(2);
    let mut data = vec![0u8; cw * ch * 3];
    for y in 0..ch {
        let sy = y as i64 + top;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..cw {
            let sx = x as i64 + left;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let src = (sy as usize * img.width + sx as usize) * 3;
            data[(y * cw + x) * 3..][..3].copy_from_slice(&img.data[src..src + 3]);
        }
    }
    RgbImage { width: cw, height: ch, data }
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

fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
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

/// PIL `Image.resize((w, h), Image.BICUBIC)` on an RGB u8 image, bit-exact: a horizontal pass
/// over the needed rows, then a vertical pass, each in 22-bit fixed point.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    if img.width == out_w && img.height == out_h {
        return img.clone();
    }
    let horiz = precompute_coeffs(img.width, out_w);
    let vert = precompute_coeffs(img.height, out_h);
    let need_h = out_w != img.width;
    let need_v = out_h != img.height;

    let (mut src, mut src_w) = (std::borrow::Cow::Borrowed(&img.data), img.width);
    let mut row_offset = 0usize;
    if need_h {
        // Only the rows that the vertical pass reads.
        let first = vert.bounds[0].0;
        let last = vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1;
        let (first, last) = if need_v { (first, last) } else { (0, img.height) };
        let rows = last - first;
        let mut tmp = vec![0u8; rows * out_w * 3];
        for y in 0..rows {
            let in_row = &img.data[(y + first) * img.width * 3..][..img.width * 3];
            for (xx, ((xmin, n), k)) in horiz.bounds.iter().zip(&horiz.weights).enumerate() {
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for x in 0..*n {
                    let p = &in_row[(xmin + x) * 3..][..3];
                    for c in 0..3 {
                        ss[c] = ss[c].wrapping_add(i32::from(p[c]).wrapping_mul(k[x]));
                    }
                }
                let out = &mut tmp[(y * out_w + xx) * 3..][..3];
                for c in 0..3 {
                    out[c] = clip8(ss[c]);
                }
            }
        }
        src = std::borrow::Cow::Owned(tmp);
        src_w = out_w;
        row_offset = first;
    }
    if !need_v {
        return RgbImage { width: out_w, height: out_h, data: src.into_owned() };
    }
    let mut out = vec![0u8; out_h * out_w * 3];
    for (yy, ((ymin, n), k)) in vert.bounds.iter().zip(&vert.weights).enumerate() {
        let ymin = ymin - row_offset;
        for xx in 0..src_w {
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for y in 0..*n {
                let p = &src[((ymin + y) * src_w + xx) * 3..][..3];
                for c in 0..3 {
                    ss[c] = ss[c].wrapping_add(i32::from(p[c]).wrapping_mul(k[y]));
                }
            }
            let o = &mut out[(yy * src_w + xx) * 3..][..3];
            for c in 0..3 {
                o[c] = clip8(ss[c]);
            }
        }
    }
    RgbImage { width: out_w, height: out_h, data: out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_matches_pil_endpoints() {
        assert_eq!(composite_over_white(0, 255), 0);
        assert_eq!(composite_over_white(200, 255), 200);
        assert_eq!(composite_over_white(0, 0), 255);
        // Half-transparent black over white is mid grey.
        let g = composite_over_white(0, 128);
        assert!((126..=128).contains(&g), "{g}");
    }

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
