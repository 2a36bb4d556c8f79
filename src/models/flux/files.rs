//! Finding the FLUX.1 Fill files: a diffusers folder, a Hugging Face cache snapshot, or BFL
//! single files with the text encoders taken from a folder.

use std::path::{Path, PathBuf};

use super::config::FluxConfig;
use super::vae::VaeConfig;
use super::weights::{KeyLayout, WeightSource};
use crate::error::ModelError;
use crate::fsio::read_json;
use crate::hub::{resolve_snapshot, shards};

/// The Hub repository of FLUX.1 Fill [dev] (gated: its licence must be accepted on the
/// Hub, and a token given).
pub const FILL_DEV_REPO: &str = "black-forest-labs/FLUX.1-Fill-dev";

/// The files of the diffusers layout in that repository (the BFL single files beside them,
/// another 24 GB, are left out).
pub const DIFFUSERS_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/",
    "transformer/",
    "vae/",
    "text_encoder/",
    "text_encoder_2/",
    "tokenizer/",
    "tokenizer_2/",
];

/// What the user pointed at.
#[derive(Debug, Clone, Default)]
pub struct FluxPaths {
    /// A diffusers folder or a Hugging Face cache entry (`models--...--FLUX.1-Fill-dev`).
    pub model_dir: Option<PathBuf>,
    /// A transformer file overriding the folder's (BFL `flux1-fill-dev.safetensors` or diffusers).
    pub transformer: Option<PathBuf>,
    /// An autoencoder file overriding the folder's (BFL `ae.safetensors` or diffusers).
    pub vae: Option<PathBuf>,
    /// A folder with `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`
    /// (defaults to the model folder).
    pub text_encoders: Option<PathBuf>,
    /// A T5 encoder weight file overriding `text_encoder_2/`'s weights: a GGUF file
    /// (llama.cpp's T5 names or transformers'), quantized or not, or safetensors. Its
    /// config and tokenizer still come from the folder.
    pub t5: Option<PathBuf>,
}

/// Where one text encoder's files are.
#[derive(Debug, Clone)]
pub struct EncoderFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// Weight shards.
    pub weights: Vec<PathBuf>,
    /// The tokenizer folder (`tokenizer.json`, or CLIP's `vocab.json` + `merges.txt`).
    pub tokenizer_dir: PathBuf,
}

/// Every file the generator needs, resolved.
#[derive(Debug, Clone)]
pub struct FluxFiles {
    /// Transformer shards.
    pub transformer: Vec<PathBuf>,
    /// Their key layout.
    pub transformer_layout: KeyLayout,
    /// Transformer hyper-parameters.
    pub transformer_config: FluxConfig,
    /// Autoencoder shards.
    pub vae: Vec<PathBuf>,
    /// Their key layout.
    pub vae_layout: KeyLayout,
    /// Autoencoder hyper-parameters.
    pub vae_config: VaeConfig,
    /// The schedule's dynamic-shift line, from `scheduler/scheduler_config.json` (FLUX.1's
    /// without one).
    pub schedule_shift: super::scheduler::DynamicShift,
    /// CLIP-L.
    pub clip: EncoderFiles,
    /// T5.
    pub t5: EncoderFiles,
}

fn missing(path: &Path, what: &str) -> ModelError {
    ModelError::files(path, format!("not found ({what})"))
}

/// The keys and stored shapes of a transformer's files: what finding its config needs,
/// answered by the mapped files ([`WeightSource`]) when loading, and by their headers alone
/// when the memory plan runs before anything loads (`plan::peek::HeaderShapes`).
pub trait KeyShapes {
    /// The stored shape of a file key.
    fn key_shape(&self, key: &str) -> Option<Vec<usize>>;
    /// Every key in the files.
    fn keys(&self) -> Vec<String>;
    /// Whether the files hold `key`.
    fn has_key(&self, key: &str) -> bool {
        self.key_shape(key).is_some()
    }
}

impl KeyShapes for WeightSource {
    fn key_shape(&self, key: &str) -> Option<Vec<usize>> {
        WeightSource::key_shape(self, key)
    }
    fn keys(&self) -> Vec<String> {
        WeightSource::keys(self)
    }
    fn has_key(&self, key: &str) -> bool {
        WeightSource::has_key(self, key)
    }
}

/// The model folder `dir` as the loader reads it (a Hugging Face cache entry's snapshot),
/// or the loader's error when it is not a folder.
pub fn model_folder(dir: &Path) -> Result<PathBuf, ModelError> {
    if !dir.is_dir() {
        return Err(missing(dir, "model folder"));
    }
    Ok(resolve_snapshot(dir)?)
}

