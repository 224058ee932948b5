//! Reading the Prometheus text that `/metrics` serves.

// Shared with the examples; not every test file reads metrics.
#[allow(unused_imports)]
pub use mpreg::demo::metric_value;
