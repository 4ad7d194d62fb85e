//! `sc-train`: train Self-Classifier models, evaluate them, predict clusters, export
//! bundles. The logic lives in the library; this file parses flags and prints results.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use selfclass_trainer::augment::AugmentConfig;
use selfclass_trainer::data::{Dataset, Split};
use selfclass_trainer::model::{BackboneConfig, Model, ModelConfig};
use selfclass_trainer::optim::OptimizerKind;
use selfclass_trainer::refit::{self, RefitConfig};
use selfclass_trainer::train::{self, CheckpointState, RunInputs, TrainConfig};
use selfclass_trainer::{eval, export};

#[derive(Parser)]
#[command(
    name = "sc-train",
    version,
    about = "Learn classes from unlabelled images (Self-Classifier)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads for the numeric kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

// Parsed once per run, so the size of the training variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Train a model; writes checkpoints every epoch and a bundle at the end.
    Train(TrainArgs),
    /// Score a model's clusters against the labels of a data set.
    Eval(EvalArgs),
    /// Write each image's cluster under every head, and a confidence, as CSV.
    Predict(PredictArgs),
    /// Write a `.scb` bundle (and optionally the ONNX network) from a checkpoint.
    Export(ExportArgs),
    /// Fit the heads of a finished run again on its frozen backbone from several starts,
    /// keep the lowest-loss one per head, rewrite the checkpoint and the bundle.
    Refit(RefitArgs),
}

/// The head refit that ends a run (see `selfclass_trainer::refit`).
#[derive(Args)]
struct RefitFlags {
    /// Random starts per head in the final head refit (`train`: 0 keeps the heads as
    /// trained; at most 1000).
    #[arg(long, default_value_t = RefitConfig::default().restarts)]
    refit_restarts: usize,
    /// Passes over the training images per refit start.
    #[arg(long, default_value_t = RefitConfig::default().epochs)]
    refit_epochs: usize,
    /// Augmented views embedded per training image for the refit (2 to 32).
    #[arg(long, default_value_t = RefitConfig::default().views)]
    refit_views: usize,
    /// Peak Adam step size of the refit.
    #[arg(long, default_value_t = RefitConfig::default().lr)]
    refit_lr: f64,
}

impl RefitFlags {
    fn config(&self) -> RefitConfig {
        RefitConfig {
            restarts: self.refit_restarts,
            epochs: self.refit_epochs,
            views: self.refit_views,
            lr: self.refit_lr,
        }
    }
}