/// The transformer files of the model folder `root`: its diffusers `transformer/` shards,
/// else a BFL `flux1-fill-dev.safetensors`, else the loader's error naming what is missing.
pub fn transformer_in_folder(root: &Path) -> Result<Vec<PathBuf>, ModelError> {
    if root.join("transformer").is_dir() {
        Ok(shards(&root.join("transformer"))?)
    } else if root.join("flux1-fill-dev.safetensors").is_file() {
        Ok(vec![root.join("flux1-fill-dev.safetensors")])
    } else {
        Err(missing(&root.join("transformer"), "transformer weights"))
    }
}

/// Why a transformer with `transformer`'s channels cannot be a Fill model over the
/// autoencoder `vae` (its input is latents, masked latents and the packed mask), or `None`.
pub fn fill_mismatch(transformer: &FluxConfig, vae: &VaeConfig) -> Option<String> {
    let cond = 4 * vae.latent_channels + 4 * vae.downscale().pow(2);
    let needed = 4 * vae.latent_channels + cond;
    (transformer.in_channels != needed).then(|| {
        format!(
            "in_channels {} is not a Fill model for this VAE (needs {needed}: latents + masked latents + mask)",
            transformer.in_channels
        )
    })
}

/// The transformer config the loader uses for `transformer` (whose keys `shapes` answers):
/// the one at `config_path` when it fits the weights' input embedder (one borrowed from the
/// text encoders' folder that does not is replaced by the weights' own; one of the
/// transformer's own that does not is refused), else read from the weights
/// ([`config_from_weights`]).
pub fn resolve_transformer_config(
    config_path: Option<&Path>,
    root: Option<&Path>,
    transformer: &[PathBuf],
    shapes: &impl KeyShapes,
) -> Result<FluxConfig, ModelError> {
    // A config's error names the config; an inferred one's, the weights it came from.
    let valid_inferred = |config: FluxConfig| {
        config
            .validate()
            .map(|()| config)
            .map_err(|reason| ModelError::files(&transformer[0], reason))
    };
    let Some(p) = config_path else {
        return config_from_weights(transformer, shapes, root);
    };
    let config = read_json::<FluxConfig>(p)?;
    config
        .validate()
        .map_err(|reason| ModelError::files(p, reason))?;
    match embedder_mismatch(&config, shapes) {
        None => Ok(config),
        // A config borrowed from the --text-encoders folder (FLUX.1-dev's, say, beside a
        // Fill file) that is not this transformer's: its weights say what it is.
        Some(why) if !borrowed_config_is_ours(p, root, transformer) => {
            let inferred = infer_bfl_config(&transformer[0], shapes).map_err(|e| {
                ModelError::files(
                    p,
                    format!("{why}, and the config cannot be read from the weights instead: {e}"),
                )
            })?;
            tracing::info!(
                "{}: {why}; the transformer's config is read from its weights instead",
                p.display()
            );
            valid_inferred(inferred)
        }
        Some(why) => Err(ModelError::files(p, why)),
    }
}

fn encoder(root: &Path, weights: &str, tokenizer: &str) -> Result<EncoderFiles, ModelError> {
    let dir = root.join(weights);
    let tokenizer_dir = root.join(tokenizer);
    if !tokenizer_dir.is_dir() {
        return Err(missing(&tokenizer_dir, "tokenizer folder"));
    }
    Ok(EncoderFiles {
        config: dir.join("config.json"),
        weights: shards(&dir)?,
        tokenizer_dir,
    })
}

/// Which layout a transformer file uses, from its keys.
fn transformer_layout(
    files: &[PathBuf],
    probe: &WeightSource,
    config: &FluxConfig,
) -> Result<KeyLayout, ModelError> {
    let bfl = [
        "double_blocks.0.img_attn.qkv.weight",
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
    ];
    if bfl.iter().any(|k| probe.has_key(k)) {
        Ok(KeyLayout::BflTransformer {
            hidden: config.hidden(),
            mlp: config.mlp_hidden(),
        })
    } else if probe.has_key("transformer_blocks.0.attn.to_q.weight")
        || probe.has_key("x_embedder.weight")
    {
        Ok(KeyLayout::Diffusers)
    } else {
        Err(ModelError::Files {
            path: files[0].clone(),
            reason:
                "neither BFL (`double_blocks.*`) nor diffusers (`transformer_blocks.*`) FLUX keys"
                    .into(),
        })
    }
}

