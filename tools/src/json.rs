//! `--json` output: serde_json values, built with their fields in the
//! order given (so output is stable for diffs and tests), pretty-printed.

pub use serde_json::Value as Json;

/// An object with its fields in this order.
pub fn obj(fields: Vec<(&str, Json)>) -> Json {
    Json::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// Renders a document for `--json`.
pub trait Render {
    /// The document, pretty-printed, ending in a newline.
    fn render(&self) -> String;
}

impl Render for Json {
    fn render(&self) -> String {
        // Serialising a Value cannot fail: its keys are strings and its
        // numbers finite (serde_json turns NaN and infinities into null).
        let mut s = serde_json::to_string_pretty(&rounded(self)).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Four decimals are plenty for percentages and ratios, and keep 0.1 + 0.2
/// from printing as 0.30000000000000004.
fn rounded(v: &Json) -> Json {
    match v {
        Json::Number(n) if n.is_f64() => n
            .as_f64()
            .map(|x| (x * 10_000.0).round() / 10_000.0)
            .map_or(Json::Null, Json::from),
        Json::Array(items) => Json::Array(items.iter().map(rounded).collect()),
        Json::Object(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), rounded(v))).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_documents_in_field_order() {
        let doc = obj(vec![
            ("name", "vm \"1\"\u{2028}".into()),
            ("size", 4096u64.into()),
            ("pct", 12.5.into()),
            ("third", (1.0 / 3.0).into()),
            ("nan", f64::NAN.into()),
            ("ok", true.into()),
            ("list", vec![1u64, 2].into()),
            ("empty", Json::Array(vec![])),
        ]);
        let text = doc.render();
        assert!(text.ends_with("}\n"));
        let keys: Vec<&str> =
            ["name", "size", "pct", "third", "nan", "ok", "list", "empty"].to_vec();
        let mut at = 0;
        for k in keys {
            let i = text[at..].find(&format!("\"{k}\"")).expect(k) + at;
            at = i;
        }
        let back: Json = serde_json::from_str(&text).unwrap();
        assert_eq!(back["name"], "vm \"1\"\u{2028}");
        assert_eq!(back["third"], 0.3333);
        assert_eq!(back["nan"], Json::Null);
        assert_eq!(back["list"], serde_json::json!([1, 2]));
    }
}
