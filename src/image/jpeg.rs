//! JPEG decoding that gives exactly the pixels Pillow gives (libjpeg-turbo with its defaults:
//! accurate integer IDCT, "fancy" triangular chroma upsampling, its fixed-point YCbCr → RGB
//! tables), so that `pixel_values` equal transformers' for the photos users really upload.
//!
//! Baseline and extended sequential (SOF0/SOF1) and progressive (SOF2) Huffman JPEGs, 8-bit,
//! grayscale or three components (YCbCr, or RGB when an Adobe marker or the component ids say
//! so), any sampling factors, restart intervals. Arithmetic-coded, lossless, hierarchical,
//! 12-bit and CMYK files are refused with a message naming what they are. The EXIF orientation
//! is reported, not applied (the caller turns the image as `ImageOps.exif_transpose` does).
//!
//! Everything a file says (sizes, counts, table indices) is checked before it is used: a corrupt
//! file is an error, never a panic or an unbounded allocation.

use anyhow::{bail, ensure, Context, Result};

/// A decoded JPEG: interleaved samples, one (grayscale) or three (RGB) per pixel.
#[derive(Debug, Clone)]
pub struct JpegImage {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
    /// EXIF orientation tag (1–8), 1 when absent.
    pub orientation: u8,
}

/// Natural (row-major) index of the k-th coefficient in zig-zag order; the 16 extra entries
/// absorb run lengths past 63 in corrupt data, as libjpeg's table does.
const ZIGZAG: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
];

/// Pixels beyond which a JPEG is refused before its coefficients are allocated (the coefficient
/// planes take 128 bytes per pixel and component at full resolution).
pub const MAX_PIXELS: u64 = super::MAX_IMAGE_PIXELS;

#[derive(Clone, Default)]
struct HuffmanTable {
    /// `(code length, value)` by the first 9 bits of the stream; length 0 = longer code.
    fast: Vec<(u8, u8)>,
    /// Canonical decoding: per code length, the largest code (exclusive) and the value offset.
    max_code: [i32; 18],
    val_offset: [i32; 17],
    values: Vec<u8>,
}

const FAST_BITS: u32 = 9;

impl HuffmanTable {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Result<Self> {
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        ensure!(total == values.len() && total <= 256, "invalid Huffman table");
        let mut table = Self { fast: vec![(0, 0); 1 << FAST_BITS], values, ..Self::default() };
        let mut code = 0i32;
        let mut k = 0usize;
        for len in 1..=16usize {
            let n = usize::from(counts[len - 1]);
            table.val_offset[len] = k as i32 - code;
            for _ in 0..n {
                if len as u32 <= FAST_BITS {
                    let shift = FAST_BITS - len as u32;
                    let first = (code as usize) << shift;
                    for slot in table.fast.iter_mut().skip(first).take(1 << shift) {
                        *slot = (len as u8, table.values[k]);
                    }
                }
                code += 1;
                k += 1;
            }
            ensure!(code <= 1 << len, "invalid Huffman table (over-subscribed codes)");
            table.max_code[len] = code;
            code <<= 1;
        }
        table.max_code[17] = i32::MAX;
        Ok(table)
    }
}

