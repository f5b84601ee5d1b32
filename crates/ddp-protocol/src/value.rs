//! Values of a key-value store: any JSON except `null`, kept as exact text.

use std::fmt;
use std::sync::Arc;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Deepest nesting of arrays and objects a value may have.
pub const MAX_DEPTH: usize = 32;

/// Why a JSON text is not a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The value is JSON `null` (or absent).
    #[error("value must not be null")]
    Null,
    /// Arrays and objects nest deeper than [`MAX_DEPTH`].
    #[error("value nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A merge patch that is not a JSON object.
    #[error("a merge patch must be a JSON object")]
    NotAnObject,
    /// The text is not a single JSON value.
    #[error("value is not valid JSON: {0}")]
    Invalid(String),
}

/// A value: any JSON number, string, boolean, array or object, never `null`.
///
/// The value is kept as its JSON text with insignificant white space removed and nothing else
/// changed, so numbers come back exactly as sent (`12345678901234567890`, `1.10`, `-0.0`). Cloning
/// is cheap (the text is shared).
#[derive(Clone)]
pub struct Value(Arc<RawValue>);

impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        self.as_json() == other.as_json()
    }
}

impl Eq for Value {}

impl std::hash::Hash for Value {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_json().hash(state);
    }
}

impl Value {
    /// Parses one JSON text (surrounding white space allowed) into a value.
    pub fn parse(text: &str) -> Result<Value, ValueError> {
        let raw: &RawValue = serde_json::from_str(text).map_err(|e| {
            if e.to_string().contains("recursion limit") {
                ValueError::TooDeep
            } else {
                ValueError::Invalid(e.to_string())
            }
        })?;
        Self::from_raw(raw)
    }

    /// The value of an already-parsed JSON text (from a larger document).
    pub fn from_raw(raw: &RawValue) -> Result<Value, ValueError> {
        let minified = minify(raw.get())?;
        if minified == "null" {
            return Err(ValueError::Null);
        }
        let raw = RawValue::from_string(minified).map_err(|e| ValueError::Invalid(e.to_string()))?;
        Ok(Value(Arc::from(raw)))
    }

    /// Reads back a value's text from storage, where only texts made by [`Value::parse`] are kept.
    /// Checks the text once more, so corrupted storage gives an error rather than bad JSON.
    pub fn from_stored(text: String) -> Result<Value, ValueError> {
        let raw = RawValue::from_string(text).map_err(|e| ValueError::Invalid(e.to_string()))?;
        if raw.get() == "null" {
            return Err(ValueError::Null);
        }
        Ok(Value(Arc::from(raw)))
    }

    /// `{}`.
    pub fn empty_object() -> Value {
        // A constant text that always parses.
        Value::from_stored("{}".to_owned()).unwrap_or_else(|_| unreachable!("{{}} is a JSON object"))
    }

    /// The value's JSON text.
    pub fn as_json(&self) -> &str {
        self.0.get()
    }

    /// Length of the JSON text in bytes (what the value size limit counts).
    pub fn len(&self) -> usize {
        self.as_json().len()
    }

    /// Never true: the shortest value is one byte long (`0`). Here for API completeness.
    pub fn is_empty(&self) -> bool {
        self.as_json().is_empty()
    }

    /// The value as a `serde_json::Value` (numbers lose their exact text beyond f64/u64/i64).
    pub fn to_json_value(&self) -> serde_json::Value {
        serde_json::from_str(self.as_json()).unwrap_or(serde_json::Value::Null)
    }

    /// The value's text as a raw JSON value, for embedding in a larger document.
    pub fn as_raw(&self) -> &RawValue {
        &self.0
    }
}

impl Value {
    /// Whether the value is a JSON object.
    pub fn is_object(&self) -> bool {
        self.as_json().starts_with('{')
    }

    /// Checks that this value can be a merge patch: an object whose member names can be read
    /// ([`Value::merge_patch`] into nothing succeeds).
    pub fn check_merge_patch(&self) -> Result<(), ValueError> {
        if !self.is_object() {
            return Err(ValueError::NotAnObject);
        }
        Value::merge_patch(None, self).map(|_| ())
    }

    /// RFC 7396 JSON merge patch: `patch` applied to `target` (absent, or not an object, counts
    /// as `{}`). Members set to `null` are removed; other members are merged recursively; a
    /// patch that is not an object replaces the target. Member order is kept: the target's
    /// members stay where they were, new ones are appended in the patch's order; a name given
    /// twice counts once, at its first place with its last value (as a JSON parser reads it).
    /// Numbers and strings keep their exact text.
    ///
    /// Refused ([`ValueError::Invalid`]): an object on the merge's way (of the target or the
    /// patch) with a member name that holds U+0000 or a lone surrogate escape (`"\ud800"`) —
    /// names no JSON text reader agrees on.
    pub fn merge_patch(target: Option<&Value>, patch: &Value) -> Result<Value, ValueError> {
        if !patch.is_object() {
            return Ok(patch.clone());
        }
        let merged = merge_text(target.map(Value::as_json), patch.as_json())?;
        // Both inputs are values and the result only nests as deep as they do.
        Value::from_stored(merged)
    }
}

