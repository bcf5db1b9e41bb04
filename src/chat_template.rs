//! Chat templates rendered exactly as transformers renders them (`apply_chat_template`):
//! Jinja with `trim_blocks` and `lstrip_blocks`, the loop-controls extension, transformers'
//! `{% generation %}…{% endgeneration %}` block (renders its body), `raise_exception`,
//! `strftime_now`, and its own `tojson` (Python's `json.dumps`: `", "` / `": "` separators,
//! no HTML escaping, `indent`, `sort_keys`, `ensure_ascii`). `None` / `True` / `False` print as
//! Python prints them.
//!
//! Templates come from anyone who publishes a model, so rendering has a budget: a template that
//! loops too long (5 M steps), asks for huge paddings or indents, or builds too large a prompt
//! (4 MiB) is stopped with an error naming it. (minijinja caps a repeated string at 100 MB; what
//! it does not bound is a string doubled by concatenation again and again: in the page such a
//! template crashes the worker, which is restarted and says so.)

use anyhow::{anyhow, Context, Result};
use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use serde_json::Value as Json;

/// Instructions a template may run per render (a chat template needs a few thousand).
const FUEL: u64 = 5_000_000;
/// Largest prompt a template may produce.
pub const MAX_RENDERED_BYTES: usize = 4 << 20;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

/// Wall-clock time for `strftime_now` (transformers: `datetime.now()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl CivilTime {
    /// From seconds since the Unix epoch (UTC).
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
        }
    }

    /// Now: the browser's local time in wasm, UTC natively.
    pub fn now() -> Self {
        #[cfg(target_arch = "wasm32")]
        {
            let d = js_sys::Date::new_0();
            Self {
                year: i64::from(d.get_full_year()),
                month: d.get_month() + 1,
                day: d.get_date(),
                hour: d.get_hours(),
                minute: d.get_minutes(),
                second: d.get_seconds(),
            }
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let secs =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            Self::from_unix(secs)
        }
    }

    fn weekday(&self) -> usize {
        // 0 = Monday (Python's weekday()); Sakamoto's method gives 0 = Sunday.
        const T: [i64; 12] = [0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4];
        let y = if self.month < 3 { self.year - 1 } else { self.year };
        let sunday_based = (y + y.div_euclid(4) - y.div_euclid(100)
            + y.div_euclid(400)
            + T[self.month as usize - 1]
            + i64::from(self.day))
        .rem_euclid(7);
        ((sunday_based + 6) % 7) as usize
    }

    fn day_of_year(&self) -> u32 {
        const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let leap = (self.year % 4 == 0 && self.year % 100 != 0) || self.year % 400 == 0;
        CUMULATIVE[self.month as usize - 1] + self.day + u32::from(leap && self.month > 2)
    }

    /// Python's `strftime` for the C-locale directives (and glibc's `%-d` style no-padding).
    pub fn strftime(&self, format: &str) -> String {
        const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
        const MONTHS: [&str; 12] = [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ];
        let mut out = String::new();
        let mut chars = format.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let no_pad = chars.peek() == Some(&'-');
            if no_pad {
                chars.next();
            }
            let Some(d) = chars.next() else {
                out.push('%');
                break;
            };
            let num = |v: i64, width: usize| if no_pad { v.to_string() } else { format!("{v:0width$}") };
            let hour12 = if self.hour.is_multiple_of(12) { 12 } else { self.hour % 12 };
            let text = match d {
                'Y' => self.year.to_string(),
                'y' => num(self.year.rem_euclid(100), 2),
                'm' => num(i64::from(self.month), 2),
                'd' => num(i64::from(self.day), 2),
                'e' => format!("{:>2}", self.day),
                'H' => num(i64::from(self.hour), 2),
                'I' => num(i64::from(hour12), 2),
                'M' => num(i64::from(self.minute), 2),
                'S' => num(i64::from(self.second), 2),
                'p' => (if self.hour < 12 { "AM" } else { "PM" }).to_owned(),
                'B' => MONTHS[self.month as usize - 1].to_owned(),
                'b' | 'h' => MONTHS[self.month as usize - 1][..3].to_owned(),
                'A' => DAYS[self.weekday()].to_owned(),
                'a' => DAYS[self.weekday()][..3].to_owned(),
                'j' => num(i64::from(self.day_of_year()), 3),
                'u' => (self.weekday() + 1).to_string(),
                'w' => ((self.weekday() + 1) % 7).to_string(),
                'F' => format!("{}-{:02}-{:02}", self.year, self.month, self.day),
                'T' => format!("{:02}:{:02}:{:02}", self.hour, self.minute, self.second),
                'D' => format!("{:02}/{:02}/{:02}", self.month, self.day, self.year.rem_euclid(100)),
                'f' => "000000".to_owned(),
                'z' => "+0000".to_owned(),
                'Z' => "UTC".to_owned(),
                '%' => "%".to_owned(),
                other => format!("%{other}"),
            };
            out.push_str(&text);
        }
        out
    }
}

