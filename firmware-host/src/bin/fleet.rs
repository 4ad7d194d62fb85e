//! `fleet`: signs models and moves them onto devices, in stages, with a way back.
//!
//! The work is in `selfclass_firmware_host::update`; this file parses arguments, draws the
//! progress display on stderr and prints the tables (or JSON) on stdout.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::{Parser, Subcommand};
use selfclass_firmware_host::update::client::{
    DeviceClient, Package, PushOptions, PushPhase, Timeouts,
};
use selfclass_firmware_host::update::protocol::{DeviceState, DeviceStatus};
use selfclass_firmware_host::update::rollout::{
    run_rollout, DeviceEntry, DeviceResult, Inventory, Outcome, RolloutEvent, RolloutPlan, Stage,
};
use selfclass_firmware_host::update::{hex, now_unix_ms, FleetKey, UpdateError};
use selfclass_runtime::bundle::Bundle;
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "fleet",
    version,
    about = "Sign selfclass models and push them to devices in stages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make an ed25519 key pair: PREFIX.key (secret) and PREFIX.pub (for trust stores).
    Keygen {
        /// Path prefix of the two files, e.g. keys/fleet.
        #[arg(long)]
        out: PathBuf,
    },
    /// Set a bundle's version and sign it. Versions only go up.
    Sign {
        /// The secret signing key (PREFIX.key from `fleet keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The bundle (.scb) to sign.
        #[arg(long)]
        model: PathBuf,
        /// The version it gets; above any version the devices ran.
        #[arg(long)]
        version: u64,
        /// Where to write the signed bundle (default: over --model).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Push a signed bundle to the inventory: canaries first, then the rest.
    Push {
        /// The signed bundle to install.
        #[arg(long)]
        model: PathBuf,
        /// The devices: a TOML file (see FLEET.md).
        #[arg(long)]
        inventory: PathBuf,
        /// Signing key for the orders (default: the inventory's `key`).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Share of the devices, in percent, that gets the model first.
        #[arg(long, default_value_t = 10)]
        canary: u32,
        /// Start no new device once this many failed.
        #[arg(long, default_value_t = 1)]
        max_failures: usize,
        /// Devices pushed at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        /// Transfer chunk size in KiB.
        #[arg(long, default_value_t = 256)]
        chunk_kib: u32,
        /// Give up on a device whose probation has no verdict after this many seconds.
        #[arg(long, default_value_t = 900)]
        probation_timeout_s: u64,
        /// Print the results as JSON on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show each device's versions, state and health.
    Status {
        /// The devices: a TOML file (see FLEET.md).
        #[arg(long)]
        inventory: PathBuf,
        /// Only this device (default: every device of the inventory).
        #[arg(long)]
        device: Option<String>,
        /// Print JSON on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Order devices back to their previous model.
    Rollback {
        /// The devices: a TOML file (see FLEET.md).
        #[arg(long)]
        inventory: PathBuf,
        /// Only this device (default: every device of the inventory).
        #[arg(long)]
        device: Option<String>,
        /// Signing key for the orders (default: the inventory's `key`).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Why, for the device's log and status.
        #[arg(long, default_value = "operator request")]
        reason: String,
        /// Print JSON on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen { out } => keygen(&out),
        Command::Sign { key, model, version, out } => sign(&key, &model, version, out.as_deref()),
        Command::Push {
            model,
            inventory,
            key,
            canary,
            max_failures,
            parallel,
            chunk_kib,
            probation_timeout_s,
            json,
        } => RolloutPlan::new(canary, max_failures, parallel).and_then(|plan| {
            let options = PushOptions {
                probation_timeout: Duration::from_secs(probation_timeout_s),
                ..PushOptions::default()
            };
            push(&model, &inventory, key.as_deref(), plan, chunk_kib, &options, json)
        }),
        Command::Status { inventory, device, json } => status(&inventory, device.as_deref(), json),
        Command::Rollback { inventory, device, key, reason, json } => {
            rollback(&inventory, device.as_deref(), key.as_deref(), &reason, json)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("fleet: {e}");
            ExitCode::from(2)
        }
    }
}

type CommandResult = Result<bool, UpdateError>;

fn keygen(prefix: &Path) -> CommandResult {
    let key = FleetKey::generate();
    let (secret, public) = key.save(prefix)?;
    println!("secret key {} (keep it private)", secret.display());
    println!("public key {} (copy it into each device's trust store)", public.display());
    Ok(true)
}

fn sign(key_path: &Path, model: &Path, version: u64, out: Option<&Path>) -> CommandResult {
    let key = FleetKey::load(key_path)?;
    let local = |e| UpdateError::Runtime { device: "local".into(), cause: e };
    let mut bundle = Bundle::load(model).map_err(local)?;
    key.sign_bundle(&mut bundle, version, &model.display().to_string())?;
    let out = out.unwrap_or(model);
    bundle.save(out).map_err(local)?;
    let digest = bundle.digest().map_err(local)?;
    println!(
        "{}: version {version}, digest {}, signed by key {}",
        out.display(),
        &hex(&digest)[..16],
        &hex(&key.public_key())[..16]
    );
    Ok(true)
}

fn signing_key(inventory: &Inventory, key: Option<&Path>) -> Result<FleetKey, UpdateError> {
    let path = key.map(Path::to_path_buf).or_else(|| inventory.key.clone()).ok_or_else(|| {
        UpdateError::Inventory {
            path: inventory.path.clone(),
            reason: "no signing key: pass --key or set key = \"...\" in the inventory".into(),
        }
    })?;
    FleetKey::load(&path)
}

#[allow(clippy::too_many_arguments)]
fn push(
    model: &Path,
    inventory_path: &Path,
    key: Option<&Path>,
    plan: RolloutPlan,
    chunk_kib: u32,
    options: &PushOptions,
    json: bool,
) -> CommandResult {
    let inventory = Inventory::load(inventory_path)?;
    let key = signing_key(&inventory, key)?;
    let package = Package::load(model, chunk_kib.saturating_mul(1024))?;
    let bundle = Bundle::from_bytes(&package.bytes, &package.origin)
        .map_err(|e| UpdateError::Runtime { device: "local".into(), cause: e })?;
    if bundle.signature.is_none() {
        return Err(UpdateError::Refused {
            device: "local".into(),
            what: format!("pushing {}", model.display()),
            reason: "the bundle is unsigned; sign it with `fleet sign` first".into(),
        });
    }
    eprintln!(
        "pushing {} (v{}, {} bytes) to {} device(s)",
        model.display(),
        package.version(),
        package.bytes.len(),
        inventory.devices.len()
    );
    let display = ProgressDisplay::new(inventory.devices.len());
    let results = run_rollout(&inventory.devices, &key, &package, plan, options, &|event| {
        display.event(event)
    });
    display.finish();
    if json {
        print_json(&results);
    } else {
        print_rollout_table(&results);
    }
    Ok(results.iter().all(|r| matches!(r.outcome, Outcome::Updated | Outcome::AlreadyCurrent)))
}

/// The live display: a redrawn line on a terminal, plain lines otherwise.
struct ProgressDisplay {
    total: usize,
    live: bool,
    state: Mutex<DisplayState>,
}

#[derive(Default)]
struct DisplayState {
    stage: &'static str,
    done: usize,
    failed: usize,
    active: BTreeMap<String, String>,
}

impl ProgressDisplay {
    fn new(total: usize) -> Self {
        ProgressDisplay {
            total,
            live: std::io::stderr().is_terminal(),
            state: Mutex::new(DisplayState::default()),
        }
    }

    fn event(&self, event: RolloutEvent<'_>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = None;
        match event {
            RolloutEvent::StageStarted { stage, devices } => {
                state.stage = match stage {
                    Stage::Canary => "canary",
                    Stage::Rest => "rollout",
                };
                line = Some(format!("{} stage: {devices} device(s)", state.stage));
            }
            RolloutEvent::Phase { device, phase } => {
                let text = match phase {
                    PushPhase::Connecting { attempt: 1 } => "connecting".to_string(),
                    PushPhase::Connecting { attempt } => format!("reconnecting (try {attempt})"),
                    PushPhase::Transferring { chunks_sent, chunks } => {
                        format!(
                            "sending {}%",
                            u64::from(chunks_sent) * 100 / u64::from(chunks.max(1))
                        )
                    }
                    PushPhase::Installing => "installing".to_string(),
                    PushPhase::Probation { elapsed_ms, window_ms } => {
                        format!("probation {}/{} s", elapsed_ms / 1000, window_ms / 1000)
                    }
                };
                state.active.insert(device.to_string(), text);
            }
            RolloutEvent::Finished(result) => {
                state.active.remove(&result.device);
                if !matches!(result.outcome, Outcome::Skipped(_)) {
                    state.done += 1;
                }
                if result.outcome.is_failure() {
                    state.failed += 1;
                }
                line = Some(format!(
                    "{:>4}/{} {} {}",
                    state.done,
                    self.total,
                    result.device,
                    outcome_text(&result.device, &result.outcome)
                ));
            }
            RolloutEvent::Stopped { reason } => line = Some(format!("stopped: {reason}")),
        }
        let mut err = std::io::stderr().lock();
        if self.live {
            let _ = write!(err, "\r\x1b[K");
        }
        if let Some(line) = line {
            let _ = writeln!(err, "{line}");
        }
        if self.live {
            let active: Vec<String> =
                state.active.iter().take(4).map(|(d, t)| format!("{d} {t}")).collect();
            let more = state.active.len().saturating_sub(4);
            let _ = write!(
                err,
                "[{}] {}/{} done, {} failed | {}{}",
                state.stage,
                state.done,
                self.total,
                state.failed,
                active.join(" | "),
                if more > 0 { format!(" | +{more} more") } else { String::new() }
            );
        }
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.live {
            eprint!("\r\x1b[K");
        }
    }
}

fn version_text(version: Option<u64>) -> String {
    version.map_or_else(|| "-".to_string(), |v| format!("v{v}"))
}

fn outcome_text(device: &str, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Updated => "updated".into(),
        Outcome::AlreadyCurrent => "already current".into(),
        Outcome::Failed(reason) => format!("FAILED: {}", without_device(device, reason)),
        Outcome::Skipped(reason) => format!("skipped: {}", without_device(device, reason)),
    }
}

/// An error's text without the `DEVICE: ` it starts with, for a table that has a device
/// column already.
fn without_device<'a>(device: &str, text: &'a str) -> &'a str {
    text.strip_prefix(device).and_then(|t| t.strip_prefix(": ")).unwrap_or(text)
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| if i == last { c } else { format!("{c:<width$}", width = widths[i]) })
            .collect();
        println!("{}", text.join("  "));
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn print_rollout_table(results: &[DeviceResult]) {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.device.clone(),
                match r.stage {
                    Stage::Canary => "canary".into(),
                    Stage::Rest => "rest".into(),
                },
                version_text(r.old_version),
                version_text(r.new_version),
                format!("{:.1} s", r.elapsed_ms as f64 / 1000.0),
                outcome_text(&r.device, &r.outcome),
            ]
        })
        .collect();
    print_table(&["DEVICE", "STAGE", "OLD", "NEW", "TIME", "OUTCOME"], &rows);
    let count =
        |wanted: fn(&Outcome) -> bool| results.iter().filter(|r| wanted(&r.outcome)).count();
    println!(
        "{} updated, {} already current, {} failed, {} skipped",
        count(|o| matches!(o, Outcome::Updated)),
        count(|o| matches!(o, Outcome::AlreadyCurrent)),
        count(|o| matches!(o, Outcome::Failed(_))),
        count(|o| matches!(o, Outcome::Skipped(_)))
    );
}

