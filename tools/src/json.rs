//! A tiny JSON encoder for `--json` output, so thinctl needs no serde.
//! Output is pretty-printed (two-space indent) and always valid JSON.

use std::fmt::Write;

pub enum Json {
    Bool(bool),
    UInt(u64),
    /// Non-finite values become `null`; JSON has no NaN or infinity.
    Float(f64),
    Str(String),
    Array(Vec<Json>),
    /// Keys in the order given, so output is stable for diffs and tests.
    Object(Vec<(&'static str, Json)>),
}

impl From<bool> for Json {
    fn from(v: bool) -> Json {
        Json::Bool(v)
    }
}
impl From<u64> for Json {
    fn from(v: u64) -> Json {
        Json::UInt(v)
    }
}
impl From<u32> for Json {
    fn from(v: u32) -> Json {
        Json::UInt(v.into())
    }
}
impl From<u8> for Json {
    fn from(v: u8) -> Json {
        Json::UInt(v.into())
    }
}
impl From<f64> for Json {
    fn from(v: f64) -> Json {
        Json::Float(v)
    }
}
impl From<&str> for Json {
    fn from(v: &str) -> Json {
        Json::Str(v.to_string())
    }
}
impl From<String> for Json {
    fn from(v: String) -> Json {
        Json::Str(v)
    }
}
impl<T: Into<Json>> From<Vec<T>> for Json {
    fn from(v: Vec<T>) -> Json {
        Json::Array(v.into_iter().map(Into::into).collect())
    }
}

impl Json {
    /// The document, ending in a newline.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out.push('\n');
        out
    }

    fn is_short_scalar(&self) -> bool {
        matches!(self, Json::Bool(_) | Json::UInt(_) | Json::Float(_))
    }

    fn write(&self, out: &mut String, depth: usize) {
        match self {
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::UInt(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Float(x) if x.is_finite() => {
                // Four decimals are plenty for percentages and ratios, and
                // keep 0.1 + 0.2 from printing as 0.30000000000000004.
                let _ = write!(out, "{}", (x * 10_000.0).round() / 10_000.0);
            }
            Json::Float(_) => out.push_str("null"),
            Json::Str(s) => escape_into(s, out),
            Json::Array(items) if items.is_empty() => out.push_str("[]"),
            // Lists of numbers or flags stay on one line: [80, 90, 95].
            Json::Array(items) if items.iter().all(Json::is_short_scalar) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out, depth);
                }
                out.push(']');
            }
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    indent(out, depth + 1);
                    item.write(out, depth + 1);
                }
                out.push('\n');
                indent(out, depth);
                out.push(']');
            }
            Json::Object(fields) if fields.is_empty() => out.push_str("{}"),
            Json::Object(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    indent(out, depth + 1);
                    escape_into(key, out);
                    out.push_str(": ");
                    value.write(out, depth + 1);
                }
                out.push('\n');
                indent(out, depth);
                out.push('}');
            }
        }
    }
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
}

/// Writes `s` as a JSON string literal: quotes, backslashes and control
/// characters escaped; U+2028/U+2029 too, so the output is also valid
/// JavaScript.
pub fn escape_into(s: &str, out: &mut String) {
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
            c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &str) -> String {
        let mut out = String::new();
        escape_into(s, &mut out);
        out
    }

    #[test]
    fn escapes_strings() {
        assert_eq!(esc("plain"), r#""plain""#);
        assert_eq!(esc(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(esc("l1\nl2\r\t"), r#""l1\nl2\r\t""#);
        assert_eq!(esc("\u{8}\u{c}"), r#""\b\f""#);
        assert_eq!(esc("\u{0}\u{1f}\u{7f}"), r#""\u0000\u001f\u007f""#);
        assert_eq!(esc("\u{2028}\u{2029}"), r#""\u2028\u2029""#);
        assert_eq!(esc("/é漢🙂"), "\"/é漢🙂\"");
        assert_eq!(esc(""), r#""""#);
    }

    #[test]
    fn renders_documents() {
        let doc = Json::Object(vec![
            ("name", "vm \"1\"".into()),
            ("size", 4096u64.into()),
            ("pct", 12.5.into()),
            ("third", (1.0 / 3.0).into()),
            ("nan", f64::NAN.into()),
            ("ok", true.into()),
            ("list", vec![1u64, 2].into()),
            ("names", vec!["a", "b"].into()),
            ("empty", Json::Array(vec![])),
            ("obj", Json::Object(vec![])),
        ]);
        let want = r#"{
  "name": "vm \"1\"",
  "size": 4096,
  "pct": 12.5,
  "third": 0.3333,
  "nan": null,
  "ok": true,
  "list": [1, 2],
  "names": [
    "a",
    "b"
  ],
  "empty": [],
  "obj": {}
}
"#;
        assert_eq!(doc.render(), want);
        assert_eq!(Json::Float(2.0).render(), "2\n");
        assert_eq!(Json::Float(f64::INFINITY).render(), "null\n");
    }
}
