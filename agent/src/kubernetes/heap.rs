//! Giving the allocator's free memory back to the system after the initial sync.
//!
//! Listing a large cluster decodes every object in pages and converts it, and most of what
//! that allocates is freed again once the caches hold their compact projections. glibc keeps
//! freed memory in its arenas (the feed's thread has its own), so without a trim the agent's
//! RSS stays near the peak of the list (measured by the scale bench: `cargo xtask bench --
//! --scale`), far above the heap it still uses.

/// Returns the free memory at the top and in the free pages of every arena to the system.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only reads and edits the allocator's own state, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
