//! TAEF1, the tiny autoencoder for FLUX.1 latents (diffusers `AutoencoderTiny`, Hub
//! `madebyollin/taef1`), as a decoder only, for cheap live previews: 1.2 M parameters and
//! an eighteenth of the FLUX autoencoder decoder's arithmetic. Its images are rougher than
//! the FLUX autoencoder's, so it never replaces that decoder for anything that is judged or
//! kept unless asked to.
//!
//! [`config`] is the `config.json`, [`decoder`] the network. This file finds the files: a
//! diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`), a Hugging Face
//! cache entry or snapshot of one, a Hub id found in the cache, or a single safetensors file
//! in either key layout (diffusers `decoder.layers.N.*`, or the original taesd.py
//! `taef1_decoder.safetensors` whose `N+1.*` is diffusers' `N`), whose configuration is then
//! read off its tensor shapes.

pub mod config;
pub mod decoder;

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

pub use config::{TinyConfig, TAEF1_FILES, TAEF1_REPO};
pub use decoder::TinyDecoder;

use crate::error::ModelError;
use crate::fsio::read_json;
use crate::hub::{self, HubSettings};
use crate::models::weight_use::{
    check_unused, KnownUnused, ReadLog, Recording, StoredTensors, UnusedWeights,
};

/// Tensors a tiny autoencoder file may hold that the decoder does not read, because the
/// reference's decode does not either.
pub const UNUSED_TENSORS: &[KnownUnused] = &[KnownUnused::new(
    "encoder.layers.*",
    "the tiny encoder: diffusers' AutoencoderTiny.decode (and FLUX's previews, which only \
     decode latents) runs `self.decoder` alone (models/autoencoders/autoencoder_tiny.py)",
)];

/// The weights file of a diffusers `AutoencoderTiny` folder.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// The original taesd.py decoder file in the TAEF1 repository.
pub const TAESD_DECODER_FILE: &str = "taef1_decoder.safetensors";

/// How the decoder's tensors are named in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyLayout {
    /// diffusers: `decoder.layers.N.*` (beside `encoder.layers.*`).
    Diffusers,
    /// taesd.py's decoder file: `N+1.*` for diffusers' `decoder.layers.N.*`, since its
    /// `nn.Sequential` starts with a weightless `Clamp` that diffusers moved into `forward`.
    Taesd,
}

/// The files of one tiny decoder, resolved.
#[derive(Debug, Clone)]
pub struct TinyDecoderFiles {
    /// The safetensors file.
    pub weights: PathBuf,
    /// How its tensors are named.
    pub layout: TinyLayout,
    /// The configuration: from `config_path`, or read off the tensor shapes.
    pub config: TinyConfig,
    /// The `config.json` it came from; `None` when inferred from a single file.
    pub config_path: Option<PathBuf>,
}

fn open(file: &Path) -> Result<MmapedSafetensors, ModelError> {
    if !file.is_file() {
        return Err(ModelError::files(file, "not found (tiny decoder weights)"));
    }
    // SAFETY: the file is mapped read-only; like every loader here, we assume it is not
    // truncated while mapped.
    unsafe { MmapedSafetensors::new(file) }
        .map_err(|e| ModelError::files(file, format!("cannot read safetensors: {e}")))
}

fn has(st: &MmapedSafetensors, key: &str) -> bool {
    st.get(key).is_ok()
}

/// Which layout a file uses, from its keys.
fn layout(file: &Path, st: &MmapedSafetensors) -> Result<TinyLayout, ModelError> {
    if has(st, "decoder.layers.0.weight") {
        Ok(TinyLayout::Diffusers)
    } else if has(st, "1.weight") && !has(st, "0.weight") {
        Ok(TinyLayout::Taesd)
    } else if has(st, "encoder.layers.0.weight") || has(st, "0.weight") {
        Err(ModelError::files(
            file,
            "holds a tiny encoder but no decoder (no `decoder.layers.0.weight`)",
        ))
    } else {
        Err(ModelError::files(
            file,
            "neither diffusers AutoencoderTiny keys (`decoder.layers.0.weight`) nor a taesd.py \
             decoder (`1.weight`)",
        ))
    }
}

/// The file's name for diffusers' `decoder.layers.{rest}`.
fn file_key(layout: TinyLayout, name: &str) -> String {
    match layout {
        TinyLayout::Diffusers => name.to_string(),
        TinyLayout::Taesd => {
            let Some(rest) = name.strip_prefix("decoder.layers.") else {
                return name.to_string();
            };
            match rest.split_once('.') {
                Some((index, tail)) => match index.parse::<usize>() {
                    Ok(i) => format!("{}.{tail}", i + 1),
                    Err(_) => name.to_string(),
                },
                None => name.to_string(),
            }
        }
    }
}

