//! Child processes that cannot outlive the test process.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not
//! the process. Test code forks from short-lived threads (a test's own thread, a
//! `spawn_blocking` worker, whoever initialises a shared fixture), so all spawns
//! go through one dedicated thread that lives as long as the process: the
//! signal then means exactly "the test process died (even by SIGKILL)".
//! Starting that thread also raises the test process's open-file limit.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

type Request = (Command, mpsc::Sender<io::Result<Child>>);

static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();

/// Spawns `cmd` so that the kernel sends it `signal` (e.g. `libc::SIGTERM`)
/// when the test process dies without cleaning up.
pub fn spawn_tied_to_process(mut cmd: Command, signal: libc::c_int) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let tx = SPAWNER
        .get_or_init(|| {
            raise_open_file_limit();
            let (tx, rx) = mpsc::channel::<Request>();
            std::thread::Builder::new()
                .name("test-process-spawner".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(cmd.spawn());
                    }
                })
                .expect("spawn spawner thread");
            Mutex::new(tx)
        })
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let (rtx, rrx) = mpsc::channel();
    tx.send((cmd, rtx))
        .map_err(|_| io::Error::other("spawner thread gone"))?;
    rrx.recv().map_err(|_| io::Error::other("spawner thread gone"))?
}

/// Raises the test process's soft open-file limit to the hard one (its
/// children inherit it). The tests share this process, and a few at once can
/// hold many hundreds of sockets: floods of clients, with both ends of the
/// in-process fake upstreams. Best effort: a limit that stays low shows up
/// as the failing test's own error.
fn raise_open_file_limit() {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}
