//! Procedural scenes and an instruction grammar with exactly rendered targets.
//!
//! A scene is a plain background with a few flat shapes; an edit is one operation on it
//! (recolour, remove, add, move, change the background). Everything is deterministic from
//! a scene seed, and the target is rendered by the same painter as the source.

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Named colours the grammar uses.
pub const COLOURS: [(&str, [u8; 3]); 7] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 210, 40]),
    ("purple", [140, 60, 180]),
    ("orange", [240, 140, 30]),
    ("white", [245, 245, 245]),
];

/// Background colours (muted so shapes stand out).
pub const BACKGROUNDS: [(&str, [u8; 3]); 4] = [
    ("grey", [128, 128, 128]),
    ("black", [20, 20, 20]),
    ("sand", [200, 180, 140]),
    ("teal", [40, 110, 110]),
];

/// Shape kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShapeKind {
    /// A filled circle.
    Circle,
    /// A filled axis-aligned square.
    Square,
    /// A filled upward triangle.
    Triangle,
}

impl ShapeKind {
    fn name(self) -> &'static str {
        match self {
            Self::Circle => "circle",
            Self::Square => "square",
            Self::Triangle => "triangle",
        }
    }
}

/// One shape, in coordinates relative to the panel (0..1), so a scene renders at any size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    /// Kind.
    pub kind: ShapeKind,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Centre x (0..1).
    pub x: f32,
    /// Centre y (0..1).
    pub y: f32,
    /// Half-size relative to the panel width.
    pub size: f32,
}

impl Shape {
    /// "red circle".
    pub fn describe(&self) -> String {
        format!("{} {}", COLOURS[self.colour].0, self.kind.name())
    }

    fn contains(&self, px: f32, py: f32, w: f32, h: f32) -> bool {
        let (cx, cy, r) = (self.x * w, self.y * h, self.size * w);
        let (dx, dy) = (px - cx, py - cy);
        match self.kind {
            ShapeKind::Circle => dx * dx + dy * dy <= r * r,
            ShapeKind::Square => dx.abs() <= r && dy.abs() <= r,
            ShapeKind::Triangle => {
                // Apex at the top; the half-width grows linearly down to the base.
                dy >= -r && dy <= r && dx.abs() <= (dy + r) / 2.0
            }
        }
    }
}

/// A scene: a background and shapes painted in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    /// Index into [`BACKGROUNDS`] or [`COLOURS`] (when `background_is_colour`).
    pub background: [u8; 3],
    /// Shapes, painted first to last.
    pub shapes: Vec<Shape>,
}

impl Scene {
    /// Renders the scene at `width` x `height`.
    pub fn render(&self, width: u32, height: u32) -> RgbImage {
        let (w, h) = (width as f32, height as f32);
        RgbImage::from_fn(width, height, |x, y| {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let colour = self
                .shapes
                .iter()
                .rev()
                .find(|s| s.contains(px, py, w, h))
                .map_or(self.background, |s| COLOURS[s.colour].1);
            Rgb(colour)
        })
    }
}

/// One edit operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum EditOp {
    /// Recolour shape `target` to colour `colour`.
    Recolour {
        /// Shape index.
        target: usize,
        /// New colour index.
        colour: usize,
    },
    /// Remove shape `target`.
    Remove {
        /// Shape index.
        target: usize,
    },
    /// Add a shape.
    Add {
        /// The new shape.
        shape: Shape,
    },
    /// Move shape `target` horizontally by `dx` (panel fraction).
    Move {
        /// Shape index.
        target: usize,
        /// Offset.
        dx: f32,
    },
    /// Change the background colour.
    Background {
        /// New background.
        colour: [u8; 3],
        /// Its name.
        name: String,
    },
}

/// A scene with its edit: the full ground truth of a testbed item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SceneEdit {
    /// The source scene.
    pub scene: Scene,
    /// The operation the instruction asks for.
    pub op: EditOp,
    /// The instruction in words.
    pub instruction: String,
}

impl EditOp {
    /// The task type of the operation, for per-task breakdowns.
    pub fn task(&self) -> &'static str {
        match self {
            Self::Recolour { .. } => "recolour",
            Self::Remove { .. } => "remove",
            Self::Add { .. } => "add",
            Self::Move { .. } => "move",
            Self::Background { .. } => "background",
        }
    }
}

