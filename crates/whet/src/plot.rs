//! A loss / metric curve as a PNG: enough of a line chart to read a run at a glance (axes with
//! numbered ticks, axis titles, a legend), drawn into an RGB buffer and encoded with the `png`
//! crate. Written by hand because a plotting library would add a font stack and dozens of
//! crates for a few polylines; text uses the small bitmap font below.

use std::path::Path;

const W: usize = 800;
const H: usize = 440;
/// Plot area margins: left (y tick labels), right, top (legend), bottom (x ticks and title).
const LEFT: usize = 80;
const RIGHT: usize = 24;
const TOP: usize = 64;
const BOTTOM: usize = 56;
/// Each font pixel becomes a `SCALE` x `SCALE` square.
const SCALE: i64 = 2;

/// 5 x 7 glyphs, one byte per row, bit 4 = leftmost column.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0, 0, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0, 0, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        // space, and anything the font lacks
        _ => [0; 7],
    }
}

/// Width in pixels of `text` drawn with [`Canvas::text`].
fn text_width(text: &str) -> i64 {
    text.chars().count() as i64 * 6 * SCALE
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            px: vec![255; W * H * 3],
        }
    }

    fn dot(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                self.dot(x as i64 + dx, y as i64 + dy, c);
            }
        }
    }

    /// Draws `text` with its top-left corner at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, text: &str, c: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            let ox = x + i as i64 * 6 * SCALE;
            for (row, bits) in glyph(ch.to_ascii_lowercase()).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for (dx, dy) in (0..SCALE).flat_map(|a| (0..SCALE).map(move |b| (a, b))) {
                            self.dot(ox + col * SCALE + dx, y + row as i64 * SCALE + dy, c);
                        }
                    }
                }
            }
        }
    }
}

/// A tick value with as few digits as the axis span needs.
fn tick_label(v: f64, span: f64) -> String {
    let decimals = if span >= 50.0 {
        0
    } else if span >= 5.0 {
        1
    } else if span >= 0.5 {
        2
    } else {
        3
    };
    format!("{v:.decimals$}")
}

/// One line of a chart and how it is drawn (whet-train's, so a task can describe the charts it
/// wants).
pub use whet_train::task::{Series, Style};

/// TensorBoard's scalar smoothing (its default weight, 0.6): an exponential moving average
/// divided by its weights' sum, so the first points are not pulled toward zero.
pub fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let (mut last, mut n) = (0.0, 0i32);
    points
        .iter()
        .map(|&(x, y)| {
            last = last * weight + (1.0 - weight) * y;
            n += 1;
            (x, last / (1.0 - weight.powi(n)))
        })
        .collect()
}

/// `c` mixed with white, `keep` of it left: the faint colour of raw values.
fn faint(c: [u8; 3], keep: f64) -> [u8; 3] {
    c.map(|v| (255.0 - (255.0 - v as f64) * keep).round() as u8)
}

