//! How much host memory the server may still take: its cgroup's limit (a pod's memory limit)
//! less what the cgroup uses, and the machine's available memory, whichever is less. The
//! engine sizes the running batch's keys and values by it where `--max-batch-tokens` is not
//! given on the CPU ([`crate::engine::BatchTokens::Memory`]).
//!
//! A cgroup's use is counted as the kubelet counts a container's working set: its usage less
//! its inactive file pages, which the kernel gives back before it kills anything (a model
//! file read at load stays in the page cache and is charged to the pod).

use std::path::Path;

/// Bytes the process may still allocate, or `None` where nothing can be read (not Linux).
pub fn host_room() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
    let v2 = || {
        cgroup_room(
            &read("/sys/fs/cgroup/memory.max")?,
            &read("/sys/fs/cgroup/memory.current")?,
            &read("/sys/fs/cgroup/memory.stat").unwrap_or_default(),
            "inactive_file",
        )
    };
    let v1 = || {
        cgroup_room(
            &read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?,
            &read("/sys/fs/cgroup/memory/memory.usage_in_bytes")?,
            &read("/sys/fs/cgroup/memory/memory.stat").unwrap_or_default(),
            "total_inactive_file",
        )
    };
    let cgroup = v2().or_else(v1);
    let machine = read("/proc/meminfo").and_then(|m| meminfo_available(&m));
    match (cgroup, machine) {
        (Some(c), Some(m)) => Some(c.min(m)),
        (c, m) => c.or(m),
    }
}

/// A cgroup limit at or past this is no limit (cgroup v1 writes 2^63 rounded to a page).
const NO_LIMIT: u64 = 1 << 60;

/// The room under a cgroup's limit (`memory.max` / `memory.limit_in_bytes`) given its usage
/// and its `memory.stat` (whose `inactive` line names the reclaimable file pages); `None`
/// when the cgroup has no limit or a file does not read as one.
fn cgroup_room(limit: &str, usage: &str, stat: &str, inactive: &str) -> Option<u64> {
    let limit = limit.trim();
    if limit == "max" {
        return None;
    }
    let limit: u64 = limit.parse().ok()?;
    if limit >= NO_LIMIT {
        return None;
    }
    let usage: u64 = usage.trim().parse().ok()?;
    let reclaimable = stat
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(' ')?;
            (key == inactive).then(|| value.trim().parse::<u64>().ok())?
        })
        .unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(reclaimable)))
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line
        .trim_start_matches("MemAvailable:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_s_room_is_its_limit_less_its_working_set() {
        let stat = "anon 100\nfile 900\ninactive_file 600\nactive_file 300\n";
        // 1000 used of which 600 can be given back: 400 in the working set.
        assert_eq!(
            cgroup_room("2000\n", "1000\n", stat, "inactive_file"),
            Some(1600)
        );
        // No stat: all of the usage counts.
        assert_eq!(cgroup_room("2000", "1000", "", "inactive_file"), Some(1000));
        // cgroup v1's key, which the v2 key does not match.
        let v1 = "cache 900\ninactive_file 5\ntotal_inactive_file 600\n";
        assert_eq!(
            cgroup_room("2000", "1000", v1, "total_inactive_file"),
            Some(1600)
        );
        // Over the limit: no room, not a wrap-around.
        assert_eq!(cgroup_room("1000", "3000", "", "inactive_file"), Some(0));
    }

    #[test]
    fn an_unlimited_or_unreadable_cgroup_gives_no_room_figure() {
        assert_eq!(cgroup_room("max\n", "1000", "", "inactive_file"), None);
        assert_eq!(
            cgroup_room("9223372036854771712", "1000", "", "total_inactive_file"),
            None
        );
        assert_eq!(cgroup_room("lots", "1000", "", "inactive_file"), None);
        assert_eq!(cgroup_room("2000", "", "", "inactive_file"), None);
    }

    #[test]
    fn meminfo_s_available_memory_is_read_in_bytes() {
        let m =
            "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_available(m), Some(20_000_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn this_machine_has_some_room() {
        // Linux (the only target the runtime ships for) always has /proc/meminfo.
        let room = host_room().expect("a room figure on Linux");
        assert!(room > 0);
    }
}