impl SceneEdit {
    /// Generates a scene and an edit, deterministically from `seed`.
    pub fn generate(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5ce9e);
        let background = BACKGROUNDS[rng.random_range(0..BACKGROUNDS.len())].1;
        let n = rng.random_range(2..=4);
        let mut shapes: Vec<Shape> = Vec::new();
        let mut used = Vec::new();
        while shapes.len() < n {
            let kind =
                [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle][rng.random_range(0..3)];
            let colour = rng.random_range(0..COLOURS.len());
            // Descriptions must be unique so the instruction names one shape.
            if used.contains(&(kind, colour)) {
                continue;
            }
            used.push((kind, colour));
            // Spread shapes over columns so they rarely overlap.
            let slot = shapes.len() as f32;
            shapes.push(Shape {
                kind,
                colour,
                x: (slot + 0.5) / n as f32 + rng.random_range(-0.04..0.04),
                y: rng.random_range(0.3..0.7),
                size: rng.random_range(0.07..0.11),
            });
        }
        let scene = Scene { background, shapes };
        let target = rng.random_range(0..n);
        let t = scene.shapes[target];
        let (op, instruction) = match rng.random_range(0..5) {
            0 => {
                let colour = other_colour(&mut rng, t.colour);
                (
                    EditOp::Recolour { target, colour },
                    format!("make the {} {}", t.describe(), COLOURS[colour].0),
                )
            }
            1 => (
                EditOp::Remove { target },
                format!("remove the {}", t.describe()),
            ),
            2 => {
                let kind = [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle]
                    [rng.random_range(0..3)];
                let shape = Shape {
                    kind,
                    colour: rng.random_range(0..COLOURS.len()),
                    x: rng.random_range(0.2..0.8),
                    y: if rng.random_bool(0.5) { 0.15 } else { 0.85 },
                    size: 0.08,
                };
                let where_ = if shape.y < 0.5 {
                    "at the top"
                } else {
                    "at the bottom"
                };
                (
                    EditOp::Add { shape },
                    format!("add a {} {where_}", shape.describe()),
                )
            }
            3 => {
                let dx = if t.x > 0.5 { -0.2 } else { 0.2 };
                let dir = if dx < 0.0 { "left" } else { "right" };
                (
                    EditOp::Move { target, dx },
                    format!("move the {} to the {dir}", t.describe()),
                )
            }
            _ => {
                let (name, colour) = loop {
                    let b = BACKGROUNDS[rng.random_range(0..BACKGROUNDS.len())];
                    if b.1 != background {
                        break b;
                    }
                };
                (
                    EditOp::Background {
                        colour,
                        name: name.to_string(),
                    },
                    format!("change the background to {name}"),
                )
            }
        };
        Self {
            scene,
            op,
            instruction,
        }
    }

    /// The scene after applying `op`.
    pub fn apply(scene: &Scene, op: &EditOp) -> Scene {
        let mut s = scene.clone();
        match op {
            EditOp::Recolour { target, colour } => s.shapes[*target].colour = *colour,
            EditOp::Remove { target } => {
                s.shapes.remove(*target);
            }
            EditOp::Add { shape } => s.shapes.push(*shape),
            EditOp::Move { target, dx } => s.shapes[*target].x += dx,
            EditOp::Background { colour, .. } => s.background = *colour,
        }
        s
    }

    /// The ground-truth target scene.
    pub fn target(&self) -> Scene {
        Self::apply(&self.scene, &self.op)
    }
}

fn other_colour(rng: &mut ChaCha8Rng, not: usize) -> usize {
    loop {
        let c = rng.random_range(0..COLOURS.len());
        if c != not {
            return c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_targets_differ_from_sources() {
        for seed in 0..40 {
            let a = SceneEdit::generate(seed);
            assert_eq!(a, SceneEdit::generate(seed));
            let src = a.scene.render(64, 64);
            let tgt = a.target().render(64, 64);
            assert_ne!(src, tgt, "seed {seed}: {}", a.instruction);
            assert!(!a.instruction.is_empty());
        }
        assert_ne!(SceneEdit::generate(1), SceneEdit::generate(2));
    }
}
