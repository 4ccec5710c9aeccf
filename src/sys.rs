//! The few operating-system calls mailproxy makes directly, behind safe
//! functions (the crate forbids `unsafe`).

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// The effective user id: files holding secrets must belong to it.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Raises the soft limit on open files to the hard limit: every session
/// holds two descriptors, and the usual soft limit of 1024 would cap a busy
/// proxy at a few hundred sessions. Returns the limit now in force (`None`
/// for unlimited).
pub fn raise_open_files() -> std::io::Result<Option<u64>> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok(limit.current);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok(getrlimit(Resource::Nofile).current)
}

#[cfg(test)]
mod tests {
    #[test]
    fn open_files_raised_to_the_hard_limit() {
        let after = super::raise_open_files().expect("raising the soft limit to the hard one is always allowed");
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(after, now.current);
        assert_eq!(now.current, now.maximum);
    }
}
