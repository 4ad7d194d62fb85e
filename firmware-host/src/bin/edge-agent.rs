//! `edge-agent`: classify a camera or file stream with a selfclass model, adapt the heads
//! on the device, and discover the clusters in what it has seen.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use selfclass_firmware_host::agent::{self, AgentConfig, Pacing};
use selfclass_firmware_host::camera;
use selfclass_firmware_host::discover_cmd::{self, DiscoverInput, DiscoverOptions};
use selfclass_firmware_host::pipeline::{adapt_params_for, resolve_model, Model, DEFAULT_MODEL};
use selfclass_firmware_host::source::{self, SourceSpec};
use selfclass_firmware_host::update::edge::{EdgeOptions, EdgeUpdates};
use selfclass_firmware_host::update::Probation;
use selfclass_runtime::discover::DiscoverParams;
use tracing::info;

/// Classify frames with a selfclass model, keep learning on the device, discover clusters.
///
/// Prints one JSON line per prediction on standard output (or --events FILE) and a status
/// line on standard error every few seconds.
#[derive(Parser, Debug)]
#[command(name = "edge-agent", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
    /// Log level (error, warn, info, debug); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Find the clusters in a set of images or in a state directory's replay.
    Discover(DiscoverArgs),
    /// List the cameras that can capture.
    Cameras,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Model bundle (.scb).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Frames from: `demo` (the shipped sample), an image folder, an IDX file, a .y4m file,
    /// or `-` for Y4M on standard input.
    #[arg(long, conflicts_with = "camera")]
    source: Option<String>,
    /// Frames from camera N (needs a build with --features camera).
    #[arg(long)]
    camera: Option<u32>,
    /// Stop after N predictions.
    #[arg(long)]
    frames: Option<u64>,
    /// Play a file source at F frames per second, dropping frames inference cannot take
    /// (0: hand over every frame). Default: 1000 for demo, 0 for files, live for pipes.
    #[arg(long)]
    fps: Option<f64>,
    /// Write the JSON lines to FILE instead of standard output.
    #[arg(long)]
    events: Option<PathBuf>,
    /// Keep the replay and the adapted heads in DIR, restored at start.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Do not adapt the heads (the replay is still kept).
    #[arg(long)]
    no_adapt: bool,
    /// Milliseconds per second the adaptation thread may compute.
    #[arg(long, default_value_t = 400)]
    adapt_budget_ms: u64,
    /// Adam step size of adaptation (default 0.01).
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Stream pairs the replay buffer holds.
    #[arg(long, default_value_t = 4096)]
    replay_capacity: usize,
    /// Seconds between state saves.
    #[arg(long, default_value_t = 5.0)]
    save_every_s: f64,
    /// Seconds between status lines.
    #[arg(long, default_value_t = 3.0)]
    status_every_s: f64,
    /// Seed of the replay's and the augmentation's random draws.
    #[arg(long, default_value_t = 0x5e1f)]
    seed: u64,
    /// Accept model updates from `fleet` on ADDR (e.g. 0.0.0.0:7700); off unless given.
    /// Runs the installed model in STATE/update (seeded from --model); needs --state, --trust.
    #[arg(long, requires_all = ["trust", "state"])]
    listen: Option<std::net::SocketAddr>,
    /// Directory of the fleet public keys (*.pub) that may sign models and orders.
    #[arg(long, requires = "listen")]
    trust: Option<PathBuf>,
    /// This device's name in the fleet inventory (default: the host name).
    #[arg(long, requires = "listen")]
    device_name: Option<String>,
    /// Seconds a newly installed model must run before it is kept.
    #[arg(long, default_value_t = 30.0, requires = "listen")]
    probation_s: f64,
}

