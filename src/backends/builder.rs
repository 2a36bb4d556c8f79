//! The one way a command assembles its engines: from a [`GeneratorSpec`] and a
//! [`JudgeSpec`] made at the command boundary, [`EngineBuilder::build`] checks the memory
//! plan (per generator device, before any weight is read or fetched), fetches what is
//! missing (`--download`), loads the judges and generators, and assembles one engine per
//! device, in that order, once. Every command that runs edits (edit, batch, eval, serve,
//! study) goes through it; judge-eval, which runs no generator, through [`prepare_judge`].

use std::sync::Arc;

use crate::engine::{Engine, GeneratorWorker};
use crate::error::EditError;
use crate::judge::{Judge, ScoreKind};
use crate::models::testbed::TestbedEdits;

use super::download::fetch_missing;
use super::generator::{GeneratorSpec, Workload};
use super::judge::JudgeSpec;

/// What a command asks to be built.
pub struct EngineBuilder {
    /// The generator (one per device).
    pub generator: GeneratorSpec,
    /// The engine's judge, and the name its errors go under (`--judge`,
    /// `selection_judge`).
    pub judge: (JudgeSpec, &'static str),
    /// Further judges the command uses beside the engine (eval's scoring judge), built in
    /// the same pass with their names.
    pub extra_judges: Vec<(JudgeSpec, &'static str)>,
    /// Fetch what the cache lacks first.
    pub download: bool,
    /// What the memory plan is made for.
    pub workload: Workload,
    /// Generator devices (`serve --devices`); `None`: the generator's own.
    pub devices: Option<Vec<String>>,
    /// Load weight files holding tensors no model part reads, logging each, instead of
    /// refusing them (`--allow-unused-weights`), for the generator and every judge.
    pub allow_unused_weights: bool,
}

/// What [`EngineBuilder::build`] made.
pub struct Built {
    /// One engine per device, with the worker's name (`cuda:0`, or `cuda:0#1` for a device
    /// named twice).
    pub engines: Vec<(String, Engine)>,
    /// The extra judges, in the order asked.
    pub extra_judges: Vec<Arc<dyn Judge>>,
}

impl EngineBuilder {
    /// An engine over `generator` and `judge` on the generator's device.
    pub fn new(
        generator: GeneratorSpec,
        judge: JudgeSpec,
        download: bool,
        workload: Workload,
    ) -> Self {
        Self {
            generator,
            judge: (judge, "--judge"),
            extra_judges: Vec::new(),
            download,
            workload,
            devices: None,
            allow_unused_weights: false,
        }
    }

    /// [`Self::allow_unused_weights`] set.
    pub fn allowing_unused_weights(mut self, allow: bool) -> Self {
        self.allow_unused_weights = allow;
        self
    }

    /// Plan, download, load, assemble; `wrap` may decorate the engine's judge (the server
    /// times its calls).
    pub fn build_wrapped(
        mut self,
        wrap: impl Fn(Arc<dyn Judge>) -> Arc<dyn Judge>,
    ) -> anyhow::Result<Built> {
        if self.allow_unused_weights {
            tracing::warn!(
                "--allow-unused-weights: weight files may hold tensors no model part reads; each is logged, none refused"
            );
            self.generator.allow_unused_weights();
            self.judge.0.allow_unused_weights();
            for (j, _) in &mut self.extra_judges {
                j.allow_unused_weights();
            }
        }
        let mut generators = match &self.devices {
            Some(names) => names
                .iter()
                .map(|n| Ok((n.clone(), self.generator.on_device(n)?)))
                .collect::<Result<Vec<_>, EditError>>()?,
            None => vec![(device_label(&self.generator), self.generator.clone())],
        };
        // 1. The memory plan, before any weight is read or fetched.
        for (_, generator) in &mut generators {
            if let Some(flux) = generator.flux_mut() {
                let judges =
                    std::iter::once(&self.judge.0).chain(self.extra_judges.iter().map(|(j, _)| j));
                let footprints = judges
                    .map(|j| j.footprint(flux.device))
                    .collect::<Result<Vec<_>, _>>()?;
                let footprint = super::judge::combined(footprints.into_iter().flatten().collect());
                flux.check_plan(footprint, &self.workload)?;
            }
        }
        // 2. Downloads.
        if self.download {
            let mut requests = self.generator.downloads();
            requests.extend(self.judge.0.downloads());
            for (j, _) in &self.extra_judges {
                requests.extend(j.downloads());
            }
            let mut seen = Vec::new();
            requests.retain(|r| {
                let new = !seen.contains(&r.repo_id);
                seen.push(r.repo_id.clone());
                new
            });
            fetch_missing(&requests)?;
        }
        // 3. Load: judges first (cheap; local models load on their first call), then the
        // generators. A testbed generator's edits are known to the testbed judges.
        let testbed =
            matches!(self.generator, GeneratorSpec::Testbed(_)).then(TestbedEdits::default);
        let judge = build_vie_judge(&self.judge, testbed.as_ref())?.map(wrap);
        let extra_judges = self
            .extra_judges
            .iter()
            .map(|spec| {
                build_vie_judge(spec, testbed.as_ref())?.ok_or_else(|| {
                    anyhow::Error::from(EditError::Invalid(format!(
                        "{}: \"none\" cannot score the returned edits",
                        spec.1
                    )))
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        // 4. One engine per device.
        let mut engines = Vec::with_capacity(generators.len());
        for (i, (name, generator)) in generators.iter().enumerate() {
            let worker = Arc::new(GeneratorWorker::spawn(generator.build(testbed.clone())?));
            let engine = match &judge {
                Some(j) => Engine::new(worker, j.clone(), self.judge.0.concurrency),
                None => Engine::without_judge(worker),
            };
            let twice = generators.iter().filter(|(n, _)| n == name).count() > 1;
            let name = if twice {
                format!("{name}#{i}")
            } else {
                name.clone()
            };
            engines.push((name, engine));
        }
        Ok(Built {
            engines,
            extra_judges,
        })
    }

    /// [`Self::build_wrapped`] with the judge as built.
    pub fn build(self) -> anyhow::Result<Built> {
        self.build_wrapped(|j| j)
    }

    /// The one engine of a single-device build.
    pub fn build_one(self) -> anyhow::Result<Engine> {
        let built = self.build()?;
        Ok(built
            .engines
            .into_iter()
            .next()
            .expect("one device, one engine")
            .1)
    }
}

/// A judge alone (judge-eval): downloads what it lacks when asked, then builds it, knowing
/// `testbed`'s edits.
pub fn prepare_judge(
    spec: &JudgeSpec,
    download: bool,
    testbed: Option<&TestbedEdits>,
) -> anyhow::Result<Option<Arc<dyn Judge>>> {
    if download {
        fetch_missing(&spec.downloads())?;
    }
    Ok(spec.build(testbed)?)
}

/// Builds a judge whose scores pick or score edits, so they must be VIE scores.
fn build_vie_judge(
    (spec, flag): &(JudgeSpec, &'static str),
    testbed: Option<&TestbedEdits>,
) -> anyhow::Result<Option<Arc<dyn Judge>>> {
    let judge = spec.build(testbed)?;
    if let Some(j) = &judge {
        require_vie(j.as_ref(), flag)?;
    }
    Ok(judge)
}

/// Refuses a reward-model judge where VIE scores are needed (the final scoring of an edit),
/// before any work: its reward is not a VIE score and the report must not mix them.
pub fn require_vie(judge: &dyn Judge, flag: &str) -> Result<(), EditError> {
    if judge.score_kind() == ScoreKind::Reward {
        return Err(EditError::Invalid(format!(
            "{flag}: {} is a reward model and gives no VIE scores; use a composite preset \
             (kind = \"composite\") that screens or compares with it and scores with a VIE judge",
            judge.name()
        )));
    }
    Ok(())
}

/// The name a single generator's worker goes by.
fn device_label(generator: &GeneratorSpec) -> String {
    match generator.flux() {
        Some(f) => f.device.to_string(),
        None => "cpu".into(),
    }
}
