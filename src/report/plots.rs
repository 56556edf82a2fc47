//! Pictures of a run: loss curves (PNG and SVG, from stats.jsonl) and sample grids (PNG).
//! Text is drawn with the DejaVu Sans file in assets/fonts, so output does not depend on the
//! fonts of the machine.
use super::runs::Bounds;
use crate::rundir::StatLine;
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

type Pick = fn(&StatLine) -> Option<f64>;

/// Distinct, print-safe colours for up to ten series (then they repeat).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}

type Area<'a, DB> = DrawingArea<DB, plotters::coord::Shift>;

/// Renders `draw` to `<stem>.png` and `<stem>.svg`.
macro_rules! png_and_svg {
    ($stem:expr, $size:expr, $draw:ident ( $($arg:expr),* )) => {{
        register_font();
        let png = $stem.with_extension("png");
        let svg = $stem.with_extension("svg");
        $draw(BitMapBackend::new(&png, $size).into_drawing_area(), $($arg),*)?;
        $draw(SVGBackend::new(&svg, $size).into_drawing_area(), $($arg),*)?;
        Ok(())
    }};
}

/// (lo, hi) of `values` with 5% padding; a flat series gets a small band.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6 * hi.abs().max(1.0));
    (lo - pad, hi + pad)
}

/// The v loss and the batch mean of the adaptive weight against step, side by side, one line
/// per run, as `<stem>.png` and `.svg` (the weighted loss is left out: it sits near 1 by
/// construction with p = 1). Logs from before the weight was logged get the v loss alone.
pub fn loss_curves(runs: &[(&str, &[StatLine])], title: &str, stem: &Path) -> Result<()> {
    if runs.iter().all(|(_, s)| s.is_empty()) {
        bail!("no statistics to plot for {title}");
    }
    png_and_svg!(stem, (1200, 460), draw_curves(runs, title))
}

fn draw_curves<DB: DrawingBackend>(
    root: Area<DB>,
    runs: &[(&str, &[StatLine])],
    title: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plot_err)?;
    let all = || runs.iter().flat_map(|(_, s)| s.iter());
    let max_step = all().map(|s| s.step as f64).fold(1.0, f64::max);
    let mut series: Vec<(&str, Pick)> = vec![("v loss: mean ||u - v||^2", |s| Some(s.v_loss))];
    if all().any(|s| s.adaptive_weight.is_some()) {
        series.push(("mean adaptive weight", |s| s.adaptive_weight));
    }
    let panels = root.split_evenly((1, series.len()));
    for (panel, (label, pick)) in panels.iter().zip(series) {
        let (lo, hi) = padded_range(all().filter_map(pick));
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{title}: {label}"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_step, lo..hi)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(plot_err)?;
        for (i, (name, stats)) in runs.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let drawn = chart
                .draw_series(LineSeries::new(
                    stats.iter().filter_map(|s| Some((s.step as f64, pick(s)?))),
                    &color,
                ))
                .map_err(plot_err)?;
            if !name.is_empty() {
                drawn
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
            }
        }
        if runs.iter().any(|(name, _)| !name.is_empty()) {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 11))
                .draw()
                .map_err(plot_err)?;
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// A point of a FID chart: x (NFE or step), the FID, and its interval where there is one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FidPoint {
    pub x: f64,
    pub fid: f64,
    pub interval: Option<Bounds>,
}

/// A line of a FID chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<FidPoint>,
}

/// FID against the number of network evaluations, one line per run, with error bars from each
/// interval's ends where the FIDs have intervals.
pub fn fid_by_nfe(runs: &[Series], title: &str, stem: &Path) -> Result<()> {
    let axis = Axis {
        caption: "FID by NFE (with intervals)",
        desc: "network evaluations (NFE)",
        whole_numbers: true,
    };
    png_and_svg!(stem, (760, 460), draw_fid_lines(runs, title, &axis))
}

/// FID against training step, one line per (run, NFE).
pub fn fid_by_step(series: &[Series], title: &str, stem: &Path) -> Result<()> {
    let axis = Axis {
        caption: "FID against training step",
        desc: "step",
        whole_numbers: false,
    };
    png_and_svg!(stem, (760, 460), draw_fid_lines(series, title, &axis))
}

/// The x axis of a FID chart.
struct Axis {
    caption: &'static str,
    desc: &'static str,
    /// NFE: a tick per whole number, half a step of margin either side.
    whole_numbers: bool,
}

