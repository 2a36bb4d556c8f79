//! Composite judges: screening by one judge, comparing by another, VIE scores averaged over
//! several; a member's failure fails the call (never a score made of the rest).

use std::sync::Arc;

use async_trait::async_trait;
use icedit_scale::edit::EditContext;
use icedit_scale::judge::composite::CompositeJudge;
use icedit_scale::judge::{
    vie_score, CallUsage, Comparison, Judge, JudgeError, Preference, PreviewStage, ScreenVerdict,
    SubScores,
};
use image::RgbImage;

/// Answers every call with fixed numbers (or fails every VIE call); with `passes`, each VIE
/// call answers as a self-ensemble of those (semantic, perceptual) passes.
struct Fixed {
    name: &'static str,
    sc: [f32; 2],
    pq: [f32; 2],
    fails: bool,
    passes: Vec<([f32; 2], [f32; 2])>,
}

/// A member's answer: `scores`, or the mean pair of `passes` with the passes kept.
fn answer(name: &str, scores: [f32; 2], passes: Vec<[f32; 2]>) -> SubScores {
    let mut s = SubScores::new(scores, name, spent(10));
    if !passes.is_empty() {
        let n = passes.len() as f32;
        s.scores = [0, 1].map(|k| passes.iter().map(|p| p[k]).sum::<f32>() / n);
        s.passes = passes;
    }
    s
}

fn spent(tokens: u64) -> CallUsage {
    CallUsage {
        prompt_tokens: tokens,
        completion_tokens: 1,
        attempts: 1,
        ..CallUsage::default()
    }
}

#[async_trait]
impl Judge for Fixed {
    fn name(&self) -> String {
        self.name.into()
    }
    async fn screen(
        &self,
        _: &EditContext,
        _: &RgbImage,
        _: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        Ok(ScreenVerdict {
            pass: true,
            score: self.sc[0],
            reasoning: self.name.into(),
            usage: spent(5),
        })
    }
    async fn compare(
        &self,
        _: &EditContext,
        _: &RgbImage,
        _: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        Ok(Comparison {
            preferred: Preference::Second,
            p_first: None,
            reasoning: self.name.into(),
            usage: spent(7),
        })
    }
    async fn semantic_consistency(
        &self,
        _: &EditContext,
        _: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        if self.fails {
            return Err(JudgeError::parse("no score", "gibberish").with_usage(spent(11)));
        }
        Ok(answer(
            self.name,
            self.sc,
            self.passes.iter().map(|p| p.0).collect(),
        ))
    }
    async fn perceptual_quality(
        &self,
        _: &EditContext,
        _: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        if self.fails {
            return Err(JudgeError::Timeout("slow".into()));
        }
        Ok(answer(
            self.name,
            self.pq,
            self.passes.iter().map(|p| p.1).collect(),
        ))
    }
}

fn judge(name: &'static str, sc: [f32; 2], pq: [f32; 2], fails: bool) -> Arc<dyn Judge> {
    Arc::new(Fixed {
        name,
        sc,
        pq,
        fails,
        passes: Vec::new(),
    })
}

#[tokio::test]
async fn roles_go_to_their_judges_and_scores_are_the_mean_of_every_member() {
    let edit = EditContext::new("e", RgbImage::new(16, 16), "make it red");
    let img = RgbImage::new(16, 16);
    let screen = judge("screener", [3.0, 3.0], [3.0, 3.0], false);
    let a = judge("a", [8.0, 4.0], [9.0, 10.0], false);
    let b = judge("b", [6.0, 10.0], [4.0, 4.0], false);
    let composite = CompositeJudge::new(None, screen, None, vec![a, b]).unwrap();
    let stage = PreviewStage { step: 2, steps: 28 };
    let verdict = composite.screen(&edit, &img, stage).await.unwrap();
    assert_eq!(
        (verdict.score, verdict.reasoning.as_str()),
        (3.0, "screener")
    );
    // No compare judge: the screening judge compares.
    assert_eq!(
        composite
            .compare(&edit, &img, &img)
            .await
            .unwrap()
            .reasoning,
        "screener"
    );
    let vie = vie_score(&composite, &edit, &img).await.unwrap();
    // SC pairs (8, 4) and (6, 10): mean pair (7, 7); SC = mean of each member's min = 5.
    assert_eq!(vie.semantic.scores, [7.0, 7.0]);
    assert_eq!(vie.sc(), 5.0);
    // O = mean of the members' O: (sqrt(4 * 9) + sqrt(6 * 4)) / 2.
    assert!((vie.overall() - (6.0 + 24f32.sqrt()) / 2.0).abs() < 1e-6);
    assert_eq!(vie.semantic.usage.prompt_tokens, 20, "both members' cost");
    assert!(
        composite.name().contains("mean of [a, b]"),
        "{}",
        composite.name()
    );
}

