//! What the hostile tests measure of a bystander: its latencies while an attack runs.

use std::time::Duration;

/// The 99th percentile of `samples` (sorted here): the sample at index `len * 99 / 100`,
/// the last one for fewer than 100 samples. Panics on no samples.
pub fn p99(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}