#[derive(Args, Debug)]
struct DiscoverArgs {
    /// Model bundle (.scb). Default: with --state, the model installed there by `fleet`
    /// (STATE/update/current.scb) if any, else the shipped model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Images: `demo`, an image folder (sub-folders are labels), an IDX file (labels
    /// beside it are used), a .y4m file or `-`. Give this or --state.
    #[arg(long, conflicts_with = "state", required_unless_present = "state")]
    source: Option<String>,
    /// A state directory: discover in its replay, with its adapted heads. Give this or
    /// --source.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Output folder for clusters.json, the contact sheets and index.html.
    #[arg(long)]
    out: PathBuf,
    /// Smallest cluster that counts.
    #[arg(long, default_value_t = 5)]
    min_cluster_size: usize,
    /// Exemplar images per cluster.
    #[arg(long, default_value_t = 16)]
    exemplars: usize,
    /// Use at most N images.
    #[arg(long)]
    limit: Option<usize>,
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();

    let result = match cli.command {
        None => run(cli.run, started),
        Some(Command::Discover(args)) => discover(args),
        Some(Command::Cameras) => cameras(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs, mut started: Instant) -> anyhow::Result<()> {
    let spec = match (&args.source, args.camera) {
        (Some(s), _) => Some(SourceSpec::parse(s)),
        (None, Some(_)) => None,
        (None, None) => anyhow::bail!("no frame source; give --source demo|PATH|- or --camera N"),
    };
    anyhow::ensure!(args.frames != Some(0), "--frames 0: give a positive number of predictions");
    anyhow::ensure!(
        args.adapt_budget_ms <= 1000,
        "--adapt-budget-ms {}: at most 1000 milliseconds per second",
        args.adapt_budget_ms
    );
    if args.listen.is_some() && matches!(spec, Some(SourceSpec::Stdin)) {
        tracing::warn!(
            "--source - with --listen: standard input cannot be reopened when an update restarts the run; use a camera, the demo or a file"
        );
    }
    for (name, value) in
        [("--save-every-s", args.save_every_s), ("--status-every-s", args.status_every_s)]
    {
        anyhow::ensure!(
            value.is_finite() && value > 0.0,
            "{name} {value}: must be a positive number of seconds"
        );
    }
    if let Some(fps) = args.fps {
        anyhow::ensure!(
            fps.is_finite() && fps >= 0.0,
            "--fps {fps}: must be 0 (every frame) or a positive rate"
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                // A second signal: the user does not want to wait for the final save.
                std::process::exit(130);
            }
        })?;
    }
    // With --listen the agent runs the installed model, and a model that `fleet` installs
    // (or a rollback) ends the run so the loop below starts again on it.
    let updates = match args.listen {
        Some(listen) => {
            anyhow::ensure!(
                args.probation_s.is_finite() && args.probation_s > 0.0,
                "--probation-s {}: must be a positive number of seconds",
                args.probation_s
            );
            let window = Duration::from_secs_f64(args.probation_s);
            let options = EdgeOptions {
                listen,
                trust_dir: args.trust.clone().unwrap_or_default(),
                state_dir: args.state.clone().unwrap_or_default(),
                seed_model: resolve_model(&args.model)?,
                device_name: args.device_name.clone(),
                probation: Probation { window, min_frames: 1, max_wait: window * 4 },
            };
            Some(EdgeUpdates::start(options, Arc::clone(&stop))?)
        }
        None => None,
    };
    loop {
        let model_path = updates.as_ref().map_or_else(|| args.model.clone(), |u| u.model_path());
        let model = Model::load(&model_path)?;
        info!(
            model = %model.path.display(),
            version = model.bundle.model_version,
            heads = ?model.bundle.classes_per_head(),
            anchors = model.bundle.anchors()?.map_or(0, |(a, _)| a.nrows()),
            engine = model.backbone.engine(),
            "model loaded"
        );
        let channels = model.bundle.preprocess.channels;
        let source = match (&spec, args.camera) {
            (Some(spec), _) => source::open(spec, channels, true)?,
            (None, Some(index)) => camera::open_camera(index, channels)?,
            (None, None) => unreachable!("checked above"),
        };
        let source = match &updates {
            Some(updates) => updates.count_frames(source),
            None => source,
        };
        let pacing = match (args.fps, &spec) {
            (Some(f), _) if f > 0.0 => Pacing::Rate(f),
            (Some(_), _) => Pacing::Lockstep,
            (None, Some(SourceSpec::Demo)) => Pacing::Rate(1000.0),
            (None, Some(SourceSpec::Stdin)) | (None, None) => Pacing::Live,
            (None, Some(SourceSpec::Path(_))) => Pacing::Lockstep,
        };
        let mut params = adapt_params_for(model.largest_head());
        if let Some(lr) = args.learning_rate {
            params.learning_rate = lr;
        }
        let config = AgentConfig {
            pacing,
            max_predictions: args.frames,
            events: args.events.clone(),
            state: args.state.clone(),
            adapt: !args.no_adapt,
            adapt_budget_ms: args.adapt_budget_ms,
            replay_capacity: args.replay_capacity,
            save_every: Duration::from_secs_f64(args.save_every_s),
            status_every: Duration::from_secs_f64(args.status_every_s),
            adapt_params: Some(params),
            seed: args.seed,
            started,
            collapse_events: updates.as_ref().map(|u| u.collapse_counter()),
        };

        let summary = agent::run(&model, source, &config, Arc::clone(&stop))?;
        if updates.as_ref().is_some_and(|u| u.take_restart()) {
            info!("model changed by an update; restarting on it");
            // The next run's first-prediction time counts from its own start.
            started = Instant::now();
            continue;
        }
        info!(
            predictions = summary.predictions,
            frames_per_s = format!("{:.1}", summary.predictions_per_s),
            p50_ms = format!("{:.2}", summary.latency_p50_ms),
            p99_ms = format!("{:.2}", summary.latency_p99_ms),
            dropped = summary.dropped,
            first_prediction_ms = format!("{:.0}", summary.first_prediction_ms),
            adapt_steps = summary.adapt_steps,
            rollbacks = summary.rollbacks,
            replay = summary.replay_len,
            "done"
        );
        return Ok(());
    }
}

