//! The commands' side of the control socket.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::{socket_path, Answer, ControlError, Reply, Request};
use crate::secret::Secret;

/// A connection to the running `serve`.
pub struct Client {
    lines: Lines<BufReader<OwnedReadHalf>>,
    w: OwnedWriteHalf,
}

impl Client {
    /// Connects to the `serve` running with `state_dir`; `None` when none
    /// runs (no socket, or one left behind by a serve that died).
    pub async fn connect(state_dir: &Path) -> Result<Option<Client>, ControlError> {
        let path = socket_path(state_dir);
        let io = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        // Passwords go through it: only to a socket of our own.
        let me = crate::sys::euid();
        if meta.uid() != me {
            return Err(ControlError::NotOwner {
                path: path.clone(),
                owner: meta.uid(),
            });
        }
        let stream = match UnixStream::connect(&path).await {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(io(e)),
        };
        let (r, w) = stream.into_split();
        Ok(Some(Client {
            lines: BufReader::new(r).lines(),
            w,
        }))
    }

    async fn send_line(&mut self, mut line: Vec<u8>) -> Result<(), ControlError> {
        line.push(b'\n');
        let r = self.w.write_all(&line).await;
        zeroize::Zeroize::zeroize(&mut line);
        r.map_err(|e| ControlError::Protocol(format!("cannot send to serve: {e}")))
    }

    pub async fn send(&mut self, req: &Request) -> Result<(), ControlError> {
        let line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
        self.send_line(line).await
    }

    /// Answers an [`Reply::Ask`].
    pub async fn answer(&mut self, password: &Secret) -> Result<(), ControlError> {
        let a = Answer {
            password: password.expose().to_string(),
        };
        let line = serde_json::to_vec(&a).map_err(|e| ControlError::Protocol(e.to_string()))?;
        self.send_line(line).await
    }

    /// The next reply; the connection ending early is an error. The line
    /// is wiped once parsed (a token reply).
    pub async fn next(&mut self) -> Result<Reply, ControlError> {
        let mut line = self
            .lines
            .next_line()
            .await
            .map_err(|e| ControlError::Protocol(e.to_string()))?
            .ok_or_else(|| ControlError::Protocol("serve closed the connection (did it stop?)".into()))?;
        let parsed = serde_json::from_str(&line).map_err(|e| {
            // A token reply this command cannot read is not shown either.
            let shown = if line.contains("\"token\"") {
                "(a token reply)"
            } else {
                &line
            };
            ControlError::Protocol(format!("{e}: {shown}"))
        });
        zeroize::Zeroize::zeroize(&mut line);
        parsed
    }
}
