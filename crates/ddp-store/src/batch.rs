//! What a batch does, worked out before anything is written (PROTOCOL.md §11).
//!
//! Both backends write a batch only once every op is known to succeed, so a failing op leaves
//! nothing behind and no savepoint is needed. SQLite's single writer runs [`plan`] inside its
//! transaction, reading each key the batch names once, then writes the plan as it stands.
//! PostgreSQL does the same in SQL under the store's row lock (`ddp_kv_apply`, with
//! `ddp_merge_patch` for merges, in `postgres/schema.rs`); the conformance suite holds the two to
//! the same answers.

use std::collections::HashMap;

use ddp_protocol::{Key, Rev, Value};

use crate::StoreError;
use crate::model::{KvAction, KvBatch};

/// A batch ready to write: each op's key, the value it leaves (`None`: deleted) and its rev.
pub(crate) struct Plan {
    /// One per op, in order.
    pub writes: Vec<(Key, Option<Value>, Rev)>,
    /// The store's key count after the batch.
    pub num_keys: i64,
}

/// The merge of `patch` into `target`, refused beyond `limit` bytes.
fn merged(target: Option<&Value>, patch: &Value, limit: usize) -> Result<Value, StoreError> {
    let value = Value::merge_patch(target, patch).map_err(|e| StoreError::InvalidValue(e.to_string()))?;
    if value.len() > limit {
        return Err(StoreError::ValueTooLarge { size: value.len(), limit });
    }
    Ok(value)
}