/// The transformer config of `files` (whose keys `probe` reads) when no `config.json`
/// states it: a BFL single file's (GGUF included) from its weights' shapes, validated; a
/// diffusers-layout transformer states its config in a file, so it is refused naming the
/// file it needs (under the model folder `root`, else beside the weights).
fn config_from_weights(
    files: &[PathBuf],
    probe: &impl KeyShapes,
    root: Option<&Path>,
) -> Result<FluxConfig, ModelError> {
    if probe.has_key("x_embedder.weight") || probe.has_key("transformer_blocks.0.attn.to_q.weight")
    {
        let expected = match root {
            Some(r) => r.join("transformer").join("config.json"),
            None => files[0].with_file_name("config.json"),
        };
        return Err(missing(
            &expected,
            "the config of a diffusers-layout transformer; only a BFL single file's is read from its weights",
        ));
    }
    let config = infer_bfl_config(&files[0], probe)?;
    config
        .validate()
        .map_err(|reason| ModelError::files(&files[0], reason))?;
    Ok(config)
}

/// Why `config` is not the config of the transformer in `probe`, judged by the input
/// embedder (`[hidden, in_channels]` in every layout), or `None` when they agree.
fn embedder_mismatch(config: &FluxConfig, probe: &impl KeyShapes) -> Option<String> {
    let (key, shape) = [
        "x_embedder.weight",
        "img_in.weight",
        "model.diffusion_model.img_in.weight",
    ]
    .into_iter()
    .find_map(|k| Some((k, probe.key_shape(k)?)))?;
    let expected = [config.hidden(), config.in_channels];
    (shape != expected).then(|| {
        format!(
            "its hidden width and in_channels {expected:?} are not those of the transformer's `{key}` {shape:?}"
        )
    })
}

