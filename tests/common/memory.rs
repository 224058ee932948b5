//! This process's resident memory: the nodes of the hostile tests run in the test
//! process, so their memory is its `VmRSS`.

/// `VmRSS` from `/proc/self/status`, in KiB; `None` where there is no such line (not
/// Linux). Each test decides whether a missing value fails it.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// [`rss_kib`] in whole MiB, 0 where unknown: for reports and loose growth bounds.
pub fn rss_mib() -> u64 {
    rss_kib().unwrap_or(0) / 1024
}
