//! The "anyres" image path shared by LLaVA-NeXT and LLaVA-OneVision.
//!
//! An image is fitted into the best of a list of resolutions (`image_grid_pinpoints`, multiples of
//! the vision tower's input size), padded to it and cut into tiles the tower can read; a copy of
//! the whole image resized to one tile (the *base* tile) goes first. After the tower and the
//! projector, the grid tiles' features are put back in their places as one feature map, the
//! padding the fit added is cut off again, each row of the map ends with the learned
//! `image_newline`, and (OneVision's `anyres_max_N`) a map larger than N tiles is shrunk
//! bilinearly. The rows merged into the prompt are the base tile's features, then the map's.
//!
//! Sizes are `(height, width)`, as transformers writes them. The arithmetic (float rounding,
//! integer division) follows `image_processing_utils.select_best_resolution`,
//! `get_patch_output_size`, `modeling_llava_next.unpad_image` and
//! `LlavaOnevisionModel.pack_image_features` exactly: the number of image tokens in the prompt
//! depends on it.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::image::{resize_bicubic_window, RgbImage};

/// The anyres settings of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Anyres {
    /// `image_grid_pinpoints`: the resolutions `(height, width)` an image may be fitted into.
    pub grid_pinpoints: Vec<(usize, usize)>,
    /// OneVision's `vision_aspect_ratio = "anyres_max_N"`: a feature map over about N tiles'
    /// worth of features is shrunk to that size; `None` (LLaVA-NeXT) keeps every feature.
    pub max_tiles: Option<usize>,
    /// OneVision: only an image alone in its prompt is tiled; among several, each is one tile
    /// (padded to a square) followed by one newline.
    pub single_images_only: bool,
}

/// Where an image's tiles come from: the resolution it is fitted into and the grid of tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileGrid {
    /// The image's own `(height, width)`.
    pub image: (usize, usize),
    /// The chosen pinpoint `(height, width)`.
    pub resolution: (usize, usize),
    /// The image resized into `resolution` keeping its aspect ratio, before padding.
    pub resized: (usize, usize),
    /// Tiles per column and per row.
    pub rows: usize,
    pub cols: usize,
}

