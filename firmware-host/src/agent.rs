//! The running agent: capture, inference and adaptation on three threads.
//!
//! ```text
//!  capture thread ──(LatestSlot: newest wins)──> inference (caller's thread) ──> events
//!                                                   │  ▲
//!                                  candidates (try) │  │ adapted heads (Arc swap)
//!                                                   ▼  │
//!                                              adaptation thread ──> state directory
//! ```
//!
//! Capture never waits for inference on live or paced sources: a frame still waiting when
//! the next arrives is replaced and counted as dropped. Inference hands every classified
//! frame to the adaptation thread through a small bounded channel with `try_send`, so it
//! never waits for adaptation either; the adaptation thread spends at most its compute
//! budget per second on making second views and optimiser steps, and installs new heads by
//! swapping an `Arc` the inference thread reads once per frame.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ndarray::Array1;
use selfclass_runtime::adapt::{AdaptParams, GuardOutcome};
use selfclass_runtime::head::Head;
use selfclass_runtime::replay::ReplayBuffer;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::pipeline::{adapt_params_for, classify, AdaptWorker, Model};
use crate::slot::{LatestSlot, Taken};
use crate::source::{CapturedFrame, FrameSource};
use crate::state::{HeadsState, StateDir};

/// How the capture loop hands frames over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// Read as fast as the source delivers (cameras, pipes); newest frame wins.
    Live,
    /// Play at this many frames per second, as a camera would; newest frame wins.
    Rate(f64),
    /// Hand over every frame, waiting for inference (offline files, exact runs).
    Lockstep,
}

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub pacing: Pacing,
    /// Stop after this many predictions.
    pub max_predictions: Option<u64>,
    /// Where JSON lines go (`None`: standard output).
    pub events: Option<PathBuf>,
    pub state: Option<PathBuf>,
    /// Run optimiser steps (the replay is kept either way).
    pub adapt: bool,
    /// Milliseconds of compute per second the adaptation thread may use.
    pub adapt_budget_ms: u64,
    pub replay_capacity: usize,
    pub save_every: Duration,
    pub status_every: Duration,
    /// Adaptation settings; `None` sizes them for the model ([`adapt_params_for`]).
    pub adapt_params: Option<AdaptParams>,
    pub seed: u64,
    /// When the process started, for the first-prediction time.
    pub started: Instant,
    /// Counts every time the collapse guard restores the last good heads; the update
    /// listener reads it to fail the probation of a model whose classes collapse.
    pub collapse_events: Option<Arc<AtomicU64>>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            pacing: Pacing::Lockstep,
            max_predictions: None,
            events: None,
            state: None,
            adapt: true,
            adapt_budget_ms: 400,
            replay_capacity: 4096,
            save_every: Duration::from_secs(5),
            status_every: Duration::from_secs(3),
            adapt_params: None,
            seed: 0x5e1f,
            started: Instant::now(),
            collapse_events: None,
        }
    }
}

/// Figures of a finished run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub frames_captured: u64,
    pub predictions: u64,
    pub dropped: u64,
    pub elapsed_s: f64,
    pub predictions_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub first_prediction_ms: f64,
    pub adapt_steps: u64,
    pub rollbacks: u64,
    pub replay_len: u64,
    pub replay_seen: u64,
    pub restored_replay: bool,
    pub restored_heads: bool,
    pub labelled_predictions: u64,
}

/// One JSON line per prediction.
#[derive(Debug, Serialize)]
struct Event<'a> {
    frame: u64,
    /// Capture time, milliseconds since the Unix epoch.
    timestamp_ms: u64,
    /// Cluster of each head, in the bundle's head order.
    clusters: &'a [u32],
    /// Confidence of each head's cluster (top softmax probability at temperature 0.1).
    confidence: &'a [f32],
    latency_ms: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<u32>,
}

