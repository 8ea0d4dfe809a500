//! The experiments' SVG plots, drawn with plotters as `moonlight-ref plot` draws loss curves,
//! and written atomically.

use std::path::Path;

use plotters::prelude::*;

/// A line to draw, with an optional band (a spread over seeds) around it.
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// `(x, y)` points of the line.
    pub line: Vec<(f64, f64)>,
    /// `(x, low, high)`: the band; empty for none.
    pub band: Vec<(f64, f64, f64)>,
    /// Points drawn as dots (measurements), with no line.
    pub dots: Vec<(f64, f64)>,
    /// Dashed line style (fits).
    pub dashed: bool,
}

/// The axes of a plot.
#[derive(Clone, Debug)]
pub struct Axes<'a> {
    /// The title.
    pub title: &'a str,
    /// The x axis.
    pub x: &'a str,
    /// The y axis.
    pub y: &'a str,
    /// A logarithmic x axis (with a logarithmic y axis too: a power law is a line).
    pub log: bool,
}

/// Draws `series` into an SVG at `out`.
pub fn plot(series: &[Series], axes: &Axes, out: &Path) -> Result<(), String> {
    let mut svg = String::new();
    draw(series, axes, &mut svg).map_err(|e| format!("cannot draw {}: {e}", out.display()))?;
    crate::files::write_atomic(out, svg.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", out.display()))
}

/// The finite range of `values`, padded by 5% (of the log for a log axis), or an error.
fn range(values: impl Iterator<Item = f64>, log: bool) -> Result<(f64, f64), String> {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    if !(lo.is_finite() && hi.is_finite()) {
        return Err("no finite values to plot".into());
    }
    if log {
        let (l, h) = (lo.ln(), hi.ln());
        let pad = ((h - l) * 0.05).max(1e-3);
        Ok(((l - pad).exp(), (h + pad).exp()))
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-3);
        Ok((lo - pad, hi + pad))
    }
}

fn draw(series: &[Series], axes: &Axes, svg: &mut String) -> Result<(), String> {
    let xs = || {
        series.iter().flat_map(|s| {
            s.line
                .iter()
                .chain(&s.dots)
                .map(|p| p.0)
                .chain(s.band.iter().map(|b| b.0))
        })
    };
    let ys = || {
        series.iter().flat_map(|s| {
            s.line
                .iter()
                .chain(&s.dots)
                .map(|p| p.1)
                .chain(s.band.iter().flat_map(|b| [b.1, b.2]))
        })
    };
    let (x0, x1) = range(xs(), axes.log)?;
    let (y0, y1) = range(ys(), axes.log)?;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = SVGBackend::with_string(svg, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(axes.title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60);
    if axes.log {
        let mut chart = builder
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(axes.x)
            .y_desc(axes.y)
            .x_label_formatter(&|v| format!("{v:.0e}"))
            .y_label_formatter(&|v| format!("{v:.3}"))
            .draw()
            .map_err(|e| err(&e))?;
        draw_series(&mut chart, series)?;
        legend(&mut chart)?;
    } else {
        let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(axes.x)
            .y_desc(axes.y)
            .draw()
            .map_err(|e| err(&e))?;
        draw_series(&mut chart, series)?;
        legend(&mut chart)?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

fn draw_series<'a, DB, CT>(chart: &mut ChartContext<'a, DB, CT>, series: &[Series]) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate<From = (f64, f64)>,
{
    let err = |e: &dyn std::fmt::Display| e.to_string();
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if !s.band.is_empty() {
            // The band as a closed polygon: the highs left to right, then the lows back.
            let mut poly: Vec<(f64, f64)> = s.band.iter().map(|b| (b.0, b.2)).collect();
            poly.extend(s.band.iter().rev().map(|b| (b.0, b.1)));
            chart
                .draw_series(std::iter::once(Polygon::new(poly, color.mix(0.2).filled())))
                .map_err(|e| err(&e))?;
        }
        let mut labelled = false;
        if !s.line.is_empty() {
            let anno = if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(
                        s.line.iter().copied(),
                        6,
                        4,
                        color.stroke_width(2),
                    ))
                    .map_err(|e| err(&e))?
            } else {
                chart
                    .draw_series(LineSeries::new(s.line.iter().copied(), color.stroke_width(2)))
                    .map_err(|e| err(&e))?
            };
            anno.label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            labelled = true;
        }
        if !s.dots.is_empty() {
            let anno = chart
                .draw_series(s.dots.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?;
            if !labelled {
                anno.label(s.label.clone())
                    .legend(move |(x, y)| Circle::new((x + 9, y), 4, color.filled()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_write_svg_and_refuse_nothing_to_draw() {
        let dir = std::env::temp_dir().join(format!("repro-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = Series {
            label: "muon".into(),
            line: vec![(1e9, 3.0), (1e10, 2.5)],
            band: vec![(1e9, 2.9, 3.1), (1e10, 2.4, 2.6)],
            dots: vec![(3e9, 2.7)],
            dashed: true,
        };
        for log in [false, true] {
            let out = dir.join(format!("p{log}.svg"));
            let axes = Axes {
                title: "t",
                x: "x",
                y: "y",
                log,
            };
            plot(std::slice::from_ref(&s), &axes, &out).unwrap();
            let svg = std::fs::read_to_string(&out).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("muon"), "{svg:.200}");
        }
        let empty = Series {
            label: "e".into(),
            ..Series::default()
        };
        let axes = Axes {
            title: "t",
            x: "x",
            y: "y",
            log: false,
        };
        assert!(plot(&[empty], &axes, &dir.join("e.svg"))
            .unwrap_err()
            .contains("no finite"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
