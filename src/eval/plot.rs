//! Score-vs-NFE plots of an eval: one colour and marker per strategy family with a legend,
//! each arm's 95% interval, the Pareto front (no arm both cheaper and better) drawn and
//! labelled, and the random baseline as a reference line. Only front points carry labels,
//! placed so that none overlaps another; every arm is in `report.md`'s table.

use std::path::Path;

use plotters::prelude::*;

use super::stats::Estimate;
use crate::engine::StrategyKind;

/// The strategy families in legend order.
const FAMILIES: [StrategyKind; 6] = [
    StrategyKind::Random,
    StrategyKind::BestOfN,
    StrategyKind::EarlyFilter,
    StrategyKind::Tournament,
    StrategyKind::SuccessiveHalving,
    StrategyKind::Adaptive,
];

/// A family's name in the legend.
fn family_name(family: StrategyKind) -> &'static str {
    match family {
        StrategyKind::Random => "random (one seed)",
        StrategyKind::BestOfN => "best-of-N",
        StrategyKind::EarlyFilter => "early-filter",
        StrategyKind::Tournament => "tournament",
        StrategyKind::SuccessiveHalving => "successive halving",
        StrategyKind::Adaptive => "adaptive",
    }
}

/// A family's colour: colour-blind-safe (Okabe-Ito).
fn family_colour(family: StrategyKind) -> RGBColor {
    match family {
        StrategyKind::Random => RGBColor(0, 0, 0),
        StrategyKind::BestOfN => RGBColor(0, 114, 178),
        StrategyKind::EarlyFilter => RGBColor(230, 159, 0),
        StrategyKind::Tournament => RGBColor(0, 158, 115),
        StrategyKind::SuccessiveHalving => RGBColor(204, 121, 167),
        StrategyKind::Adaptive => RGBColor(213, 94, 0),
    }
}