/// Reads the entropy-coded bits of a scan: byte stuffing undone, stops at a marker (then feeds
/// zeros, as libjpeg does for a truncated scan).
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    bits: u64,
    count: u32,
    /// A marker was reached: only zeros follow.
    at_marker: bool,
    /// Zero bytes fed past the end of the file, still in `bits` or consumed.
    past_end: u32,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self { data, pos, bits: 0, count: 0, at_marker: false, past_end: 0 }
    }

    /// Whether bits past the end of the file were used: the file is truncated (Pillow refuses
    /// such a file: "image file is truncated").
    fn read_past_end(&self) -> bool {
        self.past_end * 8 > self.count
    }

    fn fill(&mut self) {
        while self.count <= 56 {
            let mut byte = 0u8;
            if !self.at_marker && self.pos >= self.data.len() {
                self.past_end += 1;
            } else if !self.at_marker {
                byte = self.data[self.pos];
                if byte == 0xFF {
                    let next = self.data.get(self.pos + 1).copied().unwrap_or(0xD9);
                    if next == 0x00 {
                        self.pos += 2;
                    } else {
                        self.at_marker = true;
                        byte = 0;
                    }
                } else {
                    self.pos += 1;
                }
            }
            self.bits |= u64::from(byte) << (56 - self.count);
            self.count += 8;
        }
    }

    fn peek(&mut self, n: u32) -> u32 {
        if self.count < n {
            self.fill();
        }
        (self.bits >> (64 - n)) as u32
    }

    fn consume(&mut self, n: u32) {
        self.bits <<= n;
        self.count -= n;
    }

    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let v = self.peek(n);
        self.consume(n);
        v
    }

    fn bit(&mut self) -> bool {
        self.bits(1) == 1
    }

    /// `n` bits as a signed coefficient difference (JPEG's `EXTEND`).
    fn signed(&mut self, n: u32) -> i32 {
        if n == 0 {
            return 0;
        }
        let v = self.bits(n) as i32;
        if v < 1 << (n - 1) {
            v - (1 << n) + 1
        } else {
            v
        }
    }

    fn decode(&mut self, table: &HuffmanTable) -> Result<u8> {
        let (len, value) = table.fast[self.peek(FAST_BITS) as usize];
        if len > 0 {
            self.consume(u32::from(len));
            return Ok(value);
        }
        let code = self.peek(16) as i32;
        for len in FAST_BITS as usize + 1..=16 {
            let prefix = code >> (16 - len);
            if prefix < table.max_code[len] {
                self.consume(len as u32);
                let index = (prefix + table.val_offset[len]) as usize;
                return table.values.get(index).copied().context("corrupt JPEG data (bad Huffman code)");
            }
        }
        bail!("corrupt JPEG data (bad Huffman code)")
    }

    /// Skip to just after the next RSTn marker, dropping buffered bits.
    fn restart(&mut self) -> Result<()> {
        self.bits = 0;
        self.count = 0;
        self.at_marker = false;
        while self.pos + 1 < self.data.len() {
            if self.data[self.pos] == 0xFF && (0xD0..=0xD7).contains(&self.data[self.pos + 1]) {
                self.pos += 2;
                return Ok(());
            }
            if self.data[self.pos] == 0xFF && self.data[self.pos + 1] != 0 && self.data[self.pos + 1] != 0xFF {
                bail!("corrupt JPEG data: a restart marker is missing");
            }
            self.pos += 1;
        }
        bail!("corrupt JPEG data: the file ends before a restart marker")
    }

    /// Byte position after the scan's data (the next marker).
    fn end_of_scan(&self) -> usize {
        let mut pos = self.pos;
        while pos + 1 < self.data.len() {
            if self.data[pos] == 0xFF && self.data[pos + 1] != 0 && !(0xD0..=0xD7).contains(&self.data[pos + 1]) {
                return pos;
            }
            pos += 1;
        }
        self.data.len()
    }
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    quant: usize,
    /// Blocks per row and block rows held (whole MCUs).
    blocks_w: usize,
    blocks_h: usize,
    /// Blocks that hold image data (a non-interleaved scan covers only these).
    used_w: usize,
    used_h: usize,
    coefs: Vec<i16>,
    dc_table: usize,
    ac_table: usize,
}

struct Frame {
    width: usize,
    height: usize,
    progressive: bool,
    components: Vec<Component>,
    h_max: usize,
    v_max: usize,
    mcus_x: usize,
    mcus_y: usize,
}

struct Decoder<'a> {
    data: &'a [u8],
    quant: [Option<[u16; 64]>; 4],
    dc_tables: [Option<HuffmanTable>; 4],
    ac_tables: [Option<HuffmanTable>; 4],
    restart_interval: usize,
    frame: Option<Frame>,
    saw_jfif: bool,
    adobe_transform: Option<u8>,
    orientation: u8,
    eobrun: u32,
    scans: usize,
}

/// Whether `bytes` start like a JPEG (SOI marker).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Width and height from the frame header, without decoding (for the size check).
pub fn dimensions(bytes: &[u8]) -> Result<(usize, usize)> {
    let mut pos = 2;
    loop {
        let (marker, body, next) = segment(bytes, pos)?;
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            ensure!(body.len() >= 5, "corrupt JPEG: short frame header");
            let height = usize::from(u16::from_be_bytes([body[1], body[2]]));
            let width = usize::from(u16::from_be_bytes([body[3], body[4]]));
            return Ok((width, height));
        }
        ensure!(marker != 0xD9 && marker != 0xDA, "corrupt JPEG: no frame header before the image data");
        pos = next;
    }
}

/// The marker at `pos` (after any fill bytes), its body and the position after it.
fn segment(data: &[u8], mut pos: usize) -> Result<(u8, &[u8], usize)> {
    ensure!(data.get(pos) == Some(&0xFF), "corrupt JPEG: expected a marker at byte {pos}");
    while data.get(pos) == Some(&0xFF) {
        pos += 1;
    }
    let marker = *data.get(pos).context("corrupt JPEG: the file ends inside a marker")?;
    pos += 1;
    if marker == 0xD8 || marker == 0xD9 || (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
        return Ok((marker, &[], pos));
    }
    let len_bytes = data.get(pos..pos + 2).context("corrupt JPEG: the file ends inside a marker")?;
    let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
    ensure!(len >= 2, "corrupt JPEG: marker segment length {len}");
    let body = data.get(pos + 2..pos + len).context("corrupt JPEG: truncated marker segment")?;
    Ok((marker, body, pos + len))
}

/// Decode a JPEG file.
pub fn decode(bytes: &[u8]) -> Result<JpegImage> {
    ensure!(is_jpeg(bytes), "not a JPEG file");
    let mut decoder = Decoder {
        data: bytes,
        quant: [None; 4],
        dc_tables: Default::default(),
        ac_tables: Default::default(),
        restart_interval: 0,
        frame: None,
        saw_jfif: false,
        adobe_transform: None,
        orientation: 1,
        eobrun: 0,
        scans: 0,
    };
    decoder.run()?;
    decoder.output()
}