/// The rows as JSON (`json`) or as a table with `header`, one line per row.
fn print_rows<R: Serialize>(
    rows: &[R],
    json: bool,
    header: &[&str],
    line: impl Fn(&R) -> Vec<String>,
) {
    if json {
        print_json(&rows);
    } else {
        let table: Vec<Vec<String>> = rows.iter().map(line).collect();
        print_table(header, &table);
    }
}

fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("fleet: encoding JSON: {e}"),
    }
}

/// One device's status for display, or why it could not be had.
#[derive(Serialize)]
struct StatusRow {
    device: String,
    address: String,
    reachable: bool,
    installed_version: Option<u64>,
    installed_sha256: Option<String>,
    previous_version: Option<u64>,
    version_floor: Option<u64>,
    state: String,
    frames_seen: Option<u64>,
    collapse_events: Option<u64>,
    health_age_ms: Option<u64>,
    last_event: Option<String>,
    error: Option<String>,
}

fn state_text(state: &DeviceState) -> String {
    match state {
        DeviceState::NoModel => "no model".into(),
        DeviceState::Running => "running".into(),
        DeviceState::Probation { version, elapsed_ms, window_ms, frames } => format!(
            "probation of v{version} ({}/{} s, {frames} frames)",
            elapsed_ms / 1000,
            window_ms / 1000
        ),
        DeviceState::RolledBack { from_version, reason } => {
            format!("rolled back from v{from_version}: {reason}")
        }
    }
}

