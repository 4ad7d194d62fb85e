//! What every comparison needs: paths, the run's size and the peers' environment.

use std::path::{Path, PathBuf};

use crate::peers::Venv;
use crate::plot::Chart;
use crate::table::Row;

/// How long each comparison measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Effort {
    /// Interleaved rounds (selfclass block, peer block) per case.
    pub rounds: usize,
    /// Multiplies the iterations of each timed block.
    pub iters_scale: f64,
    pub quick: bool,
}

impl Effort {
    pub fn full() -> Effort {
        Effort { rounds: 9, iters_scale: 1.0, quick: false }
    }

    pub fn quick() -> Effort {
        Effort { rounds: 2, iters_scale: 0.25, quick: true }
    }

    /// `n` iterations scaled to the effort, at least one.
    pub fn iters(&self, n: usize) -> usize {
        ((n as f64 * self.iters_scale).round() as usize).max(1)
    }
}

/// Shared by every comparison.
pub struct Context {
    /// The workspace root.
    pub root: PathBuf,
    /// `bench/` (peer scripts, the environment, scratch files, plots).
    pub bench_dir: PathBuf,
    /// Scratch files of this run.
    pub work: PathBuf,
    /// Where the charts go.
    pub plots: PathBuf,
    /// The default model bundle.
    pub model: PathBuf,
    /// The PyTorch reference (`torch_step.py`, `ref_net.onnx`).
    pub reference: PathBuf,
    /// Cargo's target directory.
    pub target: PathBuf,
    pub venv: Venv,
    pub effort: Effort,
}

impl Context {
    pub fn release_binary(&self, relative: &str) -> PathBuf {
        self.target.join("release").join(relative)
    }

    pub fn relative<'a>(&self, path: &'a Path) -> &'a Path {
        path.strip_prefix(&self.root).unwrap_or(path)
    }
}

/// What one comparison produced.
#[derive(Default)]
pub struct Section {
    pub rows: Vec<Row>,
    /// Markdown paragraphs for BENCHMARKS.md.
    pub notes: Vec<String>,
    /// Charts drawn, with their file.
    pub charts: Vec<(Chart, PathBuf)>,
}

impl Section {
    /// Draws `chart` as `dir/file` (900 x 560 pixels) and keeps it for the report.
    pub fn add_chart(&mut self, dir: &Path, file: &str, chart: Chart) -> anyhow::Result<()> {
        let path = dir.join(file);
        crate::plot::draw(&path, &chart, (900, 560))?;
        self.charts.push((chart, path));
        Ok(())
    }
}

/// Alternates which side goes first in a round, so neither always runs on a warmer or
/// cooler machine; a pause between the sides lets the first side's idle worker threads
/// (which spin for a while after their last task) go to sleep before the second starts.
pub fn interleave<A, B>(
    round: usize,
    mut ours: impl FnMut() -> anyhow::Result<A>,
    mut peer: impl FnMut() -> anyhow::Result<B>,
) -> anyhow::Result<(A, B)> {
    let settle = || std::thread::sleep(SETTLE);
    if round.is_multiple_of(2) {
        let a = ours()?;
        settle();
        Ok((a, peer()?))
    } else {
        let b = peer()?;
        settle();
        Ok((ours()?, b))
    }
}

/// The pause between the two sides of a round.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(200);