/// Counters shared between the threads.
#[derive(Default)]
struct Shared {
    captured: AtomicU64,
    adapt_steps: AtomicU64,
    rollbacks: AtomicU64,
    replay_len: AtomicU64,
    replay_seen: AtomicU64,
    candidates_skipped: AtomicU64,
}

/// A candidate for the replay: the frame's input tensor and its embedding.
type Candidate = (Vec<f32>, Array1<f32>);

/// Latencies of the current status window.
struct Window {
    latencies_us: Vec<u32>,
    predictions: u64,
    started: Instant,
    dropped_at_start: u64,
}

impl Window {
    fn new(dropped: u64) -> Self {
        Window {
            latencies_us: Vec::with_capacity(4096),
            predictions: 0,
            started: Instant::now(),
            dropped_at_start: dropped,
        }
    }
}

fn percentile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() - 1) as f64 * q).round() as usize;
    sorted_us[i] as f64 / 1000.0
}

/// Runs the agent on `source` until it ends, `stop` is set, or the prediction limit is
/// reached. Returns the run's figures.
pub fn run(
    model: &Model,
    source: Box<dyn FrameSource>,
    config: &AgentConfig,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<RunSummary> {
    let params = config.adapt_params.unwrap_or_else(|| adapt_params_for(model.largest_head()));
    let state = config.state.as_deref().map(StateDir::open).transpose()?;
    let model_digest = model.bundle.digest()?;
    let dim = model.bundle.embedding_dim();

    // Restore what the state directory holds; bad files were set aside with a warning.
    let mut summary = RunSummary::default();
    let mut replay = ReplayBuffer::new(dim, config.replay_capacity)?;
    let mut restored_snapshot = None;
    if let Some(state) = &state {
        let restored = state.restore(&model_digest, dim)?;
        for (path, why) in &restored.rejected {
            warn!(
                "state file {why}; moved it aside to {} and started that part fresh",
                path.display()
            );
        }
        if let Some((path, version)) = &restored.parked {
            info!(
                parked = %path.display(),
                "the adapted heads belong to model version {version}; kept aside for when it runs again"
            );
        }
        if let Some(path) = &restored.unparked {
            info!(from = %path.display(), "took back the heads adapted earlier for this model");
        }
        if let Some(r) = restored.replay {
            replay = if r.capacity() == config.replay_capacity {
                r
            } else {
                r.resized(config.replay_capacity)?
            };
            summary.restored_replay = true;
        }
        restored_snapshot = restored.heads.map(|h| h.snapshot);
    }
    let mut worker = AdaptWorker::new(model, replay, params, config.seed)?;
    if let Some(snapshot) = &restored_snapshot {
        match worker.adapter.restore(snapshot) {
            Ok(()) => summary.restored_heads = true,
            Err(e) => warn!("state heads not used ({e}); starting from the shipped heads"),
        }
    }
    if let Some(state) = &state {
        info!(
            dir = %state.path().display(),
            replay_pairs = worker.replay.len(),
            adapt_steps = worker.adapter.steps(),
            "state restored"
        );
    }
    if worker.replay.anchor_count() == 0 {
        info!("the model ships no anchor embeddings; adaptation relies on the pull toward the shipped heads");
    }

    let heads: Arc<Mutex<Arc<Vec<Head<f32>>>>> = Arc::new(Mutex::new(worker.shared_heads()));
    let shared = Arc::new(Shared::default());
    let slot: Arc<LatestSlot<CapturedFrame>> = Arc::new(LatestSlot::new());
    let failure: Arc<Mutex<Option<anyhow::Error>>> = Arc::new(Mutex::new(None));

    // Capture thread.
    let pacing = config.pacing;
    info!(source = %source.describe(), ?pacing, "capture starting");
    let capture = {
        let (slot, stop, shared, failure) =
            (Arc::clone(&slot), Arc::clone(&stop), Arc::clone(&shared), Arc::clone(&failure));
        thread::Builder::new().name("capture".into()).spawn(move || {
            if let Err(e) = capture_loop(source, pacing, &slot, &stop, &shared) {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                stop.store(true, Ordering::SeqCst);
            }
            slot.close();
        })?
    };

    // Adaptation thread.
    let (candidates_tx, candidates_rx) = mpsc::sync_channel::<Candidate>(4);
    let adaptation = {
        let (heads, stop, shared, failure) =
            (Arc::clone(&heads), Arc::clone(&stop), Arc::clone(&shared), Arc::clone(&failure));
        let state = state.clone();
        let settings = AdaptSettings {
            adapt: config.adapt,
            budget: Duration::from_millis(config.adapt_budget_ms.min(1000)),
            save_every: config.save_every,
            model_digest,
            model_version: model.bundle.model_version,
            collapse_events: config.collapse_events.clone(),
        };
        thread::Builder::new().name("adaptation".into()).spawn(move || {
            if let Err(e) = adaptation_loop(
                worker,
                candidates_rx,
                &heads,
                &stop,
                &shared,
                state.as_ref(),
                &settings,
            ) {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                stop.store(true, Ordering::SeqCst);
            }
        })?
    };

    let inference =
        inference_loop(model, config, &slot, &heads, candidates_tx, &stop, &shared, &mut summary);
    stop.store(true, Ordering::SeqCst);
    slot.close();
    let _ = capture.join();
    let _ = adaptation.join();
    inference?;
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }

    summary.frames_captured = shared.captured.load(Ordering::SeqCst);
    summary.dropped = slot.dropped();
    summary.adapt_steps = shared.adapt_steps.load(Ordering::SeqCst);
    summary.rollbacks = shared.rollbacks.load(Ordering::SeqCst);
    summary.replay_len = shared.replay_len.load(Ordering::SeqCst);
    summary.replay_seen = shared.replay_seen.load(Ordering::SeqCst);
    info!(
        predictions = summary.predictions,
        dropped = summary.dropped,
        fps = format!("{:.1}", summary.predictions_per_s),
        adapt_steps = summary.adapt_steps,
        "agent stopped"
    );
    Ok(summary)
}

