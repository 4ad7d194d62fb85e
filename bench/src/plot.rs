//! PNG line charts drawn with plotters. Text is rendered from a TrueType font found on the
//! machine at run time; without one the charts are drawn without text and the Markdown
//! caption carries the labels.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

/// Font files tried, in order, for the charts' text.
const FONT_FILES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the first font found as the charts' sans-serif font; whether text can be drawn.
pub fn text_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        for path in FONT_FILES {
            if let Ok(bytes) = std::fs::read(path) {
                // Registered fonts live as long as the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!("no TrueType font found; charts are drawn without text");
        false
    })
}

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart; the x axis is logarithmic (base 2) when `log2_x`.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log2_x: bool,
    pub series: Vec<Series>,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
];

/// The x and y ranges covering every point, padded a little; `None` with no point.
fn bounds(chart: &Chart) -> Option<((f64, f64), (f64, f64))> {
    let xs = chart.series.iter().flat_map(|s| &s.points).map(|p| x_of(chart, p.0));
    let ys = chart.series.iter().flat_map(|s| &s.points).map(|p| p.1);
    let (x0, x1) = xs.fold(None, |acc: Option<(f64, f64)>, x| {
        Some(acc.map_or((x, x), |(a, b)| (a.min(x), b.max(x))))
    })?;
    let y1 = ys.fold(f64::NEG_INFINITY, f64::max);
    let pad_x = ((x1 - x0) * 0.05).max(0.5);
    Some(((x0 - pad_x, x1 + pad_x), (0.0, if y1 > 0.0 { y1 * 1.1 } else { 1.0 })))
}

fn x_of(chart: &Chart, x: f64) -> f64 {
    if chart.log2_x {
        x.log2()
    } else {
        x
    }
}

/// Draws `chart` into a PNG of `width x height` pixels at `path`.
pub fn draw(path: &Path, chart: &Chart, size: (u32, u32)) -> Result<()> {
    let ((x0, x1), (y0, y1)) = bounds(chart).ok_or_else(|| anyhow!("no points to plot"))?;
    let text = text_available();
    let root = BitMapBackend::new(path, size).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(12);
    if text {
        builder
            .caption(&chart.title, ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut ctx = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| err(&e))?;
    let log2 = chart.log2_x;
    let x_fmt = move |x: &f64| {
        if log2 {
            format!("{:.0}", x.exp2())
        } else {
            format!("{x:.0}")
        }
    };
    let mut mesh = ctx.configure_mesh();
    if text {
        mesh.x_desc(&chart.x_label).y_desc(&chart.y_label).x_label_formatter(&x_fmt);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| err(&e))?;

    for (i, series) in chart.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, f64)> =
            series.points.iter().map(|&(x, y)| (x_of(chart, x), y)).collect();
        let line = ctx
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?;
        if text {
            line.label(&series.name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        ctx.draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    if text {
        ctx.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(log2_x: bool) -> Chart {
        Chart {
            title: "step time".into(),
            x_label: "batch".into(),
            y_label: "ms".into(),
            log2_x,
            series: vec![
                Series { name: "a".into(), points: vec![(64.0, 1.0), (128.0, 2.0)] },
                Series { name: "b".into(), points: vec![(64.0, 0.5), (256.0, 3.0)] },
            ],
        }
    }

    #[test]
    fn bounds_cover_every_point() {
        let ((x0, x1), (y0, y1)) = bounds(&chart(true)).expect("points");
        assert!(x0 < 6.0 && x1 > 8.0, "{x0} {x1}");
        assert_eq!(y0, 0.0);
        assert!((y1 - 3.3).abs() < 1e-9);
        let empty = Chart { series: vec![], ..chart(false) };
        assert!(bounds(&empty).is_none());
    }

    #[test]
    fn draws_a_png() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("chart.png");
        draw(&path, &chart(true), (320, 240)).expect("drawn");
        let bytes = std::fs::read(&path).expect("written");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // Not a blank canvas: some pixel is neither white nor the background.
        assert!(bytes.len() > 500);
    }

    #[test]
    fn refuses_an_empty_chart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = Chart { series: vec![], ..chart(false) };
        assert!(draw(&dir.path().join("x.png"), &empty, (100, 100)).is_err());
    }
}
