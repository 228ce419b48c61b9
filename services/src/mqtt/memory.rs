//! Gives the memory of departed sessions back to the kernel.
//!
//! glibc's allocator keeps freed heap memory resident: after 10,000 devices connect and leave, the process
//! stays at its peak for good (measured with `mqtt-bench --scenario conn-10k`, "RSS after leave"). `malloc_trim`
//! returns the free pages of every arena. It walks the heaps under their locks, so it runs on a blocking
//! thread and only after a wave of departures, never per disconnect.

use std::time::Duration;

use super::FrontDoor;

/// Sessions that must have left since the last high-water mark before a trim is worth its pause.
const WAVE: usize = 256;

/// How often the session count is looked at.
const PERIOD: Duration = Duration::from_secs(2);

/// Watches the session count for as long as the front door lives.
pub(super) async fn trim_after_departures(door: std::sync::Weak<FrontDoor>) {
    let mut high = 0usize;
    loop {
        tokio::time::sleep(PERIOD).await;
        let Some(door) = door.upgrade() else { return };
        let now = door.sessions.attached();
        drop(door);
        high = high.max(now);
        if high - now >= WAVE.max(high / 4) {
            high = now;
            let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            tracing::debug!(
                sessions = now,
                released,
                "returned free heap memory to the kernel"
            );
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() -> bool {
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas; it is thread-safe.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}
