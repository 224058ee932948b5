//! `--plot FILE.svg` of the benches, drawn with plotters' SVG backend (no fonts or system
//! libraries needed). Every picture is a set of cumulative curves over a log-scaled x:
//!
//! - `bench rpc`, `bench cache`: each scenario's latency distribution (fraction of calls
//!   answered within x µs). A scenario keeps [`CURVE_POINTS`] quantiles of its latencies,
//!   not every sample, so the picture costs the same whatever the call count.
//! - `bench cluster`: convergence over time (fraction of nodes that route a new function x
//!   ms after its registration, that suspect and that removed a `kill -9`ed node x ms
//!   after the kill).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::bench::ScenarioResult;

/// Quantiles kept per scenario for its curve.
pub(super) const CURVE_POINTS: usize = 200;

/// `CURVE_POINTS` evenly spaced quantiles (by nearest rank) of `sorted` latencies, in µs,
/// with the fraction each stands for; empty when there are none.
pub(super) fn latency_curve(sorted: &[u32]) -> Vec<(f64, u32)> {
    if sorted.is_empty() {
        return Vec::new();
    }
    (1..=CURVE_POINTS)
        .map(|i| {
            let q = i as f64 / CURVE_POINTS as f64;
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            (q, sorted[rank - 1])
        })
        .collect()
}

/// One curve: its legend and its (x, fraction) points, x ascending.
pub(super) type Curve = (String, Vec<(f64, f64)>);

/// Draws every scenario's latency distribution into the SVG file `path`, titled `title`.
pub(super) fn write_latency_svg(path: &Path, title: &str, results: &[ScenarioResult]) -> anyhow::Result<()> {
    let curves: Vec<Curve> = results
        .iter()
        .map(|r| {
            let label = format!("{} (p50 {} µs, p99 {} µs)", r.name, r.p50_us, r.p99_us);
            (label, r.latency_curve.iter().map(|&(q, us)| (f64::from(us), q)).collect())
        })
        .collect();
    write_cdf_svg(path, title, "latency (µs, log scale)", "fraction of calls answered within", &curves)
}

/// The cumulative curve of `times` in ms: after the k-th smallest, k of n.
pub(super) fn convergence_curve(times: &[std::time::Duration]) -> Vec<(f64, f64)> {
    let mut ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len() as f64;
    ms.into_iter().enumerate().map(|(k, t)| (t, (k + 1) as f64 / n)).collect()
}

/// Draws `curves` (fractions from 0 to 1 over a log-scaled x) into the SVG file `path`.
pub(super) fn write_cdf_svg(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    curves: &[Curve],
) -> anyhow::Result<()> {
    let xs = curves.iter().flat_map(|(_, points)| points.iter().map(|&(x, _)| x));
    let (low, high) = xs.fold((f64::INFINITY, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    anyhow::ensure!(high > 0.0, "nothing to plot");
    let x_range = (low.max(high / 1e6).max(1e-3) * 0.8)..(high * 1.25);

    let root = SVGBackend::new(path, (1000, 620)).into_drawing_area();
    let draw = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(x_range.log_scale(), 0f64..1f64)
        .map_err(draw)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(draw)?;
    for (i, (label, points)) in curves.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
            .map_err(draw)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_have_a_fixed_size_and_end_at_the_maximum() {
        let sorted: Vec<u32> = (1..=100_000).collect();
        let curve = latency_curve(&sorted);
        assert_eq!(curve.len(), CURVE_POINTS);
        assert_eq!(curve.last(), Some(&(1.0, 100_000)));
        assert_eq!(curve[CURVE_POINTS / 2 - 1], (0.5, 50_000));
        assert!(latency_curve(&[]).is_empty());
        assert!(latency_curve(&[7]).iter().all(|&(_, us)| us == 7));
    }

    #[test]
    fn convergence_counts_nodes_in_order_of_time() {
        let times = [30, 10, 20, 40].map(std::time::Duration::from_millis);
        assert_eq!(convergence_curve(&times), vec![(10.0, 0.25), (20.0, 0.5), (30.0, 0.75), (40.0, 1.0)]);
        assert!(convergence_curve(&[]).is_empty());
    }

    #[test]
    fn the_svg_names_every_scenario_and_no_latencies_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latency.svg");
        let sorted: Vec<u32> = (50..5_000).collect();
        let results = [
            ScenarioResult::for_plot("rpc_echo_seq", &sorted),
            ScenarioResult::for_plot("raw_ws_echo_seq", &sorted[..10]),
        ];
        write_latency_svg(&path, "bench rpc", &results).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("rpc_echo_seq") && svg.contains("raw_ws_echo_seq") && svg.contains("<polyline"));
        let empty = [ScenarioResult::for_plot("none", &[])];
        assert!(write_latency_svg(&dir.path().join("empty.svg"), "empty", &empty).is_err());
    }
}