/// Reads the decoder's configuration off a file's tensor shapes (for a single file without
/// `config.json`). What shapes cannot say, TAEF1's values give: ReLU, nearest 2x upsampling,
/// no latent scale or shift.
fn infer_config(
    file: &Path,
    st: &MmapedSafetensors,
    layout: TinyLayout,
) -> Result<TinyConfig, ModelError> {
    let key = |name: String| file_key(layout, &format!("decoder.layers.{name}"));
    let shape = |name: String| -> Result<Vec<usize>, ModelError> {
        let k = key(name);
        st.get(&k)
            .map(|view| view.shape().to_vec())
            .map_err(|_| ModelError::files(file, format!("missing tensor `{k}`")))
    };
    let present = |name: String| has(st, &key(name));
    let first = shape("0.weight".into())?;
    if first.len() != 4 {
        return Err(ModelError::files(
            file,
            format!(
                "`{}` has shape {first:?}, not a conv",
                key("0.weight".into())
            ),
        ));
    }
    let (width, latent_channels) = (first[0], first[1]);
    let mut blocks = Vec::new();
    let mut index = 2; // 1 is the activation after the first conv
    let out_channels = loop {
        let mut n = 0;
        while present(format!("{index}.conv.0.weight")) {
            n += 1;
            index += 1;
        }
        blocks.push(n);
        if present(format!("{index}.weight")) {
            // The last stage's conv follows its blocks directly and has a bias.
            break shape(format!("{index}.weight"))?[0];
        }
        // Otherwise `index` is an upsampling and the stage's conv comes after it.
        if !present(format!("{}.weight", index + 1)) {
            return Err(ModelError::files(
                file,
                format!(
                    "no conv after decoder stage {} (looked for `{}` and `{}`)",
                    blocks.len(),
                    key(format!("{index}.weight")),
                    key(format!("{}.weight", index + 1))
                ),
            ));
        }
        index += 2;
        if blocks.len() > 16 {
            return Err(ModelError::files(
                file,
                "more than 16 decoder stages: not a TAESD-family decoder",
            ));
        }
    };
    Ok(TinyConfig {
        class_name: None,
        decoder_block_out_channels: vec![width; blocks.len()],
        num_decoder_blocks: blocks,
        latent_channels,
        out_channels,
        ..TinyConfig::taef1()
    })
}

impl TinyDecoderFiles {
    /// Finds a tiny decoder at `path`: a safetensors file, a diffusers folder (or a Hugging
    /// Face cache entry of one, resolved to its snapshot), or a Hub id such as
    /// [`TAEF1_REPO`] that is in the Hugging Face cache. Errors name the file or key.
    pub fn discover(path: &Path) -> Result<Self, ModelError> {
        if path.is_file() {
            return Self::from_file(path, None);
        }
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else {
            let name = path.to_string_lossy();
            let settings = HubSettings::from_env();
            match hub::find_local(&settings, &name) {
                Some(found) => found,
                None if hub::names_repo(&name) => {
                    return Err(ModelError::files(
                        path,
                        format!(
                            "neither a file or folder nor in the Hugging Face cache ({} not \
                             found); fetch it with `icedit-scale download {name}`",
                            hub::cache_entry(&settings, &name).display()
                        ),
                    ))
                }
                None => return Err(ModelError::files(path, "not found (tiny decoder)")),
            }
        };
        let dir = hub::resolve_snapshot(&dir)?;
        let config = dir.join("config.json");
        let weights = dir.join(WEIGHTS_FILE);
        if config.is_file() {
            if !weights.is_file() {
                return Err(ModelError::files(
                    &weights,
                    "not found (the weights beside this AutoencoderTiny config.json)",
                ));
            }
            return Self::from_file(&weights, Some(&config));
        }
        if dir.join(TAESD_DECODER_FILE).is_file() {
            return Self::from_file(&dir.join(TAESD_DECODER_FILE), None);
        }
        if weights.is_file() {
            return Self::from_file(&weights, None);
        }
        match hub::shards(&dir)?.as_slice() {
            [one] => Self::from_file(one, None),
            many => Err(ModelError::files(
                &dir,
                format!(
                    "{} .safetensors files and neither config.json + {WEIGHTS_FILE} nor \
                     {TAESD_DECODER_FILE}: name the decoder file itself",
                    many.len()
                ),
            )),
        }
    }

    /// One weights file, with its `config.json` if there is one (else the configuration is
    /// read off the shapes).
    pub fn from_file(weights: &Path, config_path: Option<&Path>) -> Result<Self, ModelError> {
        let st = open(weights)?;
        let layout = layout(weights, &st)?;
        let config = match config_path {
            Some(p) => {
                let config: TinyConfig = read_json(p)?;
                config
                    .check()
                    .map_err(|reason| ModelError::files(p, reason))?;
                config
            }
            None => {
                let config = infer_config(weights, &st, layout)?;
                config
                    .check()
                    .map_err(|reason| ModelError::files(weights, reason))?;
                config
            }
        };
        Ok(Self {
            weights: weights.to_path_buf(),
            layout,
            config,
            config_path: config_path.map(Path::to_path_buf),
        })
    }

    /// Loads the decoder in `dtype` on `device`. A missing tensor or a shape that does not fit
    /// the configuration is an error naming the file and the key as the file spells it; so is
    /// a tensor of the file that the decoder does not read, unless [`UNUSED_TENSORS`] lists
    /// it or `unused` allows it.
    pub fn load(
        &self,
        dtype: DType,
        device: &Device,
        unused: UnusedWeights,
    ) -> Result<TinyDecoder, ModelError> {
        let st = open(&self.weights)?;
        let log = ReadLog::new();
        let vb = VarBuilder::from_backend(
            Box::new(Recording::new(st, log.clone())),
            dtype,
            device.clone(),
        );
        let layout = self.layout;
        let vb = vb.rename_f(move |name| file_key(layout, name));
        let decoder = TinyDecoder::load(vb, &self.config).map_err(|e| {
            ModelError::files(
                &self.weights,
                format!("tiny decoder ({:?} layout): {e}", self.layout),
            )
        })?;
        check_unused(
            "the tiny decoder",
            &StoredTensors::safetensors(std::slice::from_ref(&self.weights))?,
            &log,
            UNUSED_TENSORS,
            unused,
        )?;
        Ok(decoder)
    }
}