#[derive(Args)]
struct RefitArgs {
    /// Checkpoint directory of a finished run.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The run's training data (IDX file, directory of IDX files, or image folder).
    #[arg(long)]
    data: PathBuf,
    /// Held-out data to score the refitted heads on (default: the test split of --data).
    #[arg(long)]
    test_data: Option<PathBuf>,
    #[command(flatten)]
    refit: RefitFlags,
    /// Where to write the bundle (default: CHECKPOINT/model.scb).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Use at most this many training images (default: as many as the run trained on).
    #[arg(long)]
    limit: Option<usize>,
    /// Embedding pairs stored in the bundle for on-device replay.
    #[arg(long, default_value_t = 3000)]
    anchors: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Arch {
    /// The reference network: 3x3 conv blocks, then pooling.
    Plain,
    /// A compact ResNet of basic blocks.
    Resnet,
}

#[derive(Clone, Copy, ValueEnum)]
enum Opt {
    Adamw,
    Sgd,
}

#[derive(Args)]
struct TrainArgs {
    /// IDX file, directory of IDX files, or image folder.
    #[arg(long)]
    data: PathBuf,
    /// Directory for checkpoints and the final bundle.
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// Continue the run whose checkpoint is in --out.
    #[arg(long)]
    resume: bool,
    /// Backbone family.
    #[arg(long, value_enum, default_value_t = Arch::Plain)]
    arch: Arch,
    /// Channels of each block of the plain backbone.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128,256")]
    widths: Vec<usize>,
    /// Channels of the ResNet's first stage (each later stage doubles it).
    #[arg(long, default_value_t = 32)]
    resnet_width: usize,
    /// Residual blocks per ResNet stage.
    #[arg(long, value_delimiter = ',', default_value = "1,1,1,1")]
    resnet_blocks: Vec<usize>,
    /// Hidden width of the projection MLP.
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    /// Embedding dimension.
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Classes of each head.
    #[arg(long, num_args = 1.., default_values_t = [10, 20, 40, 80])]
    heads: Vec<usize>,
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Images per step; at least 4 x the largest head.
    #[arg(long, default_value_t = 320)]
    batch: usize,
    #[arg(long, value_enum, default_value_t = Opt::Adamw)]
    optimizer: Opt,
    /// Peak learning rate (default 1e-3 for AdamW, 0.05 for SGD).
    #[arg(long)]
    lr: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Epochs of linear warm-up before the cosine decay.
    #[arg(long, default_value_t = 1.0)]
    warmup_epochs: f64,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.0)]
    final_lr_fraction: f64,
    /// Row (class) softmax temperature.
    #[arg(long, default_value_t = 0.1)]
    row_temp: f64,
    /// Column (batch) softmax temperature.
    #[arg(long, default_value_t = 0.05)]
    col_temp: f64,
    /// Past embeddings kept for the nearest-neighbour positive.
    #[arg(long, default_value_t = 8192)]
    nn_queue: usize,
    /// Disable the nearest-neighbour positive.
    #[arg(long, conflicts_with = "nn_queue")]
    no_nn: bool,
    /// Small local crops per image, besides the two global views.
    #[arg(long, default_value_t = 2)]
    local_crops: usize,
    /// Side of the local crops in pixels.
    #[arg(long, default_value_t = 16)]
    local_size: usize,
    /// Area range of the global crops, "min,max".
    #[arg(long, value_delimiter = ',', default_value = "0.4,1.0")]
    global_scale: Vec<f32>,
    /// Area range of the local crops, "min,max".
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.4")]
    local_scale: Vec<f32>,
    /// Probability of a horizontal flip.
    #[arg(long, default_value_t = 0.5)]
    flip: f32,
    /// Brightness offset range.
    #[arg(long, default_value_t = 0.3)]
    brightness: f32,
    /// Contrast factor range around 1.
    #[arg(long, default_value_t = 0.4)]
    contrast: f32,
    /// Probability of a Gaussian blur.
    #[arg(long, default_value_t = 0.0)]
    blur: f32,
    /// Probability of Gaussian noise.
    #[arg(long, default_value_t = 0.0)]
    noise: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out data for the per-epoch report (default: the test split of --data).
    #[arg(long)]
    test_data: Option<PathBuf>,
    /// Training images used as the k-NN bank in the per-epoch report (0: no k-NN).
    #[arg(long, default_value_t = 10_000)]
    knn_bank: usize,
    #[arg(long, default_value_t = 20)]
    knn_k: usize,
    #[command(flatten)]
    refit: RefitFlags,
    /// Embedding pairs stored in the bundle for on-device replay.
    #[arg(long, default_value_t = 3000)]
    anchors: usize,
    /// Where to write the final bundle (default: OUT/model.scb).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Stop after this many epochs in this invocation (continue with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Use at most this many training images.
    #[arg(long)]
    limit: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// A checkpoint directory or a `.scb` bundle.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "test")]
    split: String,
    /// Head to score (index); default: the head with as many classes as the labels.
    #[arg(long)]
    head: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PredictArgs {
    /// A checkpoint directory or a `.scb` bundle.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "test")]
    split: String,
    /// CSV file to write: one row per image in the data set's order (IDX order; for
    /// folders, sub-folders then files in name order), its label when the data has them,
    /// the cluster of every head and the confidence of each (softmax probability at the
    /// temperature the device reports, 0.1).
    #[arg(long)]
    out: PathBuf,
    /// Only the first N images.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Args)]
struct ExportArgs {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Bundle to write.
    #[arg(long)]
    out: PathBuf,
    /// Also write the f32 ONNX network here.
    #[arg(long)]
    onnx: Option<PathBuf>,
    /// Training data for the replay anchors (none without it).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 3000)]
    anchors: usize,
}

fn main() {
    selfclass_trainer::tune_cpu();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(threads) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("setting up threads")?;
    }
    let device = default_device()?;
    match cli.command {
        Command::Train(args) => train_command(args, &device),
        Command::Eval(args) => eval_command(args, &device),
        Command::Predict(args) => predict_command(args, &device),
        Command::Export(args) => export_command(args, &device),
        Command::Refit(args) => refit_command(args, &device),
    }
}