/// A member that asked several times enters with each pass's minimum, not the minimum of
/// its mean pair (which overstates it: passes (8, 2) and (2, 8) mean (5, 5), yet each pass's
/// SC is 2), and weighs as much as a member that asked once.
#[tokio::test]
async fn a_self_ensemble_member_enters_with_its_own_sc_pq_and_o() {
    let edit = EditContext::new("e", RgbImage::new(16, 16), "make it red");
    let img = RgbImage::new(16, 16);
    let ensemble = Arc::new(Fixed {
        name: "ensemble",
        sc: [0.0, 0.0],
        pq: [0.0, 0.0],
        fails: false,
        passes: vec![([8.0, 2.0], [9.0, 9.0]), ([2.0, 8.0], [4.0, 4.0])],
    });
    let single = judge("single", [6.0, 6.0], [1.0, 1.0], false);
    let own = vie_score(ensemble.as_ref(), &edit, &img).await.unwrap();
    assert_eq!((own.sc(), own.pq()), (2.0, 6.5));
    // Its own O: the mean of each pass's sqrt(2 * 9) and sqrt(2 * 4).
    let own_o = (18f32.sqrt() + 8f32.sqrt()) / 2.0;
    assert!((own.overall() - own_o).abs() < 1e-6);

    let composite =
        CompositeJudge::new(None, single.clone(), None, vec![ensemble.clone(), single]).unwrap();
    let vie = vie_score(&composite, &edit, &img).await.unwrap();
    assert_eq!(
        vie.semantic.scores,
        [5.5, 5.5],
        "the mean of the members' pairs"
    );
    assert_eq!(vie.sc(), (2.0 + 6.0) / 2.0);
    assert_eq!(vie.pq(), (6.5 + 1.0) / 2.0);
    assert!((vie.overall() - (own_o + 6f32.sqrt()) / 2.0).abs() < 1e-6);

    // A panel of that member alone scores as the member does.
    let alone = CompositeJudge::new(None, ensemble.clone(), None, vec![ensemble]).unwrap();
    let vie = vie_score(&alone, &edit, &img).await.unwrap();
    assert_eq!((vie.sc(), vie.pq()), (own.sc(), own.pq()));
    assert!((vie.overall() - own_o).abs() < 1e-6);
}

#[tokio::test]
async fn a_failing_member_fails_the_call_and_its_cost_is_kept() {
    let edit = EditContext::new("e", RgbImage::new(16, 16), "make it red");
    let img = RgbImage::new(16, 16);
    let good = judge("good", [8.0, 8.0], [8.0, 8.0], false);
    let broken = judge("broken", [0.0, 0.0], [0.0, 0.0], true);
    let compare = judge("comparer", [1.0, 1.0], [1.0, 1.0], false);
    let composite =
        CompositeJudge::new(None, good.clone(), Some(compare), vec![good, broken]).unwrap();
    match composite.semantic_consistency(&edit, &img).await {
        Err(e @ JudgeError::Parse { .. }) => {
            assert!(e.to_string().contains("broken"), "{e}");
            assert_eq!(
                e.usage().unwrap().prompt_tokens,
                21,
                "good's 10 and broken's 11"
            );
        }
        other => panic!("expected the member's failure, got {other:?}"),
    }
    let err = composite.perceptual_quality(&edit, &img).await.unwrap_err();
    assert!(
        err.to_string().contains("broken") && err.to_string().contains("slow"),
        "{err}"
    );
    assert!(
        vie_score(&composite, &edit, &img).await.is_err(),
        "no score from half a panel"
    );
    // The other roles are unaffected.
    assert_eq!(
        composite
            .compare(&edit, &img, &img)
            .await
            .unwrap()
            .reasoning,
        "comparer"
    );
    assert!(composite
        .screen(&edit, &img, PreviewStage { step: 1, steps: 2 })
        .await
        .is_ok());
}

#[test]
fn composite_presets_load_their_members_and_judge_eval_counts_member_failures() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write(
        "steady.toml",
        "kind = \"testbed\"\nfailure_rate = 0.0\nnoise = 0.5\n",
    );
    write("mute.toml", "kind = \"testbed\"\nfailure_rate = 1.0\n");
    write(
        "panel.toml",
        "kind = \"composite\"\nscreen = \"steady.toml\"\nscore = [\"steady.toml\", \"mute.toml\"]\n",
    );
    write(
        "nested.toml",
        "kind = \"composite\"\nscreen = \"panel.toml\"\nscore = [\"steady.toml\"]\n",
    );
    let out = dir.path().join("out");
    let run = |preset: &str, out: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_icedit-scale"))
            .args([
                "judge-eval",
                "--data",
                "testbed:6",
                "--width",
                "96",
                "--judge",
            ])
            .arg(dir.path().join(preset))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let output = run("panel.toml", &out);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    // Pairs are compared by the steady screening judge; every rating's VIE call has a
    // mute member, so none is rated.
    assert_eq!(results["pairs"]["answered"], 6);
    assert_eq!(results["ratings"]["answered"], 0);
    assert_eq!(results["ratings"]["spearman"], serde_json::Value::Null);
    assert_eq!(results["cost"]["failed_calls"], 12);
    let output = run("nested.toml", &dir.path().join("out2"));
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("cannot be a composite"), "{err}");
}

/// The judge preset files of a run are read once each, a composite's members included
/// (however many roles a member plays): every read is logged, and the log is counted.
#[test]
fn a_run_reads_each_judge_preset_file_once() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let a = write("a.toml", "kind = \"testbed\"\nseed = 1\n");
    let b = write("b.toml", "kind = \"testbed\"\nseed = 2\nnoise = 0.5\n");
    let composite = write(
        "panel.toml",
        "kind = \"composite\"\nscreen = \"a.toml\"\ncompare = \"b.toml\"\nscore = [\"a.toml\", \"b.toml\"]\n",
    );
    let out = dir.path().join("out");
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_icedit-scale"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "icedit_scale::preset=debug")
        .args([
            "edit",
            "--image",
            "tests/fixtures/flux/source.png",
            "--instruction",
            "make the sky night",
            "--width",
            "32",
            "--seeds",
            "4",
            "--probe-steps",
            "2",
            "--steps",
            "6",
            "--strategy",
            "tournament",
            "--judge",
        ])
        .arg(&composite)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(out.join("report.json").is_file());
    for file in [&composite, &a, &b] {
        let reads = stderr
            .lines()
            .filter(|l| l.contains("read judge preset") && l.contains(&*file.to_string_lossy()))
            .count();
        assert_eq!(reads, 1, "{} read {reads} times:\n{stderr}", file.display());
    }
}
