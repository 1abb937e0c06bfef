//! Renders a benchmark run's results as one SVG: throughput over time on top,
//! p50/p99 latency per run kind below, so a run can be judged at a glance.
//!
//! SVG only, with plotters' default features off: the SVG backend writes text as
//! `<text>` elements and lays it out with a size estimate, so no font file or
//! system font library is needed to render the labels.

use std::ops::Range;
use std::path::Path;

use anyhow::Context;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One run's throughput over time: (seconds since the run started, orders/s over the last sampling interval).
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One run kind's latency percentiles in milliseconds.
pub struct Latency {
    pub label: String,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

const SIZE: (u32, u32) = (1200, 900);
const FONT: &str = "sans-serif";
/// The lowest the latency axis goes: one microsecond, far below anything a real
/// run measures, so a rounding artefact such as 1e-12 ms cannot stretch it down.
const LATENCY_FLOOR_MS: f64 = 1e-3;

/// Tableau 10: distinct on white and mostly colour-blind safe, unlike
/// `Palette99`, whose third colour is a yellow that vanishes on white.
const TABLEAU10: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn series_color(i: usize) -> RGBColor {
    match TABLEAU10.get(i) {
        Some(c) => *c,
        None => {
            let (r, g, b) = Palette99::pick(i).rgb();
            RGBColor(r, g, b)
        }
    }
}

/// Renders a two-panel SVG: top, throughput over time (one line per series, legend with labels, x "seconds", y "orders/s");
/// bottom, p50 and p99 latency per run kind (grouped bars, log-scale y axis in ms since values range from ~1 ms to ~1000 ms).
/// `title` goes above both panels.
pub fn render(
    path: &Path,
    title: &str,
    throughput: &[Series],
    latency: &[Latency],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let body = root.titled(title, (FONT, 34))?;
    let (top, bottom) = body.split_vertically(body.dim_in_pixel().1 * 11 / 20);
    draw_throughput(&top, throughput).context("drawing the throughput panel")?;
    draw_latency(&bottom, latency).context("drawing the latency panel")?;
    // The backend writes the file on drop too, but swallows the error there.
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn draw_throughput<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    throughput: &[Series],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    // Skip points plotters cannot place (NaN, infinities): the rest of the run still shows.
    let cleaned: Vec<Vec<(f64, f64)>> = throughput
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let all = cleaned.iter().flatten();
    let x_range = padded_range(0.0, all.clone().map(|p| p.0), 1.0);
    // 10% headroom keeps the peak off the frame.
    let y_range = padded_range(0.0, all.map(|p| p.1 * 1.1), 1.0);

    let mut chart = ChartBuilder::on(area)
        .caption("Throughput", (FONT, 24))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(x_range, y_range)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("orders/s")
        .axis_desc_style((FONT, 20))
        .label_style((FONT, 17))
        .x_label_formatter(&format_number)
        .y_label_formatter(&format_number)
        .light_line_style(BLACK.mix(0.05))
        .draw()?;

    for (i, (series, points)) in throughput.iter().zip(&cleaned).enumerate() {
        let color = series_color(i);
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))?
            .label(series.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        // A line needs two points; a lone sample still deserves a mark.
        if points.len() == 1 {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
    }

    if cleaned.iter().all(Vec::is_empty) {
        no_data(area)?;
    }
    if !throughput.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 18))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    Ok(())
}

