//! `--plot FILE.svg`: loss and accuracy per iteration (training) and per
//! epoch (validation), side by side.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use quern_client::TrainEvent;
use std::path::Path;

type Series = Vec<(f64, f64)>;

fn series(events: &[TrainEvent]) -> (Series, Series, Series, Series) {
    let (mut loss, mut acc, mut vloss, mut vacc) = (vec![], vec![], vec![], vec![]);
    for e in events {
        match e {
            TrainEvent::Step {
                iteration,
                loss: l,
                accuracy: a,
                ..
            } => {
                loss.push((*iteration as f64, *l));
                acc.push((*iteration as f64, *a));
            }
            TrainEvent::Epoch {
                iterations,
                val_loss: Some(l),
                val_accuracy: Some(a),
                ..
            } => {
                vloss.push((*iterations as f64, *l));
                vacc.push((*iterations as f64, *a));
            }
            _ => {}
        }
    }
    (loss, acc, vloss, vacc)
}

pub fn write_svg(path: &Path, events: &[TrainEvent]) -> Result<()> {
    let (loss, acc, vloss, vacc) = series(events);
    let err = |e: &dyn std::fmt::Display| anyhow!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 2));
    let max_x = loss
        .iter()
        .chain(&vloss)
        .map(|p| p.0)
        .fold(1.0f64, f64::max);
    for (panel, (title, train, val)) in panels
        .iter()
        .zip([("loss", &loss, &vloss), ("accuracy", &acc, &vacc)])
    {
        let max_y = train
            .iter()
            .chain(val.iter())
            .map(|p| p.1)
            .filter(|v| v.is_finite())
            .fold(if title == "accuracy" { 1.0 } else { 0.1 }, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..max_x, 0f64..max_y * 1.05)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("iteration")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
            .map_err(|e| err(&e))?
            .label("training")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        chart
            .draw_series(LineSeries::new(val.iter().copied(), &RED))
            .map_err(|e| err(&e))?
            .label("validation (per epoch)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        chart
            .draw_series(val.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(|e| err(&e))?;
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
