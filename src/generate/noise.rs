//! Deterministic initial noise: a seed gives the same latents on every device and platform
//! (drawn by [`crate::models::noise`], which the models' random weights share).

pub use crate::models::noise::seeded_noise;
