//! The pipelined batch: edits flow through one engine with a bounded number in flight, so
//! the generator works on edit i+1 while edit i waits for its judge, and memory stays flat
//! however long the manifest is.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::engine::Meter;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use super::manifest::{Entry, Item, ManifestReader};
use super::shard::Shard;
use super::store::{table, write_jsonl, ItemResult, ItemStatus, SummaryLog};
use crate::edit::{load_image, resize_to_panel, EditContext, ImageLimits};
use crate::engine::budget::{Allowance, BudgetPool};
use crate::engine::outputs::write_outputs;
use crate::engine::{EditJob, Engine, Silent, StrategyConfig, StrategyKind};
use crate::error::{EditError, EngineError};
use crate::fsio::write_atomic;
use crate::fsio::OutputLock;
use crate::stop::StopSignal;

/// What a batch run needs besides the engine.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// The JSONL manifest.
    pub manifest: PathBuf,
    /// Root image paths resolve against (default: the manifest's folder).
    pub root: Option<PathBuf>,
    /// Output folder (per-item folders under `items/`, `summary.jsonl`, `summary.md`).
    pub out: PathBuf,
    /// Which part of the manifest this process runs.
    pub shard: Shard,
    /// Strategy for items without overrides.
    pub strategy: StrategyConfig,
    /// Edits in flight at once (>= 2 overlaps generator and judge work).
    pub queue: usize,
    /// Panel width.
    pub width: u32,
    /// Show a progress bar.
    pub progress: bool,
    /// Mean NFE budget per item (`--budget-nfe-mean`): fixed strategies sized to it per
    /// item; adaptive items share `items x budget` (see [`BudgetPool`]), never more than
    /// their own N. With several items in flight the split depends on finishing order.
    pub budget_nfe_mean: Option<usize>,
}

/// Counts of one batch run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Items finished in this run.
    pub done: usize,
    /// Items that failed in this run.
    pub failed: usize,
    /// Invalid manifest lines reported in this run.
    pub invalid: usize,
    /// Items skipped because an earlier run finished them.
    pub already_done: usize,
    /// Items left for another shard.
    pub other_shards: usize,
    /// Whether the run stopped early on request.
    pub cancelled: bool,
    /// Manifest lines not reached because the run stopped early.
    pub unreached: usize,
    /// Of the items run (`done` and `failed`), those an earlier run had finished from
    /// another line under the same id (its image, instruction or strategy changed): redone,
    /// their outputs replaced.
    pub changed: usize,
    /// Finished items kept without a check: their records carry no fingerprint (written
    /// by an older version), so whether their line changed cannot be told.
    pub unchecked: usize,
    /// Records dropped from the summary at the end of a run to the end: items this shard
    /// no longer runs (their line removed, or made invalid, or now another shard's). Their
    /// folders under `items/` are kept.
    pub dropped: usize,
}

