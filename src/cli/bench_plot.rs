//! `--plot FILE.svg` of `mpreg bench rpc` and `mpreg bench cache`: each scenario's latency
//! distribution as a cumulative curve (fraction of calls answered within x µs, x on a log
//! scale), drawn with plotters' SVG backend (no fonts or system libraries needed).
//!
//! A scenario keeps [`CURVE_POINTS`] quantiles of its latencies, not every sample, so the
//! picture costs the same whatever the call count.

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

/// Draws every scenario's curve into the SVG file `path`, titled `title`.
pub(super) fn write_latency_svg(path: &Path, title: &str, results: &[ScenarioResult]) -> anyhow::Result<()> {
    let points = results.iter().flat_map(|r| r.latency_curve.iter().map(|&(_, us)| us));
    let (low, high) = points.fold((u32::MAX, 0), |(lo, hi), us| (lo.min(us), hi.max(us)));
    anyhow::ensure!(high > 0, "no latencies to plot");
    let x_range = (f64::from(low.max(1)) * 0.8)..(f64::from(high) * 1.25);

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
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .y_desc("fraction of calls answered within")
        .draw()
        .map_err(draw)?;
    for (i, result) in results.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let curve = result.latency_curve.iter().map(|&(q, us)| (f64::from(us), q));
        chart
            .draw_series(LineSeries::new(curve, colour.stroke_width(2)))
            .map_err(draw)?
            .label(format!("{} (p50 {} µs, p99 {} µs)", result.name, result.p50_us, result.p99_us))
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