/// Rewrite transformers' `{% generation %}` / `{% endgeneration %}` tags (its AssistantTracker
/// extension, which renders the body unchanged) as `{% if true %}` / `{% endif %}`, keeping the
/// whitespace-control marks, so trimming works as it does around the original tags.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The closing `%}` starts after the opening `{%` (in `{%}` they overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open_mark, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
            _ => (String::new(), inner),
        };
        let (body, close_mark) = match body.trim_end().chars().last() {
            Some(c @ ('-' | '+')) => (&body.trim_end()[..body.trim_end().len() - 1], c.to_string()),
            _ => (body, String::new()),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{open_mark} {r} {close_mark}%}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Python's `repr(float)`: the shortest digits that round-trip, fixed notation for exponents
/// in [-4, 16), else `d.ddde±XX`.
pub fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    let sci = format!("{x:e}"); // shortest round-trip digits, e.g. "-1.25e-5"
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let frac = if digits.len() > 1 { format!(".{}", &digits[1..]) } else { String::new() };
        format!("{sign}{}{frac}e{}{:02}", &digits[..1], if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// `json.dumps` settings of transformers' `tojson` filter.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A dict key as Python's json converts it.
fn key_string(key: &Value) -> String {
    match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None | ValueKind::Undefined => "null".to_owned(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_owned(),
        ValueKind::Number => number_string(key),
        _ => key.to_string(),
    }
}

fn number_string(v: &Value) -> String {
    if let Ok(i) = i128::try_from(v.clone()) {
        return i.to_string();
    }
    match f64::try_from(v.clone()) {
        Ok(f) => python_float(f),
        Err(_) => v.to_string(),
    }
}

fn to_python_json(v: &Value, style: &JsonStyle, level: usize, out: &mut String) -> Result<(), Error> {
    if level > 256 {
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: value nested too deeply"));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number_string(v)),
        ValueKind::String => json_string(v.as_str().unwrap_or_default(), style.ensure_ascii, out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if style.sort_keys {
                keys.sort_by_key(key_string);
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, level + 1);
                json_string(&key_string(key), style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                to_python_json(&v.get_item(key)?, style, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, level + 1);
                to_python_json(item, style, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
    }
    Ok(())
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let positional = |i: usize| args.get(i).cloned();
    let arg = |name: &str, i: usize| -> Result<Option<Value>, Error> {
        Ok(kwargs.get::<Option<Value>>(name)?.or_else(|| positional(i)).filter(|v| !v.is_none()))
    };
    let ensure_ascii = arg("ensure_ascii", 0)?.is_some_and(|v| v.is_true());
    let indent = match arg("indent", 1)? {
        None => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_owned()),
        Some(v) => Some(" ".repeat(i64::try_from(v).unwrap_or(0).clamp(0, 64) as usize)),
    };
    let (item_sep, key_sep) = match arg("separators", 2)? {
        Some(seps) => {
            let parts: Vec<Value> = seps.try_iter()?.collect();
            let text = |i: usize| parts.get(i).and_then(|p| p.as_str().map(str::to_owned)).unwrap_or_default();
            (text(0), text(1))
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let sort_keys = arg("sort_keys", 3)?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let style = JsonStyle { ensure_ascii, indent, item_sep, key_sep, sort_keys };
    let mut out = String::new();
    to_python_json(&value, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Widest padding or indent a template may ask `format` / `indent` / `str.format` for: they
/// allocate what they are told, so `'%999999999s'|format(x)` would build a gigabyte.
const MAX_WIDTH: usize = 1024;

/// Refuse a printf- or `str.format`-style format whose field widths exceed [`MAX_WIDTH`].
fn check_format_widths(format: &str) -> Result<(), Error> {
    let chars: Vec<char> = format.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '%' || chars[i] == ':' {
            let mut j = i + 1;
            // flags, fill and alignment (printf repeats flags at will, zeros among them:
            // `%-0-09s` is a width of 9)
            while j < chars.len() && "-+ #0<>^=_,*".contains(chars[j]) {
                j += 1;
            }
            if j == i + 1 && chars.get(j + 1).is_some_and(|c| "<>^=".contains(*c)) {
                j += 2; // a fill character before an alignment (`{:x>9}`)
            }
            // the width, then a precision (`%.999f` pads with zeros as a width does)
            for what in ["width", "precision"] {
                let digits: String = chars[j..].iter().take_while(|c| c.is_ascii_digit()).collect();
                if digits.len() > 6 || digits.parse::<usize>().is_ok_and(|w| w > MAX_WIDTH) {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("a field {what} of {digits} (over {MAX_WIDTH}) in a format string"),
                    ));
                }
                j += digits.chars().count();
                if what == "width" && chars.get(j) != Some(&'.') {
                    break;
                }
                j += 1;
            }
        }
        i += 1;
    }
    Ok(())
}

/// Refuse a format string (`str.format`'s `{…}` fields, the `format` filter's `%…` fields) that
/// also holds a non-ASCII character: minijinja's format parser slices fields by bytes and panics
/// inside a character (found by fuzzing, both styles). Chat templates format ASCII strings.
fn check_format_fields(format: &str, marker: char, what: &str) -> Result<(), Error> {
    if format.contains(marker) && !format.is_ascii() {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "{what}: a format string with '{marker}' fields must be ASCII (non-ASCII text is not supported there)"
            ),
        ));
    }
    Ok(())
}

/// `format` with its widths checked (then minijinja's own).
fn format_filter(state: &State, format: &Value, args: Rest<Value>) -> Result<Value, Error> {
    check_format_widths(format.as_str().unwrap_or_default())?;
    check_format_fields(format.as_str().unwrap_or_default(), '%', "format")?;
    minijinja::filters::format(state, format, args)
}

/// `indent` with its width checked (then minijinja's own).
fn indent_filter(
    value: minijinja::value::StringInput,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let width_kwarg: Option<usize> = kwargs.peek("width")?;
    if width.or(width_kwarg).is_some_and(|w| w > MAX_WIDTH) {
        return Err(Error::new(ErrorKind::InvalidOperation, format!("indent wider than {MAX_WIDTH}")));
    }
    minijinja::filters::indent(value, width, first, blank, kwargs)
}

/// Python's string methods (minijinja-contrib's pycompat), with `str.format` widths checked.
fn python_methods(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if method == "format" {
        check_format_widths(value.as_str().unwrap_or_default())?;
        check_format_fields(value.as_str().unwrap_or_default(), '{', "str.format")?;
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Prints values as Jinja2 under Python does: `None`, `True`, `False`, floats as `repr`.
fn python_formatter(out: &mut minijinja::Output, state: &State, value: &Value) -> Result<(), Error> {
    let text = match value.kind() {
        ValueKind::None => Some("None".to_owned()),
        ValueKind::Bool => Some(if value.is_true() { "True" } else { "False" }.to_owned()),
        ValueKind::Number if i128::try_from(value.clone()).is_err() => {
            f64::try_from(value.clone()).ok().map(python_float)
        }
        _ => None,
    };
    match text {
        Some(t) => out.write_str(&t).map_err(Error::from),
        None => minijinja::escape_formatter(out, state, value),
    }
}

impl ChatTemplate {
    /// Compile a template (parse errors are reported here, with the line).
    pub fn new(source: &str) -> Result<Self> {
        Self::with_clock(source, CivilTime::now)
    }

    /// [`ChatTemplate::new`] with the clock `strftime_now` reads (tests fix it).
    pub fn with_clock(source: &str, clock: fn() -> CivilTime) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(python_methods);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_filter("format", format_filter);
        env.add_filter("indent", indent_filter);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("the template raised: {msg}")))
        });
        env.add_function("strftime_now", move |format: String| -> Result<Value, Error> {
            Ok(Value::from(clock().strftime(&format)))
        });
        env.add_template_owned("chat_template", rewrite_generation_tags(source))
            .map_err(|e| anyhow!("the chat template does not parse: {}", describe(&e)))?;
        Ok(Self { env })
    }

    /// Render `messages` (transformers' list of `{role, content}` dicts; a map keeps its key
    /// order, as a Python dict does) with the variables transformers passes:
    /// `add_generation_prompt`, `tools` / `documents` (none unless `variables` set them), the
    /// tokenizer's special tokens (`bos_token`, …) and any extra ones.
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        variables: &[(String, Value)],
    ) -> Result<String> {
        let mut ctx: Vec<(String, Value)> =
            vec![("tools".into(), Value::from(())), ("documents".into(), Value::from(()))];
        ctx.extend(variables.iter().cloned());
        ctx.push(("messages".into(), messages.clone()));
        ctx.push(("add_generation_prompt".into(), Value::from(add_generation_prompt)));
        let template = self.env.get_template("chat_template").expect("added in new");
        // Written through a cap, not checked afterwards: a loop within the fuel can write
        // gigabytes (2,000 × a 1.5 MB string took a fuzzed template past 2 GB).
        let mut output = CappedOutput::default();
        let result = template.render_captured_to(Value::from_iter(ctx), &mut output);
        if output.over {
            anyhow::bail!("the chat template produced over the {} MiB limit for a prompt", MAX_RENDERED_BYTES >> 20);
        }
        result.map_err(|e| anyhow!("the chat template failed to render: {}", describe(&e)))?;
        String::from_utf8(output.bytes).context("the chat template produced text that is not UTF-8")
    }
}