/// Infers the transformer config of a BFL file without a `config.json` (the FLUX.1 family:
/// 128-wide heads, RoPE axes 16/56/56), reading widths and depths from tensor shapes.
fn infer_bfl_config(file: &Path, probe: &impl KeyShapes) -> Result<FluxConfig, ModelError> {
    let p = if probe.has_key("img_in.weight") {
        ""
    } else {
        "model.diffusion_model."
    };
    let shape = |k: &str| {
        probe
            .key_shape(&format!("{p}{k}"))
            .ok_or_else(|| ModelError::Files {
                path: file.to_path_buf(),
                reason: format!("missing tensor `{p}{k}`"),
            })
    };
    let count = |prefix: &str| {
        probe
            .keys()
            .iter()
            .filter_map(|k| {
                k.strip_prefix(&format!("{p}{prefix}"))?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |m| m + 1)
    };
    let img_in = shape("img_in.weight")?;
    let head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")?[0];
    if head_dim != 128 {
        return Err(ModelError::Files {
            path: file.to_path_buf(),
            reason: format!("head width {head_dim}: RoPE axes unknown; give a folder with transformer/config.json"),
        });
    }
    Ok(FluxConfig {
        in_channels: img_in[1],
        out_channels: Some(shape("final_layer.linear.weight")?[0]),
        num_layers: count("double_blocks."),
        num_single_layers: count("single_blocks."),
        attention_head_dim: head_dim,
        num_attention_heads: img_in[0] / head_dim,
        joint_attention_dim: shape("txt_in.weight")?[1],
        pooled_projection_dim: shape("vector_in.in_layer.weight")?[1],
        guidance_embeds: probe.has_key(&format!("{p}guidance_in.in_layer.weight")),
        axes_dims_rope: vec![16, 56, 56],
        patch_size: 1,
    })
}

/// What FLUX needs when no model folder is named.
pub const NEEDS_FOLDERS: &str = "FLUX needs --model-dir (diffusers folder or HF snapshot), or --text-encoders with --transformer and --vae";

/// Where the transformer's `config.json` is, in the order the loader and the plan both
/// look: the model folder's `transformer/`, beside a `--transformer` file (a diffusers
/// transformer keeps its config there), the text encoders' folder's `transformer/`.
pub fn transformer_config_path(
    root: Option<&Path>,
    transformer_file: Option<&Path>,
    text_root: Option<&Path>,
) -> Option<PathBuf> {
    let in_folder =
        |r: &Path| Some(r.join("transformer").join("config.json")).filter(|p| p.is_file());
    root.and_then(in_folder)
        .or_else(|| {
            transformer_file
                .map(|f| f.with_file_name("config.json"))
                .filter(|p| p.is_file())
        })
        .or_else(|| text_root.and_then(in_folder))
}

/// Whether a transformer config found at `config` belongs to the transformer itself (under
/// the model folder `root`, or beside its weights), rather than being borrowed from the
/// text encoders' folder.
fn borrowed_config_is_ours(config: &Path, root: Option<&Path>, transformer: &[PathBuf]) -> bool {
    root.is_some_and(|r| config.starts_with(r))
        || transformer
            .first()
            .is_some_and(|f| f.with_file_name("config.json") == config)
}

impl FluxFiles {
    /// Resolves every file, failing with the first missing one named.
    pub fn discover(paths: &FluxPaths) -> Result<Self, ModelError> {
        let root = paths.model_dir.as_deref().map(model_folder).transpose()?;
        let text_root = match (&paths.text_encoders, &root) {
            (Some(dir), _) => resolve_snapshot(dir)?,
            (None, Some(dir)) => dir.clone(),
            (None, None) => return Err(ModelError::Config(NEEDS_FOLDERS.into())),
        };

        // Transformer: explicit file, the diffusers subfolder, or the BFL file in the root.
        let transformer = match (&paths.transformer, &root) {
            (Some(f), _) => vec![f.clone()],
            (None, Some(r)) => transformer_in_folder(r)?,
            (None, None) => {
                return Err(ModelError::Config(
                    "--transformer is required without --model-dir".into(),
                ))
            }
        };
        let probe = WeightSource::open(&transformer, KeyLayout::Diffusers)?;
        // A component's config file, in the model folder or else the text encoders' folder.
        let config_file = |sub: &str, name: &str| {
            [root.as_ref(), Some(&text_root)]
                .into_iter()
                .flatten()
                .map(|r| r.join(sub).join(name))
                .find(|p| p.is_file())
        };
        let config_path = transformer_config_path(
            root.as_deref(),
            paths.transformer.as_deref(),
            Some(&text_root),
        );
        let transformer_config = resolve_transformer_config(
            config_path.as_deref(),
            root.as_deref(),
            &transformer,
            &probe,
        )?;
        let transformer_layout = transformer_layout(&transformer, &probe, &transformer_config)?;

        // Autoencoder: explicit file, the diffusers subfolder, or `ae.safetensors` in the root.
        let vae = match (&paths.vae, &root) {
            (Some(f), _) => vec![f.clone()],
            (None, Some(r)) if r.join("vae").is_dir() => shards(&r.join("vae"))?,
            (None, Some(r)) if r.join("ae.safetensors").is_file() => vec![r.join("ae.safetensors")],
            (None, Some(r)) => return Err(missing(&r.join("vae"), "autoencoder weights")),
            (None, None) => {
                return Err(ModelError::Config(
                    "--vae is required without --model-dir".into(),
                ))
            }
        };
        let vae_probe = WeightSource::open(&vae, KeyLayout::Diffusers)?;
        let vae_config_path = config_file("vae", "config.json");
        let vae_config = match vae_config_path {
            Some(p) => {
                let config = read_json::<VaeConfig>(&p)?;
                config
                    .check()
                    .map_err(|reason| ModelError::files(&p, reason))?;
                config
            }
            None => VaeConfig::flux(),
        };
        let scheduler_config_path = config_file("scheduler", "scheduler_config.json");
        let schedule_shift = match scheduler_config_path {
            Some(p) => read_json::<super::scheduler::SchedulerConfig>(&p)?
                .dynamic_shift()
                .map_err(|reason| ModelError::files(&p, reason))?,
            None => super::scheduler::DynamicShift::FLUX,
        };
        let vae_layout = if vae_probe.has_key("encoder.down.0.block.0.conv1.weight") {
            KeyLayout::BflVae {
                levels: vae_config.block_out_channels.len(),
            }
        } else {
            KeyLayout::Diffusers
        };

        Ok(Self {
            transformer,
            transformer_layout,
            transformer_config,
            vae,
            vae_layout,
            vae_config,
            schedule_shift,
            clip: encoder(&text_root, "text_encoder", "tokenizer")?,
            t5: match &paths.t5 {
                Some(file) if !file.is_file() => return Err(missing(file, "T5 encoder weights")),
                Some(file) => EncoderFiles {
                    weights: vec![file.clone()],
                    ..encoder(&text_root, "text_encoder_2", "tokenizer_2")?
                },
                None => encoder(&text_root, "text_encoder_2", "tokenizer_2")?,
            },
        })
    }
}
