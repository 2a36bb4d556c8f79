//! Score-vs-NFE plots of an eval: one colour and marker per strategy family with a legend,
//! each arm's 95% interval, the Pareto front (no arm both cheaper and better) drawn and
//! labelled, and the random baseline as a reference line. Only front points carry labels,
//! placed so that none overlaps another; every arm is in `report.md`'s table.

use std::path::Path;

use plotters::prelude::*;

use super::stats::Estimate;
use crate::engine::StrategyKind;

/// A strategy family as the plots draw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// One seed.
    Random,
    /// Best-of-N and its prefixes.
    BestOfN,
    /// Early-filter.
    EarlyFilter,
    /// The paper's tournament.
    Tournament,
    /// Successive halving.
    SuccessiveHalving,
    /// Adaptive waves.
    Adaptive,
}

impl Family {
    /// The family of a strategy.
    pub fn of(kind: StrategyKind) -> Self {
        match kind {
            StrategyKind::Random => Self::Random,
            StrategyKind::BestOfN => Self::BestOfN,
            StrategyKind::EarlyFilter => Self::EarlyFilter,
            StrategyKind::Tournament => Self::Tournament,
            StrategyKind::SuccessiveHalving => Self::SuccessiveHalving,
            StrategyKind::Adaptive => Self::Adaptive,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Random => "random (one seed)",
            Self::BestOfN => "best-of-N",
            Self::EarlyFilter => "early-filter",
            Self::Tournament => "tournament",
            Self::SuccessiveHalving => "successive halving",
            Self::Adaptive => "adaptive",
        }
    }

    /// Colour-blind-safe colours (Okabe-Ito).
    fn colour(self) -> RGBColor {
        match self {
            Self::Random => RGBColor(0, 0, 0),
            Self::BestOfN => RGBColor(0, 114, 178),
            Self::EarlyFilter => RGBColor(230, 159, 0),
            Self::Tournament => RGBColor(0, 158, 115),
            Self::SuccessiveHalving => RGBColor(204, 121, 167),
            Self::Adaptive => RGBColor(213, 94, 0),
        }
    }
}

/// One plotted arm.
#[derive(Debug, Clone)]
pub struct Point {
    /// The arm's name (front points are labelled with it).
    pub arm: String,
    /// Its strategy family.
    pub family: Family,
    /// Mean NFE per item.
    pub nfe: f64,
    /// The value with its interval, on the axis' scale.
    pub value: Estimate,
}

/// Indices of the Pareto front of `points` (lower NFE, higher value), cheapest first.
fn pareto_front(points: &[Point]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| {
        points[a]
            .nfe
            .total_cmp(&points[b].nfe)
            .then(points[b].value.mean.total_cmp(&points[a].value.mean))
    });
    let mut front = Vec::new();
    let mut best = f64::NEG_INFINITY;
    for i in order {
        if points[i].value.mean > best {
            best = points[i].value.mean;
            front.push(i);
        }
    }
    front
}

/// What a plot shows.
pub struct PlotSpec<'a> {
    /// The caption.
    pub title: String,
    /// Y axis description.
    pub y_desc: &'a str,
    /// Whether the values are percentages (integer tick labels).
    pub percent: bool,
}