// One chart is one pass over plotters' builder (mesh, lines, points, bars, legend) on one
// coordinate system; split, each part would take the chart back as a generic argument.
fn draw_fid_lines<DB: DrawingBackend>(
    root: Area<DB>,
    series: &[Series],
    title: &str,
    axis: &Axis,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    if series.iter().all(|s| s.points.is_empty()) {
        bail!("no FIDs to plot for {title}");
    }
    root.fill(&WHITE).map_err(plot_err)?;
    let points = || series.iter().flat_map(|s| s.points.iter());
    let max_x = points().map(|p| p.x).fold(1.0, f64::max);
    // Whole numbers (NFE) leave room on the right for the legend.
    let x_range = if axis.whole_numbers {
        0.5..max_x.max(2.0) + 1.2
    } else {
        0.0..max_x * 1.05
    };
    let (lo, hi) = padded_range(points().flat_map(|p| {
        let i = p.interval.unwrap_or(Bounds {
            low: p.fid,
            high: p.fid,
        });
        [p.fid, i.low, i.high]
    }));
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: {}", axis.caption), ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(x_range, lo.min(0.0)..hi)
        .map_err(plot_err)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(axis.desc)
        .y_desc("FID")
        .label_style(("sans-serif", 12));
    let whole = |x: &f64| match x.fract() == 0.0 && *x >= 1.0 && *x <= max_x.max(2.0) {
        true => format!("{x:.0}"),
        false => String::new(),
    };
    if axis.whole_numbers {
        mesh.x_labels(max_x.max(2.0) as usize + 2)
            .x_label_formatter(&whole);
    }
    mesh.draw().map_err(plot_err)?;
    for (i, Series { name, points: pts }) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        // Runs at one NFE would hide each other's bars: each is nudged a little sideways.
        let nudge = match axis.whole_numbers {
            true => (i as f64 - (series.len() - 1) as f64 / 2.0) * 0.04,
            false => 0.0,
        };
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.x + nudge, p.fid)),
                &color,
            ))
            .map_err(plot_err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.x + nudge, p.fid), 4, color.filled())),
            )
            .map_err(plot_err)?;
        chart
            .draw_series(pts.iter().filter_map(|p| {
                let i = p.interval?;
                Some(ErrorBar::new_vertical(
                    p.x + nudge,
                    i.low,
                    p.fid,
                    i.high,
                    color.stroke_width(2),
                    8,
                ))
            }))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// A row of an ordering chart: its label, the paper's FID, ours with its interval.
pub struct Ranked {
    pub label: String,
    pub paper: f64,
    pub ours: f64,
    pub interval: Option<Bounds>,
}

/// Rows the runs cannot be held to in value, in the paper's order (its best FID on the left):
/// our FID of each with its interval (from its ends: it need not be symmetric). Where our order matches the paper's, the points rise
/// from left to right.
pub fn ordering(rows: &[Ranked], title: &str, stem: &Path) -> Result<()> {
    if rows.len() < 2 {
        bail!("an ordering needs two rows, {title} has {}", rows.len());
    }
    let width = (200 + 150 * rows.len() as u32).max(640);
    png_and_svg!(stem, (width, 480), draw_ordering(rows, title))
}

fn draw_ordering<DB: DrawingBackend>(root: Area<DB>, rows: &[Ranked], title: &str) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plot_err)?;
    let (lo, hi) = padded_range(rows.iter().flat_map(|r| {
        let i = r.interval.unwrap_or(Bounds {
            low: r.ours,
            high: r.ours,
        });
        [r.ours, i.low, i.high]
    }));
    let n = rows.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: our FID, rows in the paper's order (best left)"),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, lo.min(0.0)..hi)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            match (i - x).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                true => rows[i as usize].label.clone(),
                false => String::new(),
            }
        })
        .x_desc("paper row, from the paper's best FID to its worst")
        .y_desc("our FID")
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(plot_err)?;
    let color = PALETTE[0];
    chart
        .draw_series(LineSeries::new(
            rows.iter().enumerate().map(|(i, r)| (i as f64, r.ours)),
            color.mix(0.4),
        ))
        .map_err(plot_err)?;
    chart
        .draw_series(rows.iter().enumerate().filter_map(|(i, r)| {
            let b = r.interval?;
            Some(ErrorBar::new_vertical(
                i as f64,
                b.low,
                r.ours,
                b.high,
                color.stroke_width(2),
                10,
            ))
        }))
        .map_err(plot_err)?;
    chart
        .draw_series(
            rows.iter()
                .enumerate()
                .map(|(i, r)| Circle::new((i as f64, r.ours), 5, color.filled())),
        )
        .map_err(plot_err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            Text::new(
                format!("paper {:.2}", r.paper),
                (i as f64 + 0.06, r.ours),
                ("sans-serif", 11).into_font(),
            )
        }))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One bar pair per row: the paper's number beside ours.
pub struct Bar {
    pub label: String,
    pub paper: f64,
    pub ours: Option<f64>,
}

