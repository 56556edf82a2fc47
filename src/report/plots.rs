//! Pictures of a run: loss curves (PNG and SVG, from stats.jsonl) and sample grids (PNG).
//! Text is drawn with the DejaVu Sans file in assets/fonts, so output does not depend on the
//! fonts of the machine.
use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;
use tch::{Kind, Tensor};

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            eprintln!("warning: the bundled font did not load; plots will have no text");
        }
    });
}

/// One logged line of a run's stats.jsonl.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatLine {
    pub step: f64,
    pub loss: f64,
    pub v_loss: f64,
}

type Pick = fn(&StatLine) -> f64;

/// The logged lines of a stats.jsonl.
pub fn read_stats(path: &Path) -> Result<Vec<StatLine>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l)
                .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
            let num = |k: &str| {
                v[k].as_f64()
                    .with_context(|| format!("{}: line {} has no `{k}`", path.display(), i + 1))
            };
            Ok(StatLine {
                step: num("step")?,
                loss: num("loss")?,
                v_loss: num("v_loss")?,
            })
        })
        .collect()
}

/// Loss and v loss against step, side by side, as `<stem>.png` and `<stem>.svg`.
pub fn loss_curves(stats: &[StatLine], title: &str, stem: &Path) -> Result<()> {
    if stats.is_empty() {
        bail!("no statistics to plot for {title}");
    }
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    draw_curves(
        BitMapBackend::new(&png, (1100, 420)).into_drawing_area(),
        stats,
        title,
    )?;
    draw_curves(
        SVGBackend::new(&svg, (1100, 420)).into_drawing_area(),
        stats,
        title,
    )?;
    Ok(())
}

fn draw_curves<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    stats: &[StatLine],
    title: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let panels = root.split_evenly((1, 2));
    let max_step = stats.iter().map(|s| s.step).fold(1.0, f64::max);
    let series: [(&str, Pick, RGBColor); 2] = [
        ("weighted loss (sits near 1 with p = 1)", |s| s.loss, BLUE),
        ("v loss: mean ||u - v||^2", |s| s.v_loss, RED),
    ];
    for (panel, (label, pick, color)) in panels.iter().zip(series) {
        let values: Vec<f64> = stats.iter().map(pick).collect();
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(*v), b.max(*v))
            });
        let pad = ((hi - lo) * 0.05).max(1e-6);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{title}: {label}"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .draw_series(LineSeries::new(
                stats.iter().map(|s| (s.step, pick(s))),
                &color,
            ))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

/// Images (N, C, H, W) in [-1, 1], C = 1 or 3, tiled `cols` wide and scaled up `zoom` times.
pub fn sample_grid(images: &Tensor, cols: i64, zoom: u32, path: &Path) -> Result<()> {
    let (n, c, h, w) = images.size4().context("a grid takes (N, C, H, W) images")?;
    if c != 1 && c != 3 {
        bail!("a grid shows 1- or 3-channel images, not {c}");
    }
    let rows = (n + cols - 1) / cols;
    let pixels = ((images.to_kind(Kind::Float).clamp(-1.0, 1.0) + 1.0) * 127.5)
        .round()
        .to_kind(Kind::Uint8)
        .to_device(tch::Device::Cpu)
        .contiguous();
    let data = Vec::<u8>::try_from(pixels.reshape([-1]))?;
    let (gap, z) = (2u32, zoom);
    let width = cols as u32 * (w as u32 * z + gap) + gap;
    let height = rows as u32 * (h as u32 * z + gap) + gap;
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for i in 0..n {
        let (x0, y0) = (
            (i % cols) as u32 * (w as u32 * z + gap) + gap,
            (i / cols) as u32 * (h as u32 * z + gap) + gap,
        );
        for y in 0..h {
            for x in 0..w {
                let at = |ch: i64| data[(((i * c + ch) * h + y) * w + x) as usize];
                let color = if c == 1 {
                    RGBColor(at(0), at(0), at(0))
                } else {
                    RGBColor(at(0), at(1), at(2))
                };
                let (px, py) = ((x0 + x as u32 * z) as i32, (y0 + y as u32 * z) as i32);
                let corner = (px + z as i32, py + z as i32);
                root.draw(&Rectangle::new([(px, py), corner], color.filled()))
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
        }
    }
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}
