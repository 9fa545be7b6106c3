//! The model's CPU threads. candle 0.11 reads its thread settings from the environment when its
//! pools first start, so [`configure`] must run before any other thread exists: `main` calls it
//! first thing, and tools embedding the library (the bench) do the same.
//!
//! What spins: candle 0.11 runs its quantised matmuls and element-wise ops on a "barrier pool"
//! (threads − 1 workers plus the calling thread). After each op a worker busy-waits for the
//! next one for `CANDLE_BARRIER_POOL_SPIN_LIMIT` iterations (default 25 000) before parking.
//! Between ops the model thread runs serial work (rotary, softmax, KV-cache copies); a worker
//! spinning meanwhile takes the CPU it needs whenever the machine has no idle core — on
//! 2 vCPUs with anything else running, SmolLM2's decode fell to 2–3 tok/s (bench.sh, see
//! README.md). Rayon's global pool (gemm's f32 matmuls) and tokio's workers park when idle and
//! were not the cause. A short spin keeps most of the benefit of spinning for back-to-back ops.

/// The barrier pool's spin limit unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set: measured on
/// 2 shared vCPUs, 500–2000 gave 11.5–12 tok/s decode against 2.7 at candle's 25 000 and 7.6
/// at 0 (parking after every op).
pub const BARRIER_POOL_SPIN_LIMIT: u32 = 1000;

/// Sets the kernels' thread count (`None` keeps candle's default: all physical cores) and the
/// barrier pool's spin limit.
pub fn configure(threads: Option<usize>) {
    // SAFETY (both): called before any other thread exists; the pools read these when they
    // start.
    if let Some(n) = threads {
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        unsafe {
            std::env::set_var(
                "CANDLE_BARRIER_POOL_SPIN_LIMIT",
                BARRIER_POOL_SPIN_LIMIT.to_string(),
            )
        };
    }
}
