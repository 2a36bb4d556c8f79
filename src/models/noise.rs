//! Deterministic normal draws: the initial noise of every candidate, and seeded random
//! weights and test inputs.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Standard-normal noise of `shape` from `seed`, generated on the CPU in f32 and moved to
/// `device`, so a seed gives the same latents on every device and platform.
pub fn seeded_noise(seed: u64, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_different_seed_different_noise() {
        let a = seeded_noise(7, &[4, 8], &Device::Cpu).unwrap();
        let b = seeded_noise(7, &[4, 8], &Device::Cpu).unwrap();
        let c = seeded_noise(8, &[4, 8], &Device::Cpu).unwrap();
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let c: Vec<f32> = c.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.5);
    }
}