impl Anyres {
    /// Parse `image_grid_pinpoints` (`[[h, w], …]`) and `vision_aspect_ratio` against the tile
    /// side `tile` (the vision tower's `image_size`).
    pub fn from_config(pinpoints: &serde_json::Value, aspect: Option<&str>, tile: usize) -> Result<Self> {
        let list = pinpoints.as_array().filter(|l| !l.is_empty());
        let Some(list) = list else { bail!("image_grid_pinpoints must be a non-empty list of [height, width] pairs") };
        let mut grid_pinpoints = Vec::with_capacity(list.len());
        for pair in list {
            let hw = pair.as_array().filter(|p| p.len() == 2).and_then(|p| Some((p[0].as_u64()?, p[1].as_u64()?)));
            let Some((h, w)) = hw else { bail!("image_grid_pinpoints entry {pair} is not a [height, width] pair") };
            let (h, w) = (h as usize, w as usize);
            if h == 0 || w == 0 || h % tile != 0 || w % tile != 0 {
                bail!(
                    "image_grid_pinpoints entry [{h}, {w}] is not a multiple of the vision tower's {tile}-pixel input"
                );
            }
            // 64 tiles per side at most: llava-hf's largest grids are 6×6.
            if h / tile > 64 || w / tile > 64 {
                bail!("image_grid_pinpoints entry [{h}, {w}] is over 64 tiles on a side");
            }
            grid_pinpoints.push((h, w));
        }
        let max_tiles = match aspect {
            None | Some("anyres") => None,
            Some(a) => match a.strip_prefix("anyres_max_").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n > 0 => Some(n),
                _ => bail!("vision_aspect_ratio '{a}' is not supported (anyres or anyres_max_N)"),
            },
        };
        Ok(Self { grid_pinpoints, max_tiles, single_images_only: false })
    }

    /// Whether an image that is one of `among` in its prompt is tiled (OneVision tiles only an
    /// image alone; the others are one padded tile and one newline).
    pub fn tiles_among(&self, among: usize) -> bool {
        !(self.single_images_only && among > 1)
    }

    /// The pinpoint an image of `(height, width)` is fitted into (transformers'
    /// `select_best_resolution`): the most of the image's pixels kept, then the least padding;
    /// the first such pinpoint wins a tie.
    pub fn best_resolution(&self, (height, width): (usize, usize)) -> (usize, usize) {
        let (oh, ow) = (height as f64, width as f64);
        let mut best = self.grid_pinpoints[0];
        let (mut max_effective, mut min_wasted) = (0i64, i64::MAX);
        for &(h, w) in &self.grid_pinpoints {
            let scale = (w as f64 / ow).min(h as f64 / oh);
            let (dw, dh) = ((ow * scale) as i64, (oh * scale) as i64);
            let effective = (dw * dh).min(width as i64 * height as i64);
            let wasted = (w * h) as i64 - effective;
            if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
                (max_effective, min_wasted, best) = (effective, wasted, (h, w));
            }
        }
        best
    }

    /// The grid an image of `(height, width)` is cut into, with `tile`-pixel tiles.
    pub fn grid(&self, image: (usize, usize), tile: usize) -> TileGrid {
        let resolution = self.best_resolution(image);
        TileGrid {
            image,
            resolution,
            resized: fitted_size(image, resolution),
            rows: resolution.0 / tile,
            cols: resolution.1 / tile,
        }
    }

    /// Rows the packed features of an image have: the base tile's `base_tokens`, then the
    /// feature map (`side` features per tile side) unpadded, shrunk if over `max_tiles`, with a
    /// newline ending each row. The processor expands the image placeholder to this many tokens.
    pub fn image_tokens(&self, image: (usize, usize), tile: usize, side: usize, base_tokens: usize) -> usize {
        let grid = self.grid(image, tile);
        let (h, w) = self.map_size(&grid, side);
        base_tokens + h * (w + 1)
    }

    /// The feature map's `(height, width)` after unpadding and the `anyres_max_N` shrink.
    fn map_size(&self, grid: &TileGrid, side: usize) -> (usize, usize) {
        let (h, w) = unpadded_size((grid.rows * side, grid.cols * side), grid.image).1;
        match self.shrink_ratio((h, w), side) {
            Some(ratio) => ((h as f64 / ratio).floor() as usize, (w as f64 / ratio).floor() as usize),
            None => (h, w),
        }
    }

    /// OneVision: `sqrt(h·w / (N·side²))` when it is over 1.1, i.e. when the map is to shrink.
    fn shrink_ratio(&self, (h, w): (usize, usize), side: usize) -> Option<f64> {
        let n = self.max_tiles?;
        let ratio = ((h * w) as f64 / (n * side * side) as f64).sqrt();
        (ratio > 1.1).then_some(ratio)
    }

    /// Pack one image's projected tile features `[1 + rows·cols, side², H]` (base tile first,
    /// then the grid row-major) into the `[N, H]` rows merged into the prompt. `newline`: `[H]`.
    pub fn pack(&self, tile_features: &Tensor, grid: &TileGrid, newline: &Tensor) -> Result<Tensor> {
        let (n_tiles, per_tile, hidden) = tile_features.dims3()?;
        let side = (per_tile as f64).sqrt() as usize;
        if side * side != per_tile || n_tiles != 1 + grid.rows * grid.cols {
            bail!(
                "{n_tiles} tiles of {per_tile} features do not make a base tile and a {}×{} grid of square tiles",
                grid.rows,
                grid.cols
            );
        }
        let base = tile_features.get(0)?;
        // [rows, cols, side, side, H] → [H, rows, side, cols, side] → [H, rows·side, cols·side]
        let map = tile_features
            .narrow(0, 1, n_tiles - 1)?
            .reshape((grid.rows, grid.cols, side, side, hidden))?
            .permute((4, 0, 2, 1, 3))?
            .contiguous()?
            .reshape((hidden, grid.rows * side, grid.cols * side))?;
        let ((top, left), (h, w)) = unpadded_size((grid.rows * side, grid.cols * side), grid.image);
        let mut map = map.narrow(1, top, h)?.narrow(2, left, w)?.contiguous()?;
        if let Some(ratio) = self.shrink_ratio((h, w), side) {
            let out = ((h as f64 / ratio).floor() as usize, (w as f64 / ratio).floor() as usize);
            map = resize_bilinear(&map, out)?;
        }
        let (_, h, w) = map.dims3()?;
        let newlines = newline.reshape((hidden, 1, 1))?.broadcast_as((hidden, h, 1))?;
        let map = Tensor::cat(&[&map, &newlines.contiguous()?], 2)?;
        let rows = map.reshape((hidden, h * (w + 1)))?.t()?;
        Ok(Tensor::cat(&[&base, &rows], 0)?)
    }
}

