//! Files written whole or not at all: the bytes go to a uniquely named temporary file beside the
//! target, created exclusively (an existing file or symlink of that name is never opened, so
//! concurrent runs never share one), then renamed into place; on error it is removed.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary file beside `path` (`.NAME.TAG.<pid>-<n>`), removed when dropped.
pub struct TempFile {
    pub file: File,
    path: PathBuf,
}

impl TempFile {
    pub fn beside(path: &Path, tag: &str) -> Result<Self> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        for _ in 0..100 {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(".{name}.{tag}.{}-{n}-{nanos}", std::process::id()));
            match File::options().read(true).write(true).create_new(true).open(&tmp) {
                Ok(file) => return Ok(Self { file, path: tmp }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create a temporary file in {}", dir.display()))
                }
            }
        }
        bail!("cannot create a temporary file in {}: every name was taken", dir.display())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Move the file to `target` (it is then no longer removed).
    fn persist(mut self, target: &Path) -> Result<()> {
        let path = std::mem::take(&mut self.path);
        std::fs::rename(&path, target)
            .with_context(|| format!("cannot move {} to {}", path.display(), target.display()))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Write `path` through `write`: a reader never sees half a file.
pub fn write_with<T>(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> Result<T>) -> Result<T> {
    let tmp = TempFile::beside(path, "partial")?;
    let mut out = BufWriter::new(tmp.file.try_clone()?);
    let value = write(&mut out).with_context(|| format!("cannot write {}", path.display()))?;
    out.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)?;
    Ok(value)
}

/// Write `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |out| Ok(out.write_all(bytes)?))
}
