//! Small deterministic backends for tests that need real seeds (test code only).
#![allow(dead_code)]

use async_trait::async_trait;
use candle_core::{DType, Tensor};
use icedit_scale::edit::EditContext;
use icedit_scale::error::GenerateError;
use icedit_scale::generate::{DecodePurpose, Generator, GeneratorInfo, PreparedEdit};
use icedit_scale::judge::{
    CallUsage, Comparison, Judge, JudgeError, Preference, PreviewStage, ScreenVerdict, SubScores,
};
use icedit_scale::models::flux::scheduler::DynamicShift;
use image::{Rgb, RgbImage};

/// Flows each latent element to the sign of where it is heading (a two-point mixture per
/// element), so different seeds end in different images.
pub struct SignGenerator;

impl Generator for SignGenerator {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            settings: serde_json::Value::Null,
            name: "sign".into(),
            detail: "test".into(),
            max_batch: 4,
        }
    }
    fn prepare(&mut self, edit: &EditContext) -> Result<PreparedEdit, GenerateError> {
        let (w, h) = edit.panel_size();
        let image_tokens = (w as usize / 16) * (h as usize / 8);
        Ok(PreparedEdit {
            key: 0,
            image_tokens,
            latent_shape: vec![8],
            mu: DynamicShift::FLUX.mu(image_tokens),
        })
    }
    fn velocity(
        &mut self,
        _edit: &PreparedEdit,
        latents: &Tensor,
        sigma: f64,
    ) -> Result<Tensor, GenerateError> {
        let x0 = latents.sign()?;
        Ok(((latents - x0)? / sigma)?)
    }
    fn decode(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        _purpose: DecodePurpose,
    ) -> Result<RgbImage, GenerateError> {
        let _ = edit;
        let v: Vec<f32> = latents.to_vec1()?;
        let positives = v.iter().filter(|&&x| x > 0.0).count() as u8;
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let shade = ((mean + 1.0) * 127.0).clamp(0.0, 255.0) as u8;
        Ok(RgbImage::from_pixel(16, 16, Rgb([positives, shade, 0])))
    }
    fn release(&mut self, _edit: &PreparedEdit) {}
}

/// Scores by the number of positive latents the image shows; fails every call for
/// instructions containing "outage".
pub struct PixelJudge;

fn value(image: &RgbImage) -> f32 {
    image.get_pixel(0, 0)[0] as f32 * 10.0 / 8.0
}

fn usage() -> CallUsage {
    CallUsage {
        prompt_tokens: 5,
        completion_tokens: 1,
        ..CallUsage::default()
    }
}

fn outage(edit: &EditContext) -> Result<(), JudgeError> {
    if edit.instruction.contains("outage") {
        return Err(JudgeError::Http {
            status: 503,
            body: "service unavailable".into(),
        });
    }
    Ok(())
}

#[async_trait]
impl Judge for PixelJudge {
    fn name(&self) -> String {
        "pixel".into()
    }
    async fn screen(
        &self,
        edit: &EditContext,
        preview: &RgbImage,
        _stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        outage(edit)?;
        let score = value(preview);
        Ok(ScreenVerdict {
            pass: score >= 5.0,
            score,
            reasoning: "pixel".into(),
            usage: usage(),
        })
    }
    async fn compare(
        &self,
        edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        outage(edit)?;
        let preferred = if value(first) >= value(second) {
            Preference::First
        } else {
            Preference::Second
        };
        Ok(Comparison {
            preferred,
            p_first: None,
            reasoning: String::new(),
            usage: usage(),
        })
    }
    async fn semantic_consistency(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        outage(edit)?;
        Ok(SubScores {
            scores: [value(edited), 9.0],
            passes: Vec::new(),
            reasoning: String::new(),
            usage: usage(),
        })
    }
    async fn perceptual_quality(
        &self,
        edit: &EditContext,
        _edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        outage(edit)?;
        Ok(SubScores {
            scores: [8.0, 9.0],
            passes: Vec::new(),
            reasoning: String::new(),
            usage: usage(),
        })
    }
}

/// Largest absolute difference between two tensors of the same shape, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Copies the folder `from` to `to`, recursively.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

/// Runs the CLI from the repository root with `args`.
pub fn cli(args: &[&str]) -> std::process::Output {
    cli_env(&[], args)
}

/// Runs the CLI from the repository root with extra environment variables.
pub fn cli_env(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_icedit-scale"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

/// The reference inputs of one case, exactly as transformers saw them.
pub fn reference_prompt(
    refs: &std::collections::HashMap<String, Tensor>,
    case: &str,
) -> icedit_scale::models::qwen_vl::EncodedPrompt {
    let ids: Vec<u32> = refs[&format!("{case}_input_ids")]
        .get(0)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let Some(grids) = refs.get(&format!("{case}_image_grid_thw")) else {
        return icedit_scale::models::qwen_vl::EncodedPrompt {
            ids,
            images: Vec::new(),
        };
    };
    let grids = grids.to_vec2::<i64>().unwrap();
    let pixels = &refs[&format!("{case}_pixel_values")];
    let mut row = 0;
    let images = grids
        .iter()
        .map(|g| {
            let grid_thw = [g[0] as usize, g[1] as usize, g[2] as usize];
            let n = grid_thw.iter().product::<usize>();
            let pixel_values = pixels
                .narrow(0, row, n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            row += n;
            icedit_scale::models::qwen_vl::image::PreparedImage {
                pixel_values,
                grid_thw,
            }
        })
        .collect();
    icedit_scale::models::qwen_vl::EncodedPrompt { ids, images }
}

pub mod hub_server;
pub mod server;

/// A preset file read the way a run reads it (`JudgeSpec`), as the local-judge settings it
/// must hold.
pub fn local_judge_config(
    path: &std::path::Path,
) -> Result<icedit_scale::judge::qwen_vl::LocalJudgeConfig, JudgeError> {
    use icedit_scale::backends::{JudgeKind, JudgeSpec};
    match JudgeSpec::from_file(path)?.kind {
        JudgeKind::Local(config) => Ok(config),
        other => panic!("{}: not a local judge preset: {other:?}", path.display()),
    }
}

/// A local judge from a preset file, on the CPU in f32.
pub fn local_judge(
    path: &std::path::Path,
) -> Result<icedit_scale::judge::qwen_vl::Qwen2VlJudge, JudgeError> {
    icedit_scale::judge::qwen_vl::Qwen2VlJudge::new(
        local_judge_config(path)?,
        candle_core::Device::Cpu,
        DType::F32,
    )
}
