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

/// Sets the kernels' thread count and the barrier pool's spin limit. The count is `threads`
/// when given, else `RAYON_NUM_THREADS` when set, else [`default_threads`].
pub fn configure(threads: Option<usize>) {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let set = thread_setting(
        threads,
        std::env::var_os("RAYON_NUM_THREADS").is_some(),
        available,
    );
    // SAFETY (both): called before any other thread exists; the pools read these when they
    // start.
    if let Some(n) = set {
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

/// The thread count without `--threads` or `RAYON_NUM_THREADS`: the CPUs this process may use,
/// `std::thread::available_parallelism` (its affinity mask and its cgroup's CPU quota, i.e. a
/// pod's CPU limit, rounded down), as rayon's own default. candle's default instead counts the
/// physical cores it sees, which in a pod are the node's: a pod limited to 2 CPUs on a 64-core
/// node would start 32 or 64 threads, all throttled by the quota, and candle re-reads
/// `/proc/cpuinfo` for every operation (~4% of an f32 llama's decode here).
pub fn default_threads(available: usize) -> usize {
    available.max(1)
}

/// What `RAYON_NUM_THREADS` is set to (`None`: left as it is): the flag's count, else (when
/// the variable is unset) [`default_threads`].
fn thread_setting(flag: Option<usize>, env_set: bool, available: usize) -> Option<usize> {
    match flag {
        Some(n) => Some(n),
        None if env_set => None,
        None => Some(default_threads(available)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_then_the_environment_then_the_cpus_the_process_may_use() {
        assert_eq!(thread_setting(Some(3), true, 8), Some(3));
        assert_eq!(thread_setting(Some(3), false, 8), Some(3));
        assert_eq!(thread_setting(None, true, 8), None);
        assert_eq!(thread_setting(None, false, 8), Some(8));
        assert_eq!(thread_setting(None, false, 0), Some(1));
    }
}
