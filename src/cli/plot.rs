//! `edm2 plot RUN_DIR`: the figures of a training run as PNGs (plotters, with DejaVu Sans
//! embedded so they render the same everywhere): the loss and learning rate from
//! `stats.jsonl`, and from `dynamics.jsonl` the per-block activation and residual-branch
//! magnitudes, the weight
//! magnitudes and relative update sizes over training (the paper's Fig. 2/3 view, one line
//! per block or tensor, colored by depth) and the loss by noise level. `train` refreshes
//! them at every snapshot.

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The run directory (with stats.jsonl and, from training with --dynamics, dynamics.jsonl).
    pub run_dir: PathBuf,
    /// Where to write the PNGs (default: RUN_DIR/plots).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

const SIZE: (u32, u32) = (1200, 800);
/// Lines read from a record file at most (a run of a million status lines is far past any).
const MAX_RECORDS: usize = 1 << 20;

pub fn run(a: Args) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| a.run_dir.join("plots"));
    let written = write_plots(&a.run_dir, &out)?;
    anyhow::ensure!(!written.is_empty(), "{}: no stats.jsonl or dynamics.jsonl records to plot", a.run_dir.display());
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

/// Registers the embedded font once (plotters finds fonts by family name).
fn font() -> Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).map_err(|_| "cannot load the embedded font".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// The JSON records of a `.jsonl` file (none if it is missing); a bad line is an error
/// naming the file and line.
fn records(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        if out.len() >= MAX_RECORDS {
            bail!("{}: more than {MAX_RECORDS} records", path.display());
        }
        // A run being written may end in a partial line: stop there.
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => out.push(v),
            Err(_) if i + 1 == text.lines().count() => break,
            Err(e) => bail!("{}:{}: not a JSON record: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Writes every figure the run's records allow into `out`; returns their paths.
pub fn write_plots(run_dir: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let stats = records(&run_dir.join("stats.jsonl"))?;
    let dynamics = records(&run_dir.join("dynamics.jsonl"))?;
    if stats.is_empty() && dynamics.is_empty() {
        return Ok(Vec::new());
    }
    font()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    let kimg_of = |r: &serde_json::Value, key: &str| r.get(key).and_then(|v| v.as_f64());
    // Loss and learning rate.
    let loss: Vec<(f64, f64)> = stats.iter().filter_map(|r| Some((kimg_of(r, "Progress/kimg")?, kimg_of(r, "Loss/loss")?))).collect();
    let lr: Vec<(f64, f64)> = stats.iter().filter_map(|r| Some((kimg_of(r, "Progress/kimg")?, kimg_of(r, "Loss/learning_rate")?))).collect();
    if !loss.is_empty() || !lr.is_empty() {
        let p = out.join("loss.png");
        atomic_png(&p, |root| {
            let (top, bottom) = root.split_vertically(SIZE.1 / 2);
            lines(&top, "Training loss", "kimg", "loss", &[("loss".into(), loss.clone(), 0.0)], false)?;
            lines(&bottom, "Learning rate", "kimg", "learning rate", &[("learning rate".into(), lr.clone(), 0.0)], false)
        })?;
        written.push(p);
    }
    if !dynamics.is_empty() {
        let kimg: Vec<f64> = dynamics.iter().map(|r| kimg_of(r, "kimg").unwrap_or(0.0)).collect();
        // Series of one record field, one per key, in depth order.
        let series = |field: &str, depth: &dyn Fn(&str) -> (i64, i64, i64)| -> Vec<(String, Vec<(f64, f64)>, f64)> {
            let mut names: Vec<String> =
                dynamics.iter().filter_map(|r| r.get(field)?.as_object().map(|m| m.keys().cloned().collect::<Vec<_>>())).flatten().collect();
            names.sort_by_key(|n| (depth(n), n.clone()));
            names.dedup();
            let count = names.len().max(2) - 1;
            names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let pts = dynamics.iter().zip(&kimg).filter_map(|(r, &k)| Some((k, r.get(field)?.get(n)?.as_f64()?))).collect();
                    (n.clone(), pts, i as f64 / count as f64)
                })
                .collect()
        };
        let act = series("act", &block_depth);
        let p = out.join("activations.png");
        atomic_png(&p, |root| lines(root, "Activation magnitude per block (RMS of its output; blue: input side, red: output side)", "kimg", "RMS", &act, false))?;
        written.push(p);
        let br = series("branch", &block_depth);
        if br.iter().any(|s| !s.1.is_empty()) {
            let p = out.join("branches.png");
            atomic_png(&p, |root| lines(root, "Residual branch magnitude per block (RMS before the mp_sum; blue: input side, red: output side)", "kimg", "RMS", &br, false))?;
            written.push(p);
        }
        let wr = series("weight_rms", &tensor_depth);
        let p = out.join("weights.png");
        atomic_png(&p, |root| lines(root, "Weight magnitude per tensor (RMS of the stored weight; colored by depth)", "kimg", "RMS", &wr, false))?;
        written.push(p);
        let up = series("rel_update", &tensor_depth);
        if up.iter().any(|s| !s.1.is_empty()) {
            let p = out.join("updates.png");
            atomic_png(&p, |root| lines(root, "Relative update ||ΔW|| / ||W|| between measurements (colored by depth)", "kimg", "relative update", &up, true))?;
            written.push(p);
        }
        // Loss by σ: the first, middle and last measurements.
        let picks: Vec<usize> = {
            let mut v = vec![0, dynamics.len() / 2, dynamics.len() - 1];
            v.dedup();
            v
        };
        let by_sigma: Vec<(String, Vec<(f64, f64)>, f64)> = picks
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let pts = dynamics[i]
                    .get("loss_by_sigma")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?))).collect())
                    .unwrap_or_default();
                (format!("kimg {:.1}", kimg[i]), pts, j as f64 / (picks.len().max(2) - 1) as f64)
            })
            .collect();
        let p = out.join("loss_by_sigma.png");
        atomic_png(&p, |root| lines(root, "Weighted denoising error by noise level (probe batch)", "σ", "λ(σ)·mean((D − y)²)", &by_sigma, true).map(|_| ()))?;
        written.push(p);
    }
    Ok(written)
}