/// Runs (or resumes) a batch. Finished items of earlier runs are skipped unless their line
/// changed since (another image content, instruction or strategy under the same id), failed
/// ones retried; each result is durable before the next is counted. A run to the end leaves
/// the summary with exactly this shard's items of the manifest as it is now (and its invalid
/// lines), so its table and the exit code speak of the same items.
pub async fn run_batch(
    engine: &Engine,
    opts: &BatchOptions,
    stop: &StopSignal,
) -> Result<BatchOutcome, EngineError> {
    let open_err = |e: std::io::Error| EngineError::Output {
        path: opts.manifest.clone(),
        reason: format!("cannot read manifest: {e}"),
    };
    let log = Arc::new(Mutex::new(SummaryLog::open(&opts.out)?));
    let total = count_lines(&opts.manifest).map_err(open_err)?;
    let bar = if opts.progress {
        Meter::new(
            "batch",
            total as u64,
            "batch {bar:30} {pos}/{len} items, {elapsed_precise} elapsed, ETA {eta}",
        )
    } else {
        Meter::hidden()
    };
    let slots = Arc::new(Semaphore::new(opts.queue.max(1)));
    let mut tasks: JoinSet<Result<ItemStatus, EngineError>> = JoinSet::new();
    let mut outcome = BatchOutcome::default();
    let mut invalid_now = std::collections::HashSet::new();
    let mut reader =
        ManifestReader::open(&opts.manifest, opts.root.as_deref(), opts.strategy.clone())
            .map_err(open_err)?;
    let (pool, mut fingerprints) = match opts.budget_nfe_mean {
        Some(mean) => {
            // Items that keep the batch's strategy could never run.
            opts.strategy
                .under_mean_budget(mean)
                .map_err(|e| EngineError::Strategy(format!("--budget-nfe-mean {mean}: {e}")))?;
            let (pool, fingerprints) =
                fill_pool(opts, mean, &*log.lock().await).map_err(open_err)?;
            (Some(Arc::new(pool)), fingerprints)
        }
        None => Default::default(),
    };
    for (seen, entry) in reader.by_ref().enumerate() {
        let entry = entry.map_err(open_err)?;
        // Collect finished tasks as we go so errors surface early and memory stays flat.
        while let Some(done) = tasks.try_join_next() {
            count(&mut outcome, join_result(done)?);
        }
        if stop.is_set() {
            outcome.cancelled = true;
            outcome.unreached = total.saturating_sub(seen);
            break;
        }
        let item = match entry {
            Entry::Bad(bad) => {
                // Keyed by line, never by the declared id: a duplicate must not clobber the
                // record of the item that owns that id.
                let id = invalid_line_id(bad.line);
                let reason = match &bad.id {
                    Some(declared) => format!("id {declared:?}: {}", bad.reason),
                    None => bad.reason,
                };
                if !opts.shard.owns(&id) {
                    outcome.other_shards += 1;
                } else {
                    // Counted at every run that reads it (the exit code says so); recorded
                    // once per reason.
                    tracing::warn!("manifest line {}: {reason}", bad.line);
                    outcome.invalid += 1;
                    invalid_now.insert(id.clone());
                    let mut log = log.lock().await;
                    if log.get(&id).and_then(|r| r.reason.as_deref()) != Some(reason.as_str()) {
                        log.append(ItemResult {
                            id,
                            line: bad.line,
                            status: ItemStatus::Invalid,
                            reason: Some(reason),
                            ..empty_result()
                        })?;
                    }
                }
                bar.inc(1);
                continue;
            }
            Entry::Item(item) => item,
        };
        if !opts.shard.owns(&item.spec.id) {
            outcome.other_shards += 1;
            bar.inc(1);
            continue;
        }
        // Computed once: the pool's pass over the manifest took it already.
        let content = fingerprints
            .remove(&item.spec.id)
            .unwrap_or_else(|| item.fingerprint());
        {
            let mut log = log.lock().await;
            match log
                .get(&item.spec.id)
                .filter(|r| r.status == ItemStatus::Ok)
            {
                // Its spending is in the pool already (see `fill_pool`).
                Some(done) if done.content.as_ref().is_none_or(|c| *c == content) => {
                    outcome.already_done += 1;
                    outcome.unchecked += done.content.is_none() as usize;
                    if done.line != item.line {
                        log.renumber(&item.spec.id, item.line);
                    }
                    bar.inc(1);
                    continue;
                }
                // Finished from another line under this id: redone, its record and
                // outputs replaced.
                Some(_) => outcome.changed += 1,
                None => {}
            }
        }
        let permit = slots.clone().acquire_owned().await.expect("semaphore open");
        let (engine, log, bar) = (engine.clone(), log.clone(), bar.clone());
        let strategy = item.strategy.clone();
        let (out, width) = (opts.out.clone(), opts.width);
        let (pool, mean) = (pool.clone(), opts.budget_nfe_mean);
        tasks.spawn(async move {
            let result = match budgeted(strategy, mean, pool.as_deref()) {
                Ok((strategy, allowance)) => {
                    let notes = seeds_overridden(&item, &strategy, mean)
                        .into_iter()
                        .collect();
                    let result = run_item(&engine, &item, strategy, notes, width, &out).await;
                    if let (Some(p), Some(a)) = (&pool, allowance) {
                        // A failed item with no NFE recorded failed without a report.
                        let unknown = result.status != ItemStatus::Ok && result.nfe == 0;
                        p.settle(a, (!unknown).then_some(result.nfe));
                    }
                    result
                }
                Err(reason) => ItemResult {
                    id: item.spec.id.clone(),
                    line: item.line,
                    reason: Some(reason),
                    ..empty_result()
                },
            };
            let result = ItemResult {
                content: Some(content),
                ..result
            };
            let status = result.status;
            log.lock().await.append(result)?;
            bar.inc(1);
            drop(permit);
            Ok(status)
        });
    }
    while let Some(done) = tasks.join_next().await {
        count(&mut outcome, join_result(done)?);
    }
    bar.finish();
    let mut log = log.lock().await;
    if !outcome.cancelled {
        // A line that was invalid at an earlier run and is not now (mended, or gone from
        // the manifest) leaves no record behind. Nor does an item this shard no longer
        // runs: its record would count in the table (and `merge`) as if it were part of
        // the batch. Its folder stays: outputs are never deleted.
        log.retain(|r| r.status != ItemStatus::Invalid || invalid_now.contains(&r.id));
        let items_now = reader.item_ids();
        outcome.dropped = log.retain(|r| {
            r.status == ItemStatus::Invalid || (items_now.contains(&r.id) && opts.shard.owns(&r.id))
        });
    }
    log.compact()?;
    write_atomic(
        &opts.out.join("summary.md"),
        table(&log.results()).as_bytes(),
    )?;
    let record = ShardRecord {
        index: opts.shard.index,
        count: opts.shard.count,
        complete: !outcome.cancelled,
    };
    write_atomic(
        &opts.out.join(SHARD_FILE),
        &serde_json::to_vec_pretty(&record).expect("serialisable"),
    )?;
    Ok(outcome)
}

