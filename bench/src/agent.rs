//! Comparison 4 and the second half of 5: the edge agent end to end on `--source demo`
//! (throughput with and without adaptation, latency, peak memory, first prediction, bundle
//! size), and its throughput against input resolution.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use selfclass_runtime::bundle::Bundle;

use crate::context::{Context, Section};
use crate::plot::{Chart, Series};
use crate::stats::Summary;
use crate::table::{Figure, Row, Unit};

const NAME: &str = "4 agent";

/// What one agent run reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgentRun {
    pub fps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub first_prediction_ms: f64,
    pub adapt_steps: f64,
    pub peak_rss_mib: f64,
}

/// Removes ANSI colour sequences.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `key=value` fields of the agent's final `done` log line.
fn done_fields(log: &str) -> Option<HashMap<String, String>> {
    let line = log.lines().map(strip_ansi).rfind(|l| l.contains(" done "))?;
    Some(
        line.split_whitespace()
            .filter_map(|token| token.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect(),
    )
}

fn parse_run(log: &str, peak_rss_mib: f64) -> Result<AgentRun> {
    let fields = done_fields(log).context("the agent logged no final summary")?;
    let get = |k: &str| -> Result<f64> {
        fields
            .get(k)
            .with_context(|| format!("the summary has no {k}"))?
            .parse::<f64>()
            .with_context(|| format!("the summary's {k} is not a number"))
    };
    Ok(AgentRun {
        fps: get("frames_per_s")?,
        p50_ms: get("p50_ms")?,
        p99_ms: get("p99_ms")?,
        first_prediction_ms: get("first_prediction_ms")?,
        adapt_steps: get("adapt_steps")?,
        peak_rss_mib,
    })
}

/// Runs the agent on the demo source for `frames` predictions.
fn run_agent(agent: &Path, model: &Path, frames: usize, adapt: bool) -> Result<AgentRun> {
    let mut cmd = Command::new(agent);
    cmd.args(["--source", "demo", "--fps", "0", "--events", "/dev/null"])
        .arg("--model")
        .arg(model)
        .args(["--frames", &frames.to_string()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if !adapt {
        cmd.arg("--no-adapt");
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {}", agent.display()))?;
    let sampler = PeakSampler::start(child.id());
    let mut log = String::new();
    let read = child
        .stderr
        .take()
        .context("agent without standard error")
        .and_then(|mut e| e.read_to_string(&mut log).context("reading the agent's log"));
    let peak_kib = sampler.stop();
    let status = child.wait().context("waiting for the agent")?;
    read?;
    if !status.success() {
        bail!("the agent exited with {status}: {}", log.lines().last().unwrap_or(""));
    }
    let peak_kib = peak_kib.context("no memory sample of the agent (it ended too soon)")?;
    parse_run(&log, peak_kib as f64 / 1024.0)
}

/// Follows a process's peak resident set (`VmHWM`, which belongs to the program's own
/// address space) while it runs. The kernel's `ru_maxrss` of a child is not used: it
/// carries over the resident set of the parent the child was forked from.
struct PeakSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Option<u64>>,
}

impl PeakSampler {
    fn start(pid: u32) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let path = format!("/proc/{pid}/status");
            let mut peak = None;
            while !flag.load(Ordering::Relaxed) {
                // Gone, or a zombie without an address space: the last sample stands.
                let Some(kib) = std::fs::read_to_string(&path).ok().and_then(|s| vm_hwm_kib(&s))
                else {
                    break;
                };
                peak = Some(peak.map_or(kib, |p: u64| p.max(kib)));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        });
        PeakSampler { stop, handle }
    }

    /// The peak seen, in KiB.
    fn stop(self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().ok().flatten()
    }
}

/// The `VmHWM` line of a `/proc/PID/status` text, in KiB.
fn vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn summary(values: impl Iterator<Item = f64>) -> Result<Summary> {
    Summary::of(&values.collect::<Vec<_>>()).context("no agent run")
}

pub fn run(ctx: &Context) -> Result<Section> {
    crate::cargo_build::cargo_build(
        ctx,
        &["-p", "selfclass-firmware-host", "--bin", "edge-agent"],
    )?;
    let agent = ctx.release_binary("edge-agent");
    let rounds = if ctx.effort.quick { 1 } else { 3 };
    let frames = if ctx.effort.quick { 1000 } else { 5000 };
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        on.push(run_agent(&agent, &ctx.model, frames, true)?);
        off.push(run_agent(&agent, &ctx.model, frames, false)?);
        tracing::info!(round, with = ?on[round], without = ?off[round], "agent");
    }
    let mut section = Section::default();
    let row = |case: &str, runs: &[AgentRun], f: fn(&AgentRun) -> f64, unit| -> Result<Row> {
        Ok(Row::alone(NAME, case, Figure::new(summary(runs.iter().map(f))?, unit)))
    };
    section.rows.push(row("throughput, adaptation on", &on, |r| r.fps, Unit::PerSecond)?);
    section.rows.push(row("throughput, adaptation off", &off, |r| r.fps, Unit::PerSecond)?);
    section.rows.push(row("latency p50, adaptation on", &on, |r| r.p50_ms, Unit::Millis)?);
    section.rows.push(row("latency p99, adaptation on", &on, |r| r.p99_ms, Unit::Millis)?);
    section.rows.push(row("latency p50, adaptation off", &off, |r| r.p50_ms, Unit::Millis)?);
    section.rows.push(row("latency p99, adaptation off", &off, |r| r.p99_ms, Unit::Millis)?);
    section.rows.push(row(
        "peak resident memory, adaptation on",
        &on,
        |r| r.peak_rss_mib,
        Unit::MiB,
    )?);
    section.rows.push(row(
        "peak resident memory, adaptation off",
        &off,
        |r| r.peak_rss_mib,
        Unit::MiB,
    )?);
    section.rows.push(row(
        "first prediction after start",
        &on,
        |r| r.first_prediction_ms,
        Unit::Millis,
    )?);
    section.rows.push(row("adaptation steps per run", &on, |r| r.adapt_steps, Unit::Plain)?);

    let bundle_bytes = std::fs::metadata(&ctx.model)
        .with_context(|| format!("reading {}", ctx.model.display()))?
        .len() as f64;
    let onnx_bytes = Bundle::load(&ctx.model)?.network_onnx_bytes()?.len() as f64;
    let mib = |b: f64| Summary::of(&[b / (1024.0 * 1024.0)]).context("size");
    section.rows.push(Row {
        comparison: NAME.into(),
        case: "bundle size (network, heads, anchors) against the network as f32 ONNX".into(),
        ours: Figure::new(mib(bundle_bytes)?, Unit::MiB),
        peer: Some(("f32 ONNX".into(), Figure::new(mib(onnx_bytes)?, Unit::MiB))),
        ratio: Summary::of(&[bundle_bytes / onnx_bytes]),
        target: None,
    });
    section.notes.push(format!(
        "`target/release/edge-agent --source demo --fps 0 --frames {frames}` (every frame handed \
         over, events to /dev/null), {rounds} run(s) each with and without `--no-adapt`; figures \
         from its final summary line, peak resident memory is the agent's `VmHWM`, sampled every \
         5 ms while it runs."
    ));
    resolution(ctx, &agent, &mut section)?;
    Ok(section)
}