impl Decoder<'_> {
    fn run(&mut self) -> Result<()> {
        let mut pos = 2;
        loop {
            if pos >= self.data.len() {
                // No end marker: Pillow refuses the file as truncated, even when its scans are whole.
                ensure!(self.frame.is_some(), "corrupt JPEG: no image data");
                bail!("the JPEG file is truncated (it ends before its end marker)");
            }
            let (marker, body, next) = segment(self.data, pos)?;
            pos = next;
            match marker {
                0xD8 => bail!("corrupt JPEG: a second start-of-image marker"),
                0xD9 => {
                    // libjpeg: "JPEG datastream contains no image".
                    ensure!(self.scans > 0, "corrupt JPEG: no image data (the file has no scan)");
                    return Ok(());
                }
                0xC0..=0xC2 => self.read_frame(marker, body)?,
                0xC3 => bail!("lossless JPEG is not supported; convert the image to PNG or a baseline JPEG"),
                0xC5..=0xC7 | 0xCD..=0xCF => {
                    bail!("hierarchical JPEG is not supported; convert the image to PNG or a baseline JPEG")
                }
                0xC9..=0xCB => {
                    bail!("arithmetic-coded JPEG is not supported; convert the image to PNG or a baseline JPEG")
                }
                0xC4 => self.read_huffman(body)?,
                0xCC => bail!("arithmetic-coded JPEG is not supported; convert the image to PNG or a baseline JPEG"),
                0xDB => self.read_quant(body)?,
                0xDD => {
                    ensure!(body.len() >= 2, "corrupt JPEG: short restart interval");
                    self.restart_interval = usize::from(u16::from_be_bytes([body[0], body[1]]));
                }
                0xDA => {
                    pos = self.read_scan(body, pos)?;
                    self.scans += 1;
                }
                0xE0 if body.starts_with(b"JFIF\0") => self.saw_jfif = true,
                // Pillow reads the first EXIF block.
                0xE1 if body.starts_with(b"Exif\0\0") && self.orientation == 1 => {
                    self.orientation = exif_orientation(&body[6..]).unwrap_or(1);
                }
                0xEE if body.starts_with(b"Adobe") && body.len() >= 12 => self.adobe_transform = Some(body[11]),
                0xDC => bail!("JPEG with a DNL marker is not supported"),
                _ => {} // APPn, COM and others: nothing cmrm needs
            }
        }
    }

    fn read_quant(&mut self, mut body: &[u8]) -> Result<()> {
        while !body.is_empty() {
            let precision = body[0] >> 4;
            let index = usize::from(body[0] & 15);
            ensure!(index < 4, "corrupt JPEG: quantization table {index}");
            let size = if precision == 0 { 64 } else { 128 };
            let values = body.get(1..1 + size).context("corrupt JPEG: truncated quantization table")?;
            let mut table = [0u16; 64];
            for (k, &natural) in ZIGZAG.iter().take(64).enumerate() {
                table[natural] = if precision == 0 {
                    u16::from(values[k])
                } else {
                    u16::from_be_bytes([values[2 * k], values[2 * k + 1]])
                };
            }
            self.quant[index] = Some(table);
            body = &body[1 + size..];
        }
        Ok(())
    }

    fn read_huffman(&mut self, mut body: &[u8]) -> Result<()> {
        while !body.is_empty() {
            ensure!(body.len() >= 17, "corrupt JPEG: truncated Huffman table");
            let class = body[0] >> 4;
            let index = usize::from(body[0] & 15);
            ensure!(class <= 1 && index < 4, "corrupt JPEG: Huffman table {class}/{index}");
            let counts: [u8; 16] = body[1..17].try_into().expect("16 bytes");
            let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
            let values = body.get(17..17 + total).context("corrupt JPEG: truncated Huffman table")?.to_vec();
            let table = HuffmanTable::new(&counts, values)?;
            if class == 0 {
                self.dc_tables[index] = Some(table);
            } else {
                self.ac_tables[index] = Some(table);
            }
            body = &body[17 + total..];
        }
        Ok(())
    }

    fn read_frame(&mut self, marker: u8, body: &[u8]) -> Result<()> {
        ensure!(self.frame.is_none(), "corrupt JPEG: two frame headers");
        ensure!(body.len() >= 6, "corrupt JPEG: short frame header");
        let precision = body[0];
        ensure!(precision == 8, "{precision}-bit JPEG is not supported (8-bit only); convert the image to PNG");
        let height = usize::from(u16::from_be_bytes([body[1], body[2]]));
        let width = usize::from(u16::from_be_bytes([body[3], body[4]]));
        ensure!(width > 0 && height > 0, "JPEG with zero width or height (a DNL height is not supported)");
        ensure!(
            (width as u64) * (height as u64) <= MAX_PIXELS,
            "JPEG is {width}×{height}, over the {} megapixel limit",
            MAX_PIXELS / 1_000_000
        );
        let n = usize::from(body[5]);
        ensure!(body.len() >= 6 + 3 * n, "corrupt JPEG: short frame header");
        match n {
            1 | 3 => {}
            4 => bail!("CMYK JPEG is not supported; convert the image to RGB (PNG or JPEG)"),
            _ => bail!("JPEG with {n} components is not supported"),
        }
        let mut components = Vec::with_capacity(n);
        for c in body[6..6 + 3 * n].chunks_exact(3) {
            let (h, v) = (usize::from(c[1] >> 4), usize::from(c[1] & 15));
            ensure!((1..=4).contains(&h) && (1..=4).contains(&v), "corrupt JPEG: sampling factors {h}×{v}");
            ensure!(c[2] < 4, "corrupt JPEG: quantization table {}", c[2]);
            components.push(Component {
                id: c[0],
                h,
                v,
                quant: usize::from(c[2]),
                blocks_w: 0,
                blocks_h: 0,
                used_w: 0,
                used_h: 0,
                coefs: Vec::new(),
                dc_table: 0,
                ac_table: 0,
            });
        }
        let h_max = components.iter().map(|c| c.h).max().unwrap_or(1);
        let v_max = components.iter().map(|c| c.v).max().unwrap_or(1);
        ensure!(
            components.iter().all(|c| h_max % c.h == 0 && v_max % c.v == 0),
            "JPEG with fractional chroma sampling is not supported (libjpeg refuses it too)"
        );
        let mcus_x = width.div_ceil(8 * h_max);
        let mcus_y = height.div_ceil(8 * v_max);
        for c in &mut components {
            c.blocks_w = mcus_x * c.h;
            c.blocks_h = mcus_y * c.v;
            c.used_w = (width * c.h).div_ceil(h_max).div_ceil(8);
            c.used_h = (height * c.v).div_ceil(v_max).div_ceil(8);
            let len = c.blocks_w * c.blocks_h * 64;
            let mut coefs = Vec::new();
            coefs.try_reserve_exact(len).context("not enough memory for the JPEG's coefficients")?;
            coefs.resize(len, 0);
            c.coefs = coefs;
        }
        self.frame =
            Some(Frame { width, height, progressive: marker == 0xC2, components, h_max, v_max, mcus_x, mcus_y });
        Ok(())
    }

    /// Decode one scan starting at `pos` (after its header); returns the position after it.
    fn read_scan(&mut self, body: &[u8], pos: usize) -> Result<usize> {
        let frame = self.frame.as_mut().context("corrupt JPEG: a scan before the frame header")?;
        let n = usize::from(*body.first().context("corrupt JPEG: empty scan header")?);
        ensure!((1..=4).contains(&n) && body.len() >= 4 + 2 * n, "corrupt JPEG: scan header");
        let mut scan = Vec::with_capacity(n);
        for c in body[1..1 + 2 * n].chunks_exact(2) {
            let index = frame
                .components
                .iter()
                .position(|comp| comp.id == c[0])
                .with_context(|| format!("corrupt JPEG: scan names unknown component {}", c[0]))?;
            ensure!(!scan.contains(&index), "corrupt JPEG: a scan names component {} twice", c[0]);
            frame.components[index].dc_table = usize::from(c[1] >> 4);
            frame.components[index].ac_table = usize::from(c[1] & 15);
            ensure!(
                frame.components[index].dc_table < 4 && frame.components[index].ac_table < 4,
                "corrupt JPEG: Huffman table index"
            );
            scan.push(index);
        }
        let params = &body[1 + 2 * n..];
        let (ss, se, ah, al) = (usize::from(params[0]), usize::from(params[1]), params[2] >> 4, params[2] & 15);
        if frame.progressive {
            ensure!(ss <= se && se <= 63 && al <= 13, "corrupt JPEG: progressive scan parameters");
            ensure!(ss == 0 || (se >= 1 && n == 1), "corrupt JPEG: an AC scan must hold one component");
            ensure!(ss != 0 || se == 0, "corrupt JPEG: a DC scan must hold only DC");
        }
        let mut reader = BitReader::new(self.data, pos);
        self.eobrun = 0;
        let frame = self.frame.as_ref().expect("checked");
        let (units_x, units_y) = if n == 1 {
            let c = &frame.components[scan[0]];
            (c.used_w, c.used_h)
        } else {
            (frame.mcus_x, frame.mcus_y)
        };
        let total = units_x * units_y;
        let mut dc_pred = [0i32; 4];
        let mut coefs: Vec<Vec<i16>> = Vec::new();
        // The coefficient planes move out of the frame while the scan writes them.
        let frame = self.frame.as_mut().expect("checked");
        for &i in &scan {
            coefs.push(std::mem::take(&mut frame.components[i].coefs));
        }
        let layout: Vec<(usize, usize, usize, usize, usize)> = scan
            .iter()
            .map(|&i| {
                let c = &frame.components[i];
                (c.h, c.v, c.blocks_w, c.dc_table, c.ac_table)
            })
            .collect();
        let progressive = frame.progressive;
        let result = (|| -> Result<()> {
            for unit in 0..total {
                if self.restart_interval > 0 && unit > 0 && unit % self.restart_interval == 0 {
                    reader.restart()?;
                    dc_pred = [0; 4];
                    self.eobrun = 0;
                }
                let (ux, uy) = (unit % units_x, unit / units_x);
                for (s, &(h, v, blocks_w, dc_t, ac_t)) in layout.iter().enumerate() {
                    let (bh, bv) = if n == 1 { (1, 1) } else { (h, v) };
                    for by in 0..bv {
                        for bx in 0..bh {
                            let (col, row) = if n == 1 { (ux, uy) } else { (ux * h + bx, uy * v + by) };
                            let start = (row * blocks_w + col) * 64;
                            let block: &mut [i16; 64] =
                                (&mut coefs[s][start..start + 64]).try_into().expect("64 coefficients");
                            if !progressive {
                                self.decode_baseline(&mut reader, block, &mut dc_pred[s], dc_t, ac_t)?;
                            } else if ss == 0 {
                                self.decode_dc(&mut reader, block, &mut dc_pred[s], dc_t, ah, al)?;
                            } else if ah == 0 {
                                self.decode_ac_first(&mut reader, block, ac_t, ss, se, al)?;
                            } else {
                                self.decode_ac_refine(&mut reader, block, ac_t, ss, se, al)?;
                            }
                        }
                    }
                }
            }
            Ok(())
        })();
        let frame = self.frame.as_mut().expect("checked");
        for (&i, plane) in scan.iter().zip(coefs) {
            frame.components[i].coefs = plane;
        }
        result?;
        if reader.read_past_end() {
            bail!("the JPEG file is truncated (its image data ends early)");
        }
        Ok(reader.end_of_scan())
    }

    fn table<'t>(tables: &'t [Option<HuffmanTable>; 4], index: usize, kind: &str) -> Result<&'t HuffmanTable> {
        tables[index].as_ref().with_context(|| format!("corrupt JPEG: {kind} Huffman table {index} is not defined"))
    }

    fn decode_baseline(
        &self,
        reader: &mut BitReader,
        block: &mut [i16; 64],
        dc_pred: &mut i32,
        dc_t: usize,
        ac_t: usize,
    ) -> Result<()> {
        let dc = Self::table(&self.dc_tables, dc_t, "DC")?;
        let ac = Self::table(&self.ac_tables, ac_t, "AC")?;
        let s = u32::from(reader.decode(dc)?);
        ensure!(s <= 16, "corrupt JPEG data (DC magnitude)");
        *dc_pred = dc_pred.wrapping_add(reader.signed(s));
        block[0] = *dc_pred as i16;
        let mut k = 1;
        while k < 64 {
            let rs = reader.decode(ac)?;
            let (r, s) = (usize::from(rs >> 4), u32::from(rs & 15));
            if s != 0 {
                k += r;
                block[ZIGZAG[k]] = reader.signed(s) as i16;
            } else if r == 15 {
                k += 15;
            } else {
                break;
            }
            k += 1;
        }
        Ok(())
    }

    fn decode_dc(
        &self,
        reader: &mut BitReader,
        block: &mut [i16; 64],
        dc_pred: &mut i32,
        dc_t: usize,
        ah: u8,
        al: u8,
    ) -> Result<()> {
        if ah == 0 {
            let dc = Self::table(&self.dc_tables, dc_t, "DC")?;
            let s = u32::from(reader.decode(dc)?);
            ensure!(s <= 16, "corrupt JPEG data (DC magnitude)");
            *dc_pred = dc_pred.wrapping_add(reader.signed(s));
            block[0] = (dc_pred.wrapping_shl(u32::from(al))) as i16;
        } else if reader.bit() {
            block[0] |= 1 << al;
        }
        Ok(())
    }

    fn decode_ac_first(
        &mut self,
        reader: &mut BitReader,
        block: &mut [i16; 64],
        ac_t: usize,
        ss: usize,
        se: usize,
        al: u8,
    ) -> Result<()> {
        if self.eobrun > 0 {
            self.eobrun -= 1;
            return Ok(());
        }
        let ac = Self::table(&self.ac_tables, ac_t, "AC")?;
        let mut k = ss;
        while k <= se {
            let rs = reader.decode(ac)?;
            let (r, s) = (u32::from(rs >> 4), u32::from(rs & 15));
            if s != 0 {
                k += r as usize;
                block[ZIGZAG[k.min(79)]] = (reader.signed(s).wrapping_shl(u32::from(al))) as i16;
            } else if r == 15 {
                k += 15;
            } else {
                self.eobrun = (1 << r) + reader.bits(r) - 1;
                break;
            }
            k += 1;
        }
        Ok(())
    }

    fn decode_ac_refine(
        &mut self,
        reader: &mut BitReader,
        block: &mut [i16; 64],
        ac_t: usize,
        ss: usize,
        se: usize,
        al: u8,
    ) -> Result<()> {
        let p1: i16 = 1 << al;
        let m1: i16 = (-1i16).wrapping_shl(u32::from(al));
        let refine = |reader: &mut BitReader, coef: &mut i16| {
            if reader.bit() && (*coef & p1) == 0 {
                *coef = if *coef >= 0 { coef.wrapping_add(p1) } else { coef.wrapping_add(m1) };
            }
        };
        let mut k = ss;
        if self.eobrun == 0 {
            let ac = Self::table(&self.ac_tables, ac_t, "AC")?;
            while k <= se {
                let rs = reader.decode(ac)?;
                let (mut r, s) = (i32::from(rs >> 4), rs & 15);
                let mut value = 0i16;
                if s != 0 {
                    // s must be 1 in a valid file; libjpeg warns and goes on.
                    value = if reader.bit() { p1 } else { m1 };
                } else if r != 15 {
                    self.eobrun = 1 << r;
                    if r > 0 {
                        self.eobrun += reader.bits(r as u32);
                    }
                    break;
                }
                // Skip r zero coefficients (refining the non-zero ones on the way), then place the
                // new coefficient at the zero reached.
                while k <= se {
                    let coef = &mut block[ZIGZAG[k]];
                    if *coef != 0 {
                        refine(reader, coef);
                    } else {
                        r -= 1;
                        if r < 0 {
                            break;
                        }
                    }
                    k += 1;
                }
                if value != 0 && k <= se {
                    block[ZIGZAG[k]] = value;
                }
                k += 1;
            }
        }
        if self.eobrun > 0 {
            while k <= se {
                let coef = &mut block[ZIGZAG[k]];
                if *coef != 0 {
                    refine(reader, coef);
                }
                k += 1;
            }
            self.eobrun -= 1;
        }
        Ok(())
    }

    /// IDCT every block, upsample, convert to RGB.
    fn output(mut self) -> Result<JpegImage> {
        let frame = self.frame.take().context("corrupt JPEG: no frame header")?;
        let (width, height) = (frame.width, frame.height);
        let mut planes = Vec::with_capacity(frame.components.len());
        for c in &frame.components {
            let quant = self.quant[c.quant]
                .with_context(|| format!("corrupt JPEG: quantization table {} is not defined", c.quant))?;
            planes.push(idct_plane(c, &quant));
        }
        // Each component at full resolution (`width × height`), upsampled as libjpeg-turbo does.
        let full: Vec<Vec<u8>> = frame
            .components
            .iter()
            .zip(planes)
            .map(|(c, plane)| upsample(&plane, c, frame.h_max, frame.v_max, width, height))
            .collect();
        let channels = if full.len() == 1 { 1 } else { 3 };
        let mut data = Vec::new();
        data.try_reserve_exact(width * height * channels).context("not enough memory for the decoded JPEG")?;
        if channels == 1 {
            data.extend_from_slice(&full[0]);
        } else {
            let samples = full[0].iter().zip(&full[1]).zip(&full[2]);
            if self.is_rgb(&frame) {
                data.extend(samples.flat_map(|((&r, &g), &b)| [r, g, b]));
            } else {
                let tables = YccTables::new();
                data.extend(samples.flat_map(|((&y, &cb), &cr)| tables.rgb(y, cb, cr)));
            }
        }
        Ok(JpegImage { width, height, channels, data, orientation: self.orientation })
    }

    /// libjpeg's colour-space guess for three components (`default_decompress_parms`).
    fn is_rgb(&self, frame: &Frame) -> bool {
        if self.saw_jfif {
            return false;
        }
        if let Some(transform) = self.adobe_transform {
            return transform == 0;
        }
        let ids: Vec<u8> = frame.components.iter().map(|c| c.id).collect();
        ids == [b'R', b'G', b'B']
    }
}

