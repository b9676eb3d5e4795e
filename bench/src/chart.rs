//! Line charts as SVG, with plotters' SVG backend only: no font or image libraries are needed, the
//! text is left for the browser to render.

use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::prelude::*;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// The legend.
    pub name: String,
    /// The points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// What a chart shows.
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    /// The caption.
    pub title: &'a str,
    /// The x axis label.
    pub x: &'a str,
    /// The y axis label.
    pub y: &'a str,
    /// Whether x is drawn on a log scale (e.g. concurrency 1, 16, 128).
    pub log_x: bool,
}

/// Draws `series` into an SVG file at `path`.
///
/// # Errors
/// When the file cannot be written or plotters fails.
pub fn lines(path: &Path, chart: &Chart<'_>, series: &[Series]) -> anyhow::Result<()> {
    draw(path, chart, series)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("drawing {}", path.display()))
}

fn draw(
    path: &Path,
    chart: &Chart<'_>,
    series: &[Series],
) -> Result<(), Box<dyn std::error::Error>> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0_f64);
    for &(x, y) in all() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(chart.title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    let colours = [
        BLUE,
        RED,
        GREEN,
        MAGENTA,
        CYAN,
        BLACK,
        RGBColor(255, 140, 0),
        RGBColor(128, 0, 128),
    ];
    macro_rules! plot {
        ($ctx:expr) => {{
            let mut ctx = $ctx;
            ctx.configure_mesh()
                .x_desc(chart.x)
                .y_desc(chart.y)
                .draw()?;
            for (i, s) in series.iter().enumerate() {
                let colour = colours[i % colours.len()];
                ctx.draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    colour.stroke_width(2),
                ))?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
                ctx.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
            }
            ctx.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()?;
        }};
    }
    if chart.log_x {
        plot!(builder.build_cartesian_2d((x0.max(1e-3)..x1).log_scale(), 0.0..y1)?);
    } else {
        plot!(builder.build_cartesian_2d(x0..x1, 0.0..y1)?);
    }
    root.present()?;
    Ok(())
}