fn capture_loop(
    mut source: Box<dyn FrameSource>,
    pacing: Pacing,
    slot: &LatestSlot<CapturedFrame>,
    stop: &AtomicBool,
    shared: &Shared,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut number = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if let Pacing::Rate(fps) = pacing {
            let due = start + Duration::from_secs_f64(number as f64 / fps);
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
        }
        let mut frame = slot.spare().unwrap_or_default();
        if !source.next_into(&mut frame)? {
            debug!(frames = number, "source ended");
            break;
        }
        frame.number = number;
        frame.captured_at = Instant::now();
        number += 1;
        shared.captured.store(number, Ordering::Relaxed);
        match pacing {
            Pacing::Lockstep => {
                if !slot.put_waiting(frame) {
                    break;
                }
            }
            Pacing::Live | Pacing::Rate(_) => {
                slot.put(frame);
            }
        }
    }
    Ok(())
}

struct AdaptSettings {
    adapt: bool,
    budget: Duration,
    save_every: Duration,
    model_digest: [u8; 32],
    model_version: u64,
    collapse_events: Option<Arc<AtomicU64>>,
}

fn adaptation_loop(
    mut worker: AdaptWorker,
    candidates: Receiver<Candidate>,
    heads: &Mutex<Arc<Vec<Head<f32>>>>,
    stop: &AtomicBool,
    shared: &Shared,
    state: Option<&StateDir>,
    settings: &AdaptSettings,
) -> anyhow::Result<()> {
    let save = |worker: &AdaptWorker| -> anyhow::Result<()> {
        if let Some(state) = state {
            let heads_state = HeadsState {
                model_digest: settings.model_digest,
                model_version: settings.model_version,
                snapshot: worker.adapter.snapshot(),
            };
            state.save(&worker.replay, &heads_state)?;
            debug!(replay = worker.replay.len(), steps = worker.adapter.steps(), "state saved");
        }
        Ok(())
    };
    let mut window_start = Instant::now();
    let mut busy = Duration::ZERO;
    let mut last_save = Instant::now();
    let publish = |worker: &AdaptWorker| {
        shared.replay_len.store(worker.replay.len() as u64, Ordering::Relaxed);
        shared.replay_seen.store(worker.replay.seen(), Ordering::Relaxed);
        shared.adapt_steps.store(worker.adapter.steps(), Ordering::Relaxed);
        shared.rollbacks.store(worker.adapter.rollbacks(), Ordering::Relaxed);
    };
    publish(&worker);

    loop {
        if window_start.elapsed() >= Duration::from_secs(1) {
            window_start = Instant::now();
            busy = Duration::ZERO;
        }
        if last_save.elapsed() >= settings.save_every {
            if let Err(e) = save(&worker) {
                warn!("saving state failed: {e:#}; will retry");
            }
            last_save = Instant::now();
        }
        if busy >= settings.budget {
            // Budget spent: sleep out the window, but keep an eye on stop.
            let rest = Duration::from_secs(1).saturating_sub(window_start.elapsed());
            thread::sleep(rest.min(Duration::from_millis(50)));
            drain_unseen(&candidates, shared);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            continue;
        }

        let t0 = Instant::now();
        let mut did_work = false;
        // New frames first: they are cheap to turn down, and the reservoir counts them.
        while let Ok((input, z)) = candidates.try_recv() {
            worker.offer(&input, z.view())?;
            did_work = true;
            if t0.elapsed() > Duration::from_millis(20) {
                break;
            }
        }
        if settings.adapt {
            if let Some(report) = worker.step()? {
                did_work = true;
                if let Some(GuardOutcome::RolledBack { head, clusters_used, entropy }) =
                    report.guard
                {
                    info!(
                        head,
                        clusters_used,
                        entropy,
                        rollbacks = worker.adapter.rollbacks(),
                        "adaptation rolled back"
                    );
                    if let Some(events) = &settings.collapse_events {
                        events.fetch_add(1, Ordering::SeqCst);
                    }
                }
                *heads.lock().unwrap_or_else(|p| p.into_inner()) = worker.shared_heads();
            }
        }
        busy += t0.elapsed();
        publish(&worker);

        if stop.load(Ordering::Relaxed) {
            break;
        }
        if !did_work {
            match candidates.recv_timeout(Duration::from_millis(50)) {
                Ok((input, z)) => {
                    let t = Instant::now();
                    worker.offer(&input, z.view())?;
                    busy += t.elapsed();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if stop.load(Ordering::Relaxed) || !settings.adapt {
                        break;
                    }
                }
            }
        }
    }
    publish(&worker);
    save(&worker)?;
    if state.is_some() {
        info!(replay = worker.replay.len(), steps = worker.adapter.steps(), "state saved on exit");
    }
    Ok(())
}