/// OneVision's `pad_to_square`: the image centred on a square of its longer side filled with
/// `color` (the processor's mean, as bytes).
pub fn pad_to_square(img: &RgbImage, color: [u8; 3]) -> RgbImage {
    let side = img.width.max(img.height);
    if img.width == img.height {
        return img.clone();
    }
    let mut data: Vec<u8> = color.iter().copied().cycle().take(side * side * 3).collect();
    let (top, left) = ((side - img.height) / 2, (side - img.width) / 2);
    for y in 0..img.height {
        let dst = ((y + top) * side + left) * 3;
        data[dst..dst + img.width * 3].copy_from_slice(&img.data[y * img.width * 3..][..img.width * 3]);
    }
    RgbImage { width: side, height: side, data, transparent_color: None }
}

/// The image resized to fit `target` keeping its aspect ratio (transformers'
/// `get_patch_output_size`): the side that limits the scale is the target's, the other rounded up.
pub fn fitted_size((height, width): (usize, usize), (th, tw): (usize, usize)) -> (usize, usize) {
    let scale_w = tw as f64 / width as f64;
    let scale_h = th as f64 / height as f64;
    if scale_w < scale_h {
        (((height as f64 * scale_w).ceil() as usize).min(th), tw)
    } else {
        (th, ((width as f64 * scale_h).ceil() as usize).min(tw))
    }
}

/// Where the image lies in a `current` feature map once the fit's padding is cut off
/// (`unpad_image`): `((top, left), (height, width))`. Python's `round(x, 7)` then `int()` is
/// reproduced by formatting to 7 decimals.
fn unpadded_size((ch, cw): (usize, usize), (oh, ow): (usize, usize)) -> ((usize, usize), (usize, usize)) {
    let round7 = |x: f64| format!("{x:.7}").parse::<f64>().unwrap_or(x) as usize;
    if ow as f64 / oh as f64 > cw as f64 / ch as f64 {
        let new_h = round7(oh as f64 * (cw as f64 / ow as f64)).min(ch);
        let pad = (ch - new_h) / 2;
        ((pad, 0), (ch - 2 * pad, cw))
    } else {
        let new_w = round7(ow as f64 * (ch as f64 / oh as f64)).min(cw);
        let pad = (cw - new_w) / 2;
        ((0, pad), (ch, cw - 2 * pad))
    }
}

/// The grid's tiles in u8 (`tile`×`tile`, row-major): the image resized into the pinpoint
/// (PIL bicubic) and centred on zeros. Each tile is computed as a window of the resize, so the
/// whole pinpoint-sized image is never held.
pub fn grid_tiles(img: &RgbImage, grid: &TileGrid, tile: usize) -> Vec<RgbImage> {
    let (rh, rw) = grid.resized;
    let (top, left) = ((grid.resolution.0 - rh) / 2, (grid.resolution.1 - rw) / 2);
    let mut tiles = Vec::with_capacity(grid.rows * grid.cols);
    for r in 0..grid.rows {
        for c in 0..grid.cols {
            // This tile's span in the resized image's coordinates, clipped to it.
            let span = |start: usize, pad: usize, len: usize| {
                let lo = start.saturating_sub(pad).min(len);
                let hi = (start + tile).saturating_sub(pad).min(len);
                lo..hi.max(lo)
            };
            let rows = span(r * tile, top, rh);
            let cols = span(c * tile, left, rw);
            let mut data = vec![0u8; tile * tile * 3];
            if !rows.is_empty() && !cols.is_empty() {
                let window = resize_bicubic_window(img, (rw, rh), cols.clone(), rows.clone());
                let (dy, dx) = (rows.start + top - r * tile, cols.start + left - c * tile);
                for y in 0..window.height {
                    let dst = ((y + dy) * tile + dx) * 3;
                    data[dst..dst + window.width * 3]
                        .copy_from_slice(&window.data[y * window.width * 3..][..window.width * 3]);
                }
            }
            tiles.push(RgbImage { width: tile, height: tile, data, transparent_color: None });
        }
    }
    tiles
}