/// Draws onto a bitmap and writes it as `path` atomically.
fn atomic_png(path: &Path, draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>) -> Result<()> {
    let mut buf = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    edm2::io::image::write_png(path, &buf, 3, SIZE.1 as usize, SIZE.0 as usize)?;
    Ok(())
}

/// Line chart of `series` (name, points, color position in [0, 1]); log y when `log_y`
/// (and log x for σ). A legend when there are few enough series to read one.
fn lines(area: &DrawingArea<BitMapBackend<'_>, Shift>, title: &str, x_desc: &str, y_desc: &str, series: &[(String, Vec<(f64, f64)>, f64)], log_y: bool) -> Result<()> {
    let pts = || series.iter().flat_map(|s| s.1.iter()).filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_y || p.1 > 0.0));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts() {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, if log_y { 0.1 } else { 0.0 }, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        (y0, y1) = (y0 - 0.5 * y0.abs().max(1e-3), y1 + 0.5 * y1.abs().max(1e-3));
    }
    let pad = if log_y { 1.0 } else { 0.05 * (y1 - y0) };
    let color = |t: f64| HSLColor(0.66 * (1.0 - t), 0.85, 0.45);
    let mut b = ChartBuilder::on(area);
    b.caption(title, ("sans-serif", 22)).margin(12).x_label_area_size(40).y_label_area_size(70);
    let legend = series.len() <= 24;
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).label_style(("sans-serif", 15)).draw().map_err(plot_err)?;
            for (name, p, t) in series {
                let c = color(*t);
                let s = chart
                    .draw_series(LineSeries::new(p.iter().copied().filter(|q| q.1.is_finite() && (!log_y || q.1 > 0.0)), c.stroke_width(2)))
                    .map_err(plot_err)?;
                if legend {
                    s.label(name.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
                }
            }
            if legend {
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 13))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(plot_err)?;
            }
        }};
    }
    let sigma_x = x_desc == "σ";
    match (log_y, sigma_x) {
        (true, true) => draw!(b.build_cartesian_2d((x0..x1).log_scale(), (y0 / 1.5..y1 * 1.5).log_scale()).map_err(plot_err)?),
        (true, false) => draw!(b.build_cartesian_2d(x0..x1, (y0 / 1.5..y1 * 1.5).log_scale()).map_err(plot_err)?),
        _ => draw!(b.build_cartesian_2d(x0..x1, y0 - pad..y1 + pad).map_err(plot_err)?),
    }
    Ok(())
}

/// Module order of a block name (`enc.32x32_block0`, `dec.8x8_in0`, ...): the encoder from
/// the highest resolution down, then the decoder from the lowest up.
fn block_depth(name: &str) -> (i64, i64, i64) {
    let (side, rest) = name.split_once('.').unwrap_or(("", name));
    let res: i64 = rest.split('x').next().and_then(|r| r.parse().ok()).unwrap_or(0);
    let kind = rest.split_once('_').map(|(_, k)| k).unwrap_or("");
    let idx = |p: &str| kind.strip_prefix(p).and_then(|n| n.parse::<i64>().ok());
    match side {
        "enc" => (0, -res, if kind == "conv" || kind == "down" { 0 } else { 1 + idx("block").unwrap_or(0) }),
        _ => (1, res, if kind == "up" { -1 } else if let Some(i) = idx("in") { i } else { 2 + idx("block").unwrap_or(0) }),
    }
}

/// Depth of a weight tensor (`unet.enc.32x32_block0.conv_res0.weight`): its block's.
fn tensor_depth(name: &str) -> (i64, i64, i64) {
    match name.strip_prefix("unet.") {
        Some(rest) if rest.starts_with("enc.") || rest.starts_with("dec.") => block_depth(&rest.split('.').take(2).collect::<Vec<_>>().join(".")),
        Some(_) => (-1, 0, 0), // the embedding, before the encoder
        None => (2, 0, 0),     // the logvar head, after the U-Net
    }
}