/// A render's output, refused past [`MAX_RENDERED_BYTES`] (the write fails, which stops the render).
#[derive(Default)]
struct CappedOutput {
    bytes: Vec<u8>,
    over: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            self.over = true;
            return Err(std::io::Error::other("over the size limit for a prompt"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A minijinja error with its cause chain and template line.
fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    if e.kind() == ErrorKind::OutOfFuel {
        text = format!("it ran over its budget of {FUEL} steps (an endless or very long loop)");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Parse the template out of a `chat_template.json` / `tokenizer_config.json` /
/// `processor_config.json` value: a string, or a list of named templates (`"default"` taken).
pub fn template_from_config(v: &Json) -> Option<String> {
    match v.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (1e16, "1e+16"),
            (123456789012345.6, "123456789012345.6"),
            (1.5e-7, "1.5e-07"),
            (-2.5, "-2.5"),
            (0.0001, "0.0001"),
            (100.0, "100.0"),
        ] {
            assert_eq!(python_float(x), want, "{x}");
        }
    }

    #[test]
    fn civil_time_and_strftime() {
        // 2024-07-26 13:05:09 UTC was a Friday.
        let t = CivilTime::from_unix(1_721_999_109);
        assert_eq!((t.year, t.month, t.day, t.hour, t.minute, t.second), (2024, 7, 26, 13, 5, 9));
        assert_eq!(t.strftime("%d %b %Y"), "26 Jul 2024");
        assert_eq!(t.strftime("%A %B %-d, %I:%M %p (%j)"), "Friday July 26, 01:05 PM (208)");
    }

    #[test]
    fn generation_tags_keep_their_whitespace_marks() {
        assert_eq!(rewrite_generation_tags("a{%- generation -%}b{% endgeneration %}"), "a{%- if true -%}b{% endif %}");
        assert_eq!(rewrite_generation_tags("{%generation%}{%+ endgeneration%}"), "{% if true %}{%+ endif %}");
        assert_eq!(rewrite_generation_tags("{% if x %}{% endif %}"), "{% if x %}{% endif %}");
    }
}
