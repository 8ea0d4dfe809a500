//! A run's output directory: one run at a time (a lock file that names its owner), and no run
//! started over another run's files unless asked.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{TrainError, CHECKPOINT_FILE, LOG_FILE};

/// The lock file inside the output directory, present while a run writes there.
pub const LOCK_FILE: &str = "run.lock";

/// A claimed output directory; dropping it releases the lock.
pub(super) struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    /// Claims `dir`: creates it, takes its lock, and checks what it holds. A fresh run refuses
    /// a directory with a log or a checkpoint in it, unless `overwrite` (then the checkpoint
    /// goes first and the log after, so an old checkpoint never sits beside a new log); a
    /// resumed run continues them.
    pub fn claim(dir: &Path, resume: bool, overwrite: bool) -> Result<RunDir, TrainError> {
        let io = |what: &str, e: io::Error| TrainError::Io(format!("cannot {what} {}: {e}", dir.display()));
        fs::create_dir_all(dir).map_err(|e| io("create the output directory", e))?;
        lock(dir)?;
        let claimed = RunDir {
            dir: dir.to_path_buf(),
        };
        let existing: Vec<&str> = [CHECKPOINT_FILE, LOG_FILE]
            .into_iter()
            .filter(|f| dir.join(f).exists())
            .collect();
        if !resume && !existing.is_empty() {
            if !overwrite {
                return Err(TrainError::Config(format!(
                    "{} already holds a run ({}): pass --resume {} to continue it, --overwrite to replace it, or another --out",
                    dir.display(),
                    existing.join(", "),
                    dir.join(CHECKPOINT_FILE).display()
                )));
            }
            for f in existing {
                fs::remove_file(dir.join(f)).map_err(|e| io(&format!("remove the old {f} in"), e))?;
            }
        }
        Ok(claimed)
    }

    /// A file inside the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.dir.join(LOCK_FILE));
    }
}

/// Who holds a lock: `pid <pid> on <host>`.
fn owner() -> String {
    format!("pid {} on {}", std::process::id(), host())
}

fn host() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this host".into())
}

/// Whether the lock's owner is a process that no longer exists: only decidable for a process
/// of this host, where Linux lists live processes under /proc.
fn stale(owner: &str) -> bool {
    let Some((pid, on)) = owner
        .trim()
        .strip_prefix("pid ")
        .and_then(|r| r.split_once(" on "))
    else {
        return false;
    };
    on == host() && Path::new("/proc/self").exists() && !Path::new("/proc").join(pid).exists()
}

/// Creates the lock file, or explains who holds it. A lock left by a process that died
/// (`kill -9`, a power cut) is taken over.
fn lock(dir: &Path) -> Result<(), TrainError> {
    let path = dir.join(LOCK_FILE);
    for _attempt in 0..2 {
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                return f
                    .write_all(format!("{}\n", owner()).as_bytes())
                    .map_err(|e| TrainError::Io(format!("cannot write the lock {}: {e}", path.display())));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                if !stale(&holder) {
                    return Err(TrainError::Config(format!(
                        "{} is in use by another run ({}); wait for it, use another --out, or remove {} if that run is gone",
                        dir.display(),
                        holder.trim(),
                        path.display()
                    )));
                }
                let _ = fs::remove_file(&path);
            }
            Err(e) => {
                return Err(TrainError::Io(format!(
                    "cannot create the lock {}: {e}",
                    path.display()
                )))
            }
        }
    }
    Err(TrainError::Io(format!(
        "cannot take the lock {}: another run keeps creating it",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn a_lock_of_a_dead_process_on_this_host_is_stale() {
        assert!(!stale(&owner()), "this process is alive");
        // Above Linux's pid_max (4194304 at most): no such process.
        assert!(stale(&format!("pid 99999999 on {}", host())));
        assert!(!stale("pid 99999999 on some-other-host"));
        assert!(!stale("garbage"));
    }
}