/// The id a manifest line that is not a valid item is recorded under: `#line-N`, which no
/// item id can be (`#` is refused in ids), so it never shadows an item's record.
pub fn invalid_line_id(line: usize) -> String {
    format!("#line-{line}")
}

/// The file in a batch's output folder that says which shard it ran and whether to the end,
/// so `merge` can tell a complete set of shards from an incomplete one.
pub const SHARD_FILE: &str = "shard.json";

/// The content of [`SHARD_FILE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardRecord {
    /// This shard.
    pub index: usize,
    /// Shards in the split.
    pub count: usize,
    /// Whether the run went through the whole manifest (not stopped early).
    pub complete: bool,
}

fn join_result(
    r: Result<Result<ItemStatus, EngineError>, tokio::task::JoinError>,
) -> Result<ItemStatus, EngineError> {
    r.map_err(|e| EngineError::Output {
        path: PathBuf::from("summary.jsonl"),
        reason: format!("batch task died: {e}"),
    })?
}

fn count(outcome: &mut BatchOutcome, status: ItemStatus) {
    match status {
        ItemStatus::Ok => outcome.done += 1,
        ItemStatus::Failed => outcome.failed += 1,
        ItemStatus::Invalid => outcome.invalid += 1,
    }
}

fn count_lines(path: &Path) -> std::io::Result<usize> {
    use std::io::BufRead;
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut n = 0;
    // As bytes: a line that is not UTF-8 still counts (the reader reports it as bad).
    for line in file.split(b'\n') {
        n += !line?.iter().all(u8::is_ascii_whitespace) as usize;
    }
    Ok(n)
}