/// Writes one plot of `points` to `path`; nothing when there are none.
pub fn write_plot(spec: &PlotSpec, points: &[Point], path: &Path) -> anyhow::Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    let max_nfe = points.iter().map(|p| p.nfe).fold(1.0, f64::max) * 1.08;
    let lo = points
        .iter()
        .map(|p| p.value.lo)
        .fold(f64::INFINITY, f64::min);
    let hi = points
        .iter()
        .map(|p| p.value.hi)
        .fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.06).max(if spec.percent { 5.0 } else { 0.05 });
    let (lo, hi) = (lo - pad, hi + pad);
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&spec.title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_nfe, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("mean NFE per item (transformer forwards)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| {
            if spec.percent {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .y_desc(spec.y_desc)
        .light_line_style(WHITE.mix(0.0))
        .label_style(("sans-serif", 14))
        .draw()?;

    // The random baseline across the whole width.
    if let Some(r) = points.iter().find(|p| p.family == Family::Random) {
        let y = r.value.mean;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, y), (max_nfe, y)],
                6,
                4,
                BLACK.mix(0.6).stroke_width(1),
            ))?
            .label(format!("random baseline ({y:.2})"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.6)));
    }

    // The Pareto front, under the points.
    let front = pareto_front(points);
    let front_line: Vec<(f64, f64)> = front
        .iter()
        .map(|&i| (points[i].nfe, points[i].value.mean))
        .collect();
    chart
        .draw_series(LineSeries::new(
            front_line,
            RGBColor(120, 120, 120).stroke_width(2),
        ))?
        .label("Pareto front (no arm cheaper and better)")
        .legend(|(x, y)| {
            PathElement::new(
                vec![(x, y), (x + 18, y)],
                RGBColor(120, 120, 120).stroke_width(2),
            )
        });

    // Intervals, then markers; one legend entry per family.
    let mut families: Vec<Family> = points.iter().map(|p| p.family).collect();
    families.sort();
    families.dedup();
    for p in points {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(p.nfe, p.value.lo), (p.nfe, p.value.hi)],
            p.family.colour().mix(0.45),
        )))?;
    }
    for family in families {
        let members: Vec<&Point> = points.iter().filter(|p| p.family == family).collect();
        let at: Vec<(f64, f64)> = members.iter().map(|p| (p.nfe, p.value.mean)).collect();
        let colour = family.colour();
        // One shape per family, in the plot and in the legend.
        match family {
            Family::BestOfN => chart
                .draw_series(
                    at.iter()
                        .map(|&c| Circle::new(c, 4, colour.stroke_width(2))),
                )?
                .label(family.name())
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, colour.stroke_width(2))),
            Family::EarlyFilter => chart
                .draw_series(
                    at.iter()
                        .map(|&c| TriangleMarker::new(c, 6, colour.filled())),
                )?
                .label(family.name())
                .legend(move |(x, y)| TriangleMarker::new((x + 9, y), 6, colour.filled())),
            Family::Tournament => chart
                .draw_series(at.iter().map(|&c| {
                    EmptyElement::at(c) + Rectangle::new([(-4, -4), (4, 4)], colour.filled())
                }))?
                .label(family.name())
                .legend(move |(x, y)| {
                    Rectangle::new([(x + 5, y - 4), (x + 13, y + 4)], colour.filled())
                }),
            Family::SuccessiveHalving => chart
                .draw_series(at.iter().map(|&c| Cross::new(c, 5, colour.stroke_width(2))))?
                .label(family.name())
                .legend(move |(x, y)| Cross::new((x + 9, y), 5, colour.stroke_width(2))),
            Family::Random | Family::Adaptive => chart
                .draw_series(at.iter().map(|&c| Circle::new(c, 5, colour.filled())))?
                .label(family.name())
                .legend(move |(x, y)| Circle::new((x + 9, y), 5, colour.filled())),
        };
    }

    // Labels for the front's arms, each moved down (then up) until it overlaps no other
    // label and no marker; a moved label gets a leader line to its point.
    let mut placed: Vec<(i32, i32, i32, i32)> = points
        .iter()
        .map(|p| {
            let (x, y) = chart.backend_coord(&(p.nfe, p.value.mean));
            (x - 7, y - 7, x + 7, y + 7)
        })
        .collect();
    let (char_w, line_h) = (7, 15);
    for &i in &front {
        let p = &points[i];
        let (px, py) = chart.backend_coord(&(p.nfe, p.value.mean));
        let label = format!("{} ({:.0})", p.arm, p.nfe);
        let w = label.len() as i32 * char_w;
        // Right of the point, or left of it near the right edge.
        let x = if px + 10 + w > 940 {
            px - 10 - w
        } else {
            px + 10
        };
        let free = |y: i32, placed: &[(i32, i32, i32, i32)]| {
            placed
                .iter()
                .all(|&(x0, y0, x1, y1)| x + w < x0 || x > x1 || y + line_h < y0 || y > y1)
        };
        let mut y = py - line_h / 2;
        let mut step: i32 = 0;
        while !free(y, &placed) && step < 40 {
            step += 1;
            y = if step % 2 == 1 {
                py - line_h / 2 + line_h * ((step + 1) / 2)
            } else {
                py - line_h / 2 - line_h * (step / 2)
            };
        }
        placed.push((x, y, x + w, y + line_h));
        if step > 0 {
            let end = if x > px { x - 2 } else { x + w + 2 };
            root.draw(&PathElement::new(
                vec![(px, py), (end, y + line_h / 2)],
                p.family.colour().mix(0.5),
            ))?;
        }
        root.draw(&Text::new(
            label,
            (x, y),
            ("sans-serif", 12).into_font().color(&p.family.colour()),
        ))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 13))
        .border_style(BLACK.mix(0.4))
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(arm: &str, nfe: f64, mean: f64) -> Point {
        Point {
            arm: arm.into(),
            family: Family::EarlyFilter,
            nfe,
            value: Estimate {
                mean,
                lo: mean - 1.0,
                hi: mean + 1.0,
                n: 10,
            },
        }
    }

    #[test]
    fn the_front_keeps_only_arms_no_other_arm_beats_for_less() {
        let points = [
            point("a", 50.0, 5.0),
            point("b", 124.0, 9.0),
            point("c", 100.0, 8.0),
            point("d", 100.0, 7.0), // as cheap as c, worse
            point("e", 400.0, 8.5), // dearer than b, worse
            point("f", 500.0, 9.5),
        ];
        let names: Vec<&str> = pareto_front(&points)
            .iter()
            .map(|&i| points[i].arm.as_str())
            .collect();
        assert_eq!(names, ["a", "c", "b", "f"]);
    }

    #[test]
    fn a_plot_has_a_legend_entry_per_family_the_front_and_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plot.svg");
        let mut points = vec![point("early-filter-8-4-2", 124.0, 9.0)];
        points.push(Point {
            family: Family::Random,
            ..point("random", 50.0, 6.0)
        });
        points.push(Point {
            family: Family::Adaptive,
            ..point("adaptive-8-4-1-w4-t8", 72.0, 9.0)
        });
        let spec = PlotSpec {
            title: "t".into(),
            y_desc: "y",
            percent: false,
        };
        write_plot(&spec, &points, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for needle in [
            "early-filter",
            "adaptive",
            "random baseline (6.00)",
            "Pareto front",
            "adaptive-8-4-1-w4-t8 (72)",
        ] {
            assert!(svg.contains(needle), "{needle}");
        }
        // early-filter is dominated by adaptive (same O, fewer NFE): not labelled.
        assert!(!svg.contains("early-filter-8-4-2 (124)"));
    }
}