fn status_row(entry: &DeviceEntry, status: Result<DeviceStatus, UpdateError>) -> StatusRow {
    let mut row = StatusRow {
        device: entry.name.clone(),
        address: entry.address.clone(),
        reachable: false,
        installed_version: None,
        installed_sha256: None,
        previous_version: None,
        version_floor: None,
        state: "unreachable".into(),
        frames_seen: None,
        collapse_events: None,
        health_age_ms: None,
        last_event: None,
        error: None,
    };
    match status {
        Ok(s) => {
            row.reachable = true;
            row.installed_version = s.installed.map(|m| m.version);
            row.installed_sha256 = s.installed.map(|m| hex(&m.file_sha256));
            row.previous_version = s.previous.map(|m| m.version);
            row.version_floor = Some(s.version_floor);
            row.state = state_text(&s.state);
            row.frames_seen = s.health.map(|h| h.frames_seen);
            row.collapse_events = s.health.map(|h| h.collapse_events);
            row.health_age_ms = s.health.map(|h| now_unix_ms().saturating_sub(h.checked_unix_ms));
            row.last_event = s.last_event;
        }
        Err(e) => row.error = Some(e.to_string()),
    }
    row
}

/// Runs `task` for each device, a few at a time, keeping inventory order.
fn for_each_device<T: Send>(
    devices: &[DeviceEntry],
    task: impl Fn(&DeviceEntry) -> T + Sync,
) -> Vec<T> {
    let task = &task;
    std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .chunks(devices.len().div_ceil(16).max(1))
            .map(|group| scope.spawn(move || group.iter().map(task).collect::<Vec<T>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    })
}