fn empty_result() -> ItemResult {
    ItemResult {
        id: String::new(),
        line: 0,
        status: ItemStatus::Failed,
        reason: None,
        strategy: None,
        pick_seed: None,
        overall: None,
        sc: None,
        pq: None,
        nfe: 0,
        full_forwards: Some(0),
        cached_forwards: 0,
        refine_nfe: 0,
        refine_edit_step_equivalents: 0.0,
        judge_calls: 0,
        judge_failures: 0,
        output_dir: None,
        content: None,
    }
}

/// The least an item needs of a mean budget `mean`, set aside for it until it starts: a
/// fixed strategy is sized to the mean, an adaptive edit needs its first wave (and may use
/// more when other items leave it some).
fn budget_need(strategy: &StrategyConfig, mean: usize) -> usize {
    match strategy.kind {
        StrategyKind::Adaptive => strategy.first_wave_nfe(),
        _ => mean,
    }
}

/// The pool of a batch under `--budget-nfe-mean mean`: every item of this shard is in it
/// before any starts, with what it needs (an item finished by an earlier run for this very
/// line with what it spent), so the items still to come are set aside what THEY need
/// whatever the order of the lines. Also returns the fingerprints it computed (those of
/// items with a finished record), so the run does not hash their images again.
fn fill_pool(
    opts: &BatchOptions,
    mean: usize,
    log: &SummaryLog,
) -> std::io::Result<(BudgetPool, std::collections::HashMap<String, String>)> {
    let pool = BudgetPool::new(mean);
    let mut fingerprints = std::collections::HashMap::new();
    let reader = ManifestReader::open(&opts.manifest, opts.root.as_deref(), opts.strategy.clone())?;
    for entry in reader {
        let Entry::Item(item) = entry? else {
            continue;
        };
        if !opts.shard.owns(&item.spec.id) {
            continue;
        }
        let done = log
            .get(&item.spec.id)
            .filter(|r| r.status == ItemStatus::Ok);
        let finished = match done {
            Some(done) => match &done.content {
                // An unfingerprinted record is kept as done (see `run_batch`).
                None => Some(done.nfe),
                Some(stored) => {
                    let content = item.fingerprint();
                    let same = *stored == content;
                    fingerprints.insert(item.spec.id.clone(), content);
                    same.then_some(done.nfe)
                }
            },
            None => None,
        };
        match finished {
            Some(spent) => pool.add_finished(spent),
            None => pool.add_item(budget_need(&item.strategy, mean)),
        }
    }
    Ok((pool, fingerprints))
}

/// An item's strategy under a mean budget: every item draws its share from the pool; a
/// fixed strategy is sized to the mean (the pool always has it: it was set aside), an
/// adaptive one gets its share as a cap (its N cut to fit when the share is below its
/// most).
fn budgeted(
    strategy: StrategyConfig,
    mean: Option<usize>,
    pool: Option<&BudgetPool>,
) -> Result<(StrategyConfig, Option<Allowance>), String> {
    let (Some(mean), Some(pool)) = (mean, pool) else {
        return Ok((strategy, None));
    };
    let most = match strategy.kind {
        StrategyKind::Adaptive => strategy.planned_nfe(),
        _ => mean,
    };
    let allowance = pool.start_item(budget_need(&strategy, mean), most);
    let fitted = match strategy.kind {
        StrategyKind::Adaptive => strategy.held_to(allowance.nfe),
        _ => strategy.fit_to_budget(mean.min(allowance.nfe)),
    };
    match fitted {
        Ok(s) => Ok((s, Some(allowance))),
        Err(e) => {
            pool.settle(allowance, Some(0));
            Err(format!(
                "--budget-nfe-mean {mean}: this item's share ({} NFE): {e}",
                allowance.nfe
            ))
        }
    }
}

