//! End-to-end tests of the `sc-train` binary on a small real sample of Fashion-MNIST
//! (`tests/data/fashion-mnist-sample` at the repository root), each in its own temporary
//! directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/fashion-mnist-sample")
}

fn sc_train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sc-train"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sc-train")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A network small enough to train in seconds in a debug build.
const SMALL: &[&str] = &[
    "--widths",
    "8,16",
    "--hidden",
    "32",
    "--dim",
    "16",
    "--heads",
    "10",
    "16",
    "--batch",
    "64",
    "--limit",
    "256",
    "--knn-bank",
    "256",
    "--local-crops",
    "1",
    "--local-size",
    "12",
    "--nn-queue",
    "64",
    "--anchors",
    "32",
    "--quiet",
];

/// `sc-train eval --json` of a checkpoint or bundle on `data`.
fn eval_json(model: &Path, data: &str) -> serde_json::Value {
    let model = model.to_str().expect("utf-8");
    let out = sc_train(&["eval", "--model", model, "--data", data, "--json"]);
    assert!(out.status.success(), "eval failed: {}", stderr(&out));
    serde_json::from_str(stdout(&out).trim()).expect("eval json")
}

fn train(out_dir: &Path, extra: &[&str]) -> Output {
    let data = sample();
    let mut args = vec![
        "train",
        "--data",
        data.to_str().expect("utf-8"),
        "--out",
        out_dir.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    sc_train(&args)
}

#[test]
fn train_eval_predict_and_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let straight = dir.path().join("straight");
    let out = train(&straight, &["--epochs", "2"]);
    assert!(out.status.success(), "train failed: {}", stderr(&out));

    // One JSON line per epoch with the documented fields, then the head refit's.
    let mut lines: Vec<serde_json::Value> =
        stdout(&out).lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 3);
    let refit = lines.pop().expect("refit line");
    check_refit_line(&refit, 16);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["epoch"], i + 1);
        assert!(line["loss"].as_f64().is_some_and(f64::is_finite));
        assert!(line["lr"].as_f64().is_some());
        assert_eq!(line["clusters_used"].as_array().map(Vec::len), Some(2));
        assert!(line["images_per_s"].as_f64().is_some_and(|v| v > 0.0));
        let acc = line["knn_acc"].as_f64().expect("knn accuracy");
        assert!((0.0..=1.0).contains(&acc));
        assert_eq!(line["test"]["n"], 1000);
        assert_eq!(line["test"]["head_classes"], 10);
    }
    let bundle = straight.join("model.scb");
    assert!(bundle.is_file());

    // eval on the checkpoint (candle) and on the bundle (device runtime, f16 weights) agree
    // closely: both score the same 1,000 test images.
    let data = sample();
    let data = data.to_str().expect("utf-8");
    let eval = |model: &Path| eval_json(model, data);
    let from_checkpoint = eval(&straight);
    let from_bundle = eval(&bundle);
    for key in ["acc", "nmi", "ami", "ari", "n", "clusters_used", "head"] {
        assert!(from_checkpoint.get(key).is_some(), "eval output lacks {key}");
    }
    let acc_gap = (from_checkpoint["acc"].as_f64().expect("acc")
        - from_bundle["acc"].as_f64().expect("acc"))
    .abs();
    assert!(acc_gap < 0.02, "checkpoint and bundle disagree: {from_checkpoint} vs {from_bundle}");

    // predict writes one line per image plus a header.
    let csv = dir.path().join("preds.csv");
    let out = sc_train(&[
        "predict",
        "--model",
        bundle.to_str().expect("utf-8"),
        "--data",
        data,
        "--out",
        csv.to_str().expect("utf-8"),
        "--limit",
        "300",
    ]);
    assert!(out.status.success(), "predict failed: {}", stderr(&out));
    let text = std::fs::read_to_string(&csv).expect("csv");
    assert_eq!(text.lines().count(), 301);
    assert_eq!(
        text.lines().next(),
        Some("index,label,head0_k10,head1_k16,confidence0,confidence1")
    );
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), 6, "{line}");
        for c in &fields[4..] {
            let c: f64 = c.parse().expect("a confidence");
            // At least an even share of the head's classes, at most 1.
            assert!((1.0 / 16.0..=1.0).contains(&c), "{line}");
        }
    }

    // Stopping after one epoch and resuming reaches the same weights as the straight run.
    let resumed = dir.path().join("resumed");
    let out = train(&resumed, &["--epochs", "2", "--stop-after", "1"]);
    assert!(out.status.success(), "first half failed: {}", stderr(&out));
    assert!(!resumed.join("model.scb").exists());
    let out = train(&resumed, &["--epochs", "2", "--resume"]);
    assert!(out.status.success(), "resume failed: {}", stderr(&out));
    let a = std::fs::read(straight.join("checkpoint.safetensors")).expect("straight checkpoint");
    let b = std::fs::read(resumed.join("checkpoint.safetensors")).expect("resumed checkpoint");
    assert!(a == b, "resumed run differs from the uninterrupted one");

    // Resuming with other settings names them.
    let out = train(&resumed, &["--epochs", "3", "--resume"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("epochs: 2 -> 3"), "{}", stderr(&out));
}

