//! Ctrl-C (SIGINT/SIGTERM): one line saying what was kept and how to resume, then exit code 130.
//!
//! Every output but collect's parts is written atomically (temp file + rename), so an interrupt
//! at any moment leaves the previous state of each file; collect keeps its finished parts and
//! resumes from them. The message therefore depends on what is running: stages set it with
//! [`set_message`]. The run lock is removed on the way out so that the rerun needs no takeover.

use std::path::PathBuf;
use std::sync::{Mutex, Once};

/// Exit code of a process ended by SIGINT (128 + 2), as shells report it.
pub const EXIT_INTERRUPTED: i32 = 130;

static MESSAGE: Mutex<Option<String>> = Mutex::new(None);
static LOCKS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

/// Installs the handler (once per process; later calls do nothing). A handler another library
/// installed first is left alone. Only the command line calls this: a library call must never
/// take SIGINT from its host (in Python, Ctrl-C has to stay a `KeyboardInterrupt`, see
/// `python/src/lib.rs`), so stages only set the message.
pub fn install() {
    INSTALL.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            let what = MESSAGE
                .lock()
                .ok()
                .and_then(|m| m.clone())
                .unwrap_or_else(|| "every output is written atomically, so the files of the run are as they were; run the command again".to_string());
            eprintln!("\ninterrupted: {what}");
            if let Ok(locks) = LOCKS.lock() {
                for p in locks.iter() {
                    std::fs::remove_file(p).ok();
                }
            }
            std::process::exit(EXIT_INTERRUPTED);
        });
    });
}

/// Sets what the interrupt message says was kept and how to resume (`None`: the default).
pub fn set_message(message: Option<String>) {
    if let Ok(mut m) = MESSAGE.lock() {
        *m = message;
    }
}

/// Registers a lock file to remove on interrupt (or forgets it again).
pub fn register_lock(path: PathBuf, held: bool) {
    if let Ok(mut l) = LOCKS.lock() {
        l.retain(|p| p != &path);
        if held {
            l.push(path);
        }
    }
}
