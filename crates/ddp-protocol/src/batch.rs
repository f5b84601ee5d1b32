//! Atomic batches (PROTOCOL.md §11): the ops of `PATCH …/kv` and of a device's `batch` frame.
//!
//! ```text
//! {"op":"set","key":"ssid","value":"home"}
//! {"op":"delete","key":"old","ifRev":12}
//! {"op":"merge","key":"net","value":{"dhcp":true,"dns":null}}
//! ```
//!
//! A batch applies all its ops or none, in order: ops naming the same key apply one after the
//! other, each seeing what the ops before it left.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{Key, Reason, Rev, Value, ValueError};

/// What one op does to its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// Sets the key to the value.
    Set(Value),
    /// Deletes the key (it must exist when the op applies).
    Delete,
    /// Applies an RFC 7396 merge patch (an object) to the key's value.
    Merge(Value),
}

/// One op of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// The key.
    pub key: Key,
    /// What to do.
    pub kind: OpKind,
    /// `ifRev`: the key's rev must be this when the op applies (`0`: the key must be absent).
    pub if_rev: Option<Rev>,
}

/// Why a list of ops was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// The op at fault (from 0), when one is.
    pub index: Option<usize>,
    /// The reason.
    pub reason: Reason,
    /// A human sentence.
    pub message: String,
    /// The key the op named, when it named one.
    pub key: Option<String>,
}

impl OpError {
    fn at(index: usize, reason: Reason, message: impl Into<String>, key: Option<String>) -> OpError {
        OpError { index: Some(index), reason, message: format!("op {index}: {}", message.into()), key }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawOp<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    #[serde(borrow)]
    if_rev: Option<&'a RawValue>,
}

impl Op {
    /// Parses the JSON array of ops (`"ops"`). How many ops a batch may hold is the server's
    /// limit, checked where every write is.
    pub fn parse_list(ops: &RawValue) -> Result<Vec<Op>, OpError> {
        let whole = |reason, message: String| OpError { index: None, reason, message, key: None };
        if !ops.get().starts_with('[') {
            return Err(whole(Reason::InvalidParameter, "\"ops\" must be an array of ops".into()));
        }
        let raw: Vec<&RawValue> = serde_json::from_str(ops.get())
            .map_err(|e| whole(Reason::InvalidJson, format!("\"ops\" is not a JSON array: {e}")))?;
        if raw.is_empty() {
            return Err(whole(Reason::InvalidParameter, "a batch holds at least one op".into()));
        }
        raw.into_iter().enumerate().map(|(i, op)| Op::parse(i, op)).collect()
    }

    fn parse(index: usize, op: &RawValue) -> Result<Op, OpError> {
        if !op.get().starts_with('{') {
            return Err(OpError::at(index, Reason::InvalidParameter, "an op is an object {\"op\",\"key\",…}", None));
        }
        let raw: RawOp<'_> = serde_json::from_str(op.get())
            .map_err(|e| OpError::at(index, Reason::InvalidJson, format!("not an op: {e}"), None))?;
        let named = || raw.key.as_deref().map(str::to_owned);
        let key = raw
            .key
            .as_deref()
            .ok_or_else(|| OpError::at(index, Reason::InvalidKey, "the op has no \"key\"", None))
            .and_then(|k| Key::new(k).map_err(|e| OpError::at(index, Reason::InvalidKey, e.to_string(), named())))?;
        let value = || -> Result<Value, OpError> {
            match raw.value {
                None => Err(ValueError::Null),
                Some(v) => Value::from_raw(v),
            }
            .map_err(|e| OpError::at(index, Reason::InvalidValue, e.to_string(), named()))
        };
        let kind = match raw.op.as_deref() {
            Some("set") => OpKind::Set(value()?),
            Some("delete") => OpKind::Delete,
            Some("merge") => {
                let patch = value()?;
                // A patch that cannot merge even into nothing never will.
                patch
                    .check_merge_patch()
                    .map_err(|e| OpError::at(index, Reason::InvalidValue, e.to_string(), named()))?;
                OpKind::Merge(patch)
            }
            Some(other) => {
                return Err(OpError::at(
                    index,
                    Reason::InvalidParameter,
                    format!("unknown op {other:?}; ops are \"set\", \"delete\" and \"merge\""),
                    named(),
                ));
            }
            None => return Err(OpError::at(index, Reason::InvalidParameter, "the op has no \"op\"", named())),
        };
        let if_rev = match raw.if_rev.map(RawValue::get) {
            None | Some("null") => None,
            Some(text) => Some(Rev(text.parse::<u64>().map_err(|_| {
                OpError::at(index, Reason::InvalidParameter, "\"ifRev\" must be a rev (0: the key is absent)", named())
            })?)),
        };
        Ok(Op { key, kind, if_rev })
    }

