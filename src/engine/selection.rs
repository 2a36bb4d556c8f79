//! Pure decision rules of the strategies: which candidates survive screening, who wins a
//! comparison, which finished edit is returned. Ties and all-fail cases are explicit and
//! come back as notes for the report.

use std::cmp::Ordering;

use super::report::{CandidateRecord, Pick};
use crate::judge::{Comparison, Preference, ScreenVerdict};

/// Orders screened candidates: higher score first, then lower index (seed order).
fn by_score_then_index(a: (usize, f32), b: (usize, f32)) -> Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// Early-filter survivors: at most `keep` candidates that passed, best screen score first.
///
/// `verdicts[i]` is `None` when candidate i's screening failed. When nothing passed, the
/// best-scored `keep` are completed anyway; when every screening failed, the first `keep`
/// in seed order. Both fallbacks return a note.
pub fn select_survivors(
    verdicts: &[Option<&ScreenVerdict>],
    keep: usize,
) -> (Vec<usize>, Option<String>) {
    let scored = |only_passing: bool| {
        let mut v: Vec<(usize, f32)> = verdicts
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.filter(|v| v.pass || !only_passing).map(|v| (i, v.score)))
            .collect();
        v.sort_by(|&a, &b| by_score_then_index(a, b));
        v.into_iter().map(|(i, _)| i).take(keep).collect::<Vec<_>>()
    };
    let passing = scored(true);
    if !passing.is_empty() {
        return (passing, None);
    }
    let best = scored(false);
    if !best.is_empty() {
        let note = format!(
            "no preview passed screening; completing the {} best-scored candidate(s) anyway",
            best.len()
        );
        return (best, Some(note));
    }
    let first: Vec<usize> = (0..verdicts.len().min(keep)).collect();
    let note = format!(
        "screening failed for every candidate; completing the first {} in seed order",
        first.len()
    );
    (first, Some(note))
}

/// Successive-halving ranking: keep exactly `keep` (positions into `verdicts`): passing
/// candidates by score, then failing ones by score, then those whose screening failed.
pub fn rank_for_halving(
    verdicts: &[Option<&ScreenVerdict>],
    keep: usize,
) -> (Vec<usize>, Option<String>) {
    let mut order: Vec<usize> = (0..verdicts.len()).collect();
    let key = |i: usize| match verdicts[i] {
        Some(v) if v.pass => (0, v.score),
        Some(v) => (1, v.score),
        None => (2, 0.0),
    };
    order.sort_by(|&a, &b| {
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(kb.1.partial_cmp(&ka.1).unwrap_or(Ordering::Equal))
            .then(a.cmp(&b))
    });
    order.truncate(keep);
    let weak = order.iter().filter(|&&i| key(i).0 > 0).count();
    let note = (weak > 0).then(|| {
        format!(
            "{weak} kept candidate(s) did not pass screening (too few passed to fill the round)"
        )
    });
    (order, note)
}

/// Decides a champion-vs-challenger pair from the two orders it was asked in
/// (`champion_first` = [champion, challenger, source], `challenger_first` = swapped).
///
/// With probabilities from both orders, the position-debiased P(champion better) is their
/// mean; otherwise each answer is a vote. The challenger must win outright: ties, a split
/// decision and failures keep the champion. Returns (champion wins, how it was decided).
pub fn tournament_decision(
    champion_first: Option<&Comparison>,
    challenger_first: Option<&Comparison>,
) -> (bool, String) {
    if let (Some(a), Some(b)) = (champion_first, challenger_first) {
        if let (Some(pa), Some(pb)) = (a.p_first, b.p_first) {
            let p_champion = 0.5 * (pa + (1.0 - pb));
            return if p_champion < 0.5 {
                (
                    false,
                    format!("P(champion better) = {p_champion:.3} over both orders"),
                )
            } else {
                (
                    true,
                    format!("P(champion better) = {p_champion:.3} over both orders; champion kept"),
                )
            };
        }
    }
    let mut champion_votes = 0;
    let mut challenger_votes = 0;
    if let Some(c) = champion_first {
        match c.preferred {
            Preference::First => champion_votes += 1,
            Preference::Second => challenger_votes += 1,
            Preference::Tie => {}
        }
    }
    if let Some(c) = challenger_first {
        match c.preferred {
            Preference::First => challenger_votes += 1,
            Preference::Second => champion_votes += 1,
            Preference::Tie => {}
        }
    }
    let answered = champion_first.is_some() as u8 + challenger_first.is_some() as u8;
    let decision = match (answered, challenger_votes.cmp(&champion_votes)) {
        (0, _) => "both comparisons failed; champion kept".to_string(),
        (_, Ordering::Greater) => format!(
            "challenger preferred {challenger_votes}-{champion_votes} over {answered} answer(s)"
        ),
        (_, Ordering::Equal) => format!(
            "tie {challenger_votes}-{champion_votes} (position bias or equal quality); champion kept"
        ),
        (_, Ordering::Less) => format!("champion preferred {champion_votes}-{challenger_votes}"),
    };
    (challenger_votes <= champion_votes, decision)
}

