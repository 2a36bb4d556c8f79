//! What kind of file a weight path holds, judged by its first bytes: GGUF (by its magic),
//! safetensors (a header length and a `{`), or neither (an image, another format). Loaders
//! ask before they read, so a file of the wrong kind is named as such rather than
//! reported as a damaged header.

use std::io::Read;
use std::path::Path;

/// The first bytes of a GGUF file.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Whether `path` is a GGUF file (by its magic, not its name).
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|_| &magic == GGUF_MAGIC)
}

/// Why `path` cannot be read as its name says: a `.gguf` file that does not start with
/// GGUF's magic (damaged, or another format renamed) would otherwise be read as
/// safetensors and reported as a bad safetensors header.
pub fn gguf_name_without_magic(path: &Path) -> Option<String> {
    let named_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    (named_gguf && !is_gguf(path)).then(|| {
        "named .gguf, but it does not start with GGUF's magic bytes (`GGUF`): the file is \
         damaged or not a GGUF file; download it again"
            .to_string()
    })
}

/// The image a file's first bytes say it is (`a PNG image`), for the formats a user gives
/// by mistake where weights or a manifest belong (PNG, JPEG, WebP, GIF), by the image
/// crate's format guess.
pub fn image_kind(head: &[u8]) -> Option<&'static str> {
    use image::ImageFormat;
    match image::guess_format(head).ok()? {
        ImageFormat::Png => Some("a PNG image"),
        ImageFormat::Jpeg => Some("a JPEG image"),
        ImageFormat::WebP => Some("a WebP image"),
        ImageFormat::Gif => Some("a GIF image"),
        _ => None,
    }
}

/// Why `path` is not a safetensors file, judged by its first bytes (a safetensors file
/// opens with its header's length, 8 bytes, and the header's `{`): an image or a file of
/// another kind given where weights belong is named as such, not as a header error.
/// `None` when it may be one (or cannot be read: opening it reports that).
pub fn not_safetensors(path: &Path) -> Option<String> {
    let mut head = [0u8; 9];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head));
    match read {
        Ok(()) if head[8] == b'{' => None,
        Err(e) if e.kind() != std::io::ErrorKind::UnexpectedEof => None,
        _ => Some(match image_kind(&head) {
            Some(image) => format!("{image}, not a safetensors file"),
            None if &head[..4] == GGUF_MAGIC => "a GGUF file, not a safetensors file".into(),
            None => "not a safetensors file (it does not open with a safetensors header)".into(),
        }),
    }
}