#[cfg(feature = "cuda")]
fn default_device() -> Result<Device> {
    Ok(Device::new_cuda(0)?)
}

#[cfg(not(feature = "cuda"))]
fn default_device() -> Result<Device> {
    Ok(Device::Cpu)
}

fn pair(values: &[f32], flag: &str) -> Result<(f32, f32)> {
    match values {
        [lo, hi] => Ok((*lo, *hi)),
        _ => bail!("--{flag} takes two numbers, \"min,max\""),
    }
}

/// The command line as a bundle records it: the program by its name, not by where this
/// machine keeps it (`/tmp/x/sc-train train ...` becomes `sc-train train ...`).
fn recorded_command_line(line: &str) -> String {
    let (program, rest) = line.split_once(' ').unwrap_or((line, ""));
    let name = Path::new(program).file_name().map_or(program.into(), |n| n.to_string_lossy());
    let name = if name.starts_with("sc-train") { "sc-train".into() } else { name };
    if rest.is_empty() {
        name.into_owned()
    } else {
        format!("{name} {rest}")
    }
}

fn train_command(args: TrainArgs, device: &Device) -> Result<()> {
    let command_line = recorded_command_line(&std::env::args().collect::<Vec<_>>().join(" "));
    let mut train_set = Dataset::load(&args.data, Split::Train)?;
    if let Some(limit) = args.limit {
        train_set = train_set.take(limit);
    }
    let test_path = args.test_data.clone().unwrap_or_else(|| args.data.clone());
    let chw = (train_set.channels, train_set.height, train_set.width);
    let test_set = match Dataset::load(&test_path, Split::Test) {
        Ok(set) if (set.channels, set.height, set.width) == chw => Some(set),
        Ok(set) if args.test_data.is_some() => {
            check_shape(&set, chw, "--test-data")?;
            None
        }
        Ok(_) => {
            tracing::info!("the test split's images differ in shape from the training images; per-epoch scores disabled");
            None
        }
        Err(e) if args.test_data.is_some() => return Err(e.into()),
        Err(e) => {
            tracing::info!("no labelled test split, per-epoch scores disabled: {e}");
            None
        }
    };
    tracing::info!(images = train_set.len(), size = ?(train_set.channels, train_set.height, train_set.width), "training data loaded");

    let (lr, optimizer) = match args.optimizer {
        Opt::Adamw => {
            (args.lr.unwrap_or(1e-3), OptimizerKind::Adamw { beta1: 0.9, beta2: 0.999, eps: 1e-8 })
        }
        Opt::Sgd => (args.lr.unwrap_or(0.05), OptimizerKind::Sgd { momentum: args.momentum }),
    };
    let backbone = match args.arch {
        Arch::Plain => BackboneConfig::Plain { widths: args.widths.clone() },
        Arch::Resnet => {
            BackboneConfig::Resnet { width: args.resnet_width, blocks: args.resnet_blocks.clone() }
        }
    };
    let (mean, std) = train::channel_stats(&train_set);
    let config = TrainConfig {
        model: ModelConfig {
            in_channels: train_set.channels,
            backbone,
            hidden: args.hidden,
            dim: args.dim,
            heads: args.heads.clone(),
        },
        augment: AugmentConfig {
            global_scale: pair(&args.global_scale, "global-scale")?,
            local_crops: args.local_crops,
            local_size: args.local_size,
            local_scale: pair(&args.local_scale, "local-scale")?,
            flip: args.flip,
            brightness: args.brightness,
            contrast: args.contrast,
            blur: args.blur,
            noise: args.noise,
            noise_std: 0.03,
            mean,
            std,
        },
        epochs: args.epochs,
        batch_size: args.batch,
        optimizer,
        lr,
        weight_decay: args.weight_decay,
        warmup_epochs: args.warmup_epochs,
        final_lr_fraction: args.final_lr_fraction,
        row_temperature: args.row_temp,
        col_temperature: args.col_temp,
        nn_queue: if args.no_nn { 0 } else { args.nn_queue },
        seed: args.seed,
        knn_bank: args.knn_bank,
        knn_k: args.knn_k,
    };
    let train_set = Arc::new(train_set);
    let inputs = RunInputs {
        train: train_set.clone(),
        test: test_set.clone(),
        out_dir: args.out.clone(),
        resume: args.resume,
        stop_after: args.stop_after,
        progress: !args.quiet,
        command_line: command_line.clone(),
    };
    args.refit.config().validate()?;
    let bundle_path = args.bundle.clone().unwrap_or_else(|| args.out.join("model.scb"));
    if args.out.is_dir() || args.bundle.is_some() {
        check_bundle_path(&bundle_path, &args.out)?;
    }
    let output = train::run(config, inputs, device)?;
    if output.state.epochs_done < output.state.config.epochs {
        tracing::info!(
            epochs_done = output.state.epochs_done,
            "stopped early; continue with --resume"
        );
        return Ok(());
    }
    let (mut model, mut state) = (output.model, output.state);
    let refit = args.refit.config();
    let line = if refit.restarts > 0 && state.refit.is_none() {
        Some(refit_heads_and_score(
            &mut model,
            &mut state,
            &train_set,
            test_set.as_ref(),
            &refit,
            !args.quiet,
        )?)
    } else {
        if state.refit.is_some() {
            tracing::info!("the heads were refitted when the run finished; the --refit flags are not used again");
        }
        None
    };
    let bundle =
        export::build_bundle(&mut model, &state, &train_set, args.anchors, &provenance(&state))?;
    bundle.save(&bundle_path)?;
    if let Some(line) = line {
        // After the bundle, as `refit` does: a failure in between leaves a checkpoint that
        // `--resume` refits again, to the same heads.
        train::update_checkpoint(&args.out, &mut model, &state)?;
        println!("{line}");
    }
    tracing::info!(path = %bundle_path.display(), "bundle written");
    Ok(())
}

