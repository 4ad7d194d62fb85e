//! The selfclass benchmark suite: every comparison of selfclass with what its users would
//! otherwise run (onnxruntime, PyTorch), on the same machine in the same run. Prints one
//! table, writes BENCHMARKS.md with the figures, the machine and PNG charts, and exits
//! non-zero when a bench could not run.
//!
//! ```text
//! cargo run --release -p selfclass-bench [-- --quick] [--only embed,adapt,train,agent]
//! ```

mod adapt_step;
mod agent;
mod cargo_build;
mod context;
mod embed;
mod machine;
mod peers;
mod plot;
mod profile_target;
mod report;
mod stats;
mod table;
mod train_step;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Parser;

use context::{Context, Effort, Section};
use peers::{TorchSource, Venv};

/// The comparisons, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Bench {
    /// 1: embedding inference, tract against onnxruntime.
    Embed,
    /// 2 and 5a: head adaptation step against PyTorch, and its scaling.
    Adapt,
    /// 3: training step of the reference network against PyTorch.
    Train,
    /// 4 and 5b: the agent end to end, and its throughput against resolution.
    Agent,
}

impl Bench {
    fn title(self) -> &'static str {
        match self {
            Bench::Embed => "1. Embedding inference",
            Bench::Adapt => "2. Head adaptation step (and 5. its scaling)",
            Bench::Train => "3. Training step",
            Bench::Agent => "4. Agent end to end (and 5. throughput against resolution)",
        }
    }

    fn run(self, ctx: &Context) -> Result<Section> {
        match self {
            Bench::Embed => embed::run(ctx),
            Bench::Adapt => adapt_step::run(ctx),
            Bench::Train => train_step::run(ctx),
            Bench::Agent => agent::run(ctx),
        }
    }
}

#[derive(Debug, Parser)]
#[command(about = "selfclass side by side with onnxruntime and PyTorch")]
struct Args {
    /// A short smoke run: fewer rounds and iterations, fewer scaling points.
    #[arg(long)]
    quick: bool,
    /// Run only these comparisons (comma separated).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Bench>,
    /// Where to write the report (default: BENCHMARKS.md at the workspace root, charts in
    /// bench/plots); elsewhere the charts go to a folder `NAME-plots` beside it.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the peers' PyTorch comes from.
    #[arg(long, value_enum, default_value = "system")]
    torch: TorchSource,
    /// The model bundle (default: models/fashion-mnist.scb).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The PyTorch reference directory (default: ../shared/reference from the workspace).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Interleaved rounds per case (default: 9, 2 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Run one workload in a loop for a profiler instead of the suite (no peers, no report).
    #[arg(long, value_enum)]
    profile: Option<profile_target::Workload>,
    /// Iterations of the --profile workload.
    #[arg(long, default_value_t = 100)]
    iters: usize,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Today's date and time in UTC, from the system clock.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    // Civil date from days since 1970-01-01 (Gregorian, proleptic).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rem = secs % 86_400;
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// The one-minute load average: other work on the machine while the suite ran.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn peer_versions(venv: &Venv) -> Vec<(String, String)> {
    let code = "import sys, numpy, onnxruntime, torch; \
                print(sys.version.split()[0], numpy.__version__, onnxruntime.__version__, \
                torch.__version__, torch.get_num_threads())";
    match venv.eval(code) {
        Ok(line) => {
            let v: Vec<&str> = line.split_whitespace().collect();
            let names = ["Python", "numpy", "onnxruntime", "PyTorch", "PyTorch default threads"];
            names.iter().zip(v).map(|(n, v)| (n.to_string(), v.to_string())).collect()
        }
        Err(e) => vec![("peers".into(), format!("versions unavailable: {e:#}"))],
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(0) => {}
        Ok(failed) => {
            eprintln!("selfclass-bench: {failed} bench(es) could not run");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("selfclass-bench: error: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Runs the suite; the number of benches that failed.
fn run(args: Args) -> Result<usize> {
    let root = workspace_root();
    let bench_dir = root.join("bench");
    let work = bench_dir.join("work");
    // The committed charts belong to BENCHMARKS.md; a report written elsewhere (--out) gets
    // its own folder beside it, so a trial run leaves them alone.
    let plots = match &args.out {
        None => bench_dir.join("plots"),
        Some(out) => {
            let stem = out.file_stem().map_or("report".into(), |s| s.to_string_lossy());
            out.with_file_name(format!("{stem}-plots"))
        }
    };
    for dir in [&work, &plots] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut effort = if args.quick { Effort::quick() } else { Effort::full() };
    if let Some(r) = args.rounds {
        effort.rounds = r.max(1);
    }
    let venv = if args.profile.is_some() {
        Venv { dir: bench_dir.join(".venv") }
    } else {
        Venv::ensure(&bench_dir.join(".venv"), args.torch)?
    };
    let ctx = Context {
        model: args.model.unwrap_or_else(|| root.join("models/fashion-mnist.scb")),
        reference: args.reference.unwrap_or_else(|| root.join("../shared/reference")),
        target: std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| root.join("target"), PathBuf::from),
        root: root.clone(),
        bench_dir: bench_dir.clone(),
        work,
        plots,
        venv,
        effort,
    };
    if let Some(workload) = args.profile {
        profile_target::run(&ctx, workload, args.iters)?;
        return Ok(0);
    }
    let load_before = load_average();
    let benches = if args.only.is_empty() {
        vec![Bench::Embed, Bench::Adapt, Bench::Train, Bench::Agent]
    } else {
        args.only.clone()
    };

    let mut sections = Vec::new();
    let mut failures = Vec::new();
    for bench in benches {
        tracing::info!(bench = bench.title(), "running");
        match bench.run(&ctx) {
            Ok(section) => sections.push((bench.title().to_string(), section)),
            Err(e) => {
                tracing::error!(bench = bench.title(), error = format!("{e:#}"), "bench failed");
                failures.push((bench.title().to_string(), format!("{e:#}")));
            }
        }
    }

    let rows: Vec<table::Row> = sections.iter().flat_map(|(_, s)| s.rows.clone()).collect();
    println!("{}", table::plain(&rows));
    for (name, error) in &failures {
        println!("FAILED {name}: {error}");
    }

    let mut machine = machine::describe(&root);
    machine.push((
        "load average (1 min) at start and end".into(),
        format!("{} and {}", load_before, load_average()),
    ));
    let peers = peer_versions(&ctx.venv);
    let notes: Vec<String> = ["peers.md", "profile.md"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(bench_dir.join("notes").join(f)).ok())
        .collect();
    let mut command = String::from("cargo run --release -p selfclass-bench");
    let extra: Vec<String> = std::env::args().skip(1).collect();
    if !extra.is_empty() {
        command.push_str(" -- ");
        command.push_str(&extra.join(" "));
    }
    let out = args.out.unwrap_or_else(|| root.join("BENCHMARKS.md"));
    let md_dir = out.parent().map_or_else(|| root.clone(), Path::to_path_buf);
    let md = report::markdown(
        &report::Report {
            command: &command,
            date: utc_now(),
            machine: &machine,
            peers: &peers,
            sections: &sections,
            failures: &failures,
            notes: &notes,
        },
        &md_dir,
    );
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    tracing::info!(report = %out.display(), "written");
    Ok(failures.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_has_the_expected_shape() {
        let d = utc_now();
        assert_eq!(d.len(), "2026-12-04 19:16 UTC".len(), "{d}");
        assert!(d.starts_with("20"));
    }
}