fn discover(args: DiscoverArgs) -> anyhow::Result<()> {
    let installed = args.state.as_ref().map(|s| s.join("update").join("current.scb"));
    let model_path = match (&args.model, installed) {
        (Some(m), _) => m.clone(),
        (None, Some(installed)) if installed.is_file() => {
            info!(model = %installed.display(), "using the model installed in the state directory");
            installed
        }
        (None, _) => PathBuf::from(DEFAULT_MODEL),
    };
    let model = Model::load(&model_path)?;
    let input = match (&args.source, &args.state) {
        (Some(s), _) => DiscoverInput::Source(SourceSpec::parse(s)),
        (None, Some(dir)) => DiscoverInput::State(dir.clone()),
        (None, None) => anyhow::bail!("give --source or --state"),
    };
    let options = DiscoverOptions {
        input,
        out: args.out.clone(),
        params: DiscoverParams {
            min_cluster_size: args.min_cluster_size,
            exemplars: args.exemplars,
            ..DiscoverParams::default()
        },
        limit: args.limit,
    };
    let (found, scores) = discover_cmd::run(&model, &options)?;
    let chosen = found.chosen();
    println!(
        "{} clusters in {} items (head {}, {} classes; a cluster counts from {} items); wrote {}",
        found.clusters_found,
        found.items,
        found.chosen_head,
        chosen.classes,
        found.min_support,
        args.out.join("index.html").display()
    );
    if let Some(s) = scores {
        println!(
            "ACC {:.4}  NMI {:.4}  AMI {:.4}  ARI {:.4}  (n = {}, {} classes)",
            s.acc, s.nmi, s.ami, s.ari, s.n, s.classes
        );
    }
    Ok(())
}

fn cameras() -> anyhow::Result<()> {
    let found = camera::list_cameras()?;
    if found.is_empty() {
        anyhow::bail!(
            "no camera can capture ({} /dev/video* nodes present)",
            camera::video_nodes().len()
        );
    }
    for line in found {
        println!("{line}");
    }
    Ok(())
}
