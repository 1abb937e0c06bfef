//! The capacity schedule as one SVG (the style of the main benchmark's
//! plot): orders committed per second over time on top, each contestant's
//! payment concurrency limit below it with the simulator's capacity as a
//! dashed step, from the last run of each contestant.

use std::path::Path;

use anyhow::Context as _;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::schedule::ScheduleResults;
use super::FlowArgs;

const SIZE: (u32, u32) = (1200, 900);
const FONT: &str = "sans-serif";
/// Tableau 10's first colours: distinct on white.
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

struct Line {
    label: String,
    points: Vec<(f64, f64)>,
}

pub(crate) fn render(path: &Path, a: &FlowArgs, s: &ScheduleResults) -> anyhow::Result<()> {
    let last = |i: usize| s.runs.get(i).and_then(|r| r.last());
    let mut throughput = Vec::new();
    let mut limits = Vec::new();
    for (i, c) in s.contestants.iter().enumerate() {
        let Some(run) = last(i) else { continue };
        throughput.push(Line {
            label: c.label(),
            points: run.throughput.clone(),
        });
        limits.push(Line {
            label: c.label(),
            points: run.limits[0].clone(),
        });
    }
    let end = a.capacities.len() as f64 * a.phase_secs;
    let capacity: Vec<(f64, f64)> = a
        .capacities
        .iter()
        .enumerate()
        .flat_map(|(k, c)| {
            let (from, to) = (k as f64 * a.phase_secs, (k + 1) as f64 * a.phase_secs);
            [(from, f64::from(*c)), (to, f64::from(*c))]
        })
        .collect();
    let caps: Vec<String> = a.capacities.iter().map(u32::to_string).collect();
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "conveyor flow control: capacity {} at L = {} ms (last run of each contestant)",
        caps.join(" → "),
        a.latency_ms
    );
    let body = root.titled(&title, (FONT, 28))?;
    let (top, bottom) = body.split_vertically(body.dim_in_pixel().1 / 2);
    panel(&top, "Throughput", "orders/s", end, &throughput, None).context("throughput panel")?;
    panel(
        &bottom,
        "Payment concurrency limit (conveyor_downstream_concurrency_limit)",
        "calls in flight",
        end,
        &limits,
        Some(&capacity),
    )
    .context("limit panel")?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    y_desc: &str,
    end: f64,
    lines: &[Line],
    capacity: Option<&[(f64, f64)]>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite() && p.0 <= end;
    let top = lines
        .iter()
        .flat_map(|l| l.points.iter().filter(finite))
        .chain(capacity.unwrap_or(&[]).iter())
        .map(|p| p.1)
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..end.max(1.0), 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(y_desc)
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 15))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(BLACK.mix(0.05))
        .draw()?;
    for (i, line) in lines.iter().enumerate() {
        let style = COLORS[i % COLORS.len()].stroke_width(2);
        chart
            .draw_series(LineSeries::new(
                line.points.iter().filter(finite).copied(),
                style,
            ))?
            .label(line.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    if let Some(cap) = capacity {
        let style = BLACK.mix(0.7).stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(cap.iter().copied(), 8, 6, style))?
            .label("simulator capacity")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}
