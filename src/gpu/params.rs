//! Each kernel's parameter block, declared once: a `#[repr(C)]` Rust struct whose WGSL twin
//! (`struct P`, or `Step`) is generated from the same declaration and prepended to the kernel's
//! source, so a field cannot be added, dropped or reordered on one side only. Every field is one
//! 32-bit scalar (`u32` or `f32`); the WGSL struct is padded to whole 16-byte rows, as uniform
//! buffers need, and so is the uploaded block.

/// A kernel parameter block: its fields as 32-bit words, and its WGSL declaration.
pub trait KernelParams {
    /// `(field, WGSL type)` in declaration order.
    const FIELDS: &'static [(&'static str, &'static str)];

    /// The fields' bits, in order.
    fn words(&self) -> Vec<u32>;

    /// The words padded with zeros to whole 16-byte rows (what the uniform buffer holds).
    fn padded_words(&self) -> Vec<u32> {
        let mut words = self.words();
        words.resize(Self::FIELDS.len().div_ceil(4) * 4, 0);
        words
    }

    /// `struct NAME { field: type, … }` with the same padding.
    fn wgsl(name: &str) -> String {
        let mut out = format!("struct {name} {{\n");
        for (field, ty) in Self::FIELDS {
            out.push_str(&format!("    {field}: {ty},\n"));
        }
        for pad in Self::FIELDS.len()..Self::FIELDS.len().div_ceil(4) * 4 {
            out.push_str(&format!("    _pad{pad}: u32,\n"));
        }
        out.push_str("}\n");
        out
    }
}

/// A 32-bit field's bits.
pub trait Word: Copy {
    fn word(self) -> u32;
}

impl Word for u32 {
    fn word(self) -> u32 {
        self
    }
}

impl Word for f32 {
    fn word(self) -> u32 {
        self.to_bits()
    }
}

