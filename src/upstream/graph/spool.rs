//! One message on its way to Graph, on disk: a client may send 35 MB and
//! many sessions may do so at once, so a message is never held whole in
//! memory. The file is private (0600) under `state_dir/spool` and removed
//! when the message is sent, refused or dropped, and when the session ends.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// How far into a message its header may reach.
pub const MAX_HEADER: usize = 256 * 1024;

pub struct Spool {
    path: PathBuf,
    file: tokio::fs::File,
    size: u64,
}

impl Spool {
    /// A new empty spool file in `dir` (created 0700 if missing).
    pub async fn create(dir: &Path) -> std::io::Result<Spool> {
        let dir = dir.to_owned();
        let (path, file) = tokio::task::spawn_blocking(move || {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
            static SWEPT: std::sync::Once = std::sync::Once::new();
            SWEPT.call_once(|| sweep(&dir));
            let mut id = [0u8; 12];
            rand::thread_rng().fill_bytes(&mut id);
            let name: String = id.iter().map(|b| format!("{b:02x}")).collect();
            let path = dir.join(format!("{name}.eml"));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            Ok::<_, std::io::Error>((path, file))
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Spool {
            path,
            file: tokio::fs::File::from_std(file),
            size: 0,
        })
    }

    pub async fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes).await?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes `[from, from + len)` of the message.
    pub async fn read_at(&mut self, from: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        self.read_into(from, len, &mut out).await?;
        Ok(out)
    }

    /// Appends bytes `[from, from + len)` of the message to `out`.
    pub async fn read_into(&mut self, from: u64, len: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
        self.file.flush().await?;
        self.file.seek(std::io::SeekFrom::Start(from)).await?;
        let start = out.len();
        out.resize(start + len, 0);
        self.file.read_exact(&mut out[start..]).await?;
        Ok(())
    }

    /// A second handle on the file, for reading it through.
    pub async fn reader(&mut self) -> std::io::Result<tokio::fs::File> {
        self.file.flush().await?;
        tokio::fs::File::open(&self.path).await
    }

    /// The header fields and the blank line after them: its length.
    pub async fn header_len(&mut self) -> std::io::Result<usize> {
        let n = usize::try_from(self.size).unwrap_or(usize::MAX).min(MAX_HEADER);
        let start = self.read_at(0, n).await?;
        Ok(header_end(&start).unwrap_or(n))
    }
}

/// Spool files a killed process left behind (a day old: no send takes
/// that long) are removed once per process.
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let day = std::time::Duration::from_secs(86_400);
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > day);
        if old && e.path().extension().is_some_and(|x| x == "eml") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Where the blank line after the header ends (`None`: not within `b`).
pub fn header_end(b: &[u8]) -> Option<usize> {
    if b.starts_with(b"\r\n") {
        return Some(2);
    }
    if b.starts_with(b"\n") {
        return Some(1);
    }
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove a spooled message");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn private_file_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::create(&dir.path().join("spool")).await.unwrap();
        s.append(b"Subject: x\r\n\r\nbody\r\n").await.unwrap();
        let path = s.path.clone();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(s.header_len().await.unwrap(), 14);
        assert_eq!(s.read_at(14, 4).await.unwrap(), b"body");
        drop(s);
        assert!(!path.exists());
    }

    #[test]
    fn day_old_leftovers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("a.eml"), dir.path().join("b.eml"));
        std::fs::write(&old, "x").unwrap();
        std::fs::write(&new, "x").unwrap();
        let two_days = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(two_days)
            .unwrap();
        sweep(dir.path());
        assert!(!old.exists() && new.exists());
    }

    #[test]
    fn header_ends() {
        assert_eq!(header_end(b"A: b\r\n\r\nx"), Some(8));
        assert_eq!(header_end(b"A: b\n\nx"), Some(6));
        assert_eq!(header_end(b"\r\nx"), Some(2));
        assert_eq!(header_end(b"A: b\r\n"), None);
    }
}
