//! Keeping the daemon's resident memory what it uses (glibc's allocator).
//!
//! glibc gives every thread that allocates an arena of its own (up to eight per core) and keeps
//! freed memory in them: after a burst — a replica catching up reads history back, a large
//! transaction goes by — the resident size stayed at its peak (94 MB in the soak, 45 MB of it in
//! use). replited allocates little and rarely contends, so two arenas are enough, and a thread
//! hands what is free back to the kernel every few seconds (`malloc_trim`, a few µs when there
//! is nothing to give back).

use std::time::Duration;

/// How often free memory is handed back.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Limits the allocator's arenas and starts the trimming thread. Call once, early.
pub fn keep_small() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt and malloc_trim only tune and walk glibc's own allocator state.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
        let _ = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(|| loop {
                std::thread::sleep(TRIM_EVERY);
                // SAFETY: as above.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
    }
}

/// This process's peak resident size so far (VmHWM), in kB.
pub fn peak_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}
