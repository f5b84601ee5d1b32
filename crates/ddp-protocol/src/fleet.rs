//! Finding devices by their state (PROTOCOL.md §12): the `where` conditions of `GET /devices`
//! and of a job's selection.
//!
//! A condition is `<key><op><JSON literal>` with `op` one of `=` `!=` `<` `<=` `>` `>=`,
//! `<key>` (the key exists) or `!<key>` (it is absent). A comparison matches only a value of the
//! literal's own JSON type: numbers compare as numbers, strings as strings (by code point), and
//! booleans, arrays and objects only by `=`/`!=` of their minified JSON text (so an object's
//! members must come in the same order). An absent key matches no comparison, not even `!=`.
//! Numbers whose JSON text is longer than [`MAX_NUMBER_BYTES`] and strings whose JSON text is
//! longer than [`MAX_STRING_BYTES`] are not indexed and match no comparison (they still exist).

use std::fmt;

use crate::key::Key;
use crate::value::Value;

/// Longest JSON text of a number that comparisons see.
pub const MAX_NUMBER_BYTES: usize = 100;
/// Longest JSON text (quotes and escapes included) of a string that comparisons see.
pub const MAX_STRING_BYTES: usize = 1024;

/// A comparison operator of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl Cmp {
    /// The operator as written, which is also its SQL spelling (`!=` and `<>` alike in SQL).
    pub const fn as_str(self) -> &'static str {
        match self {
            Cmp::Eq => "=",
            Cmp::Ne => "!=",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
        }
    }

    /// Whether `ordering` (of the value against the literal) satisfies this operator.
    pub fn holds(self, ordering: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Cmp::Eq => ordering == Equal,
            Cmp::Ne => ordering != Equal,
            Cmp::Lt => ordering == Less,
            Cmp::Le => ordering != Greater,
            Cmp::Gt => ordering == Greater,
            Cmp::Ge => ordering != Less,
        }
    }
}

/// A number literal: an integer when it is one that fits 64 bits, else a double.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    /// An integer.
    Int(i64),
    /// Any other number.
    Float(f64),
}

impl Number {
    fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }
}

/// What a condition asks of its key.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// `<key>`: the key exists.
    Exists,
    /// `!<key>`: the key is absent.
    Absent,
    /// The value is a number that compares so with the literal.
    Number(Cmp, Number),
    /// The value is a string that compares so with the literal.
    String(Cmp, String),
    /// The value is of the literal's type (boolean, array or object) and its minified text is
    /// (`equal`) or is not the literal's.
    Json {
        /// `=` (true) or `!=` (false).
        equal: bool,
        /// The literal, minified.
        text: String,
    },
}

/// One condition on a device's store.
#[derive(Debug, Clone, PartialEq)]
pub struct Where {
    /// The key it looks at.
    pub key: Key,
    /// What it asks.
    pub test: Test,
}

/// The first character of a minified value's JSON text tells its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Number,
    String,
    Boolean,
    Array,
    Object,
}

fn kind_of(json: &str) -> Kind {
    match json.as_bytes().first() {
        Some(b'"') => Kind::String,
        Some(b't' | b'f') => Kind::Boolean,
        Some(b'[') => Kind::Array,
        Some(b'{') => Kind::Object,
        _ => Kind::Number,
    }
}

impl Where {
    /// Parses one condition in the query syntax; the error names the part at fault.
    pub fn parse(text: &str) -> Result<Where, String> {
        if let Some(key) = text.strip_prefix('!')
            && !key.starts_with('=')
        {
            let key = Key::new(key).map_err(|e| format!("where={text}: {e}"))?;
            return Ok(Where { key, test: Test::Absent });
        }
        let Some(at) = text.find(['=', '!', '<', '>']) else {
            let key = Key::new(text).map_err(|e| format!("where={text}: {e}"))?;
            return Ok(Where { key, test: Test::Exists });
        };
        let (key, rest) = text.split_at(at);
        let key = Key::new(key).map_err(|e| format!("where={text}: {e}"))?;
        let (cmp, literal) = if let Some(l) = rest.strip_prefix("!=") {
            (Cmp::Ne, l)
        } else if let Some(l) = rest.strip_prefix("<=") {
            (Cmp::Le, l)
        } else if let Some(l) = rest.strip_prefix(">=") {
            (Cmp::Ge, l)
        } else if let Some(l) = rest.strip_prefix('=') {
            (Cmp::Eq, l)
        } else if let Some(l) = rest.strip_prefix('<') {
            (Cmp::Lt, l)
        } else if let Some(l) = rest.strip_prefix('>') {
            (Cmp::Gt, l)
        } else {
            return Err(format!("where={text}: expected one of = != < <= > >= after the key {key}"));
        };
        if literal.trim() == "null" {
            return Err(format!("where={text}: no value is null; `where=!{key}` finds devices without the key"));
        }
        let value = Value::parse(literal).map_err(|e| {
            format!(
                "where={text}: {literal:?} is not a JSON literal ({e}); strings are quoted: {key}{}\"{literal}\"",
                cmp.as_str()
            )
        })?;
        let json = value.as_json();
        let test = match kind_of(json) {
            Kind::Number => {
                let n: serde_json::Number = serde_json::from_str(json).map_err(|e| format!("where={text}: {e}"))?;
                let n = match n.as_i64() {
                    Some(i) => Number::Int(i),
                    None => Number::Float(n.as_f64().unwrap_or(f64::NAN)),
                };
                if let Number::Float(f) = n
                    && !f.is_finite()
                {
                    return Err(format!("where={text}: {literal} is out of range"));
                }
                Test::Number(cmp, n)
            }
            Kind::String => {
                let s: String = serde_json::from_str(json).map_err(|e| format!("where={text}: {e}"))?;
                Test::String(cmp, s)
            }
            kind => match cmp {
                Cmp::Eq | Cmp::Ne => Test::Json { equal: cmp == Cmp::Eq, text: json.to_owned() },
                _ => {
                    let what = match kind {
                        Kind::Boolean => "booleans",
                        Kind::Array => "arrays",
                        _ => "objects",
                    };
                    return Err(format!(
                        "where={text}: {what} compare only with = and !=; < <= > >= compare numbers or strings"
                    ));
                }
            },
        };
        Ok(Where { key, test })
    }

