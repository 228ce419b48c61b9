//! The process allocator, and giving the memory of departed sessions back to the kernel.
//!
//! `main.rs` installs mimalloc as the global allocator. Against glibc's malloc it cut the CPU of a shadow
//! update by about a quarter (alternating `shadow-bench --quick` runs with Redis: 121–147 → 89–96 µs of
//! antumbra CPU per update). glibc's
//! arenas were locked by the two tokio workers and the router thread in turn, and grew and shrank their heaps
//! with `mprotect` (perf showed malloc at ~20 % of all samples).
//!
//! mimalloc keeps a heap per thread and cannot be collected process-wide: a thread can only give back what its
//! own heap holds. So after a wave of departures [`release`] raises an epoch, and each tokio worker collects
//! its heap the next time it parks ([`on_worker_park`], a runtime hook installed by `main.rs`), which is when it
//! has nothing else to do. Transparent huge pages are off (the `no_thp` build feature): they made an idle
//! device cost ~18 KB instead of ~15 (`mqtt-bench --scenario conn-10k`).
//!
//! Free memory is given back to the kernel once it has been free for [`PURGE_DELAY_MS`] (mimalloc's default is
//! 10 ms): with the default, what a burst freed went back at once and the next burst faulted it in again, which
//! showed as a stall of every reply at the start of `shadow-bench`'s paced phase (0.2 s after the saturated one).
//! A release after departures ([`release`]) still gives everything back at once.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// How long freed memory stays with the process before it goes back to the kernel, in milliseconds.
pub const PURGE_DELAY_MS: i64 = 10_000;

/// mimalloc's `mi_option_purge_delay` (the crate names no constant for it; `mimalloc.h`, v2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets the allocator's options; called once, first thing in `main`.
#[allow(unsafe_code)]
pub fn configure() {
    // SAFETY: mi_option_set stores an integer in mimalloc's option table (read when it schedules a purge); it
    // takes no pointer and may be called at any time. Option 15 is `mi_option_purge_delay` in the v2 header the
    // crate builds (`c_src/mimalloc/v2/include/mimalloc.h`).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as std::ffi::c_long) }
}

/// Raised when freed memory should be returned; each worker collects once per raise.
static RELEASE_EPOCH: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The epoch this thread last collected for.
    static COLLECTED: Cell<u64> = const { Cell::new(0) };
}

/// Asks every worker to return its free memory when it next parks; the calling thread returns its own at once.
pub fn release() {
    RELEASE_EPOCH.fetch_add(1, Ordering::Relaxed);
    collect_if_asked();
}

/// The tokio `on_thread_park` hook: one atomic load unless a release was asked for since the last collect.
pub fn on_worker_park() {
    collect_if_asked();
}

fn collect_if_asked() {
    let epoch = RELEASE_EPOCH.load(Ordering::Relaxed);
    if COLLECTED.with(Cell::get) != epoch {
        COLLECTED.with(|c| c.set(epoch));
        collect();
    }
}

#[allow(unsafe_code)]
fn collect() {
    // SAFETY: mi_collect frees the empty pages of the calling thread's heap and purges the arenas' free
    // memory; it takes no pointer and is safe to call from any thread at any time. Without mimalloc as the
    // global allocator (the library's own unit tests) its heap is empty and this does nothing.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_is_the_one_configured() {
        // Right before its successor in the header, which the crate does name.
        assert_eq!(
            MI_OPTION_PURGE_DELAY,
            libmimalloc_sys::mi_option_use_numa_nodes - 1
        );
        configure();
        // SAFETY: reads an integer from mimalloc's option table.
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay as i64, PURGE_DELAY_MS);
    }

    #[test]
    fn a_thread_collects_once_per_release() {
        release();
        let epoch = RELEASE_EPOCH.load(Ordering::Relaxed);
        assert_eq!(COLLECTED.with(Cell::get), epoch);
        on_worker_park();
        assert_eq!(COLLECTED.with(Cell::get), epoch, "nothing new asked");
        let other = std::thread::spawn(|| {
            on_worker_park();
            COLLECTED.with(Cell::get)
        })
        .join()
        .unwrap();
        assert!(other >= epoch, "another thread collects for the epoch it sees");
    }
}
