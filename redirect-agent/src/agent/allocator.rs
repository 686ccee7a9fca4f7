//! How the agent asks the C allocator to hold memory. Only glibc builds are concerned: the
//! release image links musl, whose allocator keeps one heap and returns free pages by itself.

/// One malloc arena for the whole process (unless `MALLOC_ARENA_MAX` says otherwise). glibc
/// gives threads arenas of their own; a sync runs on whichever runtime thread is free, so
/// what one sync frees sits in another arena than the next sync allocates from, and the
/// freed-but-kept memory grows. At 10,000 Services (`cargo xtask bench sync`) the agent's RSS
/// after 200 watch events went from about 65 MiB to about 61 MiB with one arena. Threads keep
/// their small-allocation caches (tcache), so one arena rarely means waiting on its lock.
/// Call it first thing in `main`, before any thread starts.
pub fn one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes a tunable of the allocator; no allocation is live in a
        // way it affects, and no other thread runs yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Gives the heap's free pages back to the kernel, after every sync. A sync allocates and
/// frees megabytes (indexes, tables, the snapshot's lists) among the long-lived cached objects;
/// without a trim the freed pages stay in the process. A trim costs 1 to 4 ms, after the maps
/// are written.
pub fn trim_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}