/// `torch.nn.functional.interpolate(map[None], size=out, mode="bilinear")` (align_corners
/// false, no antialias) of a `[C, H, W]` map, in f32 with torch's order of operations.
fn resize_bilinear(map: &Tensor, (oh, ow): (usize, usize)) -> Result<Tensor> {
    let (c, h, w) = map.dims3()?;
    let data = map.flatten_all()?.to_vec1::<f32>()?;
    // Per output index: the two input indices and their weights (torch's
    // `area_pixel_compute_source_index` + `guard_index_and_lambda`, in f32).
    let taps = |input: usize, output: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = input as f32 / output as f32;
        (0..output)
            .map(|o| {
                let real = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (real.floor() as usize).min(input - 1);
                let lambda = (real - i0 as f32).clamp(0.0, 1.0);
                let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
                (i0, i1, 1.0 - lambda, lambda)
            })
            .collect()
    };
    let (ys, xs) = (taps(h, oh), taps(w, ow));
    let mut out = Vec::with_capacity(c * oh * ow);
    for plane in data.chunks_exact(h * w) {
        for &(y0, y1, wy0, wy1) in &ys {
            for &(x0, x1, wx0, wx1) in &xs {
                let row = |y: usize| plane[y * w + x0] * wx0 + plane[y * w + x1] * wx1;
                out.push(row(y0) * wy0 + row(y1) * wy1);
            }
        }
    }
    Ok(Tensor::from_vec(out, (c, oh, ow), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next() -> Anyres {
        let pins = serde_json::json!([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]);
        Anyres::from_config(&pins, None, 336).unwrap()
    }

    #[test]
    fn best_resolution_keeps_the_most_pixels_then_wastes_the_least() {
        let a = next();
        // A wide 800×400 (w×h) image fits 672×336 and 1008×336 with the same pixels kept;
        // 672×336 pads less. (Values from transformers' select_best_resolution.)
        assert_eq!(a.best_resolution((400, 800)), (336, 672));
        assert_eq!(a.best_resolution((800, 400)), (672, 336));
        assert_eq!(a.best_resolution((1000, 1000)), (672, 672));
        assert_eq!(a.best_resolution((300, 1200)), (336, 1008));
    }

    #[test]
    fn the_fit_rounds_the_free_side_up() {
        assert_eq!(fitted_size((400, 800), (336, 672)), (336, 672));
        assert_eq!(fitted_size((70, 30), (112, 56)), (112, 48));
        assert_eq!(fitted_size((20, 150), (56, 168)), (23, 168));
    }

    #[test]
    fn token_count_matches_the_packed_rows() {
        // 2×2 tiles of 3×3 features, hidden 2, for a wide 40×90 image.
        let pins = serde_json::json!([[12, 24], [24, 12], [24, 24]]);
        for max_tiles in [None, Some(1)] {
            let a = Anyres { max_tiles, ..Anyres::from_config(&pins, None, 12).unwrap() };
            assert!(!a.single_images_only);
            for image in [(40, 90), (90, 40), (50, 50), (7, 200)] {
                let grid = a.grid(image, 12);
                let n = 1 + grid.rows * grid.cols;
                let features =
                    Tensor::arange(0f32, (n * 9 * 2) as f32, &Device::Cpu).unwrap().reshape((n, 9, 2)).unwrap();
                let newline = Tensor::new(&[-1f32, -2.0], &Device::Cpu).unwrap();
                let packed = a.pack(&features, &grid, &newline).unwrap();
                assert_eq!(packed.dim(0).unwrap(), a.image_tokens(image, 12, 3, 9), "{image:?} {max_tiles:?}");
                // The last row of the packed features is a newline.
                assert_eq!(packed.get(packed.dim(0).unwrap() - 1).unwrap().to_vec1::<f32>().unwrap(), [-1.0, -2.0]);
            }
        }
    }

    #[test]
    fn bilinear_matches_torch_on_a_small_map() {
        // torch.nn.functional.interpolate(torch.arange(12.).view(1,1,3,4), size=[2,3], mode="bilinear")
        let map = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((1, 3, 4)).unwrap();
        let out = resize_bilinear(&map, (2, 3)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let torch = [1.1666666f32, 2.5, 3.8333335, 7.1666665, 8.5, 9.833333];
        for (a, b) in out.iter().zip(torch) {
            assert!((a - b).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn bad_pinpoints_are_named() {
        let err = Anyres::from_config(&serde_json::json!([[100, 200]]), None, 336).unwrap_err().to_string();
        assert!(err.contains("multiple of"), "{err}");
        let err = Anyres::from_config(&serde_json::json!([[336, 336]]), Some("pad"), 336).unwrap_err().to_string();
        assert!(err.contains("vision_aspect_ratio"), "{err}");
        assert!(Anyres::from_config(&serde_json::json!([]), None, 336).is_err());
    }
}
