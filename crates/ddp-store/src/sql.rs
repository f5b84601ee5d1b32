//! Conversions shared by the SQL backends: both keep ids and revs as signed 64-bit integers.

use ddp_protocol::Rev;

use crate::StoreError;
use crate::model::StoreRef;

/// An id or rev as SQL's i64; values past i64::MAX cannot exist, so they map to -1, which
/// matches nothing.
pub(crate) fn sql_id(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(-1)
}

/// An i64 column as an id; negative values (never written) read as 0, which no id is.
pub(crate) fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// An i64 column as a rev.
pub(crate) fn rev_of(n: i64) -> Rev {
    Rev(to_u64(n))
}

/// The error for a store that does not exist.
pub(crate) fn not_found(store: StoreRef) -> StoreError {
    match store {
        StoreRef::Device(d) => StoreError::DeviceNotFound(d),
        StoreRef::Home(h) => StoreError::HomeNotFound(h),
    }
}
