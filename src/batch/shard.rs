//! Deterministic sharding of a manifest across array-job tasks.

use sha2::{Digest, Sha256};

/// Shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This task's shard.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl Shard {
    /// The whole manifest.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Parses `i/n` or `auto` (from the scheduler's environment, via `env`).
    pub fn parse(spec: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        if spec == "auto" {
            return Self::from_env(env);
        }
        let (i, n) = spec
            .split_once('/')
            .ok_or_else(|| format!("--shard {spec:?}: expected i/n (e.g. 0/4) or auto"))?;
        let parse = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("--shard {spec:?}: {s:?} is not a number"))
        };
        Self::new(parse(i)?, parse(n)?)
    }

    fn new(index: usize, count: usize) -> Result<Self, String> {
        if count == 0 || index >= count {
            return Err(format!("--shard {index}/{count}: need 0 <= i < n"));
        }
        Ok(Self { index, count })
    }

    /// Slurm job arrays (`SLURM_ARRAY_TASK_ID` - `SLURM_ARRAY_TASK_MIN` of
    /// `SLURM_ARRAY_TASK_COUNT`) or Kubernetes indexed Jobs (`JOB_COMPLETION_INDEX` of
    /// `ICEDIT_SHARD_COUNT`, which the Job spec sets to its `completions`).
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let num = |k: &str| -> Result<Option<usize>, String> {
            env(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("{k}={v:?} is not a number"))
                })
                .transpose()
        };
        if let (Some(id), Some(count)) =
            (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?)
        {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            return Self::new(
                id.checked_sub(min).ok_or("SLURM_ARRAY_TASK_ID below MIN")?,
                count,
            );
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = num("ICEDIT_SHARD_COUNT")?.ok_or(
                "JOB_COMPLETION_INDEX is set but ICEDIT_SHARD_COUNT is not (set it to the Job's completions)",
            )?;
            return Self::new(index, count);
        }
        Err("--shard auto: no SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or JOB_COMPLETION_INDEX in the environment".into())
    }

    /// Whether item `id` belongs to this shard: by a hash of the id, so the split does not
    /// depend on line order and is the same on every machine.
    pub fn owns(&self, id: &str) -> bool {
        if self.count == 1 {
            return true;
        }
        let digest = Sha256::digest(id.as_bytes());
        let h = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
        (h % self.count as u64) as usize == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn parses_explicit_and_scheduler_specs() {
        let none = |_: &str| None;
        assert_eq!(
            Shard::parse("1/4", none).unwrap(),
            Shard { index: 1, count: 4 }
        );
        assert!(Shard::parse("4/4", none).is_err());
        assert!(Shard::parse("x", none).is_err());
        assert!(Shard::parse("auto", none).unwrap_err().contains("SLURM"));
        let slurm: HashMap<&str, &str> = [
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]
        .into();
        let env = |k: &str| slurm.get(k).map(|v| v.to_string());
        assert_eq!(
            Shard::parse("auto", env).unwrap(),
            Shard { index: 2, count: 4 }
        );
        let k8s: HashMap<&str, &str> =
            [("JOB_COMPLETION_INDEX", "0"), ("ICEDIT_SHARD_COUNT", "8")].into();
        let env = |k: &str| k8s.get(k).map(|v| v.to_string());
        assert_eq!(
            Shard::parse("auto", env).unwrap(),
            Shard { index: 0, count: 8 }
        );
    }

    #[test]
    fn every_id_in_exactly_one_shard_and_roughly_balanced() {
        let shards: Vec<Shard> = (0..4).map(|i| Shard { index: i, count: 4 }).collect();
        let mut sizes = [0usize; 4];
        for n in 0..4000 {
            let id = format!("item-{n}");
            let owners: Vec<usize> = shards
                .iter()
                .filter(|s| s.owns(&id))
                .map(|s| s.index)
                .collect();
            assert_eq!(owners.len(), 1);
            sizes[owners[0]] += 1;
        }
        assert!(sizes.iter().all(|&s| (850..1150).contains(&s)), "{sizes:?}");
    }
}