/// libjpeg's `jpeg_idct_islow` with its output range limiting, for every block of a component:
/// an 8-bit plane `blocks_w·8 × blocks_h·8`.
fn idct_plane(c: &Component, quant: &[u16; 64]) -> Vec<u8> {
    let stride = c.blocks_w * 8;
    let mut plane = vec![0u8; stride * c.blocks_h * 8];
    for by in 0..c.blocks_h {
        for bx in 0..c.blocks_w {
            let start = (by * c.blocks_w + bx) * 64;
            let block: &[i16; 64] = c.coefs[start..start + 64].try_into().expect("64 coefficients");
            let out = idct_islow(block, quant);
            for y in 0..8 {
                plane[(by * 8 + y) * stride + bx * 8..][..8].copy_from_slice(&out[y * 8..y * 8 + 8]);
            }
        }
    }
    plane
}

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;
const FIX_0_298631336: i64 = 2446;
const FIX_0_390180644: i64 = 3196;
const FIX_0_541196100: i64 = 4433;
const FIX_0_765366865: i64 = 6270;
const FIX_0_899976223: i64 = 7373;
const FIX_1_175875602: i64 = 9633;
const FIX_1_501321110: i64 = 12299;
const FIX_1_847759065: i64 = 15137;
const FIX_1_961570560: i64 = 16069;
const FIX_2_053119869: i64 = 16819;
const FIX_2_562915447: i64 = 20995;
const FIX_3_072711026: i64 = 25172;