/// One plotted arm.
#[derive(Debug, Clone)]
pub struct Point {
    /// The arm's name (front points are labelled with it).
    pub arm: String,
    /// Its strategy family (best-of-n prefixes are best-of-N).
    pub family: StrategyKind,
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
    // NFE on a log axis: cheap arms crowd together on a linear one.
    let max_nfe = points.iter().map(|p| p.nfe).fold(1.0, f64::max) * 1.15;
    let min_nfe = points.iter().map(|p| p.nfe).fold(f64::INFINITY, f64::min) * 0.85;
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
    let front = pareto_front(points);
    // The front's arms are numbered on the plot and named in a key below it.
    let key_rows = front.len().div_ceil(2) as u32;
    let root = SVGBackend::new(path, (960, 600 + 28 + 18 * key_rows)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot_area, key_area) = root.split_vertically(600);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(&spec.title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d((min_nfe..max_nfe).log_scale(), lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("mean NFE per item (transformer forwards, log scale)")
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
    if let Some(r) = points.iter().find(|p| p.family == StrategyKind::Random) {
        let y = r.value.mean;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(min_nfe, y), (max_nfe, y)],
                6,
                4,
                BLACK.mix(0.6).stroke_width(1),
            ))?
            .label(if spec.percent {
                format!("random baseline ({y:.1}%)")
            } else {
                format!("random baseline ({y:.2})")
            })
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.6)));
    }

    // The Pareto front, under the points.
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
    let families: Vec<StrategyKind> = FAMILIES
        .into_iter()
        .filter(|&f| points.iter().any(|p| p.family == f))
        .collect();
    for p in points {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(p.nfe, p.value.lo), (p.nfe, p.value.hi)],
            family_colour(p.family).mix(0.45),
        )))?;
    }
    let families_count = families.len();
    for family in families {
        let members: Vec<&Point> = points.iter().filter(|p| p.family == family).collect();
        let at: Vec<(f64, f64)> = members.iter().map(|p| (p.nfe, p.value.mean)).collect();
        let colour = family_colour(family);
        // One shape per family, in the plot and in the legend.
        match family {
            StrategyKind::BestOfN => chart
                .draw_series(
                    at.iter()
                        .map(|&c| Circle::new(c, 4, colour.stroke_width(2))),
                )?
                .label(family_name(family))
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, colour.stroke_width(2))),
            StrategyKind::EarlyFilter => chart
                .draw_series(
                    at.iter()
                        .map(|&c| TriangleMarker::new(c, 6, colour.filled())),
                )?
                .label(family_name(family))
                .legend(move |(x, y)| TriangleMarker::new((x + 9, y), 6, colour.filled())),
            StrategyKind::Tournament => chart
                .draw_series(at.iter().map(|&c| {
                    EmptyElement::at(c) + Rectangle::new([(-4, -4), (4, 4)], colour.filled())
                }))?
                .label(family_name(family))
                .legend(move |(x, y)| {
                    Rectangle::new([(x + 5, y - 4), (x + 13, y + 4)], colour.filled())
                }),
            StrategyKind::SuccessiveHalving => chart
                .draw_series(at.iter().map(|&c| Cross::new(c, 5, colour.stroke_width(2))))?
                .label(family_name(family))
                .legend(move |(x, y)| Cross::new((x + 9, y), 5, colour.stroke_width(2))),
            StrategyKind::Random | StrategyKind::Adaptive => chart
                .draw_series(at.iter().map(|&c| Circle::new(c, 5, colour.filled())))?
                .label(family_name(family))
                .legend(move |(x, y)| Circle::new((x + 9, y), 5, colour.filled())),
        };
    }

    // The front's numbers, each at the first spot around its point that overlaps no other
    // number, marker or interval and stays inside the plot.
    let ((x0, y0), (x1, y1)) = (
        chart.backend_coord(&(min_nfe, hi)),
        chart.backend_coord(&(max_nfe, lo)),
    );
    let mut placed: Vec<(i32, i32, i32, i32)> = points
        .iter()
        .map(|p| {
            // The marker and its interval bar.
            let (x, top) = chart.backend_coord(&(p.nfe, p.value.hi));
            let (_, bottom) = chart.backend_coord(&(p.nfe, p.value.lo));
            (x - 6, top.min(bottom) - 6, x + 6, top.max(bottom) + 6)
        })
        .collect();
    let line_h = 14;
    for (number, &i) in front.iter().enumerate() {
        let p = &points[i];
        let (px, py) = chart.backend_coord(&(p.nfe, p.value.mean));
        let label = (number + 1).to_string();
        let w = 8 * label.len() as i32;
        let free = |(x, y): (i32, i32), placed: &[(i32, i32, i32, i32)]| {
            x >= x0
                && x + w <= x1
                && y >= y0
                && y + line_h <= y1
                && placed
                    .iter()
                    .all(|&(a0, b0, a1, b1)| x + w < a0 || x > a1 || y + line_h < b0 || y > b1)
        };
        // Rings of spots around the point, nearest first.
        let spot = (1..=12)
            .flat_map(|r: i32| {
                let d = 9 * r;
                [
                    (px + d, py - line_h / 2),
                    (px - d - w, py - line_h / 2),
                    (px - w / 2, py - d - line_h),
                    (px - w / 2, py + d),
                    (px + d, py - d - line_h),
                    (px - d - w, py + d),
                    (px + d, py + d),
                    (px - d - w, py - d - line_h),
                ]
            })
            .find(|&spot| free(spot, &placed))
            .unwrap_or((px + 8, py - line_h / 2));
        placed.push((spot.0, spot.1, spot.0 + w, spot.1 + line_h));
        let far = (spot.0 - px).abs() > 20 || (spot.1 - py).abs() > 20;
        if far {
            plot_area.draw(&PathElement::new(
                vec![(px, py), (spot.0 + w / 2, spot.1 + line_h / 2)],
                family_colour(p.family).mix(0.5),
            ))?;
        }
        plot_area.draw(&Text::new(
            label,
            spot,
            ("sans-serif", 13)
                .into_font()
                .color(&family_colour(p.family)),
        ))?;
    }
    // The key: each front arm by number, with its NFE and value.
    key_area.draw(&Text::new(
        "Pareto front, cheapest first:",
        (20, 6),
        ("sans-serif", 13).into_font(),
    ))?;
    for (number, &i) in front.iter().enumerate() {
        let p = &points[i];
        let value = if spec.percent {
            format!("{:.1}%", p.value.mean)
        } else {
            format!("{:.2}", p.value.mean)
        };
        let (col, row) = ((number % 2) as i32, (number / 2) as i32);
        key_area.draw(&Text::new(
            format!("{}  {}: {:.0} NFE, {value}", number + 1, p.arm, p.nfe),
            (20 + 470 * col, 26 + 18 * row),
            ("sans-serif", 13)
                .into_font()
                .color(&family_colour(p.family)),
        ))?;
    }
    // The legend goes to the corner of the plot area with the fewest markers and numbers.
    let (legend_w, legend_h) = (300, 24 + 17 * (families_count as i32 + 2));
    let corners = [
        (
            SeriesLabelPosition::LowerRight,
            (x1 - legend_w, y1 - legend_h, x1, y1),
        ),
        (
            SeriesLabelPosition::UpperLeft,
            (x0, y0, x0 + legend_w, y0 + legend_h),
        ),
        (
            SeriesLabelPosition::LowerLeft,
            (x0, y1 - legend_h, x0 + legend_w, y1),
        ),
        (
            SeriesLabelPosition::UpperRight,
            (x1 - legend_w, y0, x1, y0 + legend_h),
        ),
    ];
    let covered = |(a0, b0, a1, b1): (i32, i32, i32, i32)| {
        placed
            .iter()
            .filter(|&&(x, y, xe, ye)| xe >= a0 && x <= a1 && ye >= b0 && y <= b1)
            .count()
    };
    let position = corners
        .into_iter()
        .min_by_key(|&(_, rect)| covered(rect))
        .map(|(p, _)| p)
        .expect("four corners");
    chart
        .configure_series_labels()
        .position(position)
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
            family: StrategyKind::EarlyFilter,
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
            family: StrategyKind::Random,
            ..point("random", 50.0, 6.0)
        });
        points.push(Point {
            family: StrategyKind::Adaptive,
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
            "adaptive-8-4-1-w4-t8: 72 NFE",
        ] {
            assert!(svg.contains(needle), "{needle}");
        }
        // early-filter is dominated by adaptive (same O, fewer NFE): not labelled.
        assert!(!svg.contains("early-filter-8-4-2: 124 NFE"));
    }
}
