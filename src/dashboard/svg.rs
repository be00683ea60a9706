//! Inline SVG charts: a line chart, a bar chart and a timeline, drawn from plain
//! numbers with no script. Every text they hold is escaped here.
//!
//! Coordinates: time runs left to right over the chart's window; values run bottom
//! (0) to top (the scale's maximum, rounded up to 1, 2 or 5 times a power of ten).

use std::fmt::Write as _;

use super::escape;

/// Chart width in SVG units.
pub const WIDTH: f64 = 640.0;
/// Chart height in SVG units.
pub const HEIGHT: f64 = 150.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 22.0;

/// The time a chart covers and how its values read.
#[derive(Clone, Copy)]
pub struct Frame<'a> {
    /// What the chart shows; also its accessible name.
    pub title: &'a str,
    /// A class naming the chart, for styles and tests (a constant, not escaped).
    pub class: &'static str,
    /// Left edge, in milliseconds since the epoch.
    pub start_ms: u64,
    /// Right edge, in milliseconds since the epoch.
    pub end_ms: u64,
    /// A value for people (an axis label).
    pub format: &'a dyn Fn(f64) -> String,
}

impl std::fmt::Debug for Frame<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("title", &self.title)
            .field("start_ms", &self.start_ms)
            .field("end_ms", &self.end_ms)
            .finish_non_exhaustive()
    }
}

impl Frame<'_> {
    fn x(&self, at_ms: u64) -> f64 {
        let span = self.end_ms.saturating_sub(self.start_ms).max(1);
        let offset = at_ms.clamp(self.start_ms, self.end_ms) - self.start_ms;
        LEFT + ms_f64(offset) / ms_f64(span) * (WIDTH - LEFT - RIGHT)
    }

    /// The opening tag, the frame (axes and their labels) of a chart whose values
    /// go up to `top`.
    fn open(&self, out: &mut String, top: Option<f64>) {
        let title = escape(self.title);
        let _ = write!(
            out,
            "<svg class=\"chart {}\" role=\"img\" aria-label=\"{title}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" xmlns=\"http://www.w3.org/2000/svg\"><title>{title}</title>",
            self.class
        );
        let (bottom, right) = (HEIGHT - BOTTOM, WIDTH - RIGHT);
        let _ = write!(
            out,
            "<path class=\"axis\" d=\"M{LEFT},{TOP} V{bottom} H{right}\" fill=\"none\" stroke=\"#888\"/>"
        );
        if let Some(top) = top {
            let _ = write!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"11\">{}</text><text x=\"{}\" y=\"{bottom}\" text-anchor=\"end\" font-size=\"11\">{}</text>",
                LEFT - 4.0,
                TOP + 8.0,
                escape(&(self.format)(top)),
                LEFT - 4.0,
                escape(&(self.format)(0.0)),
            );
        }
        let span_min = self.end_ms.saturating_sub(self.start_ms) / 60_000;
        let _ = write!(
            out,
            "<text x=\"{LEFT}\" y=\"{}\" font-size=\"11\">-{span_min} min</text><text x=\"{right}\" y=\"{}\" text-anchor=\"end\" font-size=\"11\">now</text>",
            HEIGHT - 6.0,
            HEIGHT - 6.0,
        );
    }
}

/// Milliseconds as a coordinate: exact to 2^53, far beyond any chart's span.
#[allow(clippy::cast_precision_loss)]
fn ms_f64(ms: u64) -> f64 {
    ms as f64
}

/// The y coordinate of `value` on a scale from 0 to `top`.
fn y(value: f64, top: f64) -> f64 {
    let plot = HEIGHT - TOP - BOTTOM;
    TOP + plot - (value.max(0.0) / top).min(1.0) * plot
}

/// The smallest 1, 2 or 5 times a power of ten at or above `max` (1 for nothing).
pub fn scale_top(max: f64) -> f64 {
    if !max.is_finite() || max <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|step| step * power)
        .find(|top| *top >= max * (1.0 - 1e-9))
        .unwrap_or(10.0 * power)
}

/// A point as SVG coordinates, one decimal.
fn coordinate(x: f64, y: f64) -> String {
    format!("{x:.1},{y:.1}")
}

/// A line through `points` (time, value), broken where a value is missing; a point
/// with no neighbour is drawn as a dot. Points outside the frame are pinned to its
/// edges.
pub fn line_chart(frame: &Frame<'_>, points: &[(u64, Option<f64>)]) -> String {
    let top = scale_top(points.iter().filter_map(|(_, v)| *v).fold(0.0, f64::max));
    let mut out = String::new();
    frame.open(&mut out, Some(top));
    for run in points.split(|(_, value)| value.is_none()) {
        let coordinates: Vec<String> = run
            .iter()
            .filter_map(|(at, value)| value.map(|v| coordinate(frame.x(*at), y(v, top))))
            .collect();
        match coordinates.as_slice() {
            [] => {}
            [one] => {
                let (cx, cy) = one.split_once(',').unwrap_or(("0", "0"));
                let _ = write!(
                    out,
                    "<circle class=\"dot\" cx=\"{cx}\" cy=\"{cy}\" r=\"2.5\" fill=\"#1f6feb\"/>"
                );
            }
            many => {
                let _ = write!(
                    out,
                    "<polyline class=\"line\" fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"1.5\" points=\"{}\"/>",
                    many.join(" ")
                );
            }
        }
    }
    out.push_str("</svg>");
    out
}

