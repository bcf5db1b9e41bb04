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

/// One line per α sweep: `(label, points)`; α = 0 is the unaltered answer.
fn series(report: &EvalReport) -> Vec<(String, Vec<(f64, f64)>)> {
    let runs: Vec<(f64, &crate::eval::Metrics)> = std::iter::once((0.0, &report.unaltered))
        .chain(report.steered.iter().map(|m| (f64::from(m.alpha), m)))
        .collect();
    let sorted = |mut points: Vec<(f64, f64)>| {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    };
    let groups = &report.unaltered.groups;
    if groups.iter().all(|g| g.kind == "all") {
        return vec![("refusal rate".into(), sorted(runs.iter().map(|(a, m)| (*a, m.refusal_rate)).collect()))];
    }
    let mut out = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let what = if g.with_image { "with image" } else { "text only" };
        out.push((
            format!("{} {what}: refusal", g.kind),
            sorted(runs.iter().filter_map(|(a, m)| Some((*a, m.groups.get(i)?.refusal_rate))).collect()),
        ));
        if g.accuracy.is_some() {
            out.push((
                format!("{} {what}: accuracy", g.kind),
                sorted(runs.iter().filter_map(|(a, m)| Some((*a, m.groups.get(i)?.accuracy?))).collect()),
            ));
        }
    }
    out
}

fn refusal_chart(report: &EvalReport) -> Result<String> {
    let mut svg = String::new();
    let lines = series(report);
    let alphas = lines.iter().flat_map(|(_, p)| p.iter().map(|p| p.0));
    let x_min = alphas.clone().fold(0f64, f64::min);
    let x_max = alphas.fold(x_min + 1e-3, f64::max);
    let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Refusal rate (keyword proxy) and accuracy vs α (α = 0: unaltered)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x_min..x_max, 0f64..1.05f64)
        .map_err(err)?;
    chart.configure_mesh().x_desc("α").y_desc("rate").draw().map_err(err)?;
    for (i, (label, points)) in lines.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(err)?;
    }
    if lines.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    drop(chart);
    drop(root);
    Ok(svg)
}