/// The refit's JSON line: every head has the trained candidate and `restarts` random
/// ones, the kept one has the lowest loss, and the held-out scores are reported.
fn check_refit_line(line: &serde_json::Value, restarts: usize) {
    let heads = line["refit"]["heads"].as_array().expect("refit heads");
    assert_eq!(heads.len(), 2, "{line}");
    for head in heads {
        let losses: Vec<f64> = head["losses"]
            .as_array()
            .expect("losses")
            .iter()
            .map(|l| l.as_f64().expect("a loss"))
            .collect();
        assert_eq!(losses.len(), restarts + 1, "{line}");
        let chosen = head["chosen"].as_u64().expect("chosen") as usize;
        assert!(losses.iter().all(|l| losses[chosen] <= *l), "{line}");
        assert_eq!(head["held_out"]["acc"].as_array().map(Vec::len), Some(restarts + 1));
    }
    assert_eq!(line["test"]["n"], 1000, "{line}");
    assert!(line["test"]["acc"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)));
}

#[test]
fn refit_a_finished_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let data = sample();
    let data = data.to_str().expect("utf-8");
    let run_arg = run.to_str().expect("utf-8");

    // Not before the run is finished.
    let out = train(&run, &["--epochs", "2", "--stop-after", "1", "--refit-restarts", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = sc_train(&["refit", "--checkpoint", run_arg, "--data", data, "--quiet"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("1 of its 2 epochs") && stderr(&out).contains("--resume"));

    // A finished run without refit: one line per epoch, no refit recorded.
    let out = train(&run, &["--epochs", "2", "--resume", "--refit-restarts", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 1);
    let state = std::fs::read_to_string(run.join("checkpoint.json")).expect("state");
    assert!(!state.contains("\"refit\""));

    // Bad settings are refused by name.
    let out = sc_train(&["refit", "--checkpoint", run_arg, "--data", data, "--refit-views", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("two views"), "{}", stderr(&out));

    // A bundle path that cannot work, or test data that is not there, is refused before
    // any work, and the run is left as it was.
    let state_before = std::fs::read(run.join("checkpoint.json")).expect("state");
    let tensors_before = std::fs::read(run.join("checkpoint.safetensors")).expect("tensors");
    let own_file = run.join("checkpoint.json");
    let missing_dir = dir.path().join("no/such/dir/m.scb");
    let refused: [(&[&str], &str); 4] = [
        (&["--bundle", own_file.to_str().expect("utf-8")], "the run's checkpoint"),
        (&["--bundle", missing_dir.to_str().expect("utf-8")], "does not exist"),
        (&["--bundle", run_arg], "is a directory"),
        (&["--test-data", "/nonexistent/test"], "/nonexistent/test"),
    ];
    for (extra, message) in refused {
        let mut args = vec!["refit", "--checkpoint", run_arg, "--data", data, "--quiet"];
        args.extend_from_slice(extra);
        let out = sc_train(&args);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(stderr(&out).contains(message), "{extra:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{extra:?} printed a result");
        assert_eq!(std::fs::read(run.join("checkpoint.json")).expect("state"), state_before);
        assert_eq!(std::fs::read(run.join("checkpoint.safetensors")).expect("t"), tensors_before);
    }

    // The refit rewrites checkpoint and bundle and records itself.
    let before = std::fs::read(run.join("model.scb")).expect("bundle");
    let out = sc_train(&[
        "refit",
        "--checkpoint",
        run_arg,
        "--data",
        data,
        "--refit-restarts",
        "3",
        "--refit-epochs",
        "2",
        "--quiet",
    ]);
    assert!(out.status.success(), "refit failed: {}", stderr(&out));
    let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    check_refit_line(&line, 3);
    let state = std::fs::read_to_string(run.join("checkpoint.json")).expect("state");
    assert!(state.contains("\"refit\""));
    assert_ne!(std::fs::read(run.join("model.scb")).expect("bundle"), before);

    // The refitted checkpoint and its bundle score alike.
    let eval = |model: &Path| eval_json(model, data)["acc"].as_f64().expect("acc");
    let (a, b) = (eval(&run), eval(&run.join("model.scb")));
    assert!((a - b).abs() < 0.02, "checkpoint {a} vs bundle {b}");
    assert!((a - line["test"]["acc"].as_f64().expect("acc")).abs() < 1e-9);

    // export refuses to write its bundle over the checkpoint, as refit does.
    let out =
        sc_train(&["export", "--checkpoint", run_arg, "--out", own_file.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the run's checkpoint"), "{}", stderr(&out));

    // A bundle exported again from the refitted checkpoint still says how it was made.
    let exported = dir.path().join("again.scb");
    let out =
        sc_train(&["export", "--checkpoint", run_arg, "--out", exported.to_str().expect("utf-8")]);
    assert!(out.status.success(), "export failed: {}", stderr(&out));
    let bytes = std::fs::read(&exported).expect("bundle");
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("sc-train refit --checkpoint"), "the refit is not recorded");
}

#[test]
fn clear_errors_for_bad_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("run");

    // Batch smaller than four times the largest head.
    let out = train(&out_dir, &["--epochs", "1", "--heads", "10", "32"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("smaller than 4 x the largest head"), "{}", stderr(&out));

    // Missing data set.
    let out = sc_train(&[
        "train",
        "--data",
        "/nonexistent/data",
        "--out",
        out_dir.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/data") && stderr(&out).contains("no such file"),
        "{}",
        stderr(&out)
    );

    // Malformed data set: a truncated IDX file.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(
        bad.join("train-images-idx3-ubyte"),
        [0u8, 0, 8, 3, 0, 0, 0, 9, 0, 0, 0, 28, 0, 0, 0, 28, 1],
    )
    .expect("write");
    let out = sc_train(&[
        "train",
        "--data",
        bad.to_str().expect("utf-8"),
        "--out",
        out_dir.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("train-images-idx3-ubyte") && stderr(&out).contains("bytes of data"),
        "{}",
        stderr(&out)
    );

    // Contradicting flags.
    let data = sample();
    let data = data.to_str().expect("utf-8");
    let out = sc_train(&["train", "--data", data, "--no-nn", "--nn-queue", "128"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--no-nn") && stderr(&out).contains("--nn-queue"),
        "{}",
        stderr(&out)
    );

    // Resuming with nothing to resume.
    let out = train(&dir.path().join("empty"), &["--epochs", "1", "--resume"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("checkpoint.json"), "{}", stderr(&out));

    // A checkpoint resumed with another architecture.
    let out = train(&out_dir, &["--epochs", "2", "--stop-after", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = train(&out_dir, &["--epochs", "2", "--resume", "--widths", "8,32"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("other settings"), "{}", stderr(&out));
}
