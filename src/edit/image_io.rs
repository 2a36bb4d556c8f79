//! Reading source images safely.

use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::error::EditError;

/// Limits that protect against decompression bombs and absurd inputs.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    /// Largest accepted width or height, in pixels.
    pub max_side: u32,
    /// Largest accepted decoded allocation, in bytes.
    pub max_alloc: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        // 16k x 16k covers every real photo; 1 GiB of decoded pixels is far beyond any.
        Self {
            max_side: 16_384,
            max_alloc: 1 << 30,
        }
    }
}

/// Loads a PNG, JPEG or WebP file as RGB (alpha is dropped).
///
/// Errors name the file: unreadable, not an image, empty, or over [`ImageLimits`].
pub fn load_image(path: &Path, limits: ImageLimits) -> Result<RgbImage, EditError> {
    let bad = |reason: String| EditError::Image {
        path: path.to_path_buf(),
        reason,
    };
    // Opening a FIFO (or a device) would block until something writes to it.
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    if !meta.is_file() {
        return Err(bad(format!(
            "not a regular file ({}); give an image file",
            if meta.is_dir() {
                "a folder"
            } else {
                "a FIFO, socket or device"
            }
        )));
    }
    let reader = ImageReader::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    decode(reader, path, limits)
}

/// Decodes an encoded image held in memory (e.g. a parquet cell); errors name `origin`.
pub fn load_image_bytes(
    bytes: &[u8],
    origin: &str,
    limits: ImageLimits,
) -> Result<RgbImage, EditError> {
    decode(
        ImageReader::new(std::io::Cursor::new(bytes)),
        Path::new(origin),
        limits,
    )
}

/// Checks that an encoded image held in memory decodes under the limits, without keeping
/// (or converting) its pixels; errors name `origin`.
pub fn check_decodes(bytes: &[u8], origin: &str, limits: ImageLimits) -> Result<(), EditError> {
    let name = Path::new(origin);
    let image = limited(ImageReader::new(std::io::Cursor::new(bytes)), name, limits)?
        .decode()
        .map_err(|e| EditError::Image {
            path: name.to_path_buf(),
            reason: decode_failure(&e, limits),
        })?;
    if image.width() == 0 || image.height() == 0 {
        return Err(EditError::Image {
            path: name.to_path_buf(),
            reason: "image is empty (0 pixels)".into(),
        });
    }
    Ok(())
}

/// The reader with its format sniffed and the decoder limits set; `name` is what errors
/// call the image.
fn limited<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
    name: &Path,
    limits: ImageLimits,
) -> Result<ImageReader<R>, EditError> {
    let bad = |reason: String| EditError::Image {
        path: name.to_path_buf(),
        reason,
    };
    let mut reader = reader
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    decoder_limits.max_alloc = Some(limits.max_alloc);
    reader.limits(decoder_limits);
    if reader.format().is_none() {
        return Err(bad("not a recognised image format (PNG, JPEG, WebP)".into()));
    }
    Ok(reader)
}

/// Why a decode failed, in words: a limit says which and how much.
fn decode_failure(e: &image::ImageError, limits: ImageLimits) -> String {
    match e {
        image::ImageError::Limits(_) => format!(
            "cannot decode: its pixels would take more than {:.1} MB or a side over {} px (the limits for one image)",
            limits.max_alloc as f64 / f64::from(1 << 20),
            limits.max_side
        ),
        other => format!("cannot decode: {other}"),
    }
}

/// Sniffs the format and decodes under the limits; `name` is what errors call the image.
fn decode<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
    name: &Path,
    limits: ImageLimits,
) -> Result<RgbImage, EditError> {
    let bad = |reason: String| EditError::Image {
        path: name.to_path_buf(),
        reason,
    };
    let mut decoder = limited(reader, name, limits)?
        .into_decoder()
        .map_err(|e| bad(decode_failure(&e, limits)))?;
    // What `ImageReader::decode` checks before it allocates, which `into_decoder` leaves out.
    if decoder.total_bytes() > limits.max_alloc {
        return Err(bad(decode_failure(
            &image::ImageError::Limits(image::error::LimitError::from_kind(
                image::error::LimitErrorKind::InsufficientMemory,
            )),
            limits,
        )));
    }
    // A phone photo is stored sideways with an EXIF orientation: edit it as it is shown.
    // Unreadable metadata is no reason to refuse the pixels.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| bad(decode_failure(&e, limits)))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(bad("image is empty (0 pixels)".into()));
    }
    image.apply_orientation(orientation);
    // Without a copy when it decoded as RGB already.
    Ok(image.into_rgb8())
}

/// The `(width, height)` an encoded image is shown at: its stored size, swapped when its
/// EXIF orientation turns it a quarter (as [`load_image`] does), read from the header alone.
pub fn shown_dimensions<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
) -> image::ImageResult<(u32, u32)> {
    let mut decoder = reader.into_decoder()?;
    let (w, h) = decoder.dimensions();
    let turned = matches!(
        decoder.orientation().unwrap_or(Orientation::NoTransforms),
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    Ok(if turned { (h, w) } else { (w, h) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 32x16 JPEG, red left and blue right, stored with EXIF orientation 6 (shown turned a
    /// quarter clockwise: 16x32, red on top).
    fn sideways_jpeg() -> Vec<u8> {
        let stored = RgbImage::from_fn(32, 16, |x, _| {
            if x < 16 {
                image::Rgb([220, 20, 20])
            } else {
                image::Rgb([20, 20, 220])
            }
        });
        let mut jpeg = Vec::new();
        stored
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        // APP1 "Exif": a big-endian TIFF header and one IFD entry, Orientation (0x0112) = 6.
        let mut app1 = vec![0xFF, 0xE1, 0, 34];
        app1.extend_from_slice(b"Exif\0\0MM\0\x2A\0\0\0\x08");
        app1.extend_from_slice(&[0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
        assert_eq!(app1.len(), 2 + 34);
        jpeg.splice(2..2, app1);
        jpeg
    }

    #[test]
    fn a_photo_is_read_as_its_exif_orientation_shows_it() {
        let jpeg = sideways_jpeg();
        let shown = shown_dimensions(
            ImageReader::new(std::io::Cursor::new(&jpeg))
                .with_guessed_format()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(shown, (16, 32));
        let image = load_image_bytes(&jpeg, "photo.jpg", ImageLimits::default()).unwrap();
        assert_eq!(image.dimensions(), (16, 32));
        let (top, bottom) = (image.get_pixel(8, 4), image.get_pixel(8, 28));
        assert!(top[0] > 150 && top[2] < 100, "top {top:?}");
        assert!(bottom[2] > 150 && bottom[0] < 100, "bottom {bottom:?}");
    }

    #[test]
    fn rejects_missing_garbage_and_oversized_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.png");
        let err = load_image(&missing, ImageLimits::default()).unwrap_err();
        assert!(err.to_string().contains("nope.png"), "{err}");

        let garbage = dir.path().join("garbage.png");
        std::fs::write(&garbage, b"definitely not a png").unwrap();
        let err = load_image(&garbage, ImageLimits::default()).unwrap_err();
        assert!(err.to_string().contains("garbage.png"), "{err}");

        let big = dir.path().join("big.png");
        RgbImage::new(64, 40).save(&big).unwrap();
        let tight = ImageLimits {
            max_side: 32,
            max_alloc: 1 << 20,
        };
        let err = load_image(&big, tight).unwrap_err();
        assert!(err.to_string().contains("big.png"), "{err}");
        assert_eq!(
            load_image(&big, ImageLimits::default())
                .unwrap()
                .dimensions(),
            (64, 40)
        );
    }
}