    /// The op's JSON text, as a client sends it.
    pub fn to_json(&self) -> String {
        let if_rev = self.if_rev.map(|r| format!(r#","ifRev":{r}"#)).unwrap_or_default();
        match &self.kind {
            OpKind::Set(v) => format!(r#"{{"op":"set","key":"{}","value":{v}{if_rev}}}"#, self.key),
            OpKind::Delete => format!(r#"{{"op":"delete","key":"{}"{if_rev}}}"#, self.key),
            OpKind::Merge(v) => format!(r#"{{"op":"merge","key":"{}","value":{v}{if_rev}}}"#, self.key),
        }
    }

    /// A list of ops as a JSON array.
    pub fn list_json(ops: &[Op]) -> String {
        let mut out = String::from("[");
        for (i, op) in ops.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&op.to_json());
        }
        out.push(']');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Op>, OpError> {
        let raw: &RawValue = serde_json::from_str(text).expect("json");
        Op::parse_list(raw)
    }

    #[test]
    fn ops_parse_and_print_back() {
        let text = r#"[{"op":"set","key":"a","value":1.10},{"op":"delete","key":"b","ifRev":0},{"op":"merge","key":"c","value":{"x":null},"ifRev":7}]"#;
        let ops = parse(text).expect("ops");
        assert_eq!(ops[0].kind, OpKind::Set(Value::parse("1.10").expect("v")));
        assert_eq!(ops[1].if_rev, Some(Rev(0)));
        assert_eq!(ops[2].kind, OpKind::Merge(Value::parse(r#"{"x":null}"#).expect("v")));
        assert_eq!(Op::list_json(&ops), text);
    }

    #[test]
    fn bad_ops_name_their_index_and_reason() {
        let fail = |t: &str| parse(t).err().map(|e| (e.index, e.reason));
        assert_eq!(fail("[]"), Some((None, Reason::InvalidParameter)));
        assert_eq!(fail(r#"{"op":"set"}"#), Some((None, Reason::InvalidParameter)));
        assert_eq!(fail("[1,2,3,4]"), Some((Some(0), Reason::InvalidParameter)), "the op count is the server's limit");
        assert_eq!(
            fail(r#"[{"op":"set","key":"a","value":1},{"op":"set","key":"a b","value":1}]"#),
            Some((Some(1), Reason::InvalidKey))
        );
        assert_eq!(fail(r#"[{"op":"set","key":"a"}]"#), Some((Some(0), Reason::InvalidValue)));
        assert_eq!(fail(r#"[{"op":"merge","key":"a","value":[1]}]"#), Some((Some(0), Reason::InvalidValue)));
        assert_eq!(fail(r#"[{"op":"merge","key":"a","value":null}]"#), Some((Some(0), Reason::InvalidValue)));
        assert_eq!(fail(r#"[{"op":"put","key":"a"}]"#), Some((Some(0), Reason::InvalidParameter)));
        assert_eq!(fail(r#"[{"key":"a"}]"#), Some((Some(0), Reason::InvalidParameter)));
        assert_eq!(fail(r#"[{"op":"delete","key":"a","ifRev":-1}]"#), Some((Some(0), Reason::InvalidParameter)));
        assert_eq!(fail(r#"[{"op":"delete","key":"a","ifRev":"1"}]"#), Some((Some(0), Reason::InvalidParameter)));
        assert_eq!(fail(r#"[["set","a",1]]"#), Some((Some(0), Reason::InvalidParameter)));
        let err = parse(r#"[{"op":"delete","key":"a/b"}]"#).expect_err("bad key");
        assert_eq!(err.key.as_deref(), Some("a/b"));
        assert!(err.message.starts_with("op 0: "), "{}", err.message);
    }
}
