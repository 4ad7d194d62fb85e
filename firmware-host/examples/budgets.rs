//! Measures the agent's budgets on `--source demo` with adaptation running: predictions
//! per second end to end, latency, resident memory at steady state, and the time from
//! process start to the first prediction.
//!
//! ```text
//! cargo run --release -p selfclass-firmware-host --example budgets -- [--model PATH] [--seconds 20]
//! ```
//!
//! Without a trained model (`models/fashion-mnist.scb`) pass `--fixture` to measure with
//! the reference network (same architecture family, random weights). Runs the agent in
//! this process exactly as `edge-agent` does (same `agent::run`), with events written to
//! /dev/null so the terminal is not what is measured.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use selfclass_firmware_host::agent::{self, AgentConfig, Pacing};
use selfclass_firmware_host::fixture::reference_bundle;
use selfclass_firmware_host::pipeline::{adapt_params_for, Model, DEFAULT_MODEL};
use selfclass_firmware_host::source::{self, SourceSpec};

/// Resident set size of this process, in MiB, from /proc.
fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value =
        |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let seconds: f64 = value("--seconds").map(|s| s.parse()).transpose()?.unwrap_or(20.0);
    let pacing = match value("--fps").map(|s| s.parse::<f64>()).transpose()? {
        Some(f) if f > 0.0 => Pacing::Rate(f),
        _ => Pacing::Lockstep,
    };
    let dir = tempfile::tempdir()?;
    let model_path = if args.iter().any(|a| a == "--fixture") {
        let path = dir.path().join("reference.scb");
        reference_bundle(1000)?.save(&path)?;
        path
    } else {
        PathBuf::from(value("--model").unwrap_or_else(|| DEFAULT_MODEL.into()))
    };
    let model =
        Model::load(&model_path).context("pass --fixture to measure with the reference network")?;
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    let source = source::open(&SourceSpec::Demo, model.bundle.preprocess.channels, true)?;
    let config = AgentConfig {
        pacing,
        events: Some(PathBuf::from("/dev/null")),
        state: Some(dir.path().join("state")),
        adapt: true,
        adapt_params: Some(adapt_params_for(model.largest_head())),
        started,
        ..AgentConfig::default()
    };

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            // (seconds since start, RSS MiB) every 100 ms.
            let t0 = Instant::now();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(rss) = rss_mib() {
                    samples.push((t0.elapsed().as_secs_f64(), rss));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };
    {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(seconds));
            stop.store(true, Ordering::SeqCst);
        });
    }
    let summary = agent::run(&model, source, &config, Arc::clone(&stop))?;
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().map_err(|_| anyhow::anyhow!("the memory sampler panicked"))?;
    let steady: Vec<f64> =
        samples.iter().filter(|(t, _)| *t >= seconds / 2.0).map(|(_, r)| *r).collect();
    let peak = samples.iter().map(|(_, r)| *r).fold(0.0, f64::max);
    let steady_max = steady.iter().copied().fold(0.0, f64::max);

    println!(
        "model              {} (heads {:?})",
        model.path.display(),
        model.bundle.classes_per_head()
    );
    println!(
        "pacing             {pacing:?}, adaptation on, budget {} ms/s",
        config.adapt_budget_ms
    );
    println!("model load         {load_ms:.0} ms");
    println!(
        "first prediction   {:.0} ms after start          (budget 300 ms)",
        summary.first_prediction_ms
    );
    println!(
        "throughput         {:.0} predictions/s end to end   (budget >= 500)",
        summary.predictions_per_s
    );
    println!(
        "latency            p50 {:.2} ms, p99 {:.2} ms",
        summary.latency_p50_ms, summary.latency_p99_ms
    );
    println!("dropped            {} of {} captured", summary.dropped, summary.frames_captured);
    println!(
        "adaptation         {} steps, {} rollbacks, replay {} pairs",
        summary.adapt_steps, summary.rollbacks, summary.replay_len
    );
    println!("resident memory    {steady_max:.1} MiB steady (second half), {peak:.1} MiB peak   (budget 64 MB)");
    Ok(())
}