macro_rules! kernel_params {
    ($(#[doc = $doc:literal])* $name:ident { $($(#[doc = $fdoc:literal])* $field:ident: $ty:ident),+ $(,)? }) => {
        $(#[doc = $doc])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq)]
        pub struct $name {
            $($(#[doc = $fdoc])* pub $field: $ty),+
        }

        impl KernelParams for $name {
            const FIELDS: &'static [(&'static str, &'static str)] = &[$((stringify!($field), stringify!($ty))),+];

            fn words(&self) -> Vec<u32> {
                vec![$(Word::word(self.$field)),+]
            }
        }
    };
}

kernel_params! {
    /// Every step-dependent kernel's `Step` (`common.wgsl` users): the step's rows.
    Step {
        /// Absolute position of the step's first row.
        start: u32,
        /// Rows in this step.
        t: u32,
        /// The prompt's length (steering's positions rule).
        prompt_len: u32,
        /// `t − 1`.
        last: u32,
        /// Rows per sequence: row `i` is position `start + i % seq_rows` of the cache's sequence
        /// `seq0 + i / seq_rows` (`t` for a step of one sequence).
        seq_rows: u32,
        /// The cache's sequence of the step's first row.
        seq0: u32,
    }
}

impl Step {
    /// `t` rows of one sequence (the cache's first), at positions `start ..`.
    pub fn new(start: usize, t: usize, prompt_len: usize) -> Self {
        Self::of_sequence(0, start, t, prompt_len)
    }

    /// `t` rows of the cache's sequence `seq`, at positions `start ..`.
    pub fn of_sequence(seq: usize, start: usize, t: usize, prompt_len: usize) -> Self {
        Self {
            start: start as u32,
            t: t as u32,
            prompt_len: prompt_len as u32,
            last: t.saturating_sub(1) as u32,
            seq_rows: t as u32,
            seq0: seq as u32,
        }
    }

    /// One row for each of the cache's sequences `seq0 .. seq0 + n`, all at position `start`
    /// (a batched decode step).
    pub fn batch(seq0: usize, n: usize, start: usize, prompt_len: usize) -> Self {
        Self { seq_rows: 1, ..Self::of_sequence(seq0, start, n, prompt_len) }
    }
}

kernel_params! {
    /// `matmul.wgsl`, `gemv.wgsl`, `gemv_rows.wgsl`: `out[:, off..] (+)= x · Wᵀ (+ b)`.
    LinearParams {
        /// Rows; 0 = the step's row count.
        m: u32,
        k: u32,
        /// Output columns (this chunk's rows of W).
        n: u32,
        /// First element of `x` read.
        x_off: u32,
        out_stride: u32,
        /// First output column written.
        out_off: u32,
        /// Bit 0: add the bias, bit 1: accumulate into `out`.
        flags: u32,
        /// First bias element (this chunk's first row).
        bias_off: u32,
    }
}

kernel_params! {
    /// `embed_rows.wgsl`: the step's tokens' rows of one chunk of the embedding table.
    EmbedRowsParams {
        /// Hidden size.
        k: u32,
        /// Rows in this chunk.
        n: u32,
        /// First table row of this chunk.
        r0: u32,
    }
}

kernel_params! {
    /// `rmsnorm.wgsl`.
    RmsNormParams {
        h: u32,
        eps: f32,
        /// 1: only the step's last row.
        last_only: u32,
        /// First output element (captures write into a wider buffer).
        out_off: u32,
    }
}

kernel_params! {
    /// `layernorm.wgsl`.
    LayerNormParams {
        h: u32,
        eps: f32,
    }
}

kernel_params! {
    /// `rope_kv.wgsl`: RoPE on q and k, k and v written into the cache.
    RopeKvParams {
        nh: u32,
        kvh: u32,
        d: u32,
        /// Cache capacity (positions).
        cap: u32,
        /// Rows of the RoPE table (its sin half starts there).
        rope_rows: u32,
    }
}

kernel_params! {
    /// `attention.wgsl`: GQA attention, causal over the cache or full over packed rows.
    AttentionParams {
        nh: u32,
        kvh: u32,
        d: u32,
        scale: f32,
        /// Row stride of the packed `qkv`.
        q_stride: u32,
        /// Sliding window (0: none).
        window: u32,
        /// Full attention over this many keys (0: causal over the cache).
        n_keys: u32,
        k_off: u32,
        v_off: u32,
        row_stride: u32,
        head_stride: u32,
    }
}

kernel_params! {
    /// `act.wgsl` (in place) and `act_mul.wgsl` (gated: `act(gate) · up`).
    ActParams {
        /// Values per row.
        m: u32,
        /// `ops::activation_code`.
        act: u32,
    }
}

kernel_params! {
    /// `steer.wgsl`: a layer's delta added to the rows the positions rule selects.
    SteerParams {
        h: u32,
        /// `ops::steer_mode`.
        mode: u32,
        /// The cache's sequence whose rows are steered (the others pass through).
        seq: u32,
    }
}

kernel_params! {
    /// `copy_rows.wgsl`: `rows` rows of width `h` copied to `dst_off`, one every `dst_stride`.
    CopyRowsParams {
        h: u32,
        dst_off: u32,
        /// 1: start at row 0 instead of the step's last row.
        fixed_zero: u32,
        rows: u32,
        dst_stride: u32,
    }
}

impl CopyRowsParams {
    /// One row of width `h` (the step's last, or row 0 with `fixed_zero`) to `dst_off`.
    pub fn one_row(h: usize, dst_off: usize, fixed_zero: bool) -> Self {
        Self { h: h as u32, dst_off: dst_off as u32, fixed_zero: u32::from(fixed_zero), rows: 1, dst_stride: 0 }
    }

    /// Rows `0..rows` of a `[rows, h]` matrix as the columns `col .. col + h` of a
    /// `[rows, width]` one.
    pub fn as_columns(rows: usize, h: usize, width: usize, col: usize) -> Self {
        Self { h: h as u32, dst_off: col as u32, fixed_zero: 1, rows: rows as u32, dst_stride: width as u32 }
    }
}

kernel_params! {
    /// `argmax.wgsl`.
    ArgmaxParams {
        n: u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wgsl_and_words_have_the_same_fields_in_the_same_order() {
        let p = AttentionParams { nh: 1, kvh: 2, d: 3, scale: 0.5, k_off: 7, ..Default::default() };
        let words = p.padded_words();
        assert_eq!(words.len(), 12);
        assert_eq!(&words[..4], &[1, 2, 3, 0.5f32.to_bits()]);
        assert_eq!(words[7], 7);
        let wgsl = AttentionParams::wgsl("P");
        assert!(wgsl.starts_with("struct P {\n    nh: u32,\n    kvh: u32,\n    d: u32,\n    scale: f32,\n"));
        assert!(wgsl.contains("    head_stride: u32,\n    _pad11: u32,\n}"), "{wgsl}");
        // A block of 3 fields is padded to one 16-byte row on both sides.
        assert_eq!(EmbedRowsParams::default().padded_words().len(), 4);
        assert_eq!(EmbedRowsParams::wgsl("P").matches(": u32").count(), 4);
        assert_eq!(std::mem::size_of::<AttentionParams>(), 4 * AttentionParams::FIELDS.len());
    }
}
