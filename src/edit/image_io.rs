//! Reading source images safely.

use std::path::Path;

use image::{ImageReader, RgbImage};

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
    let image = limited(reader, name, limits)?
        .decode()
        .map_err(|e| bad(decode_failure(&e, limits)))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(bad("image is empty (0 pixels)".into()));
    }
    // Without a copy when it decoded as RGB already.
    Ok(image.into_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

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