/// Works out a batch on a store at `rev` holding `num_keys` keys. `lookup(key, with_value)`
/// reads a key's rev (and, when asked, its value) before the batch; it is called once per key.
/// The outer error is the lookup's; the inner one the batch's.
pub(crate) fn plan<E>(
    batch: &KvBatch,
    rev: Rev,
    num_keys: i64,
    mut lookup: impl FnMut(&Key, bool) -> Result<Option<(Rev, Option<Value>)>, E>,
) -> Result<Result<Plan, StoreError>, E> {
    if let Some(want) = batch.store_rev
        && want != rev
    {
        return Ok(Err(StoreError::StoreRevMismatch { current: rev }));
    }
    // What the ops so far left of each key they touched: (rev, value), or None when absent.
    let mut seen: HashMap<&Key, Option<(Rev, Option<Value>)>> = HashMap::new();
    let mut writes = Vec::with_capacity(batch.ops.len());
    let mut count = num_keys;
    let mut rev = rev;
    for (i, op) in batch.ops.iter().enumerate() {
        let current = match seen.get(&op.key) {
            Some(slot) => slot.clone(),
            None => lookup(&op.key, matches!(op.action, KvAction::Merge(_)))?,
        };
        let current_rev = current.as_ref().map(|c| c.0);
        if !op.condition.holds(current_rev) {
            return Ok(Err(StoreError::RevisionMismatch { current: current_rev }.in_op(i)));
        }
        rev = rev.next();
        let value = match &op.action {
            KvAction::Delete => {
                if current.is_none() {
                    return Ok(Err(StoreError::KeyNotFound.in_op(i)));
                }
                count -= 1;
                None
            }
            KvAction::Set(v) => Some(v.clone()),
            KvAction::Merge(patch) => {
                match merged(current.as_ref().and_then(|c| c.1.as_ref()), patch, batch.max_value_bytes) {
                    Ok(v) => Some(v),
                    Err(e) => return Ok(Err(e.in_op(i))),
                }
            }
        };
        if value.is_some() && current.is_none() {
            if usize::try_from(count).unwrap_or(usize::MAX) >= batch.max_keys {
                return Ok(Err(StoreError::TooManyKeys { limit: batch.max_keys }.in_op(i)));
            }
            count += 1;
        }
        seen.insert(&op.key, value.clone().map(|v| (rev, Some(v))));
        writes.push((op.key.clone(), value, rev));
    }
    Ok(Ok(Plan { writes, num_keys: count }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Condition, KvOp, Origin, StoreRef};
    use ddp_protocol::DeviceId;

    fn key(k: &str) -> Key {
        Key::new(k).expect("key")
    }

    fn val(v: &str) -> Value {
        Value::parse(v).expect("value")
    }

    fn batch(ops: Vec<(&str, KvAction, Condition)>) -> KvBatch {
        KvBatch {
            store: StoreRef::Device(DeviceId::new(1).expect("id")),
            ops: ops.into_iter().map(|(k, action, condition)| KvOp { key: key(k), action, condition }).collect(),
            store_rev: None,
            max_keys: 3,
            max_value_bytes: 32,
            origin: Origin::Admin,
            job: None,
        }
    }

    /// A store at rev 10 holding `a` (rev 4) = {"x":1}.
    fn run(b: &KvBatch) -> Result<Plan, StoreError> {
        let mut reads = Vec::new();
        let plan = plan::<()>(b, Rev(10), 1, |k, with_value| {
            reads.push(k.as_str().to_owned());
            Ok((k.as_str() == "a").then(|| (Rev(4), with_value.then(|| val(r#"{"x":1}"#)))))
        });
        let mut unique = reads.clone();
        unique.dedup();
        assert_eq!(unique.len(), reads.len(), "each key is read once");
        plan.expect("lookup")
    }

    #[test]
    fn ops_apply_in_order_with_consecutive_revs() {
        let b = batch(vec![
            ("a", KvAction::Merge(val(r#"{"y":2}"#)), Condition::RevIn(vec![Rev(4)])),
            ("a", KvAction::Merge(val(r#"{"x":null}"#)), Condition::RevIn(vec![Rev(11)])),
            ("b", KvAction::Set(val("1")), Condition::Absent),
            ("b", KvAction::Delete, Condition::None),
        ]);
        let plan = run(&b).expect("applies");
        let got: Vec<(String, Option<String>, u64)> = plan
            .writes
            .iter()
            .map(|(k, v, r)| (k.as_str().into(), v.as_ref().map(|v| v.as_json().into()), r.0))
            .collect();
        assert_eq!(
            got,
            [
                ("a".into(), Some(r#"{"x":1,"y":2}"#.into()), 11),
                ("a".into(), Some(r#"{"y":2}"#.into()), 12),
                ("b".into(), Some("1".into()), 13),
                ("b".into(), None, 14)
            ]
        );
        assert_eq!(plan.num_keys, 1);
    }

    #[test]
    fn a_failing_op_names_itself() {
        let fails = |b: KvBatch| run(&b).err().map(|e| e.split_op());
        let r = fails(batch(vec![("a", KvAction::Delete, Condition::None), ("a", KvAction::Delete, Condition::None)]));
        assert_eq!(r, Some((Some(1), StoreError::KeyNotFound)));
        let r = fails(batch(vec![("a", KvAction::Set(val("1")), Condition::RevIn(vec![Rev(5)]))]));
        assert_eq!(r, Some((Some(0), StoreError::RevisionMismatch { current: Some(Rev(4)) })));
        let r = fails(batch(vec![
            ("b", KvAction::Set(val("1")), Condition::None),
            ("c", KvAction::Set(val("1")), Condition::None),
            ("d", KvAction::Set(val("1")), Condition::None),
        ]));
        assert_eq!(r, Some((Some(2), StoreError::TooManyKeys { limit: 3 })));
        let r = fails(batch(vec![(
            "a",
            KvAction::Merge(val(r#"{"long":"0123456789012345678901234567"}"#)),
            Condition::None,
        )]));
        assert!(matches!(r, Some((Some(0), StoreError::ValueTooLarge { limit: 32, .. }))), "{r:?}");
        let mut b = batch(vec![("a", KvAction::Delete, Condition::None)]);
        b.store_rev = Some(Rev(9));
        assert_eq!(fails(b), Some((None, StoreError::StoreRevMismatch { current: Rev(10) })));
    }
}