/// The note an item's report carries when its line asked for a number of seeds and the
/// mean budget ran another: the budget sets N, and the report must not let the line's
/// value pass for what ran.
fn seeds_overridden(item: &Item, ran: &StrategyConfig, mean: Option<usize>) -> Option<String> {
    let mean = mean?;
    let Some(crate::engine::Seeds::Count(asked)) = item.spec.overrides.seeds else {
        return None;
    };
    (ran.seeds != asked).then(|| {
        format!(
            "line {}: `seeds` {asked} not run: --budget-nfe-mean {mean} sets the number of seeds, and this item's share ({} NFE) runs {} {}",
            item.line,
            ran.budget_nfe.unwrap_or(mean),
            ran.kind.name(),
            match ran.seeds {
                1 => "with 1 seed".to_string(),
                n => format!("with {n} seeds"),
            }
        )
    })
}

/// Runs one item end to end; every failure becomes a `Failed` record with its reason.
async fn run_item(
    engine: &Engine,
    item: &Item,
    strategy: StrategyConfig,
    notes: Vec<String>,
    width: u32,
    out: &Path,
) -> ItemResult {
    let id = item.spec.id.clone();
    let base = ItemResult {
        id: id.clone(),
        line: item.line,
        strategy: Some(strategy.kind.name().to_string()),
        ..empty_result()
    };
    let started = Instant::now();
    let failed = |reason: String| ItemResult {
        reason: Some(reason),
        ..base.clone()
    };
    let (original, source) = match load_image(&item.image_path, ImageLimits::default())
        .and_then(|img| resize_to_panel(&img, width).map(|panel| (img, panel)))
    {
        Ok(s) => s,
        Err(e) => return failed(e.to_string()),
    };
    let mut edit = EditContext::new(id.clone(), source, item.spec.instruction.clone());
    if strategy.refine.is_some() {
        // A refine resizes the image as loaded to its own size.
        edit = edit.with_original(Arc::new(original));
    }
    let job = EditJob::new(edit, strategy);
    let mut report = match engine.run(job, Arc::new(Silent)).await {
        Ok(r) => r,
        Err(e) => return failed(e.to_string()),
    };
    report.notes.extend(notes);
    let rel = format!("items/{id}");
    if let Err(e) = write_outputs(&mut report, &out.join(&rel)) {
        return failed(e.to_string());
    }
    tracing::debug!("{id} done in {:.1}s", started.elapsed().as_secs_f64());
    let mut result = ItemResult {
        status: ItemStatus::Ok,
        output_dir: Some(rel),
        nfe: report.nfe.total,
        full_forwards: Some(report.forwards.full),
        cached_forwards: report.forwards.cached,
        refine_nfe: report.nfe.refine,
        refine_edit_step_equivalents: report.nfe.refine_edit_step_equivalents,
        judge_calls: report.judge_totals.calls,
        judge_failures: report.judge_totals.failures,
        ..base
    };
    result.pick_seed = report.pick.as_ref().map(|p| p.seed);
    if let Some(v) = report
        .picked()
        .and_then(|c| c.vie.as_ref())
        .and_then(|v| v.ok())
    {
        result.overall = Some(v.overall);
        result.sc = Some(v.sc);
        result.pq = Some(v.pq);
    }
    if let Some(reason) = report.incomplete_reason() {
        // A judge outage or a failed refine: marked failed so a rerun retries it (the
        // judge cache makes the answered calls free).
        result.status = ItemStatus::Failed;
        result.reason = Some(reason);
    }
    result
}

/// What `merge` produced, and what the user should know about it.
#[derive(Debug, Clone)]
pub struct Merged {
    /// The latest record per id over all shards, in manifest order.
    pub results: Vec<ItemResult>,
    /// Shards missing from the set, shards stopped before the end, or of another split.
    pub warnings: Vec<String>,
}