fn draw_latency<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    latency: &[Latency],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let values = latency
        .iter()
        .flat_map(|l| [l.p50_ms, l.p99_ms])
        .filter_map(loggable);
    let (lo, hi) = decades(values);
    let bold: Vec<f64> = (lo..=hi).map(|k| 10f64.powi(k)).collect();
    let light: Vec<f64> = (lo..hi)
        .flat_map(|k| (2..10).map(move |m| f64::from(m) * 10f64.powi(k)))
        .collect();
    let y_axis = (10f64.powi(lo)..10f64.powi(hi))
        .log_scale()
        .with_key_points(bold)
        .with_light_points(light);

    let n = latency.len();
    let x_axis = Categories(n);
    let label_of = |x: &f64| {
        let i = x.round();
        if i >= 0.0 {
            latency
                .get(i as usize)
                .map(|l| l.label.clone())
                .unwrap_or_default()
        } else {
            String::new()
        }
    };

    let mut chart = ChartBuilder::on(area)
        .caption("Latency percentiles", (FONT, 24))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(x_axis, y_axis)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("run kind")
        .y_desc("latency, ms (log scale)")
        .axis_desc_style((FONT, 20))
        .x_label_style((FONT, category_font_size(area, latency)))
        .y_label_style((FONT, 17))
        .x_label_formatter(&label_of)
        .y_label_formatter(&format_decade)
        .light_line_style(BLACK.mix(0.05))
        .draw()?;

    // Bars stand on the bottom of the axis: a log axis has no zero to stand on.
    let base = 10f64.powi(lo);
    type Pick = fn(&Latency) -> f64;
    let bars: [(&str, f64, f64, RGBColor, Pick); 2] = [
        ("p50", -0.38, -0.02, series_color(0), |l| l.p50_ms),
        ("p99", 0.02, 0.38, series_color(1), |l| l.p99_ms),
    ];
    let value_style = TextStyle::from((FONT, 15))
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    for &(_, from, to, color, pick) in &bars {
        // A value the axis cannot show gets no bar, only an "n/a" where it would stand.
        chart.draw_series(latency.iter().enumerate().filter_map(|(i, l)| {
            let x = i as f64;
            let top = loggable(pick(l))?;
            Some(Rectangle::new(
                [(x + from, base), (x + to, top)],
                color.filled(),
            ))
        }))?;
        chart.draw_series(latency.iter().enumerate().map(|(i, l)| {
            let v = pick(l);
            let at = (i as f64 + (from + to) / 2.0, loggable(v).unwrap_or(base));
            Text::new(format_ms(v), at, value_style.clone())
        }))?;
    }

    if latency.is_empty() {
        no_data(area)?;
    }
    // Beside the caption rather than inside the plot, where the tallest bar would be.
    let (w, _) = area.dim_in_pixel();
    let legend_style = TextStyle::from((FONT, 18))
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (k, &(name, _, _, color, _)) in bars.iter().enumerate() {
        let x = w as i32 - 170 + 80 * k as i32;
        let y = 28;
        area.draw(&Rectangle::new(
            [(x, y - 7), (x + 18, y + 7)],
            color.filled(),
        ))?;
        area.draw(&Text::new(name, (x + 24, y), legend_style.clone()))?;
    }
    Ok(())
}

/// `v` as the log axis can show it: positive and finite, at least the floor.
fn loggable(v: f64) -> Option<f64> {
    (v.is_finite() && v > 0.0).then(|| v.max(LATENCY_FLOOR_MS))
}

/// An x axis of `n` categories: category `i` is centred on `i`, its bars sit
/// within `i ± 0.5`, and the only ticks are at the centres, where its label goes.
/// (`with_key_points` would do on `f64`, but loses the tick label formatting.)
struct Categories(usize);

impl Ranged for Categories {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let frac = (value + 0.5) / self.0.max(1) as f64;
        limit.0 + (frac * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            (0..self.0).map(|i| i as f64).collect()
        }
    }

    fn range(&self) -> Range<f64> {
        -0.5..self.0.max(1) as f64 - 0.5
    }
}

/// The largest font, up to 19, at which the longest category label fits its slot,
/// so many or long run-kind names shrink instead of running into each other.
fn category_font_size<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    latency: &[Latency],
) -> f64 {
    let longest = latency.iter().map(|l| l.label.chars().count()).max();
    let slot = f64::from(area.dim_in_pixel().0.saturating_sub(130)) / latency.len().max(1) as f64;
    // plotters draws a size-s font at s / 1.24 px; a sans-serif glyph is ~0.6 em wide.
    let fits = slot / (0.6 * longest.unwrap_or(1).max(1) as f64) * 1.24;
    fits.clamp(12.0, 19.0)
}

/// `min..max` of `floor` and `values`, widened to `min + span` when empty or flat,
/// so a single point or no data still gives plotters a non-empty range.
fn padded_range(floor: f64, values: impl Iterator<Item = f64>, span: f64) -> Range<f64> {
    let (lo, hi) = values.fold((floor, floor), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi > lo {
        lo..hi
    } else {
        lo..lo + span
    }
}

/// The powers of ten (as exponents) that enclose every value with some room: the
/// smallest bar stays visible and the largest keeps space for its value label.
fn decades(values: impl Iterator<Item = f64>) -> (i32, i32) {
    let bounds = values.fold(None, |acc: Option<(f64, f64)>, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    });
    // Without data, show the range the benchmark usually lands in.
    let (lo, hi) = bounds.unwrap_or((1.0, 1000.0));
    let lo = (lo.log10() - 0.3).floor() as i32;
    let hi = ((hi.log10() + 0.3).ceil() as i32).max(lo + 1);
    (lo, hi)
}