/// Draws the series on shared axes (x: `x_title`, y: `y_title`, auto-scaled, with light grid
/// lines and numbered ticks), each in its [`Style`], a legend along the top, and writes a PNG.
pub fn line_chart(
    path: &Path,
    x_title: &str,
    y_title: &str,
    series: &[Series],
) -> std::io::Result<()> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(_, y)| y.is_finite())
        .collect();
    let mut c = Canvas::new();
    let ink = [0, 0, 0];
    let (x0, x1) = (LEFT as f64, (W - RIGHT) as f64);
    let (y0, y1) = (TOP as f64, (H - BOTTOM) as f64);
    if !all.is_empty() {
        let (xmin, xmax) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (ymin, ymax) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let (xspan, yspan) = ((xmax - xmin).max(1e-9), (ymax - ymin).max(1e-9));
        let sx = |x: f64| x0 + (x - xmin) / xspan * (x1 - x0);
        let sy = |y: f64| y1 - (y - ymin) / yspan * (y1 - y0);
        for k in 0..=10 {
            let y = y0 + k as f64 * (y1 - y0) / 10.0;
            c.line((x0, y), (x1, y), [230, 230, 230]);
            if k % 2 == 0 {
                let v = ymax - k as f64 * yspan / 10.0;
                let label = tick_label(v, yspan);
                let tx = x0 as i64 - 8 - text_width(&label);
                c.text(tx, y as i64 - 7, &label, ink);
                c.line((x0 - 5.0, y), (x0, y), ink);
            }
        }
        for k in 0..=5 {
            let x = x0 + k as f64 * (x1 - x0) / 5.0;
            let v = xmin + k as f64 * xspan / 5.0;
            let label = tick_label(v, xspan.max(50.0));
            c.text(
                x as i64 - text_width(&label) / 2,
                y1 as i64 + 10,
                &label,
                ink,
            );
            c.line((x, y1), (x, y1 + 5.0), ink);
        }
        // The axes under the series, so that a point on an axis keeps its marker.
        c.line((x0, y0), (x0, y1), ink);
        c.line((x0, y1), (x1, y1), ink);
        // Faint series first, so that the curves over them stay visible.
        let mut order: Vec<&Series> = series.iter().collect();
        order.sort_by_key(|s| s.style != Style::Faint);
        for s in order {
            let color = match s.style {
                Style::Faint => faint(s.color, 0.35),
                _ => s.color,
            };
            for w in s.points.windows(2) {
                let (a, b) = ((sx(w[0].0), sy(w[0].1)), (sx(w[1].0), sy(w[1].1)));
                c.line(a, b, color);
                if s.style == Style::Plain || s.style == Style::Marked {
                    // Two pixels wide.
                    c.line((a.0, a.1 + 1.0), (b.0, b.1 + 1.0), color);
                }
            }
            for p in &s.points {
                let (x, y) = (sx(p.0) as i64, sy(p.1) as i64);
                match s.style {
                    Style::Line => {
                        for d in -2..=2 {
                            c.dot(x + d, y, color);
                            c.dot(x, y + d, color);
                        }
                    }
                    Style::Marked => {
                        for dx in -4..=4 {
                            for dy in -4..=4 {
                                let edge = dx == -4 || dx == 4 || dy == -4 || dy == 4;
                                c.dot(x + dx, y + dy, if edge { ink } else { color });
                            }
                        }
                    }
                    Style::Faint | Style::Plain => {}
                }
            }
        }
    }
    if all.is_empty() {
        c.line((x0, y0), (x0, y1), ink);
        c.line((x0, y1), (x1, y1), ink);
    }
    let title_x = ((x0 + x1) / 2.0) as i64 - text_width(x_title) / 2;
    c.text(title_x, (H - BOTTOM) as i64 + 32, x_title, ink);
    // The y axis's title above it (the bitmap font writes only across).
    c.text(8, y0 as i64 - 28, y_title, ink);
    // Legend: a colour bar and the name of each series, left to right along the top.
    let mut lx = x0 as i64;
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        let color = match s.style {
            Style::Faint => faint(s.color, 0.35),
            _ => s.color,
        };
        for dy in 0..4 {
            c.line(
                (lx as f64, 18.0 + dy as f64),
                (lx as f64 + 24.0, 18.0 + dy as f64),
                color,
            );
        }
        c.text(lx + 32, 13, &s.name, ink);
        lx += 32 + text_width(&s.name) + 28;
    }
    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(std::io::Error::other)?;
    writer
        .write_image_data(&c.px)
        .map_err(std::io::Error::other)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TensorBoard's debiased smoothing, by hand: 0.4·1 / 0.4, then 0.24 / 0.64, 0.144 / 0.784.
    #[test]
    fn smoothing_is_tensorboards() {
        let got = smooth(&[(1.0, 1.0), (2.0, 0.0), (3.0, 0.0)], 0.6);
        let want = [1.0, 0.375, 0.144 / 0.784];
        for ((x, y), (i, w)) in got.iter().zip(want.iter().enumerate()) {
            assert_eq!(*x, i as f64 + 1.0);
            assert!((y - w).abs() < 1e-12, "{y} vs {w}");
        }
    }

    /// The faint series is drawn in its washed-out colour and the marked one with a square
    /// of its colour, ringed in black, centred on each point.
    #[test]
    fn raw_values_are_faint_and_evaluations_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let raw = Series {
            name: "train loss".into(),
            points: (0..20).map(|i| (i as f64, 2.0 + (i % 3) as f64)).collect(),
            color: [31, 119, 180],
            style: Style::Faint,
        };
        let eval = Series {
            name: "eval loss".into(),
            points: vec![(0.0, 0.0), (19.0, 4.0)],
            color: [214, 39, 40],
            style: Style::Marked,
        };
        line_chart(&path, "optimizer step", "loss", &[raw, eval]).unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut px = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut px).unwrap();
        let at = |x: usize, y: usize| {
            [
                px[(y * W + x) * 3],
                px[(y * W + x) * 3 + 1],
                px[(y * W + x) * 3 + 2],
            ]
        };
        let pale = faint([31, 119, 180], 0.35);
        assert!(px.chunks(3).any(|p| p == pale), "no faint pixels");
        assert!(
            !px.chunks(3).any(|p| p == [31, 119, 180]),
            "raw values drawn at full strength"
        );
        // The first evaluation, (0, 0), sits at the plot's bottom-left corner.
        let (x, y) = (LEFT, H - BOTTOM);
        assert_eq!(at(x + 1, y - 1), [214, 39, 40]);
        assert_eq!(at(x + 4, y - 4), [0, 0, 0], "the marker's ring");
    }
}
