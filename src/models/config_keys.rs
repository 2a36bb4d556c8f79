//! Every key of a family's reference config class accounted for. A key is either read by
//! our serde structs (honoured, or checked), on the family's list of keys known not to
//! change the math here ([`ConfigKeys::inert`], each with the reason), or on its list of
//! keys refused by name when set to a value we do not implement ([`ConfigKeys::refused`],
//! each with such a value). `tests/config_keys.rs` walks each family's full key list, dumped
//! from the reference class by `tests/fixtures/config_keys/make_config_keys.py`, and fails on
//! a key in none of the three: a new key in the reference fails it until it is classified.
//!
//! The lists live beside each family's config: [`crate::models::flux::config`],
//! [`crate::models::flux::vae`], [`crate::models::flux::text`] (T5, CLIP),
//! [`crate::models::taef1::config`], [`crate::models::qwen_vl::config`].

/// One section of a family's config (the top level, or a sub-config such as
/// `text_config`).
#[derive(Debug, Clone, Copy)]
pub struct ConfigKeys {
    /// The section: `""` for the top level, else the sub-config's key.
    pub section: &'static str,
    /// Keys not read because they do not change what is computed here: (key, why).
    pub inert: &'static [(&'static str, &'static str)],
    /// Keys read and refused by name for values not implemented here: (key, one such
    /// value as JSON).
    pub refused: &'static [(&'static str, &'static str)],
}

impl ConfigKeys {
    /// Why `key` does not change the math, if it is on the inert list (the family's own,
    /// then the ones every config of its library carries).
    pub fn inert_reason(
        &self,
        key: &str,
        common: &[(&'static str, &'static str)],
    ) -> Option<&'static str> {
        self.inert
            .iter()
            .chain(common)
            .find(|(k, _)| *k == key)
            .map(|(_, why)| *why)
    }
}

/// Keys every transformers `PreTrainedConfig` writes that say how to run, save or train a
/// model, never what it computes at inference.
pub const TRANSFORMERS_COMMON_INERT: &[(&str, &str)] = &[
    ("_name_or_path", "where the config was loaded from"),
    ("architectures", "class names for Auto loading; the model built here is fixed by the loader (and model_type where a family has several)"),
    ("transformers_version", "the version that wrote the file"),
    ("dtype", "the dtype the weights were saved in; the compute dtype is the caller's choice"),
    ("chunk_size_feed_forward", "splits the feed-forward over the sequence to save memory (apply_chunking_to_forward): the same values"),
    ("id2label", "labels of a classification head, not built"),
    ("label2id", "labels of a classification head, not built"),
    ("problem_type", "the loss of a classification head, not built"),
    ("is_encoder_decoder", "generation bookkeeping"),
    ("output_attentions", "what the forward returns besides its output"),
    ("output_hidden_states", "what the forward returns besides its output"),
    ("return_dict", "the forward's return type"),
    ("use_cache", "whether generation keeps a KV cache: the same logits"),
    ("initializer_range", "random initialisation, overwritten by the checkpoint"),
    ("initializer_factor", "random initialisation, overwritten by the checkpoint"),
];

/// Keys every diffusers `ConfigMixin` writes.
pub const DIFFUSERS_COMMON_INERT: &[(&str, &str)] = &[
    ("_class_name", "the class diffusers instantiates; the loader here builds its one model, and a config of another class fails on its fields or the weights' shapes"),
    ("_diffusers_version", "the version that wrote the file"),
];
