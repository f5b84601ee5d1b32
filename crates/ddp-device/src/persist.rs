//! Keeping the mirror in a file, so a device that restarts without network still knows its last
//! configuration. Written whole, to a temporary file that is synced and then renamed over the
//! old one: a crash leaves either the old mirror or the new one, never half of one.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::mirror::Mirror;

/// Reads a mirror file; `Ok(None)` when there is none yet.
pub fn load(path: &Path) -> Result<Option<Mirror>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::new(ErrorKind::Storage, format!("{} is not a mirror file: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::new(ErrorKind::Storage, format!("cannot read {}: {e}", path.display()))),
    }
}

/// Writes `mirror` to `path` atomically and durably.
pub fn save(path: &Path, mirror: &Mirror) -> Result<()> {
    let fail = |e: std::io::Error| Error::new(ErrorKind::Storage, format!("cannot write {}: {e}", path.display()));
    let bytes = serde_json::to_vec(mirror).map_err(|e| Error::new(ErrorKind::Storage, e.to_string()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp).map_err(fail)?;
    file.write_all(&bytes).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
    }
    Ok(())
}