/// Embeddings and head outputs from either a checkpoint directory or a bundle.
fn load_predictions(
    model_path: &Path,
    data: &Dataset,
    device: &Device,
) -> Result<export::Predictions> {
    if model_path.is_dir() {
        let (mut model, state) = train::load_model(model_path, device)?;
        let z = eval::embed_dataset(&mut model, data, &state.mean, &state.std)?;
        let (clusters, confidence) = eval::predict(&model, &z)?;
        Ok(export::Predictions { head_classes: model.config.heads.clone(), clusters, confidence })
    } else {
        Ok(export::predict_with_bundle(model_path, data)?)
    }
}

fn eval_command(args: EvalArgs, device: &Device) -> Result<()> {
    let split: Split = args.split.parse()?;
    let data = Dataset::load(&args.data, split)?;
    let Some(labels) = data.labels.clone() else {
        bail!(
            "{}: the {} split has no labels, so there is nothing to score against",
            args.data.display(),
            args.split
        );
    };
    let export::Predictions { head_classes: heads, clusters, .. } =
        load_predictions(&args.model, &data, device)?;
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let head = match args.head {
        Some(h) if h >= heads.len() => {
            bail!("--head {h}: the model has {} heads (0..{})", heads.len(), heads.len() - 1)
        }
        Some(h) => h,
        None => heads.iter().position(|&k| k == classes).unwrap_or(0),
    };
    let scores = selfclass_runtime::metrics::score(&labels, &clusters[head])?;
    let report = serde_json::json!({
        "head": head,
        "head_classes": heads[head],
        "acc": scores.acc,
        "nmi": scores.nmi,
        "ami": scores.ami,
        "ari": scores.ari,
        "n": scores.n,
        "clusters_used": scores.clusters_used,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "head {head} ({} classes): ACC {:.4}  NMI {:.4}  AMI {:.4}  ARI {:.4}  on {} images, {} clusters used",
            heads[head], scores.acc, scores.nmi, scores.ami, scores.ari, scores.n, scores.clusters_used
        );
    }
    Ok(())
}

