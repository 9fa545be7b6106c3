//! The model's CPU threads. candle 0.11 reads its thread count from the environment
//! (`RAYON_NUM_THREADS`) when its pools first start, so this must run before any other thread
//! exists: `main` calls it first thing, and tools embedding the library (the bench) do the same.

/// Sets the kernels' thread count; `None` keeps candle's default (all physical cores).
pub fn configure(threads: Option<usize>) {
    let Some(n) = threads else { return };
    // SAFETY: called before any other thread exists; the pools read it when they start.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
}