fn descale(x: i64, n: u32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// One 1-D pass of the LL&M IDCT on 8 values (`x[0..8]`, already scaled): the eight outputs
/// before descaling, in order.
fn idct_1d(x: [i64; 8]) -> [i64; 8] {
    // Even part.
    let z1 = (x[2] + x[6]) * FIX_0_541196100;
    let tmp2 = z1 + x[6] * -FIX_1_847759065;
    let tmp3 = z1 + x[2] * FIX_0_765366865;
    let tmp0 = (x[0] + x[4]) << CONST_BITS;
    let tmp1 = (x[0] - x[4]) << CONST_BITS;
    let (tmp10, tmp13, tmp11, tmp12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
    // Odd part.
    let (t0, t1, t2, t3) = (x[7], x[5], x[3], x[1]);
    let (z1, z2, z3, z4) = (t0 + t3, t1 + t2, t0 + t2, t1 + t3);
    let z5 = (z3 + z4) * FIX_1_175875602;
    let (t0, t1, t2, t3) = (t0 * FIX_0_298631336, t1 * FIX_2_053119869, t2 * FIX_3_072711026, t3 * FIX_1_501321110);
    let (z1, z2) = (z1 * -FIX_0_899976223, z2 * -FIX_2_562915447);
    let (z3, z4) = (z3 * -FIX_1_961570560 + z5, z4 * -FIX_0_390180644 + z5);
    let (t0, t1, t2, t3) = (t0 + z1 + z3, t1 + z2 + z4, t2 + z2 + z3, t3 + z1 + z4);
    [tmp10 + t3, tmp11 + t2, tmp12 + t1, tmp13 + t0, tmp13 - t0, tmp12 - t1, tmp11 - t2, tmp10 - t3]
}

/// libjpeg's post-IDCT range limit: centre on 128, clamp, wrap beyond ±512 like its table.
fn range_limit(x: i64) -> u8 {
    let v = (x & 1023) as i32;
    match v {
        0..=127 => (v + 128) as u8,
        128..=511 => 255,
        512..=895 => 0,
        _ => (v - 896) as u8,
    }
}

/// `jpeg_idct_islow`: dequantize, columns then rows, 8-bit samples out (row-major).
fn idct_islow(coefs: &[i16; 64], quant: &[u16; 64]) -> [u8; 64] {
    let mut workspace = [0i64; 64];
    for col in 0..8 {
        let deq = |row: usize| i64::from(coefs[row * 8 + col]) * i64::from(quant[row * 8 + col]);
        let x: [i64; 8] = std::array::from_fn(deq);
        let out = idct_1d(x);
        for (row, v) in out.iter().enumerate() {
            workspace[row * 8 + col] = descale(*v, CONST_BITS - PASS1_BITS);
        }
    }
    let mut out = [0u8; 64];
    for row in 0..8 {
        let x: [i64; 8] = workspace[row * 8..row * 8 + 8].try_into().expect("8 values");
        let values = idct_1d(x);
        for (col, v) in values.iter().enumerate() {
            out[row * 8 + col] = range_limit(descale(*v, CONST_BITS + PASS1_BITS + 3));
        }
    }
    out
}

/// One component at full resolution, as libjpeg-turbo's upsampler makes it: fancy (triangular)
/// for 2:1 horizontal, 2:1 vertical or both; sample replication for other integer ratios.
/// Context rows and columns beyond the component's real samples repeat its last real one.
fn upsample(plane: &[u8], c: &Component, h_max: usize, v_max: usize, width: usize, height: usize) -> Vec<u8> {
    let stride = c.blocks_w * 8;
    let comp_w = (width * c.h).div_ceil(h_max);
    let comp_h = (height * c.v).div_ceil(v_max);
    let (fx, fy) = (h_max / c.h, v_max / c.v);
    let at = |x: usize, y: usize| i32::from(plane[y * stride + x]);
    let mut out = vec![0u8; width * height];
    // libjpeg-turbo uses the fancy 2:1 filters only for components wider than 2 samples
    // (`downsampled_width > 2`; h1v2 always); everything else replicates samples.
    let fancy_h = comp_w > 2;
    if !h_max.is_multiple_of(c.h) || !v_max.is_multiple_of(c.v) {
        // Non-integer ratios (e.g. 3:2) are refused when the frame is read.
        return out;
    }
    for y in 0..height {
        let line = &mut out[y * width..][..width];
        match (fx, fy) {
            (1, 1) => line.copy_from_slice(&plane[y * stride..][..width]),
            (2, 1) if fancy_h => line.copy_from_slice(&fancy_h2(&|x| at(x, y), comp_w, false)[..width]),
            (1, 2) => {
                let (row, other) = v2_rows(y, comp_h);
                // h1v2: (3·nearer + further + bias) >> 2, the bias 1 above and 2 below.
                let bias = if y.is_multiple_of(2) { 1 } else { 2 };
                for (x, o) in line.iter_mut().enumerate() {
                    *o = ((at(x, row) * 3 + at(x, other) + bias) >> 2) as u8;
                }
            }
            (2, 2) if fancy_h => {
                let (row, other) = v2_rows(y, comp_h);
                let colsum = |x: usize| at(x, row) * 3 + at(x, other);
                line.copy_from_slice(&fancy_h2(&colsum, comp_w, true)[..width]);
            }
            _ => {
                for (x, o) in line.iter_mut().enumerate() {
                    *o = plane[(y / fy) * stride + x / fx];
                }
            }
        }
    }
    out
}

/// For output row `y` of a 2:1 vertical upsample: the nearer input row and the further one
/// (above for even rows, below for odd), clamped to the component's real rows.
fn v2_rows(y: usize, comp_h: usize) -> (usize, usize) {
    let row = (y / 2).min(comp_h - 1);
    let other = if y.is_multiple_of(2) { row.saturating_sub(1) } else { (row + 1).min(comp_h - 1) };
    (row, other)
}

/// Horizontal 2:1 fancy upsampling of one row of "column sums" `s(x)`: outputs
/// `(3·s(x) + s(x∓1) + bias) >> shift`, the first and last ones taking `s` itself as the
/// missing neighbour. h2v1 (`vertical: false`) works on samples, `>> 2`, biases 1 / 2; h2v2 on
/// sums `3·nearer row + further row`, `>> 4`, biases 8 / 7 (libjpeg-turbo's rounding).
fn fancy_h2(s: &dyn Fn(usize) -> i32, comp_w: usize, vertical: bool) -> Vec<u8> {
    let (shift, bias_left, bias_right) = if vertical { (4, 8, 7) } else { (2, 1, 2) };
    let mut out = Vec::with_capacity(comp_w * 2);
    let last = comp_w - 1;
    for x in 0..comp_w {
        let this = s(x);
        let left = if x == 0 { this } else { s(x - 1) };
        let right = if x == last { this } else { s(x + 1) };
        out.push(((this * 3 + left + bias_left) >> shift) as u8);
        out.push(((this * 3 + right + bias_right) >> shift) as u8);
    }
    out
}

/// libjpeg's YCbCr → RGB fixed-point tables (`build_ycc_rgb_table`, 16 fraction bits).
struct YccTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i64; 256],
    cb_g: [i64; 256],
}