fn predict_command(args: PredictArgs, device: &Device) -> Result<()> {
    use std::io::Write;
    let split: Split = args.split.parse()?;
    let mut data = Dataset::load(&args.data, split)?;
    if let Some(limit) = args.limit {
        data = data.take(limit);
    }
    let export::Predictions { head_classes: heads, clusters, confidence } =
        load_predictions(&args.model, &data, device)?;
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut header = vec!["index".to_string()];
    if data.labels.is_some() {
        header.push("label".into());
    }
    header.extend(heads.iter().enumerate().map(|(i, k)| format!("head{i}_k{k}")));
    header.extend((0..heads.len()).map(|i| format!("confidence{i}")));
    writeln!(out, "{}", header.join(","))?;
    for i in 0..data.len() {
        let mut row = vec![i.to_string()];
        if let Some(labels) = &data.labels {
            row.push(labels[i].to_string());
        }
        row.extend(clusters.iter().map(|c| c[i].to_string()));
        row.extend(confidence.iter().map(|c| format!("{:.4}", c[i])));
        writeln!(out, "{}", row.join(","))?;
    }
    out.flush().with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!(images = data.len(), path = %args.out.display(), "predictions written");
    Ok(())
}

/// The bundle a command is about to write, checked before any work: not a directory, not
/// one of a checkpoint's own files, in a directory that exists.
fn check_bundle_path(path: &Path, checkpoint_dir: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("bundle {}: is a directory; give a file path such as DIR/model.scb", path.display());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!(
            "bundle {}: the directory {} does not exist; create it first",
            path.display(),
            parent.display()
        );
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let own = [train::CHECKPOINT_STATE, train::CHECKPOINT_TENSORS];
    let same_dir =
        std::fs::canonicalize(&parent).ok() == std::fs::canonicalize(checkpoint_dir).ok();
    if same_dir && own.contains(&name) {
        bail!("bundle {}: that is the run's checkpoint; write the bundle elsewhere (for example DIR/model.scb)", path.display());
    }
    Ok(())
}

/// `data`'s images have the shape the run was trained on; `flag` names where they came from.
fn check_shape(data: &Dataset, chw: (usize, usize, usize), flag: &str) -> Result<()> {
    if (data.channels, data.height, data.width) != chw {
        bail!(
            "{flag} {}: holds {}x{}x{} images (channels x height x width); the run was trained on {}x{}x{}",
            data.origin.display(),
            data.channels,
            data.height,
            data.width,
            chw.0,
            chw.1,
            chw.2
        );
    }
    Ok(())
}

/// Refits the heads of `model` in memory and returns the JSON line to print once the
/// bundle and checkpoint are written: the refit's record and, when `test` has labels, the
/// refitted heads' scores on it. `state.refit` records it.
fn refit_heads_and_score(
    model: &mut Model,
    state: &mut CheckpointState,
    train_set: &Dataset,
    test: Option<&Dataset>,
    refit: &RefitConfig,
    progress: bool,
) -> Result<serde_json::Value> {
    // The backbone stays frozen, so the held-out embeddings serve before and after.
    let test = match test.and_then(|t| Some((t.labels.clone()?, t))) {
        Some((labels, test)) => {
            let z = eval::embed_dataset(model, test, &state.mean, &state.std)?;
            let (n, dim) = z.dims2()?;
            let rows = ndarray::Array2::from_shape_vec((n, dim), z.flatten_all()?.to_vec1()?)?;
            Some((z, refit::HeldOut { z: rows, labels }))
        }
        None => None,
    };
    let held_out = test.as_ref().map(|(_, h)| h);
    let mut record = refit::refit_heads(model, state, train_set, refit, held_out, progress)?;
    record.command_line = recorded_command_line(&std::env::args().collect::<Vec<_>>().join(" "));
    state.refit = Some(record.clone());
    let mut line = serde_json::json!({ "refit": record });
    if let Some((z, held_out)) = &test {
        let (clusters, _) = eval::predict(model, z)?;
        let labels = &held_out.labels;
        let head = eval::default_head(model, Some(labels));
        line["test"] = serde_json::to_value(eval::score_head(model, &clusters, labels, head)?)?;
    }
    Ok(line)
}

/// The command lines a bundle records: the training run's, and the refit's when it was a
/// separate command.
fn provenance(state: &CheckpointState) -> String {
    let train = recorded_command_line(&state.command_line);
    match &state.refit {
        Some(r) if !r.command_line.is_empty() && r.command_line != train => {
            format!("{train}; {}", r.command_line)
        }
        _ => train,
    }
}

