//! Comparison 3: one training step of the reference network (batch 256, two views), the
//! trainer (its `step_bench` example) against PyTorch (the reference's `torch_step.py`),
//! interleaved process by process.

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::context::{interleave, Context, Section};
use crate::stats::{ratios, Summary};
use crate::table::{Figure, Row, Target, Unit};

const NAME: &str = "3 training step";
const BATCH: usize = 256;

/// The JSON object a line of `output` carries after `prefix`.
fn json_after(output: &str, prefix: &str) -> Option<Value> {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .filter_map(|rest| serde_json::from_str(rest.trim()).ok())
        .next_back()
}

fn run_and_read(cmd: &mut Command, what: &str, prefix: &str) -> Result<f64> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        );
    }
    json_after(&stdout, prefix)
        .and_then(|v| v["train_step_s"].as_f64())
        .with_context(|| format!("{what} printed no train_step_s: {stdout}"))
}

pub fn run(ctx: &Context) -> Result<Section> {
    let steps = if ctx.effort.quick { 2 } else { 5 };
    let rounds = if ctx.effort.quick { 1 } else { 5 };
    crate::cargo_build::cargo_build(ctx, &["-p", "selfclass-trainer", "--example", "step_bench"])?;
    let step_bench = ctx.release_binary("examples/step_bench");
    let torch_step = ctx.reference.join("torch_step.py");
    anyhow::ensure!(torch_step.is_file(), "{} is missing", torch_step.display());
    // PyTorch with its default thread count (every core) and with one thread: on a loaded
    // machine its threads can slow each other down, so both are measured.
    let torch_threads = [None, Some(1usize)];
    let mut ours = Vec::new();
    let mut theirs: Vec<Vec<f64>> = vec![Vec::new(); torch_threads.len()];
    for round in 0..rounds {
        let trainer = || {
            run_and_read(
                Command::new(&step_bench)
                    .args(["--batch", &BATCH.to_string(), "--steps", &steps.to_string()])
                    .arg("--no-torch")
                    .current_dir(&ctx.root),
                "step_bench",
                "selfclass:",
            )
        };
        let torch = |threads: Option<usize>| {
            let mut cmd = Command::new(ctx.venv.python());
            cmd.arg(&torch_step)
                .args(["--batch", &BATCH.to_string(), "--steps", &steps.to_string()])
                .current_dir(&ctx.reference);
            if let Some(t) = threads {
                cmd.args(["--threads", &t.to_string()]);
            }
            run_and_read(&mut cmd, "torch_step.py", "")
        };
        let (x, ys) = interleave(round, trainer, || {
            torch_threads.iter().map(|&t| torch(t)).collect::<Result<Vec<f64>>>()
        })?;
        tracing::info!(round, trainer_s = x, pytorch_s = ?ys, "training step");
        ours.push(x);
        theirs.iter_mut().zip(ys).for_each(|(list, y)| list.push(y));
    }
    let mut section = Section::default();
    for (threads, b) in torch_threads.iter().zip(&theirs) {
        let label = threads.map_or("default threads".to_string(), |t| format!("{t} thread"));
        section.rows.push(Row {
            comparison: NAME.into(),
            case: format!(
                "reference network, batch {BATCH}x2 views; trainer on every core, PyTorch {label}"
            ),
            ours: Figure::new(Summary::of(&ours).context("no timing")?, Unit::Seconds),
            peer: Some((
                "PyTorch".into(),
                Figure::new(Summary::of(b).context("no timing")?, Unit::Seconds),
            )),
            ratio: Summary::of(&ratios(&ours, b)),
            target: Some(Target { max_ratio: 1.5 }),
        });
    }
    section.notes.push(format!(
        "Each round runs `trainer/examples/step_bench.rs` (`--no-torch`) and the reference's \
         `torch_step.py` once each, {steps} timed steps apiece (median), alternating which \
         goes first."
    ));
    Ok(section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_last_json_after_a_prefix() {
        let out = "noise\nselfclass: {\"train_step_s\": 0.5}\nselfclass: {\"train_step_s\": 0.4}\n";
        let v = json_after(out, "selfclass:").expect("json");
        assert_eq!(v["train_step_s"].as_f64(), Some(0.4));
        assert!(json_after("selfclass: not json", "selfclass:").is_none());
        let bare = json_after("{\"train_step_s\": 0.36}", "").expect("json");
        assert_eq!(bare["train_step_s"].as_f64(), Some(0.36));
    }
}