impl YccTables {
    fn new() -> Self {
        const SCALEBITS: u32 = 16;
        const ONE_HALF: i64 = 1 << (SCALEBITS - 1);
        let fix = |x: f64| (x * f64::from(1u32 << SCALEBITS) + 0.5) as i64;
        let mut t = Self { cr_r: [0; 256], cb_b: [0; 256], cr_g: [0; 256], cb_g: [0; 256] };
        for i in 0..256 {
            let x = i as i64 - 128;
            t.cr_r[i] = ((fix(1.40200) * x + ONE_HALF) >> SCALEBITS) as i32;
            t.cb_b[i] = ((fix(1.77200) * x + ONE_HALF) >> SCALEBITS) as i32;
            t.cr_g[i] = -fix(0.71414) * x;
            t.cb_g[i] = -fix(0.34414) * x + ONE_HALF;
        }
        t
    }

    fn rgb(&self, y: u8, cb: u8, cr: u8) -> [u8; 3] {
        let (y, cb, cr) = (i32::from(y), usize::from(cb), usize::from(cr));
        let clamp = |v: i32| v.clamp(0, 255) as u8;
        let g = ((self.cb_g[cb] + self.cr_g[cr]) >> 16) as i32;
        [clamp(y + self.cr_r[cr]), clamp(y + g), clamp(y + self.cb_b[cb])]
    }
}

/// The orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block, if present and 1–8.
pub fn exif_orientation(tiff: &[u8]) -> Option<u8> {
    let big = match tiff.get(..4)? {
        [b'I', b'I', 42, 0] => false,
        [b'M', b'M', 0, 42] => true,
        _ => return None,
    };
    let u16_at = |p: usize| -> Option<u16> {
        let b = tiff.get(p..p + 2)?;
        Some(if big { u16::from_be_bytes([b[0], b[1]]) } else { u16::from_le_bytes([b[0], b[1]]) })
    };
    let u32_at = |p: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(p..p + 4)?.try_into().ok()?;
        Some(if big { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) })
    };
    let ifd = u32_at(4)? as usize;
    let entries = u16_at(ifd)? as usize;
    for e in 0..entries {
        let p = ifd.checked_add(2 + e * 12)?;
        if u16_at(p)? == 0x0112 {
            let value = u16_at(p + 8)?;
            return (1..=8).contains(&value).then_some(value as u8);
        }
    }
    None
}