fn refit_command(args: RefitArgs, device: &Device) -> Result<()> {
    let refit = args.refit.config();
    refit.validate()?;
    if refit.restarts == 0 {
        bail!("--refit-restarts 0 would leave the heads as they are; give at least 1");
    }
    let bundle_path = args.bundle.clone().unwrap_or_else(|| args.checkpoint.join("model.scb"));
    check_bundle_path(&bundle_path, &args.checkpoint)?;
    let (mut model, mut state) = train::load_model(&args.checkpoint, device)?;
    if state.epochs_done < state.config.epochs {
        bail!(
            "the run in {} has done {} of its {} epochs; finish it with `sc-train train --resume` first",
            args.checkpoint.display(),
            state.epochs_done,
            state.config.epochs
        );
    }
    let mut train_set = Dataset::load(&args.data, Split::Train)?;
    check_shape(&train_set, state.input_chw, "--data")?;
    let limit = args.limit.unwrap_or(state.train_images);
    if train_set.len() > limit {
        train_set = train_set.take(limit);
    }
    if train_set.origin.display().to_string() != state.dataset
        || train_set.len() != state.train_images
    {
        tracing::warn!(
            data = %train_set.origin.display(),
            images = train_set.len(),
            trained_on = %state.dataset,
            trained_images = state.train_images,
            "refitting on other images than the run was trained on"
        );
    }
    state.config.validate(&train_set).context("the checkpoint's settings")?;
    let channels = state.input_chw.0;
    if state.mean.len() != channels
        || state.std.len() != channels
        || !state.std.iter().all(|s| s.is_finite() && *s > 0.0)
    {
        bail!(
            "{}: its normalisation (mean {:?}, std {:?}) does not fit {channels}-channel images",
            args.checkpoint.join(train::CHECKPOINT_STATE).display(),
            state.mean,
            state.std
        );
    }
    let test_set = match &args.test_data {
        Some(path) => {
            let set = Dataset::load(path, Split::Test)?;
            check_shape(&set, state.input_chw, "--test-data")?;
            Some(set)
        }
        None => Dataset::load(&args.data, Split::Test).ok().filter(|t| {
            (t.channels, t.height, t.width) == state.input_chw && t.origin != train_set.origin
        }),
    };
    let line = refit_heads_and_score(
        &mut model,
        &mut state,
        &train_set,
        test_set.as_ref(),
        &refit,
        !args.quiet,
    )?;
    // The bundle first, then the checkpoint: a failure or a kill in between leaves the
    // checkpoint as it was, and running the same command again gives the same heads.
    let bundle =
        export::build_bundle(&mut model, &state, &train_set, args.anchors, &provenance(&state))?;
    bundle.save(&bundle_path)?;
    train::update_checkpoint(&args.checkpoint, &mut model, &state)?;
    println!("{line}");
    tracing::info!(path = %bundle_path.display(), "bundle written");
    Ok(())
}

fn export_command(args: ExportArgs, device: &Device) -> Result<()> {
    check_bundle_path(&args.out, &args.checkpoint)?;
    let (mut model, state) = train::load_model(&args.checkpoint, device)?;
    let anchors_from = match &args.data {
        Some(path) => Dataset::load(path, Split::Train)?,
        None => Dataset {
            pixels: Vec::new(),
            channels: state.input_chw.0,
            height: state.input_chw.1,
            width: state.input_chw.2,
            labels: None,
            class_names: Vec::new(),
            origin: PathBuf::new(),
        },
    };
    let bundle =
        export::build_bundle(&mut model, &state, &anchors_from, args.anchors, &provenance(&state))?;
    bundle.save(&args.out)?;
    if let Some(onnx) = &args.onnx {
        let bytes = export::onnx_bytes(&mut model, state.input_chw)?;
        std::fs::write(onnx, bytes).with_context(|| format!("writing {}", onnx.display()))?;
    }
    tracing::info!(path = %args.out.display(), "bundle written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::recorded_command_line;

    #[test]
    fn the_recorded_command_line_names_the_program_not_its_path() {
        assert_eq!(
            recorded_command_line("/tmp/build-7/sc-train train --data d --epochs 20"),
            "sc-train train --data d --epochs 20"
        );
        assert_eq!(recorded_command_line("./target/release/sc-train-b export"), "sc-train export");
        assert_eq!(recorded_command_line("sc-train"), "sc-train");
    }
}
