//! Reading the Prometheus text that `/metrics` serves.

/// The value of the first sample of `metric` whose labels contain `labels`.
pub fn metric_value(text: &str, metric: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(labels))
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}