/// Agent throughput with the default network run at larger input sizes (the network is
/// convolutional with global pooling, so only the bundle's declared input size changes).
fn resolution(ctx: &Context, agent: &Path, section: &mut Section) -> Result<()> {
    let sizes: &[u32] = if ctx.effort.quick { &[28, 56] } else { &[28, 56, 112, 224] };
    let base = Bundle::load(&ctx.model)?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for &size in sizes {
        let mut bundle = base.clone();
        bundle.preprocess.width = size;
        bundle.preprocess.height = size;
        let path = ctx.work.join(format!("default-{size}px.scb"));
        bundle.save(&path)?;
        let pixels = (size as f64 / 28.0).powi(2);
        let frames =
            ((if ctx.effort.quick { 1000.0 } else { 4000.0 }) / pixels).max(100.0) as usize;
        let a = run_agent(agent, &path, frames, true)?;
        let b = run_agent(agent, &path, frames, false)?;
        tracing::info!(size, with = a.fps, without = b.fps, "agent by resolution");
        with.push((size as f64, a.fps));
        without.push((size as f64, b.fps));
    }
    let chart = Chart {
        title: "Agent throughput against input resolution (demo source)".into(),
        x_label: "input width = height (pixels)".into(),
        y_label: "predictions per second".into(),
        log2_x: true,
        series: vec![
            Series { name: "adaptation on".into(), points: with },
            Series { name: "adaptation off".into(), points: without },
        ],
    };
    section.add_chart(&ctx.plots, "agent-by-resolution.png", chart)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\u{1b}[2m2026-12-04T19:18:07Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m done \
        predictions=2000 frames_per_s=\"1823.2\" p50_ms=\"1.56\" p99_ms=\"2.20\" dropped=0 \
        first_prediction_ms=\"36\" adapt_steps=12 rollbacks=0 replay=645\n";

    #[test]
    fn reads_the_summary_line_through_colours() {
        let run = parse_run(LOG, 42.0).expect("parsed");
        assert_eq!(run.fps, 1823.2);
        assert_eq!((run.p50_ms, run.p99_ms), (1.56, 2.20));
        assert_eq!(
            (run.first_prediction_ms, run.adapt_steps, run.peak_rss_mib),
            (36.0, 12.0, 42.0)
        );
    }

    #[test]
    fn a_log_without_summary_is_an_error() {
        assert!(parse_run("INFO agent stopped predictions=2000\n", 1.0).is_err());
        let broken = LOG.replace("\"1823.2\"", "\"fast\"");
        assert!(parse_run(&broken, 1.0).is_err());
    }

    #[test]
    fn reads_the_peak_resident_set() {
        let status =
            "Name:\tedge-agent\nVmPeak:\t 900 kB\nVmHWM:\t   41234 kB\nVmRSS:\t 40000 kB\n";
        assert_eq!(vm_hwm_kib(status), Some(41234));
        assert_eq!(vm_hwm_kib("Name:\tzombie\n"), None);
    }

    #[test]
    fn strips_colour_sequences() {
        assert_eq!(strip_ansi("\u{1b}[32mINFO\u{1b}[0m x=1"), "INFO x=1");
    }
}
