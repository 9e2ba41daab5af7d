//! Line charts as SVG, rendered on the server from a metrics-history answer:
//! no charting library, no script, nothing but SVG presentation attributes (the
//! CSP allows no inline style). Pure: points in, markup out.

use std::fmt::Write as _;

use super::html::esc;

/// The drawing area, in SVG user units (the SVG scales to its box).
const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 22.0;

/// How the values of a chart read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// 0 to 100 (the axis stays there).
    Percent,
    /// Bytes: the axis grows with the largest value.
    Bytes,
    /// A plain number (percent of one core summed over replicas): the axis grows
    /// with the largest value, from 100.
    Open,
}

/// A chart's data: step starts (Unix ms) with a value or a gap.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The range's start, Unix ms.
    pub from_ms: u64,
    /// The range's end, Unix ms.
    pub to_ms: u64,
    /// `(step start, value)`, oldest first.
    pub points: Vec<(u64, Option<f64>)>,
}

/// The SVG of `series`: a labelled axis, grid lines and the line itself (gaps
/// where there is no data). The root carries `data-points` (how many values are
/// drawn) and `data-last` (the newest value's time), which the page's script and
/// the tests read; `id` lets the script replace it when it refreshes.
pub fn line_chart(id: &str, title: &str, scale: Scale, series: &Series) -> String {
    let values: Vec<f64> = series
        .points
        .iter()
        .filter_map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .collect();
    let largest = values.iter().copied().fold(0.0_f64, f64::max);
    let top = match scale {
        Scale::Percent => 100.0,
        // A power of two: the grid's quarters read as round binary sizes.
        Scale::Bytes => 2f64.powf(largest.max(1.0).log2().ceil()),
        Scale::Open => nice_ceiling(largest.max(100.0)),
    };
    let last = series
        .points
        .iter()
        .rev()
        .find(|(_, v)| v.is_some_and(f64::is_finite))
        .map_or(0, |(t, _)| *t);
    let span = series.to_ms.saturating_sub(series.from_ms).max(1) as f64;
    let x =
        |t: u64| LEFT + (t.saturating_sub(series.from_ms) as f64 / span) * (WIDTH - LEFT - RIGHT);
    let y = |v: f64| TOP + (1.0 - (v / top).clamp(0.0, 1.0)) * (HEIGHT - TOP - BOTTOM);

    let mut svg = String::with_capacity(4096 + series.points.len() * 24);
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{}\" class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         role=\"img\" aria-label=\"{}\" data-points=\"{}\" data-last=\"{last}\" preserveAspectRatio=\"none\">",
        esc(id),
        esc(title),
        values.len()
    );
    let _ = write!(svg, "<title>{}</title>", esc(title));
    // Grid: four bands, labelled on the left.
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        let gy = y(v);
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{gy:.1}\" y2=\"{gy:.1}\" stroke=\"#d7dce2\" stroke-width=\"1\"/>\
             <text x=\"{}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\" fill=\"#5b6470\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 4.0,
            gy + 3.5,
            axis_label(v, scale)
        );
    }
    // Time labels: the range's start and end.
    for (t, anchor, at) in [
        (series.from_ms, "start", LEFT),
        (series.to_ms, "end", WIDTH - RIGHT),
    ] {
        let _ = write!(
            svg,
            "<text x=\"{at}\" y=\"{}\" font-size=\"10\" text-anchor=\"{anchor}\" fill=\"#5b6470\">{}</text>",
            HEIGHT - 6.0,
            clock(t)
        );
    }
    let d = path(&series.points, x, y);
    if d.is_empty() {
        let _ = write!(
            svg,
            "<text class=\"nodata\" x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#5b6470\">no data in this range yet</text>",
            (LEFT + WIDTH - RIGHT) / 2.0,
            HEIGHT / 2.0
        );
    } else {
        let _ = write!(
            svg,
            "<path class=\"line\" d=\"{d}\" fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"1.5\" \
             vector-effect=\"non-scaling-stroke\" stroke-linejoin=\"round\"/>"
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The path through the points: `M` starts a run, `L` continues it, a gap (no
/// value) ends it; a run of one point is drawn as a dot-long segment.
fn path(points: &[(u64, Option<f64>)], x: impl Fn(u64) -> f64, y: impl Fn(f64) -> f64) -> String {
    let mut d = String::new();
    let mut in_run = false;
    for (t, v) in points {
        match v.filter(|v| v.is_finite()) {
            Some(v) => {
                let (px, py) = (x(*t), y(v));
                let _ = write!(d, "{}{px:.1} {py:.1} ", if in_run { "L" } else { "M" });
                if !in_run {
                    let _ = write!(d, "L{:.1} {py:.1} ", px + 0.5);
                }
                in_run = true;
            }
            None => in_run = false,
        }
    }
    d.trim_end().to_string()
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    let exp = v.log10().floor();
    let base = 10f64.powf(exp);
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * base >= v {
            return m * base;
        }
    }
    10.0 * base
}

fn axis_label(v: f64, scale: Scale) -> String {
    match scale {
        Scale::Percent => format!("{v:.0}%"),
        Scale::Bytes => super::html::bytes(v as u64),
        Scale::Open => format!("{v:.0}"),
    }
}

/// `HH:MM` (UTC) of a Unix-ms time.
fn clock(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    format!("{:02}:{:02} UTC", (secs / 3600) % 24, (secs / 60) % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(points: Vec<(u64, Option<f64>)>) -> Series {
        Series {
            from_ms: 0,
            to_ms: 100_000,
            points,
        }
    }

    #[test]
    fn a_line_breaks_at_gaps_and_counts_its_points() {
        let s = series(vec![
            (0, Some(10.0)),
            (10_000, Some(20.0)),
            (20_000, None),
            (30_000, Some(50.0)),
        ]);
        let svg = line_chart("cpu", "CPU", Scale::Percent, &s);
        assert!(svg.contains("data-points=\"3\""), "{svg}");
        assert!(svg.contains("data-last=\"30000\""), "{svg}");
        let d = svg
            .split(" d=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("a path");
        assert_eq!(d.matches('M').count(), 2, "two runs: {d}");
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(!svg.contains("style="));
    }

    #[test]
    fn no_data_says_so_and_values_stay_inside_the_box() {
        let empty = line_chart("m", "Memory", Scale::Percent, &series(vec![(0, None)]));
        assert!(empty.contains("no data in this range yet"));
        assert!(empty.contains("data-points=\"0\""));
        let over = line_chart("m", "x", Scale::Percent, &series(vec![(0, Some(250.0))]));
        let d = over.split(" d=\"").nth(1).expect("path");
        assert!(d.starts_with(&format!("M{LEFT:.1} {TOP:.1}")), "{d}");
    }

    #[test]
    fn a_hostile_title_is_escaped() {
        let svg = line_chart("x\"", "<script>", Scale::Bytes, &series(vec![]));
        assert!(!svg.contains("<script>"));
        assert!(svg.contains("&lt;script&gt;"));
        assert!(svg.contains("id=\"x&quot;\""));
    }

    #[test]
    fn axes_round_up_to_readable_values() {
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
        assert_eq!(nice_ceiling(130.0), 200.0);
        let mib = line_chart("m", "x", Scale::Bytes, &series(vec![(0, Some(900_000.0))]));
        assert!(mib.contains(">1.0 MiB</text>"), "{mib}");
        assert!(mib.contains(">512 KiB</text>"), "{mib}");
        assert_eq!(clock(3_600_000 + 61_000), "01:01 UTC");
    }
}