/// The finished candidates after `pick`, best first, at most `n` of them: the ones a
/// `refine_best` refines beside the pick. Ranked as [`pick_best`] ranks (VIE O, then screen
/// score, then seed order), unscored ones after the scored.
pub fn runner_ups(candidates: &[CandidateRecord], pick: usize, n: usize) -> Vec<usize> {
    let key = |c: &CandidateRecord| {
        (
            c.overall().unwrap_or(f32::NEG_INFINITY),
            c.last_screen_score().unwrap_or(f32::NEG_INFINITY),
        )
    };
    let mut finished: Vec<usize> = candidates
        .iter()
        .filter(|c| c.index != pick && c.images.final_image.is_some())
        .map(|c| c.index)
        .collect();
    finished.sort_by(|&a, &b| {
        let (ka, kb) = (key(&candidates[a]), key(&candidates[b]));
        kb.0.partial_cmp(&ka.0)
            .unwrap_or(Ordering::Equal)
            .then(kb.1.partial_cmp(&ka.1).unwrap_or(Ordering::Equal))
            .then(a.cmp(&b))
    });
    finished.truncate(n);
    finished
}

/// The returned edit among candidate indices `among`: the highest VIE O; ties go to the
/// better screen score, then the lower index. If none could be scored, the first of
/// `among` (which callers order by screening rank) is returned, with a note.
pub fn pick_best(
    candidates: &[CandidateRecord],
    among: &[usize],
) -> (Option<Pick>, Option<String>) {
    let mut scored: Vec<(usize, f32)> = among
        .iter()
        .filter_map(|&i| candidates[i].overall().map(|o| (i, o)))
        .collect();
    scored.sort_by(|&(a, oa), &(b, ob)| {
        ob.partial_cmp(&oa)
            .unwrap_or(Ordering::Equal)
            .then_with(|| {
                let (sa, sb) = (
                    candidates[a].last_screen_score().unwrap_or(f32::MIN),
                    candidates[b].last_screen_score().unwrap_or(f32::MIN),
                );
                sb.partial_cmp(&sa)
                    .unwrap_or(Ordering::Equal)
                    .then(a.cmp(&b))
            })
    });
    if let Some(&(index, overall)) = scored.first() {
        let tied = scored.iter().filter(|&&(_, o)| o == overall).count();
        let note = (tied > 1).then(|| {
            format!(
                "{tied} candidates tied at VIE O {overall:.2}; broken by screen score, then seed order"
            )
        });
        let pick = Pick {
            index,
            seed: candidates[index].seed,
            overall: Some(overall),
            reason: format!("highest VIE O ({overall:.2}) of {} scored", scored.len()),
        };
        return (Some(pick), note);
    }
    let Some(&index) = among.first() else {
        return (None, None);
    };
    // Say how the fallback was chosen: by the screen where there was a score (`among` is in
    // screen order then), else by seed order (best-of-n and random screen nothing).
    let reason = if candidates[index].last_screen_score().is_some() {
        "no finished candidate could be scored; returned the top-screened one"
    } else {
        "no finished candidate could be scored; returned the first in seed order (no screen score to rank by)"
    };
    let pick = Pick {
        index,
        seed: candidates[index].seed,
        overall: None,
        reason: reason.into(),
    };
    (
        Some(pick),
        Some("VIE scoring failed for every finished candidate".into()),
    )
}
