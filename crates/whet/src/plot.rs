//! A loss / metric curve as a PNG: enough of a line chart to see a run at a glance, drawn into
//! an RGB buffer and encoded with the `png` crate (a plotting library would add a font stack
//! and dozens of crates for two polylines).

use std::path::Path;

const W: usize = 800;
const H: usize = 400;
const MARGIN: usize = 40;

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
}

/// One curve: points `(x, y)` and a colour.
pub struct Series {
    pub points: Vec<(f64, f64)>,
    pub color: [u8; 3],
}

/// Draws the series on shared axes (x: steps, y: auto-scaled, with light grid lines at tenths)
/// and writes a PNG.
pub fn line_chart(path: &Path, series: &[Series]) -> std::io::Result<()> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(_, y)| y.is_finite())
        .collect();
    let mut c = Canvas::new();
    if !all.is_empty() {
        let (xmin, xmax) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (ymin, ymax) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let (xspan, yspan) = ((xmax - xmin).max(1e-9), (ymax - ymin).max(1e-9));
        let sx = |x: f64| MARGIN as f64 + (x - xmin) / xspan * (W - 2 * MARGIN) as f64;
        let sy = |y: f64| (H - MARGIN) as f64 - (y - ymin) / yspan * (H - 2 * MARGIN) as f64;
        for k in 0..=10 {
            let y = MARGIN as f64 + k as f64 * (H - 2 * MARGIN) as f64 / 10.0;
            c.line(
                (MARGIN as f64, y),
                ((W - MARGIN) as f64, y),
                [230, 230, 230],
            );
        }
        c.line(
            (MARGIN as f64, MARGIN as f64),
            (MARGIN as f64, (H - MARGIN) as f64),
            [0, 0, 0],
        );
        c.line(
            (MARGIN as f64, (H - MARGIN) as f64),
            ((W - MARGIN) as f64, (H - MARGIN) as f64),
            [0, 0, 0],
        );
        for s in series {
            for w in s.points.windows(2) {
                c.line((sx(w[0].0), sy(w[0].1)), (sx(w[1].0), sy(w[1].1)), s.color);
            }
            for p in &s.points {
                let (x, y) = (sx(p.0) as i64, sy(p.1) as i64);
                for d in -2..=2 {
                    c.dot(x + d, y, s.color);
                    c.dot(x, y + d, s.color);
                }
            }
        }
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
