//! The small JSON subset the metadata dump needs (`dump.rs`): objects,
//! arrays, strings, non-negative integers, booleans and null. A dump is
//! user input to `restore`, so the parser returns errors, never panics,
//! bounds nesting, and rejects what the dump never contains (fractions,
//! negative numbers, integers past u64).

use std::fmt::Write;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Num(u64),
    Str(String),
    Arr(Vec<Value>),
    /// Keys in document order; a key given twice is an error.
    Obj(Vec<(String, Value)>),
}

/// Deepest nesting accepted (the dump uses 4 levels).
const MAX_DEPTH: usize = 32;

pub(crate) fn parse(text: &str) -> Result<Value, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.err("trailing characters after the document"));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> String {
        // Line numbers are what an admin editing a dump needs.
        let upto = self.i.min(self.s.len());
        let line = 1 + self.s[..upto].iter().filter(|&&c| c == b'\n').count();
        format!("line {line}: {what}")
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && b" \t\r\n".contains(&self.s[self.i]) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", c as char)))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deeply"));
        }
        self.ws();
        match self.peek() {
            None => Err(self.err("unexpected end of input")),
            Some(b'{') => {
                self.i += 1;
                let mut fields: Vec<(String, Value)> = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(Value::Obj(fields));
                }
                loop {
                    self.ws();
                    if self.peek() != Some(b'"') {
                        return Err(self.err("expected a quoted key"));
                    }
                    let key = self.string()?;
                    if fields.iter().any(|(k, _)| *k == key) {
                        return Err(self.err(&format!("key \"{key}\" given twice")));
                    }
                    self.expect(b':')?;
                    let v = self.value(depth + 1)?;
                    fields.push((key, v));
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Value::Obj(fields));
                        }
                        _ => return Err(self.err("expected ',' or '}'")),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(Value::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Value::Arr(items));
                        }
                        _ => return Err(self.err("expected ',' or ']'")),
                    }
                }
            }
            Some(b'"') => self.string().map(Value::Str),
            Some(b't') => self.word("true", Value::Bool(true)),
            Some(b'f') => self.word("false", Value::Bool(false)),
            Some(b'n') => self.word("null", Value::Null),
            Some(b'0'..=b'9') => {
                let mut n: u64 = 0;
                let start = self.i;
                while let Some(c @ b'0'..=b'9') = self.peek() {
                    n = n
                        .checked_mul(10)
                        .and_then(|n| n.checked_add((c - b'0') as u64))
                        .ok_or_else(|| self.err("number too large"))?;
                    self.i += 1;
                }
                if self.i - start > 1 && self.s[start] == b'0' {
                    return Err(self.err("number with a leading zero"));
                }
                if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
                    return Err(self.err("only whole numbers are expected"));
                }
                Ok(Value::Num(n))
            }
            Some(b'-') => Err(self.err("negative numbers are not expected")),
            Some(_) => Err(self.err("unexpected character")),
        }
    }

    fn word(&mut self, w: &str, v: Value) -> Result<Value, String> {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(v)
        } else {
            Err(self.err("unexpected word"))
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self
            .s
            .get(self.i..self.i + 4)
            .ok_or_else(|| self.err("short \\u escape"))?;
        let text = std::str::from_utf8(digits).map_err(|_| self.err("bad \\u escape"))?;
        let v = u32::from_str_radix(text, 16).map_err(|_| self.err("bad \\u escape"))?;
        self.i += 4;
        Ok(v)
    }

    /// A string; `self.i` is at the opening quote.
    fn string(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err("unterminated string"));
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return Err(self.err("unterminated string"));
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&hi) {
                                if self.s.get(self.i..self.i + 2) != Some(b"\\u") {
                                    return Err(self.err("lone surrogate in \\u escape"));
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err(self.err("bad surrogate pair"));
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            char::from_u32(code).ok_or_else(|| self.err("bad \\u escape"))?
                        }
                        _ => return Err(self.err("bad escape")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c if c < 0x20 => return Err(self.err("control character in a string")),
                c => out.push(c),
            }
        }
        // The input is a &str, and escapes add whole characters.
        String::from_utf8(out).map_err(|_| self.err("invalid UTF-8 in a string"))
    }
}

/// Appends `s` as a JSON string literal.
pub(crate) fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Field access with errors that name the field.
impl Value {
    pub fn field<'a>(&'a self, key: &str, ctx: &str) -> Result<&'a Value, String> {
        match self {
            Value::Obj(fields) => fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .ok_or_else(|| format!("{ctx}: missing \"{key}\"")),
            _ => Err(format!("{ctx}: not an object")),
        }
    }

    pub fn u64_field(&self, key: &str, ctx: &str) -> Result<u64, String> {
        match self.field(key, ctx)? {
            Value::Num(n) => Ok(*n),
            _ => Err(format!("{ctx}: \"{key}\" must be a whole number")),
        }
    }

    pub fn u32_field(&self, key: &str, ctx: &str) -> Result<u32, String> {
        let n = self.u64_field(key, ctx)?;
        u32::try_from(n).map_err(|_| format!("{ctx}: \"{key}\" is too large"))
    }

    pub fn str_field<'a>(&'a self, key: &str, ctx: &str) -> Result<&'a str, String> {
        match self.field(key, ctx)? {
            Value::Str(s) => Ok(s),
            _ => Err(format!("{ctx}: \"{key}\" must be a string")),
        }
    }

    pub fn arr_field<'a>(&'a self, key: &str, ctx: &str) -> Result<&'a [Value], String> {
        match self.field(key, ctx)? {
            Value::Arr(a) => Ok(a),
            _ => Err(format!("{ctx}: \"{key}\" must be an array")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_should() {
        let v = parse(" {\"a\": [1, 0, 18446744073709551615], \"b\": \"x\\u00e9\\ud83d\\ude00\\n\", \"c\": [true, false, null], \"d\": {}} ").unwrap();
        assert_eq!(
            v.field("a", "t").unwrap(),
            &Value::Arr(vec![Value::Num(1), Value::Num(0), Value::Num(u64::MAX)])
        );
        assert_eq!(v.str_field("b", "t").unwrap(), "x\u{e9}\u{1f600}\n");
        assert_eq!(v.field("d", "t").unwrap(), &Value::Obj(vec![]));
        let mut s = String::new();
        write_str(&mut s, "q\"\\\n\u{1}é");
        assert_eq!(parse(&s).unwrap(), Value::Str("q\"\\\n\u{1}é".into()));
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        let deep = "[".repeat(100) + &"]".repeat(100);
        for bad in [
            "",
            "{",
            "[1,",
            "[1 2]",
            "{\"a\" 1}",
            "{\"a\":1,\"a\":2}",
            "18446744073709551616",
            "-1",
            "1.5",
            "01",
            "\"abc",
            "\"\\ud800\"",
            "\"\\u12\"",
            "\"\\x\"",
            "tru",
            "{} x",
            "\"\u{1}\"",
            &deep,
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
        // Every prefix of a valid document is handled.
        let doc = "{\"k\": [1, \"s\\u00e9\", {\"x\": null}]}";
        for i in 0..doc.len() {
            if doc.is_char_boundary(i) {
                let _ = parse(&doc[..i]);
            }
        }
    }
}
