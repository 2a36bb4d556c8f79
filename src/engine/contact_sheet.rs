//! The contact sheet: every candidate's last image with its seed, verdict and scores, so a
//! person can audit a pick at a glance.

use image::{imageops, Rgb, RgbImage};

use super::report::{CandidateRecord, CandidateStatus, EditReport};

const THUMB_WIDTH: u32 = 192;
const LABEL_LINES: u32 = 3;
const LINE_HEIGHT: u32 = 10;
const PAD: u32 = 4;

/// A grid of every candidate's last preview (or short run, or final) with its seed, screen
/// verdict and VIE O drawn underneath; the pick is framed in green.
pub fn contact_sheet(report: &EditReport) -> RgbImage {
    let tiles: Vec<(&CandidateRecord, Option<&RgbImage>)> = report
        .candidates
        .iter()
        .map(|c| {
            let image = c
                .images
                .previews
                .last()
                .or(c.images.short_run.as_ref())
                .or(c.images.final_image.as_ref())
                .map(|a| a.as_ref());
            (c, image)
        })
        .collect();
    let (pw, ph) = report.panel;
    let thumb_h = (THUMB_WIDTH as u64 * ph as u64 / pw.max(1) as u64).max(1) as u32;
    let cell_w = THUMB_WIDTH + 2 * PAD;
    let cell_h = thumb_h + LABEL_LINES * LINE_HEIGHT + 3 * PAD;
    let cols = (tiles.len() as u32).clamp(1, 4);
    let rows = (tiles.len() as u32).div_ceil(cols).max(1);
    let mut sheet = RgbImage::from_pixel(cols * cell_w, rows * cell_h, Rgb([24, 24, 24]));
    let pick = report.pick.as_ref().map(|p| p.index);
    for (n, (c, image)) in tiles.iter().enumerate() {
        let (x0, y0) = ((n as u32 % cols) * cell_w, (n as u32 / cols) * cell_h);
        if pick == Some(c.index) {
            fill_rect(&mut sheet, x0, y0, cell_w, cell_h, Rgb([40, 160, 60]));
            fill_rect(
                &mut sheet,
                x0 + 2,
                y0 + 2,
                cell_w - 4,
                cell_h - 4,
                Rgb([24, 24, 24]),
            );
        }
        if let Some(image) = image {
            let thumb =
                imageops::resize(*image, THUMB_WIDTH, thumb_h, imageops::FilterType::Triangle);
            imageops::replace(&mut sheet, &thumb, (x0 + PAD) as i64, (y0 + PAD) as i64);
        }
        let ty = y0 + thumb_h + 2 * PAD;
        let screen = c.screens.last().map(|s| match s.verdict.ok() {
            Some(v) => format!("{} {:.1}", if v.pass { "PASS" } else { "FAIL" }, v.score),
            None => "JUDGE ERROR".to_string(),
        });
        let status = match c.status {
            CandidateStatus::Pruned => "pruned",
            CandidateStatus::Completed => "completed",
            CandidateStatus::Eliminated => "eliminated",
            CandidateStatus::Champion => "champion",
            CandidateStatus::Pooled => "pooled",
        };
        let vie = match &c.vie {
            Some(v) => match v.ok() {
                Some(v) => format!("O {:.2} SC {:.1} PQ {:.1}", v.overall, v.sc, v.pq),
                None => "VIE: judge error".to_string(),
            },
            None => String::new(),
        };
        let colour = match c.screens.last().and_then(|s| s.verdict.ok()) {
            Some(v) if !v.pass => Rgb([230, 90, 80]),
            _ => Rgb([230, 230, 230]),
        };
        let lines = [
            format!("#{} seed {} {}", c.index, c.seed, status),
            screen.unwrap_or_default(),
            vie,
        ];
        for (l, line) in lines.iter().enumerate() {
            draw_text(
                &mut sheet,
                x0 + PAD,
                ty + l as u32 * LINE_HEIGHT,
                line,
                colour,
            );
        }
    }
    sheet
}

fn fill_rect(image: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, colour: Rgb<u8>) {
    for yy in y..(y + h).min(image.height()) {
        for xx in x..(x + w).min(image.width()) {
            image.put_pixel(xx, yy, colour);
        }
    }
}

/// Draws ASCII text with the 8x8 bitmap font (non-ASCII is shown as '?').
fn draw_text(image: &mut RgbImage, x: u32, y: u32, text: &str, colour: Rgb<u8>) {
    use font8x8::UnicodeFonts;
    for (n, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let (px, py) = (x + n as u32 * 8 + col, y + row as u32);
                    if px < image.width() && py < image.height() {
                        image.put_pixel(px, py, colour);
                    }
                }
            }
        }
    }
}