/// Tick labels without a pointless `.0`.
fn format_number(v: &f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn format_decade(v: &f64) -> String {
    let decimals = (-v.log10().round()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

fn format_ms(v: f64) -> String {
    if !v.is_finite() || v <= 0.0 {
        "n/a".to_string()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn no_data<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.dim_in_pixel();
    let grey = BLACK.mix(0.5);
    let style = TextStyle::from((FONT, 20))
        .color(&grey)
        .pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new("no data", (w as i32 / 2, h as i32 / 2), style))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_throughput() -> Vec<Series> {
        ["kafka", "rabbitmq", "kafka+pg", "rabbitmq+pg"]
            .iter()
            .enumerate()
            .map(|(k, label)| Series {
                label: label.to_string(),
                points: (0..50)
                    .map(|i| {
                        let t = f64::from(i);
                        let ramp = 1.0 - (-t / 5.0).exp();
                        let rate = (4000.0 - 700.0 * k as f64) * ramp + 150.0 * (t * 0.7).sin();
                        (t, rate)
                    })
                    .collect(),
            })
            .collect()
    }

    fn sample_latency() -> Vec<Latency> {
        [
            ("kafka", 1.2, 9.5),
            ("rabbitmq", 2.4, 31.0),
            ("kafka+pg", 6.8, 120.0),
            ("rabbitmq+pg", 9.1, 480.0),
            ("charge-outage", 48.0, 1250.0),
        ]
        .iter()
        .map(|&(label, p50_ms, p99_ms)| Latency {
            label: label.to_string(),
            p50_ms,
            p99_ms,
        })
        .collect()
    }

    fn render_to_string(title: &str, throughput: &[Series], latency: &[Latency]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.svg");
        render(&path, title, throughput, latency).unwrap();
        std::fs::read_to_string(&path).unwrap()
    }

    /// The contents of every `<text>` element, trimmed.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..];
                Some(body[..body.find("</text>")?].trim().to_string())
            })
            .collect()
    }

    fn has_text(svg: &str, text: &str) -> bool {
        texts(svg).iter().any(|t| t == text)
    }

    #[test]
    fn renders_labels_legend_and_axes() {
        let throughput = sample_throughput();
        let latency = sample_latency();
        let svg = render_to_string("conveyor-bench sample", &throughput, &latency);

        assert!(
            svg.len() > 10_000,
            "suspiciously small SVG: {} bytes",
            svg.len()
        );
        assert!(svg.starts_with("<svg"));
        assert!(has_text(&svg, "conveyor-bench sample"));
        for s in &throughput {
            assert!(has_text(&svg, &s.label), "no legend for {}", s.label);
        }
        for l in &latency {
            assert!(has_text(&svg, &l.label), "no category {}", l.label);
        }
        let axes = [
            "seconds",
            "orders/s",
            "p50",
            "p99",
            "latency, ms (log scale)",
        ];
        for text in axes {
            assert!(has_text(&svg, text), "missing {text:?}");
        }
        // Log axis ticks at decades, and the bars' values written on them.
        for text in ["1", "10", "100", "1000", "1250", "1.2"] {
            assert!(has_text(&svg, text), "missing {text:?}");
        }
    }

    #[test]
    fn survives_empty_single_and_bad_values() {
        let svg = render_to_string("empty", &[], &[]);
        assert!(has_text(&svg, "no data"));

        let single = [Series {
            label: "one".into(),
            points: vec![(0.0, 10.0)],
        }];
        let odd = [
            Latency {
                label: "zero".into(),
                p50_ms: 0.0,
                p99_ms: -3.0,
            },
            Latency {
                label: "nan".into(),
                p50_ms: f64::NAN,
                p99_ms: f64::INFINITY,
            },
        ];
        let svg = render_to_string("odd", &single, &odd);
        assert!(has_text(&svg, "one"));
        assert!(has_text(&svg, "n/a"));

        let nonfinite = [Series {
            label: "nan".into(),
            points: vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)],
        }];
        let one_kind = [Latency {
            label: "flat".into(),
            p50_ms: 5.0,
            p99_ms: 5.0,
        }];
        render_to_string("nonfinite", &nonfinite, &one_kind);
    }

    #[test]
    fn decades_enclose_values() {
        assert_eq!(loggable(0.0), None);
        assert_eq!(loggable(f64::NAN), None);
        assert_eq!(loggable(f64::INFINITY), None);
        assert_eq!(loggable(1e-12), Some(LATENCY_FLOOR_MS));
        assert_eq!(decades([1.2, 1250.0].into_iter()), (-1, 4));
        assert_eq!(decades([5.0].into_iter()), (0, 1));
        assert_eq!(decades([0.001].into_iter()), (-4, -2));
        assert_eq!(decades(std::iter::empty()), (-1, 4));
        assert_eq!(format_decade(&0.01), "0.01");
        assert_eq!(format_decade(&1000.0), "1000");
        assert_eq!(format_number(&2500.0), "2500");
        assert_eq!(format_number(&0.25), "0.25");
    }
}
