//! The Python peers: the virtual environment they run in and the line protocol the suite
//! talks to them with (one JSON request per line on their standard input, one JSON answer
//! per line on their standard output).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// onnxruntime version the peers are pinned to (the reference figures use it).
pub const ONNXRUNTIME: &str = "onnxruntime==1.32.0";

/// How the virtual environment gets PyTorch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TorchSource {
    /// See the system's PyTorch through the environment (no multi-GB download); PyTorch is
    /// installed from PyPI into the environment only when the system has none.
    System,
    /// Install PyTorch from PyPI into an isolated environment (its Linux wheel pulls the
    /// CUDA libraries: several GB).
    Pypi,
}

/// A virtual environment under the bench directory.
#[derive(Debug, Clone)]
pub struct Venv {
    pub dir: PathBuf,
}

impl Venv {
    pub fn python(&self) -> PathBuf {
        self.dir.join("bin").join("python")
    }

    /// Creates the environment at `dir` when missing, then installs what the peers import
    /// and is not there yet.
    pub fn ensure(dir: &Path, torch: TorchSource) -> Result<Venv> {
        let venv = Venv { dir: dir.to_path_buf() };
        if !venv.python().is_file() {
            tracing::info!(dir = %dir.display(), ?torch, "creating the peers' virtual environment");
            let mut cmd = Command::new("python3");
            cmd.args(["-m", "venv"]);
            if torch == TorchSource::System {
                cmd.arg("--system-site-packages");
            }
            run(cmd.arg(dir), "python3 -m venv")?;
        }
        let mut wanted = Vec::new();
        if !venv.imports("onnxruntime") {
            wanted.push(ONNXRUNTIME);
        }
        if !venv.imports("numpy") {
            wanted.push("numpy");
        }
        if !venv.imports("torch") {
            tracing::warn!("PyTorch from PyPI: its Linux wheel pulls several GB of CUDA libraries");
            wanted.push("torch");
        }
        if !wanted.is_empty() {
            tracing::info!(?wanted, "installing the peers' packages from PyPI");
            let mut cmd = Command::new(venv.python());
            cmd.args(["-m", "pip", "install", "--quiet"]).args(&wanted);
            run(&mut cmd, "pip install")?;
        }
        Ok(venv)
    }

    fn imports(&self, module: &str) -> bool {
        Command::new(self.python())
            .args(["-c", &format!("import {module}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `python -c CODE`, its standard output.
    pub fn eval(&self, code: &str) -> Result<String> {
        let out = Command::new(self.python())
            .args(["-c", code])
            .output()
            .with_context(|| format!("running {}", self.python().display()))?;
        if !out.status.success() {
            bail!("python failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// A running peer script.
pub struct Peer {
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts `script` with the environment's Python.
    pub fn spawn(venv: &Venv, script: &Path, name: &str) -> Result<Peer> {
        let mut child = Command::new(venv.python())
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {name} peer ({})", script.display()))?;
        let stdin = child.stdin.take().context("peer without standard input")?;
        let stdout = BufReader::new(child.stdout.take().context("peer without standard output")?);
        Ok(Peer { name: name.to_string(), child, stdin, stdout })
    }

    /// Sends one request and waits for its answer; an answer with `ok: false` is an error.
    pub fn call(&mut self, request: &Value) -> Result<Value> {
        writeln!(self.stdin, "{request}")
            .and_then(|_| self.stdin.flush())
            .with_context(|| format!("writing to the {} peer", self.name))?;
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .with_context(|| format!("reading from the {} peer", self.name))?;
        if n == 0 {
            bail!("the {} peer exited before answering {request}", self.name);
        }
        let answer: Value = serde_json::from_str(&line)
            .with_context(|| format!("the {} peer answered {line:?}", self.name))?;
        if answer["ok"] != Value::Bool(true) {
            bail!("the {} peer failed on {request}: {}", self.name, answer["error"]);
        }
        Ok(answer)
    }

    /// A request's `median_s` answer.
    pub fn median_s(&mut self, request: &Value) -> Result<f64> {
        let answer = self.call(request)?;
        answer["median_s"]
            .as_f64()
            .with_context(|| format!("the {} peer's answer has no median_s: {answer}", self.name))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Closing standard input ends the peer's loop; wait so no process is left behind.
        let _ = self.stdin.flush();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Path of a peer script shipped in `bench/peers/`.
pub fn script(bench_dir: &Path, name: &str) -> PathBuf {
    bench_dir.join("peers").join(name)
}