/// Combines shard outputs into one summary under `out`: the latest record per id over all
/// shards, in manifest order, with output folders rewritten as absolute paths.
/// A shard folder that does not exist or holds no results is bad input; a set of shards
/// that does not cover the split, or a shard that stopped early, is warned about.
pub fn merge_shards(shard_dirs: &[PathBuf], out: &Path) -> Result<Merged, EngineError> {
    let mut all = std::collections::BTreeMap::new();
    let mut records = Vec::new();
    let mut warnings = Vec::new();
    // The merged summary must not land in a shard's folder: it would replace that shard's
    // own summary with everyone's.
    let out_abs = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let out_real = out_abs.canonicalize().unwrap_or(out_abs);
    for dir in shard_dirs {
        let dir_abs = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        if out_real.starts_with(&dir_abs) {
            return Err(EditError::Invalid(format!(
                "--out {}: is (or is inside) the shard folder {}; give a folder of its own",
                out.display(),
                dir.display()
            ))
            .into());
        }
        if !dir.is_dir() {
            return Err(EditError::Invalid(format!(
                "shard folder {} does not exist",
                dir.display()
            ))
            .into());
        }
        let latest = super::store::read_latest(&dir.join("summary.jsonl"))?;
        let record = crate::fsio::read_json::<ShardRecord>(&dir.join(SHARD_FILE));
        // A shard whose hash owned no item finishes with an empty summary: that is a
        // result. A folder with neither results nor a shard record is not a batch's.
        if latest.is_empty() && record.is_err() {
            return Err(EditError::Invalid(format!(
                "shard folder {}: no results (no summary.jsonl, or an empty one, and no {SHARD_FILE})",
                dir.display()
            ))
            .into());
        }
        match record {
            Ok(record) => {
                if !record.complete {
                    warnings.push(format!(
                        "shard {}/{} in {} stopped before the end of its manifest",
                        record.index,
                        record.count,
                        dir.display()
                    ));
                }
                records.push(record);
            }
            Err(e) => warnings.push(format!("{e} (cannot tell which shard this is)")),
        }
        // Absolute: a relative shard path is relative to this working directory, not to
        // wherever the merged summary is read from.
        let dir = dir.canonicalize().map_err(|e| EngineError::Output {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        for (id, mut r) in latest {
            r.output_dir = r
                .output_dir
                .map(|d| dir.join(d).to_string_lossy().into_owned());
            all.insert(id, r);
        }
    }
    warnings.extend(missing_shards(&records));
    warnings.extend(mixed_settings(shard_dirs)?);
    let _lock = OutputLock::acquire(&{
        crate::fsio::prepare_output_dir(out, "--out")
            .map_err(|e| EditError::Invalid(e.to_string()))?;
        out.to_path_buf()
    })
    .map_err(|e| EditError::Invalid(e.to_string()))?;
    let mut results: Vec<ItemResult> = all.into_values().collect();
    results.sort_by(|a, b| (a.line, &a.id).cmp(&(b.line, &b.id)));
    write_jsonl(&out.join("summary.jsonl"), &results)?;
    write_atomic(&out.join("summary.md"), table(&results).as_bytes())?;
    Ok(Merged { results, warnings })
}

/// Refuses shards run with other settings (`settings.json`: width, strategy, mean budget,
/// judge, and the generator's settings: the testbed's difficulty and contrast, FLUX's
/// dtype, format, LoRA scale, guidance...): one summary would mix two experiments' results
/// as if one batch had made them. A generator whose file paths alone differ is a warning:
/// the machines of one cluster job hold the same weights at other paths. Shards without
/// the file (older runs) are not compared.
fn mixed_settings(shard_dirs: &[PathBuf]) -> Result<Vec<String>, EngineError> {
    use crate::fsio::settings::{changed_settings, SETTINGS_FILE};
    let mut shards = shard_dirs
        .iter()
        .filter(|dir| dir.join(SETTINGS_FILE).is_file());
    let Some(first) = shards.next() else {
        return Ok(Vec::new());
    };
    let mut warnings = Vec::new();
    for dir in shards {
        let settings: serde_json::Map<String, serde_json::Value> =
            crate::fsio::read_json(&dir.join(SETTINGS_FILE))
                .map_err(|e| EditError::Invalid(e.to_string()))?;
        let (generator, mut others): (Vec<_>, Vec<_>) =
            changed_settings(&first.join(SETTINGS_FILE), &settings)?
                .into_iter()
                .map(|(key, then)| {
                    let now = settings[&key].clone();
                    (key, then, now)
                })
                .partition(|(key, _, _)| key == "generator");
        // The generator's settings apart from its paths: each differing one is refused by
        // its own name.
        let mut paths = Vec::new();
        for (_, then, now) in generator {
            for (key, then, now) in differing_leaves("generator", &then, &now) {
                if is_weight_path(&key) {
                    paths.push((key, then, now));
                } else {
                    others.push((key, then, now));
                }
            }
        }
        let named = |changed: &[(String, serde_json::Value, serde_json::Value)]| {
            changed
                .iter()
                .map(|(key, then, now)| {
                    format!("`{key}` {} there, {} here", shown(then), shown(now))
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        if !others.is_empty() {
            return Err(EditError::Invalid(format!(
                "shard folder {} was run with other settings than {} ({}): a merged summary would mix them; merge the shards of one batch",
                dir.display(),
                first.display(),
                named(&others)
            ))
            .into());
        }
        if !paths.is_empty() {
            warnings.push(format!(
                "shard folder {} names the `generator`'s files at other paths than {} (the same weights on another machine, or other weights?): {}",
                dir.display(),
                first.display(),
                named(&paths)
            ));
        }
    }
    Ok(warnings)
}

/// The leaves of two JSON values that differ, as (dotted key under `prefix`, then, now); a
/// leaf one side lacks is `null` there.
fn differing_leaves(
    prefix: &str,
    then: &serde_json::Value,
    now: &serde_json::Value,
) -> Vec<(String, serde_json::Value, serde_json::Value)> {
    use serde_json::Value;
    match (then, now) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter()
                .flat_map(|key| {
                    differing_leaves(
                        &format!("{prefix}.{key}"),
                        a.get(key).unwrap_or(&Value::Null),
                        b.get(key).unwrap_or(&Value::Null),
                    )
                })
                .collect()
        }
        _ if then == now => Vec::new(),
        _ => vec![(prefix.to_string(), then.clone(), now.clone())],
    }
}

/// Whether a generator setting (a key of [`differing_leaves`]) names where weights are,
/// not what they are: FLUX's files and folders, and its LoRA (a file, or a released one's
/// name).
fn is_weight_path(key: &str) -> bool {
    const PATHS: [&str; 6] = [
        "model_dir",
        "transformer",
        "vae",
        "text_encoders",
        "t5",
        "lora",
    ];
    key.strip_prefix("generator.flux.")
        .is_some_and(|field| PATHS.contains(&field))
}

/// A setting's value as a message shows it: an `f32` stored as JSON's `f64`
/// (`0.8999999761581421`) as the `f32` it was (`0.9`).
fn shown(value: &serde_json::Value) -> String {
    match value.as_f64() {
        Some(f) if value.is_f64() && f64::from(f as f32) == f => format!("{}", f as f32),
        _ => value.to_string(),
    }
}

/// Which shards of the split(s) the records do not cover.
fn missing_shards(records: &[ShardRecord]) -> Vec<String> {
    let counts: std::collections::BTreeSet<usize> = records.iter().map(|r| r.count).collect();
    if counts.len() > 1 {
        return vec![format!(
            "the shards come from different splits (counts {counts:?}); the merge may double or miss items"
        )];
    }
    let Some(&count) = counts.first() else {
        return Vec::new();
    };
    let have: std::collections::BTreeSet<usize> = records.iter().map(|r| r.index).collect();
    let missing: Vec<String> = (0..count)
        .filter(|i| !have.contains(i))
        .map(|i| format!("{i}/{count}"))
        .collect();
    if missing.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "shard(s) {} are missing: the merged summary covers {} of {count} shards",
            missing.join(", "),
            have.len()
        )]
    }
}
