//! Reading the Hugging Face parquet layouts of the Emu Edit test set and GEdit-Bench from
//! local files, with the `parquet` crate's row API. Images are the datasets' `Image`
//! feature: a struct `{bytes, path}` holding the encoded file.

use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};

use super::item::{EvalItem, ItemSource};
use crate::error::EditError;

/// Which column names to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `facebook/emu_edit_test_set`: `idx`, `image`, `instruction`, `task`.
    EmuEdit,
    /// `stepfun-ai/GEdit-Bench`: `key`, `input_image`, `instruction`, `task_type`,
    /// `instruction_language`.
    GeditBench,
}

impl Layout {
    fn columns(
        self,
    ) -> (
        &'static [&'static str],
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
    ) {
        match self {
            Self::EmuEdit => (&["idx", "id"], "image", "instruction", "task", None),
            Self::GeditBench => (
                &["key", "id"],
                "input_image",
                "instruction",
                "task_type",
                Some("instruction_language"),
            ),
        }
    }
}

/// The parquet files at `path`: the file itself, or every `.parquet` under the folder (sub
/// folders included, as the Hub lays out configs), sorted.
pub(crate) fn files(path: &Path) -> Result<Vec<PathBuf>, EditError> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut found = Vec::new();
    let mut folders = vec![path.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder)
            .map_err(|e| EditError::Invalid(format!("{}: {e}", folder.display())))?
        {
            let p = entry
                .map_err(|e| EditError::Invalid(format!("{}: {e}", folder.display())))?
                .path();
            if p.is_dir() {
                folders.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                found.push(p);
            }
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(EditError::Invalid(format!(
            "{}: no .parquet files",
            path.display()
        )));
    }
    Ok(found)
}

/// Every row of one parquet file, with errors naming the file and row.
pub(crate) fn rows(file: &Path) -> Result<Vec<Row>, EditError> {
    let bad = |row: usize, what: String| {
        EditError::Invalid(format!("{} row {row}: {what}", file.display()))
    };
    let handle = std::fs::File::open(file).map_err(|e| bad(0, format!("cannot open: {e}")))?;
    let reader = SerializedFileReader::new(handle)
        .map_err(|e| bad(0, format!("not a parquet file: {e}")))?;
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| bad(0, e.to_string()))?;
    iter.enumerate()
        .map(|(n, row)| row.map_err(|e| bad(n, e.to_string())))
        .collect()
}

pub(crate) fn field<'a>(row: &'a Row, name: &str) -> Option<&'a Field> {
    row.get_column_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, f)| f)
}

pub(crate) fn text(f: &Field) -> Option<String> {
    match f {
        Field::Str(s) => Some(s.clone()),
        Field::Null => None,
        other => Some(other.to_string().trim_matches('"').to_string()),
    }
}

pub(crate) fn image_bytes(f: &Field) -> Option<Vec<u8>> {
    match f {
        Field::Bytes(b) => Some(b.data().to_vec()),
        Field::Group(g) => match field(g, "bytes")? {
            Field::Bytes(b) => Some(b.data().to_vec()),
            _ => None,
        },
        _ => None,
    }
}

/// Loads every row of the parquet file(s) at `path`; `language` keeps one instruction
/// language (GEdit-Bench).
pub fn load(
    path: &Path,
    layout: Layout,
    language: Option<&str>,
) -> Result<Vec<EvalItem>, EditError> {
    let (id_cols, image_col, instruction_col, task_col, language_col) = layout.columns();
    let mut items = Vec::new();
    for file in files(path)? {
        let bad = |row: usize, what: String| {
            EditError::Invalid(format!("{} row {row}: {what}", file.display()))
        };
        for (n, row) in rows(&file)?.into_iter().enumerate() {
            let id = id_cols
                .iter()
                .find_map(|c| field(&row, c).and_then(text))
                .unwrap_or_else(|| {
                    format!(
                        "{}-{n}",
                        file.file_stem().unwrap_or_default().to_string_lossy()
                    )
                });
            let instruction = field(&row, instruction_col)
                .and_then(text)
                .ok_or_else(|| bad(n, format!("no `{instruction_col}` column")))?;
            let bytes = field(&row, image_col)
                .and_then(image_bytes)
                .ok_or_else(|| bad(n, format!("no image bytes in `{image_col}`")))?;
            let lang = language_col.and_then(|c| field(&row, c)).and_then(text);
            if let (Some(want), Some(have)) = (language, &lang) {
                if want != have {
                    continue;
                }
            }
            items.push(EvalItem {
                id,
                source: ItemSource::Bytes {
                    bytes,
                    origin: format!("{} row {n}", file.display()),
                },
                instruction,
                task: field(&row, task_col).and_then(text),
                language: lang,
            });
        }
    }
    Ok(items)
}