/// Counts candidates that arrive while the budget is spent; they are not offered.
fn drain_unseen(candidates: &Receiver<Candidate>, shared: &Shared) {
    while candidates.try_recv().is_ok() {
        shared.candidates_skipped.fetch_add(1, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
fn inference_loop(
    model: &Model,
    config: &AgentConfig,
    slot: &LatestSlot<CapturedFrame>,
    heads: &Mutex<Arc<Vec<Head<f32>>>>,
    candidates: SyncSender<Candidate>,
    stop: &AtomicBool,
    shared: &Shared,
    summary: &mut RunSummary,
) -> anyhow::Result<()> {
    let mut classifier = model.classifier()?;
    let mut out: Box<dyn Write> = match &config.events {
        Some(path) => {
            Box::new(std::io::BufWriter::new(std::fs::File::create(path).with_context(|| {
                format!(
                    "events file {}: cannot create it; choose a writable --events path",
                    path.display()
                )
            })?))
        }
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let start = Instant::now();
    let mut window = Window::new(0);
    let mut all_latencies: Vec<u32> = Vec::new();
    let mut clusters = Vec::new();
    let mut confidence = Vec::new();
    let mut line = Vec::with_capacity(256);

    loop {
        let frame = match slot.take(Duration::from_millis(100)) {
            Taken::Item(frame) => frame,
            Taken::Empty => {
                status(&mut window, slot, shared, config, &mut out)?;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            Taken::Closed => break,
        };

        let z = classifier.embed_frame(&frame)?;
        let current = Arc::clone(&heads.lock().unwrap_or_else(|p| p.into_inner()));
        clusters.clear();
        confidence.clear();
        for (c, p) in classify(&current, z.view()) {
            clusters.push(c);
            confidence.push(p);
        }
        let latency = frame.captured_at.elapsed();
        let timestamp_ms = SystemTime::now()
            .checked_sub(latency)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        line.clear();
        serde_json::to_writer(
            &mut line,
            &Event {
                frame: frame.number,
                timestamp_ms,
                clusters: &clusters,
                confidence: &confidence,
                latency_ms: latency.as_secs_f32() * 1000.0,
                label: frame.label,
            },
        )?;
        line.push(b'\n');
        out.write_all(&line).context("writing prediction events")?;

        if summary.predictions == 0 {
            summary.first_prediction_ms = config.started.elapsed().as_secs_f64() * 1000.0;
            info!(after_ms = format!("{:.0}", summary.first_prediction_ms), "first prediction");
        }
        summary.predictions += 1;
        summary.labelled_predictions += u64::from(frame.label.is_some());
        let latency_us = latency.as_micros().min(u32::MAX as u128) as u32;
        window.latencies_us.push(latency_us);
        window.predictions += 1;
        if all_latencies.len() < 1 << 20 {
            all_latencies.push(latency_us);
        }

        match candidates.try_send((classifier.input().to_vec(), z)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                shared.candidates_skipped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
        slot.recycle(frame);

        if config.max_predictions.is_some_and(|n| summary.predictions >= n) {
            break;
        }
        if window.started.elapsed() >= config.status_every {
            status(&mut window, slot, shared, config, &mut out)?;
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    out.flush().context("writing prediction events")?;
    drop(candidates);

    summary.elapsed_s = start.elapsed().as_secs_f64();
    summary.predictions_per_s = summary.predictions as f64 / summary.elapsed_s.max(1e-9);
    all_latencies.sort_unstable();
    summary.latency_p50_ms = percentile_ms(&all_latencies, 0.5);
    summary.latency_p99_ms = percentile_ms(&all_latencies, 0.99);
    Ok(())
}

/// Logs the status line of the window that just ended and starts a new one.
fn status(
    window: &mut Window,
    slot: &LatestSlot<CapturedFrame>,
    shared: &Shared,
    config: &AgentConfig,
    out: &mut Box<dyn Write>,
) -> anyhow::Result<()> {
    let elapsed = window.started.elapsed();
    if elapsed < config.status_every {
        return Ok(());
    }
    out.flush().context("writing prediction events")?;
    let mut sorted = std::mem::take(&mut window.latencies_us);
    sorted.sort_unstable();
    let dropped = slot.dropped();
    info!(
        "{:.1} frames/s, latency p50 {:.2} ms p99 {:.2} ms, dropped {} (total {}), replay {} pairs ({} seen), adaptation {} steps, {} rollbacks",
        window.predictions as f64 / elapsed.as_secs_f64(),
        percentile_ms(&sorted, 0.5),
        percentile_ms(&sorted, 0.99),
        dropped - window.dropped_at_start,
        dropped,
        shared.replay_len.load(Ordering::Relaxed),
        shared.replay_seen.load(Ordering::Relaxed),
        shared.adapt_steps.load(Ordering::Relaxed),
        shared.rollbacks.load(Ordering::Relaxed),
    );
    sorted.clear();
    *window = Window::new(dropped);
    window.latencies_us = sorted;
    Ok(())
}