/// The members of a JSON object, in order, values as raw text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Members<'a>, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Members<'a>, M::Error> {
                let mut members = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    members.push((k, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// The members of the object `text`, a name given twice once (first place, last value).
fn object_members(text: &str) -> Result<Vec<(String, std::borrow::Cow<'_, str>)>, ValueError> {
    let bad = |why: String| ValueError::Invalid(format!("cannot merge: {why}"));
    let parsed =
        serde_json::from_str::<Members<'_>>(text).map_err(|e| bad(format!("a member name is unreadable ({e})")))?;
    let mut out: Vec<(String, std::borrow::Cow<'_, str>)> = Vec::with_capacity(parsed.0.len());
    for (name, value) in parsed.0 {
        if name.contains('\0') {
            return Err(bad("a member name holds U+0000".into()));
        }
        match out.iter().position(|(k, _)| *k == name) {
            Some(i) => out[i].1 = std::borrow::Cow::Borrowed(value.get()),
            None => out.push((name, std::borrow::Cow::Borrowed(value.get()))),
        }
    }
    Ok(out)
}

/// [`Value::merge_patch`] on JSON texts; `patch` is an object.
fn merge_text(target: Option<&str>, patch: &str) -> Result<String, ValueError> {
    let mut members = match target {
        Some(t) if t.starts_with('{') => object_members(t)?,
        _ => Vec::new(),
    };
    for (key, value) in object_members(patch)? {
        let text = minify(&value)?;
        let at = members.iter().position(|(k, _)| *k == key);
        if text == "null" {
            members.retain(|(k, _)| *k != key);
            continue;
        }
        let merged = if text.starts_with('{') { merge_text(at.map(|i| members[i].1.as_ref()), &text)? } else { text };
        match at {
            Some(i) => members[i].1 = std::borrow::Cow::Owned(merged),
            None => members.push((key, std::borrow::Cow::Owned(merged))),
        }
    }
    let mut out = String::with_capacity(2 + members.iter().map(|(k, v)| k.len() + v.len() + 4).sum::<usize>());
    out.push('{');
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(k).map_err(|e| ValueError::Invalid(e.to_string()))?);
        out.push(':');
        out.push_str(v);
    }
    out.push('}');
    Ok(out)
}

/// Removes white space outside strings and checks the nesting depth. `text` must be valid JSON.
///
/// Works on bytes: every structural character is ASCII, and bytes of multi-byte UTF-8 characters
/// are never mistaken for one. Text without white space to remove is copied in one piece.
fn minify(text: &str) -> Result<String, ValueError> {
    let bytes = text.as_bytes();
    let mut out: Option<Vec<u8>> = None; // allocated only once white space must be dropped
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => {
                    out.get_or_insert_with(|| {
                        let mut v = Vec::with_capacity(bytes.len());
                        v.extend_from_slice(&bytes[..i]);
                        v
                    });
                    continue;
                }
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err(ValueError::TooDeep);
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        if let Some(out) = out.as_mut() {
            out.push(b);
        }
    }
    match out {
        None => Ok(text.to_owned()),
        // Only ASCII white space outside strings was dropped, so the bytes are still UTF-8.
        Some(v) => String::from_utf8(v).map_err(|e| ValueError::Invalid(e.to_string())),
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_raw().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Value::from_raw(&raw).map_err(D::Error::custom)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_json())
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Value({})", self.as_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn numbers_keep_their_exact_text() {
        for n in ["12345678901234567890", "1.10", "-0.0", "1e400", "0.1000000000000000000001"] {
            assert_eq!(Value::parse(n).expect("valid").as_json(), n);
        }
    }

    #[test]
    fn white_space_outside_strings_is_removed() {
        let v = Value::parse(" { \"a b\" : [ 1 , 2.50 ] ,\n\"c\":\"x  y\" } ").expect("valid");
        assert_eq!(v.as_json(), r#"{"a b":[1,2.50],"c":"x  y"}"#);
        let v = Value::parse(r#""quote \" and \\ backslash ""#).expect("valid");
        assert_eq!(v.as_json(), r#""quote \" and \\ backslash ""#);
    }

    #[test]
    fn null_is_rejected_but_nested_null_is_fine() {
        assert_eq!(Value::parse("null"), Err(ValueError::Null));
        assert_eq!(Value::parse(" null "), Err(ValueError::Null));
        assert!(Value::parse(r#"{"a":null}"#).is_ok());
    }

    #[test]
    fn depth_limit_is_32() {
        let ok = format!("{}1{}", "[".repeat(32), "]".repeat(32));
        assert!(Value::parse(&ok).is_ok());
        let deep = format!("{}1{}", "[".repeat(33), "]".repeat(33));
        assert_eq!(Value::parse(&deep), Err(ValueError::TooDeep));
        let very_deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
        assert_eq!(Value::parse(&very_deep), Err(ValueError::TooDeep));
    }

    #[test]
    fn invalid_json_is_rejected() {
        for bad in ["", "{", "[1,]", "tru", "1 2", "'x'"] {
            assert!(matches!(Value::parse(bad), Err(ValueError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn serializes_raw_inside_a_document() {
        #[derive(Serialize)]
        struct Item<'a> {
            key: &'a str,
            value: &'a Value,
        }
        let v = Value::parse("1.10").expect("valid");
        let doc = serde_json::to_string(&Item { key: "k", value: &v }).expect("serialize");
        assert_eq!(doc, r#"{"key":"k","value":1.10}"#);
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let merge = |t: Option<&str>, p: &str| {
            Value::merge_patch(t.map(|t| Value::parse(t).expect("target")).as_ref(), &Value::parse(p).expect("patch"))
                .expect("merges")
                .as_json()
                .to_owned()
        };
        // The examples of RFC 7396 appendix A (target, patch, result).
        let cases = [
            (r#"{"a":"b"}"#, r#"{"a":"c"}"#, r#"{"a":"c"}"#),
            (r#"{"a":"b"}"#, r#"{"b":"c"}"#, r#"{"a":"b","b":"c"}"#),
            (r#"{"a":"b"}"#, r#"{"a":null}"#, r#"{}"#),
            (r#"{"a":"b","b":"c"}"#, r#"{"a":null}"#, r#"{"b":"c"}"#),
            (r#"{"a":["b"]}"#, r#"{"a":"c"}"#, r#"{"a":"c"}"#),
            (r#"{"a":"c"}"#, r#"{"a":["b"]}"#, r#"{"a":["b"]}"#),
            (r#"{"a":{"b":"c"}}"#, r#"{"a":{"b":"d","c":null}}"#, r#"{"a":{"b":"d"}}"#),
            (r#"{"a":[{"b":"c"}]}"#, r#"{"a":[1]}"#, r#"{"a":[1]}"#),
            (r#"["a","b"]"#, r#"{"a":"c"}"#, r#"{"a":"c"}"#),
            (r#"{"e":null}"#, r#"{"a":1}"#, r#"{"e":null,"a":1}"#),
            (r#"[1,2]"#, r#"{"a":"b","c":null}"#, r#"{"a":"b"}"#),
            (r#"{}"#, r#"{"a":{"bb":{"ccc":null}}}"#, r#"{"a":{"bb":{}}}"#),
        ];
        for (target, patch, result) in cases {
            assert_eq!(merge(Some(target), patch), result, "{target} + {patch}");
        }
        assert_eq!(merge(None, r#"{"a":{"b":null},"c":1}"#), r#"{"a":{},"c":1}"#, "absent counts as {{}}");
        assert_eq!(merge(Some("7"), r#"{"x":1}"#), r#"{"x":1}"#, "a number counts as {{}}");
        assert_eq!(
            merge(Some(r#"{"z":1.10,"a":{"n":12345678901234567890}}"#), r#"{ "a" : { "m" : -0.0 } }"#),
            r#"{"z":1.10,"a":{"n":12345678901234567890,"m":-0.0}}"#,
            "order and exact numbers are kept"
        );
        assert_eq!(merge(Some(r#"{"a":1,"b":2,"a":3}"#), r#"{"c":1,"c":2}"#), r#"{"a":3,"b":2,"c":2}"#, "last wins");
        for (target, patch) in [
            (None, r#"{"\ud800":1}"#),
            (Some(r#"{"\ud800":1,"x":2}"#), r#"{"y":3}"#),
            (Some(r#"{"a":{"\u0000":1}}"#), r#"{"a":{"b":1}}"#),
            (None, r#"{"a":{"b\u0000":1}}"#),
        ] {
            let merged = Value::merge_patch(
                target.map(|t| Value::parse(t).expect("target")).as_ref(),
                &Value::parse(patch).expect("patch"),
            );
            assert!(matches!(merged, Err(ValueError::Invalid(_))), "{target:?} + {patch}: {merged:?}");
        }
    }

    proptest! {
        /// Minifying keeps the meaning: the minified text parses to the same JSON as the input.
        #[test]
        fn minify_preserves_meaning(v in arb_json()) {
            let pretty = serde_json::to_string_pretty(&v).expect("serialize");
            let parsed = Value::parse(&pretty).expect("valid");
            let back: serde_json::Value = serde_json::from_str(parsed.as_json()).expect("reparse");
            prop_assert_eq!(back, v.clone());
            prop_assert!(!parsed.as_json().contains('\n'));
        }
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[ a-z\"\\\\\n]{0,8}".prop_map(serde_json::Value::from),
        ];
        let inner = leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z ]{0,4}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        });
        inner.prop_filter("not null", |v| !v.is_null())
    }
}