fn status(inventory_path: &Path, device: Option<&str>, json: bool) -> CommandResult {
    let inventory = Inventory::load(inventory_path)?;
    let devices = inventory.select(device)?;
    let timeouts = Timeouts { connect: Duration::from_secs(3), io: Duration::from_secs(10) };
    let rows = for_each_device(&devices, |entry| {
        let status = DeviceClient::connect(&entry.name, &entry.address, timeouts)
            .and_then(|mut c| c.status());
        status_row(entry, status)
    });
    print_rows(
        &rows,
        json,
        &["DEVICE", "INSTALLED", "PREVIOUS", "FLOOR", "HEALTH", "STATE"],
        |r| {
            vec![
                r.device.clone(),
                version_text(r.installed_version),
                version_text(r.previous_version),
                r.version_floor.map_or("-".into(), |v| v.to_string()),
                match (r.frames_seen, r.collapse_events) {
                    (Some(f), Some(c)) => format!("{f} frames, {c} collapses"),
                    _ => "-".into(),
                },
                match &r.error {
                    Some(e) => format!("unreachable: {e}"),
                    None => r.state.clone(),
                },
            ]
        },
    );
    Ok(rows.iter().all(|r| r.reachable))
}

#[derive(Serialize)]
struct RollbackRow {
    device: String,
    from_version: Option<u64>,
    to_version: Option<u64>,
    error: Option<String>,
}

fn rollback(
    inventory_path: &Path,
    device: Option<&str>,
    key: Option<&Path>,
    reason: &str,
    json: bool,
) -> CommandResult {
    let inventory = Inventory::load(inventory_path)?;
    let devices = inventory.select(device)?;
    let key = signing_key(&inventory, key)?;
    let rows = for_each_device(&devices, |entry| {
        let done = DeviceClient::connect(&entry.name, &entry.address, Timeouts::default())
            .and_then(|mut c| c.rollback(&key, reason));
        match done {
            Ok((from, to)) => RollbackRow {
                device: entry.name.clone(),
                from_version: Some(from),
                to_version: Some(to),
                error: None,
            },
            Err(e) => RollbackRow {
                device: entry.name.clone(),
                from_version: None,
                to_version: None,
                error: Some(e.to_string()),
            },
        }
    });
    print_rows(&rows, json, &["DEVICE", "FROM", "TO", "OUTCOME"], |r| {
        vec![
            r.device.clone(),
            version_text(r.from_version),
            version_text(r.to_version),
            r.error.as_ref().map_or("rolled back".into(), |e| {
                format!("FAILED: {}", without_device(&r.device, &e.to_string()))
            }),
        ]
    });
    Ok(rows.iter().all(|r| r.error.is_none()))
}
