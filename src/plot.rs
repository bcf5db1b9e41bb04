//! SVG charts of an evaluation (native only): the representation gap per layer before and after
//! steering, and the refusal rate against α.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::eval::EvalReport;

const SIZE: (u32, u32) = (720, 420);

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plotting failed: {e}")
}

/// Write `gap_per_layer.svg` and `refusal_vs_alpha.svg` into `dir`; returns their paths.
pub fn write_eval_plots(report: &EvalReport, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
    let gap_path = dir.join("gap_per_layer.svg");
    let refusal_path = dir.join("refusal_vs_alpha.svg");
    // Each chart is drawn in memory and written whole (a reader never sees half an SVG).
    crate::atomic_file::write(&gap_path, gap_chart(report)?.as_bytes())?;
    crate::atomic_file::write(&refusal_path, refusal_chart(report)?.as_bytes())?;
    Ok(vec![gap_path, refusal_path])
}

fn gap_chart(report: &EvalReport) -> Result<String> {
    let mut svg = String::new();
    let layers = report.unaltered.gap_l2.len();
    let y_max = std::iter::once(&report.unaltered)
        .chain(&report.steered)
        .flat_map(|m| m.gap_l2.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.1;
    let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Representation gap ‖h(x, img) − h(x)‖ per layer", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..(layers.max(2) - 1) as f64, 0f64..y_max)
        .map_err(err)?;
    chart.configure_mesh().x_desc("decoder layer").y_desc("L2 distance").draw().map_err(err)?;
    let series = std::iter::once(("unaltered".to_owned(), &report.unaltered.gap_l2))
        .chain(report.steered.iter().map(|m| (format!("CMRM α = {}", m.alpha), &m.gap_l2)));
    for (i, (label, gaps)) in series.enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = gaps.iter().enumerate().map(|(l, g)| (l as f64, *g)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(err)?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;
    root.present().map_err(err)?;
    drop(chart);
    drop(root);
    Ok(svg)
}

fn refusal_chart(report: &EvalReport) -> Result<String> {
    let mut svg = String::new();
    let mut points: Vec<(f64, f64)> = vec![(0.0, report.unaltered.refusal_rate)];
    points.extend(report.steered.iter().map(|m| (f64::from(m.alpha), m.refusal_rate)));
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let x_min = points.first().map_or(0.0, |p| p.0).min(0.0);
    let x_max = points.last().map_or(1.0, |p| p.0).max(x_min + 1e-3);
    let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Refusal rate vs α (keyword proxy)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x_min..x_max, 0f64..1.05f64)
        .map_err(err)?;
    chart.configure_mesh().x_desc("α").y_desc("refusal rate").draw().map_err(err)?;
    chart.draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(2))).map_err(err)?;
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled()))).map_err(err)?;
    root.present().map_err(err)?;
    drop(chart);
    drop(root);
    Ok(svg)
}