    /// Whether a store whose `key` holds `value` (or nothing) matches: the reference the
    /// storage backends' queries agree with.
    pub fn matches(&self, value: Option<&Value>) -> bool {
        let Some(value) = value else { return self.test == Test::Absent };
        let json = value.as_json();
        match &self.test {
            Test::Exists => true,
            Test::Absent => false,
            Test::Number(cmp, n) => {
                if kind_of(json) != Kind::Number || json.len() > MAX_NUMBER_BYTES {
                    return false;
                }
                let Ok(v) = serde_json::from_str::<serde_json::Number>(json) else { return false };
                let ordering = match (v.as_i64(), n) {
                    (Some(v), Number::Int(n)) => Some(v.cmp(n)),
                    _ => v.as_f64().unwrap_or(f64::NAN).partial_cmp(&n.as_f64()),
                };
                ordering.is_some_and(|o| cmp.holds(o))
            }
            Test::String(cmp, s) => {
                kind_of(json) == Kind::String
                    && json.len() <= MAX_STRING_BYTES
                    && serde_json::from_str::<String>(json).is_ok_and(|v| cmp.holds(v.as_str().cmp(s.as_str())))
            }
            Test::Json { equal, text } => kind_of(json) == kind_of(text) && (json == text) == *equal,
        }
    }
}

impl fmt::Display for Where {
    /// The condition in the query syntax (what [`Where::parse`] reads back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.key;
        match &self.test {
            Test::Exists => write!(f, "{key}"),
            Test::Absent => write!(f, "!{key}"),
            Test::Number(cmp, Number::Int(n)) => write!(f, "{key}{}{n}", cmp.as_str()),
            Test::Number(cmp, Number::Float(n)) => write!(f, "{key}{}{n:?}", cmp.as_str()),
            Test::String(cmp, s) => {
                let quoted = serde_json::to_string(s).map_err(|_| fmt::Error)?;
                write!(f, "{key}{}{quoted}", cmp.as_str())
            }
            Test::Json { equal, text } => write!(f, "{key}{}{text}", if *equal { "=" } else { "!=" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(json: &str) -> Value {
        Value::parse(json).expect("parses")
    }

    #[test]
    fn parses_every_form() {
        let w = Where::parse("fw<2.1").expect("parses");
        assert_eq!(w.key.as_str(), "fw");
        assert_eq!(w.test, Test::Number(Cmp::Lt, Number::Float(2.1)));
        assert_eq!(Where::parse("n>=3").expect("parses").test, Test::Number(Cmp::Ge, Number::Int(3)));
        assert_eq!(Where::parse("mode!=\"eco\"").expect("parses").test, Test::String(Cmp::Ne, "eco".into()));
        assert_eq!(Where::parse("on=true").expect("parses").test, Test::Json { equal: true, text: "true".into() });
        assert_eq!(
            Where::parse("cfg={ \"a\" : 1 }").expect("parses").test,
            Test::Json { equal: true, text: "{\"a\":1}".into() }
        );
        assert_eq!(Where::parse("fw").expect("parses").test, Test::Exists);
        assert_eq!(Where::parse("!fw").expect("parses").test, Test::Absent);
        for text in ["fw<2.1", "n>=3", "mode!=\"eco\"", "on=true", "fw", "!fw", "x<=-1", "s>\"a\\\"b\""] {
            assert_eq!(
                Where::parse(&Where::parse(text).expect("parses").to_string()).expect("parses"),
                Where::parse(text).expect("parses")
            );
        }
    }

    #[test]
    fn refuses_bad_syntax_naming_the_part() {
        for (text, says) in [
            ("fw=eco", "not a JSON literal"),
            ("on<true", "booleans compare only"),
            ("a>[1]", "arrays compare only"),
            ("fw=null", "no value is null"),
            ("f w=1", "key holds"),
            ("=1", "key must not be empty"),
            ("fw!1", "expected one of"),
            ("fw=1e999", "out of range"),
            ("", "key must not be empty"),
        ] {
            let e = Where::parse(text).expect_err("refused");
            assert!(e.contains(says), "{text}: {e}");
            assert!(e.contains(&format!("where={text}")), "{text}: {e}");
        }
    }

    #[test]
    fn types_never_match_each_other() {
        let gt9 = Where::parse("fw>9").expect("parses");
        assert!(!gt9.matches(Some(&v("\"zzz\""))));
        assert!(gt9.matches(Some(&v("10"))));
        assert!(gt9.matches(Some(&v("9.5"))));
        assert!(!gt9.matches(None));
        let ne = Where::parse("fw!=2").expect("parses");
        assert!(ne.matches(Some(&v("3"))));
        assert!(!ne.matches(Some(&v("2.0"))));
        assert!(!ne.matches(Some(&v("\"2\""))));
        assert!(!ne.matches(None));
        assert!(Where::parse("on!=true").expect("parses").matches(Some(&v("false"))));
        assert!(!Where::parse("on!=true").expect("parses").matches(Some(&v("[true]"))));
        assert!(Where::parse("!fw").expect("parses").matches(None));
        assert!(Where::parse("s<\"b\"").expect("parses").matches(Some(&v("\"a\\u00e9\""))));
    }
}