/// A bar at each (time, value).
pub fn bar_chart(frame: &Frame<'_>, bars: &[(u64, f64)]) -> String {
    let top = scale_top(bars.iter().map(|(_, v)| *v).fold(0.0, f64::max));
    let mut out = String::new();
    frame.open(&mut out, Some(top));
    let base = HEIGHT - BOTTOM;
    for (at, value) in bars {
        let (x, top_y) = (frame.x(*at), y(*value, top));
        let _ = write!(
            out,
            "<rect class=\"bar\" x=\"{:.1}\" y=\"{top_y:.1}\" width=\"3\" height=\"{:.1}\" fill=\"#2da44e\"><title>{}</title></rect>",
            x - 1.5,
            base - top_y,
            escape(&(frame.format)(*value)),
        );
    }
    out.push_str("</svg>");
    out
}

/// A mark on a timeline: when, what (shown on hover), and whether to stress it.
#[derive(Debug, Clone)]
pub struct Mark {
    /// When, in milliseconds since the epoch.
    pub at_ms: u64,
    /// What it is.
    pub label: String,
    /// Drawn filled (an application-consistent point, say) rather than hollow.
    pub strong: bool,
}

/// Marks on a line of time.
pub fn timeline(frame: &Frame<'_>, marks: &[Mark]) -> String {
    let mut out = String::new();
    frame.open(&mut out, None);
    let line_y = (HEIGHT - BOTTOM) / 2.0 + TOP / 2.0;
    let _ = write!(
        out,
        "<line x1=\"{LEFT}\" y1=\"{line_y}\" x2=\"{}\" y2=\"{line_y}\" stroke=\"#bbb\"/>",
        WIDTH - RIGHT
    );
    for mark in marks {
        let fill = if mark.strong { "#8250df" } else { "#fff" };
        let _ = write!(
            out,
            "<circle class=\"mark\" cx=\"{:.1}\" cy=\"{line_y}\" r=\"5\" fill=\"{fill}\" stroke=\"#8250df\" stroke-width=\"2\"><title>{}</title></circle>",
            frame.x(mark.at_ms),
            escape(&mark.label)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seconds(value: f64) -> String {
        format!("{value} s")
    }

    fn frame(format: &dyn Fn(f64) -> String) -> Frame<'_> {
        Frame {
            title: "Lag <last hour>",
            class: "lag",
            start_ms: 1_000_000,
            end_ms: 1_000_000 + 564_000,
            format,
        }
    }

    #[test]
    fn a_line_chart_of_known_samples_has_the_expected_points() {
        // The plot spans x 64..628 (564 units for 564 s) and y 12..128 (116 units).
        let chart = line_chart(
            &frame(&seconds),
            &[
                (1_000_000, Some(0.0)),
                (1_000_000 + 282_000, Some(5.0)),
                (1_000_000 + 564_000, Some(10.0)),
            ],
        );
        assert!(
            chart.contains("points=\"64.0,128.0 346.0,70.0 628.0,12.0\""),
            "{chart}"
        );
        assert!(chart.starts_with("<svg class=\"chart lag\""), "{chart}");
        assert!(chart.contains(">10 s</text>"), "{chart}");
        assert!(
            chart.contains("<title>Lag &lt;last hour&gt;</title>"),
            "{chart}"
        );
        assert!(chart.ends_with("</svg>"));
    }

    #[test]
    fn a_missing_value_breaks_the_line_and_a_lone_point_is_a_dot() {
        let chart = line_chart(
            &frame(&seconds),
            &[
                (1_000_000, Some(2.0)),
                (1_000_000 + 1_000, Some(2.0)),
                (1_000_000 + 2_000, None),
                (1_000_000 + 564_000, Some(1.0)),
            ],
        );
        assert_eq!(chart.matches("<polyline").count(), 1, "{chart}");
        assert!(
            chart.contains("<circle class=\"dot\" cx=\"628.0\" cy=\"70.0\""),
            "{chart}"
        );
    }

    #[test]
    fn bars_stand_on_the_axis_at_their_time() {
        let chart = bar_chart(&frame(&seconds), &[(1_000_000 + 282_000, 2.5)]);
        // Scale top 5: 2.5 is half way up.
        assert!(
            chart.contains("x=\"344.5\" y=\"70.0\" width=\"3\" height=\"58.0\""),
            "{chart}"
        );
        assert!(chart.contains("<title>2.5 s</title>"), "{chart}");
    }

    #[test]
    fn timeline_marks_are_placed_by_time_and_their_labels_escaped() {
        let chart = timeline(
            &frame(&seconds),
            &[Mark {
                at_ms: 1_000_000 + 564_000,
                label: "cycle 7 <script>".into(),
                strong: true,
            }],
        );
        assert!(chart.contains("cx=\"628.0\""), "{chart}");
        assert!(
            chart.contains("<title>cycle 7 &lt;script&gt;</title>"),
            "{chart}"
        );
        assert!(!chart.contains("<script>"), "{chart}");
    }

    #[test]
    fn scales_round_up_to_one_two_or_five() {
        for (max, top) in [
            (0.0, 1.0),
            (0.3, 0.5),
            (1.0, 1.0),
            (1.2, 2.0),
            (3.0, 5.0),
            (7.0, 10.0),
            (4200.0, 5000.0),
        ] {
            assert!(
                (scale_top(max) - top).abs() < 1e-9,
                "{max} -> {}",
                scale_top(max)
            );
        }
    }
}