/// Ours-vs-paper bars for the rows of a sweep.
pub fn paper_vs_ours(bars: &[Bar], title: &str, stem: &Path) -> Result<()> {
    if bars.is_empty() {
        bail!("no rows to plot for {title}");
    }
    let width = (160 + 90 * bars.len() as u32).max(600);
    png_and_svg!(stem, (width, 480), draw_bars(bars, title))
}

// One pass over plotters' builder, as draw_fid_lines (the labels under the bars need the
// chart's coordinates at the end).
fn draw_bars<DB: DrawingBackend>(root: Area<DB>, bars: &[Bar], title: &str) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plot_err)?;
    let hi = bars
        .iter()
        .flat_map(|b| [Some(b.paper), b.ours])
        .flatten()
        .fold(1.0, f64::max)
        * 1.12;
    let n = bars.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: paper vs ours (FID)"), ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(70)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..n as f64, 0.0..hi)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // The bar labels are drawn below each pair instead (see the end).
        .x_label_formatter(&|_| String::new())
        .y_desc("FID")
        .label_style(("sans-serif", 11))
        .draw()
        .map_err(plot_err)?;
    let (paper_color, ours_color) = (PALETTE[7], PALETTE[0]);
    let rect = |i: usize, side: f64, v: f64, c: RGBColor| {
        let x0 = i as f64 + 0.12 + side * 0.38;
        Rectangle::new([(x0, 0.0), (x0 + 0.36, v)], c.filled())
    };
    chart
        .draw_series(
            bars.iter()
                .enumerate()
                .map(|(i, b)| rect(i, 0.0, b.paper, paper_color)),
        )
        .map_err(plot_err)?
        .label("paper")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], paper_color.filled()));
    chart
        .draw_series(
            bars.iter()
                .enumerate()
                .filter_map(|(i, b)| b.ours.map(|v| rect(i, 1.0, v, ours_color))),
        )
        .map_err(plot_err)?
        .label("ours")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], ours_color.filled()));
    chart
        .draw_series(bars.iter().enumerate().flat_map(|(i, b)| {
            let mut labels = vec![Text::new(
                format!("{:.1}", b.paper),
                (i as f64 + 0.14, b.paper + hi * 0.01),
                ("sans-serif", 10).into_font(),
            )];
            if let Some(v) = b.ours {
                labels.push(Text::new(
                    format!("{v:.1}"),
                    (i as f64 + 0.52, v + hi * 0.01),
                    ("sans-serif", 10).into_font(),
                ));
            }
            labels
        }))
        .map_err(plot_err)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .draw()
        .map_err(plot_err)?;
    let style = ("sans-serif", 12).into_font().into_text_style(&root).pos(
        plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Top,
        ),
    );
    for (i, b) in bars.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(b.label.clone(), (x, y + 10), style.clone()))
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// uint8 NHWC images (1 or 3 channels) as one PNG grid of `cols` columns, each pixel drawn
/// `zoom` x `zoom`, 2-pixel white gaps.
pub fn sample_grid(images: &Tensor, cols: i64, zoom: u32, path: &Path) -> Result<()> {
    let (n, h, w, c) = images
        .size4()
        .context("a grid takes (N, H, W, C) uint8 images")?;
    if images.kind() != Kind::Uint8 || (c != 1 && c != 3) {
        bail!(
            "a grid shows uint8 1- or 3-channel images, got {:?} x {c}",
            images.kind()
        );
    }
    let data = Vec::<u8>::try_from(
        images
            .to_device(tch::Device::Cpu)
            .contiguous()
            .reshape([-1]),
    )?;
    let rows = (n + cols - 1) / cols;
    let (gap, z) = (2u32, zoom);
    let (cell_w, cell_h) = (w as u32 * z + gap, h as u32 * z + gap);
    let mut grid = image::RgbImage::from_pixel(
        cols as u32 * cell_w + gap,
        rows as u32 * cell_h + gap,
        image::Rgb([255, 255, 255]),
    );
    for i in 0..n {
        let (x0, y0) = (
            (i % cols) as u32 * cell_w + gap,
            (i / cols) as u32 * cell_h + gap,
        );
        for y in 0..h as u32 * z {
            for x in 0..w as u32 * z {
                let at = |ch: i64| {
                    let (sy, sx) = ((y / z) as i64, (x / z) as i64);
                    data[(((i * h + sy) * w + sx) * c + ch.min(c - 1)) as usize]
                };
                grid.put_pixel(x0 + x, y0 + y, image::Rgb([at(0), at(1), at(2)]));
            }
        }
    }
    let mut png = Vec::new();
    grid.write_to(
        &mut std::io::Cursor::new(&mut png),
        image::ImageOutputFormat::Png,
    )
    .with_context(|| format!("{}: cannot encode", path.display()))?;
    crate::files::write_atomic(path, &png)
}
