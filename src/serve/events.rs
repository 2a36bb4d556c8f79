//! The server's side of an edit's events: [`EventSink`] receives the engine's
//! [`EditEvent`]s (on the generator thread or a judge task), and [`relay`] turns them, in
//! order, into [`ServerEvent`]s for the edit's Server-Sent Events stream, writing the
//! images they carry into the edit's folder first so every event names a file that exists.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::outputs::{candidate_stem, save_png};
use crate::engine::report::Judged;
use crate::engine::{EditEvent, Progress};

/// One event of an edit's stream: its number in the stream (from 0), its SSE event name
/// and its JSON data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEvent {
    /// Position in the edit's stream (SSE `id`).
    pub seq: u64,
    /// SSE event name: `queued`, `started`, `spawned`, `step`, `live`, `screened`,
    /// `selected`, `finished`, `scored`, `compared`, then one of `done`, `failed`,
    /// `cancelled`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The event's fields.
    pub data: Value,
}

impl ServerEvent {
    /// Whether this event ends the stream.
    pub fn is_last(&self) -> bool {
        matches!(self.kind.as_str(), "done" | "failed" | "cancelled")
    }
}

/// A [`Progress`] that forwards the engine's events to the edit's relay; phase bars are
/// not drawn (the `step` events carry the same).
pub struct EventSink(mpsc::UnboundedSender<EditEvent>);

impl EventSink {
    /// A sink and the receiver [`relay`] reads.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<EditEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }
}

impl Progress for EventSink {
    fn begin(&self, _: &str, _: u64) {}
    fn inc(&self, _: u64) {}
    fn end(&self) {}
    fn event(&self, event: EditEvent) {
        // The relay outlives the run; a send fails only if it died, and then nobody watches.
        let _ = self.0.send(event);
    }
}

/// Writes a PNG by renaming a finished temporary file over it, so a reader never sees half
/// a file. Not fsynced: a live preview is overwritten at the next step and is no output.
fn save_live_png(dir: &Path, rel: &str, image: &RgbImage) -> std::io::Result<()> {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("png.part");
    image
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(std::io::Error::other)?;
    std::fs::rename(&tmp, &path)
}

/// Reads the engine's events for edit `id` until the run drops its sink, writes the images
/// they carry under `dir`, and hands each [`ServerEvent`] (without its `seq`, which the job
/// assigns) to `publish`, in order. Returns the outputs it wrote (previews, short runs,
/// finals: durably, as the edit's outputs would write them), which the job's own output
/// writing then leaves alone.
pub async fn relay(
    id: String,
    dir: PathBuf,
    mut events: mpsc::UnboundedReceiver<EditEvent>,
    publish: impl Fn(&str, Value),
) -> HashSet<String> {
    let mut seeds: HashMap<usize, u64> = HashMap::new();
    let mut outputs = HashSet::new();
    let url = |rel: &str| format!("/v1/edits/{id}/files/{rel}");
    // An output written (a preview, a short run, a final): kept in the list, linked.
    let mut output_url = |rel: String| {
        let link = url(&rel);
        outputs.insert(rel);
        link
    };
    while let Some(event) = events.recv().await {
        // An image is written before its event goes out, off the async threads.
        let write = |rel: String, image: Arc<RgbImage>| {
            let dir = dir.clone();
            let r = rel.clone();
            async move {
                let written = tokio::task::spawn_blocking(move || {
                    if r.starts_with("live/") {
                        save_live_png(&dir, &r, &image).map_err(|e| e.to_string())
                    } else {
                        save_png(&dir, &r, &image)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    }
                })
                .await;
                match written {
                    Ok(Ok(())) => Some(rel),
                    Ok(Err(e)) => {
                        tracing::warn!("writing {rel}: {e}");
                        None
                    }
                    Err(e) => {
                        tracing::warn!("writing {rel}: {e}");
                        None
                    }
                }
            }
        };
        let seed = |i: usize| seeds.get(&i).copied().unwrap_or_default();
        let (kind, data) = match event {
            EditEvent::Spawned { candidates } => {
                seeds.extend(candidates.iter().copied());
                let list: Vec<Value> = candidates
                    .iter()
                    .map(|&(index, seed)| json!({"index": index, "seed": seed}))
                    .collect();
                ("spawned", json!({ "candidates": list }))
            }
            EditEvent::Step {
                phase,
                candidates,
                step,
                to_step,
                steps,
            } => (
                "step",
                json!({"phase": phase, "candidates": candidates, "step": step,
                       "to_step": to_step, "steps": steps}),
            ),
            EditEvent::LivePreview {
                candidate,
                step,
                image,
            } => {
                // One file per candidate, overwritten each step: a 50-step run would
                // otherwise leave N x 50 images behind.
                let rel = format!("live/{}.png", candidate_stem(candidate, seed(candidate)));
                let Some(rel) = write(rel, image).await else {
                    continue;
                };
                (
                    "live",
                    json!({"candidate": candidate, "step": step,
                           "url": format!("{}?step={step}", url(&rel))}),
                )
            }
            EditEvent::Screened {
                candidate,
                step,
                image,
                verdict,
            } => {
                let rel = format!(
                    "previews/{}_step{step:02}.png",
                    candidate_stem(candidate, seed(candidate))
                );
                let file = write(rel, image).await.map(&mut output_url);
                let mut data = json!({"candidate": candidate, "step": step, "url": file});
                match verdict {
                    Judged::Ok(v) => {
                        data["pass"] = json!(v.pass);
                        data["score"] = json!(v.score);
                        data["reasoning"] = json!(v.reasoning);
                    }
                    Judged::Failed(e) => data["failed"] = json!(e.to_string()),
                }
                ("screened", data)
            }
            EditEvent::Selected {
                step,
                kept,
                dropped,
            } => (
                "selected",
                json!({"step": step, "kept": kept, "dropped": dropped}),
            ),
            EditEvent::Finished { candidate, image } => {
                let rel = format!("finals/{}.png", candidate_stem(candidate, seed(candidate)));
                let file = write(rel, image).await.map(&mut output_url);
                ("finished", json!({"candidate": candidate, "url": file}))
            }
            EditEvent::Scored { candidate, vie } => {
                let data = match vie {
                    None => json!({"candidate": candidate, "unscored": true}),
                    Some(Judged::Ok(v)) => json!({"candidate": candidate, "sc": v.sc,
                                                  "pq": v.pq, "overall": v.overall}),
                    Some(Judged::Failed(e)) => {
                        json!({"candidate": candidate, "failed": e.to_string()})
                    }
                };
                ("scored", data)
            }
            EditEvent::ShortRun { candidate, image } => {
                let rel = format!("short/{}.png", candidate_stem(candidate, seed(candidate)));
                let file = write(rel, image).await.map(&mut output_url);
                ("short_run", json!({"candidate": candidate, "url": file}))
            }
            EditEvent::Compared {
                champion,
                challenger,
                winner,
                decision,
            } => (
                "compared",
                json!({"champion": champion, "challenger": challenger, "winner": winner,
                       "decision": decision}),
            ),
        };
        publish(kind, data);
    }
    outputs
}
