//! The real `edge-agent` binary on the real sample, in temporary directories.
//!
//! Every test runs against a bundle built once per test process from the reference network
//! (see `fixture`), passed with `--model`, so the suite does not depend on a trained model.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use selfclass_firmware_host::fixture::reference_bundle;
use selfclass_firmware_host::state::HeadsState;
use selfclass_runtime::replay::ReplayBuffer;

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-agent"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// The reference bundle, written once per test process.
fn model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("reference.scb");
        reference_bundle(512).expect("fixture bundle").save(&path).expect("save bundle");
        (dir, path)
    });
    path
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("edge-agent runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A failed run's standard error: one line starting `edge-agent: error:`, no panic.
fn assert_clean_error(out: &Output, must_contain: &[&str]) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> =
        stderr.lines().filter(|l| l.starts_with("edge-agent: error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    for needle in must_contain {
        assert!(errors[0].contains(needle), "{needle:?} missing from {:?}", errors[0]);
    }
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    text(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn demo_run_emits_one_valid_json_line_per_prediction() {
    let out = run(agent()
        .args(["--source", "demo", "--frames", "150", "--fps", "0", "--model"])
        .arg(model()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 150);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["frame"].as_u64(), Some(i as u64), "lockstep numbers every frame");
        assert!(line["timestamp_ms"].as_u64().is_some_and(|t| t > 1_600_000_000_000));
        let clusters = line["clusters"].as_array().expect("clusters");
        let confidence = line["confidence"].as_array().expect("confidence");
        assert_eq!((clusters.len(), confidence.len()), (2, 2), "one per head");
        assert!(
            clusters[0].as_u64().is_some_and(|c| c < 10)
                && clusters[1].as_u64().is_some_and(|c| c < 20)
        );
        assert!(confidence.iter().all(|c| c.as_f64().is_some_and(|c| c > 0.0 && c <= 1.0)));
        assert!(line["label"].as_u64().is_some_and(|l| l < 10));
    }
    let stderr = text(&out.stderr);
    assert!(stderr.contains("model loaded") && stderr.contains("first prediction"), "{stderr}");
}

#[test]
fn events_go_to_a_file_and_paced_demo_counts_drops_in_frame_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = dir.path().join("events.jsonl");
    let out = run(agent()
        .args([
            "--source",
            "demo",
            "--frames",
            "100",
            "--fps",
            "5000",
            "--status-every-s",
            "0.2",
            "--model",
        ])
        .arg(model())
        .arg("--events")
        .arg(&events));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "events went to the file");
    let lines = json_lines(&std::fs::read(&events).expect("events file"));
    assert_eq!(lines.len(), 100);
    let numbers: Vec<u64> = lines.iter().map(|l| l["frame"].as_u64().expect("frame")).collect();
    assert!(numbers.windows(2).all(|w| w[1] > w[0]), "frame numbers increase");
}

#[test]
fn state_is_saved_and_restored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let args = |frames: &str| {
        let mut cmd = agent();
        cmd.args([
            "--source",
            "demo",
            "--fps",
            "0",
            "--replay-capacity",
            "300",
            "--adapt-budget-ms",
            "1000",
            "--frames",
            frames,
            "--model",
        ])
        .arg(model())
        .arg("--state")
        .arg(&state);
        cmd
    };
    let first = run(&mut args("400"));
    assert!(first.status.success(), "{}", text(&first.stderr));
    let replay = ReplayBuffer::from_bytes(
        &std::fs::read(state.join("replay.bin")).expect("replay saved"),
        "replay",
    )
    .expect("loads");
    let heads =
        HeadsState::from_bytes(&std::fs::read(state.join("heads.bin")).expect("heads saved"))
            .expect("loads");
    assert!(!replay.is_empty() && replay.seen() > 0);

    let second = run(&mut args("50"));
    assert!(second.status.success(), "{}", text(&second.stderr));
    let stderr = text(&second.stderr);
    assert!(stderr.contains("state restored"), "{stderr}");
    assert!(stderr.contains(&format!("replay_pairs={}", replay.len())), "{stderr}");
    let again = ReplayBuffer::from_bytes(
        &std::fs::read(state.join("replay.bin")).expect("replay"),
        "replay",
    )
    .expect("loads");
    assert!(again.seen() >= replay.seen(), "the reservoir's count carries over");
    let heads_again =
        HeadsState::from_bytes(&std::fs::read(state.join("heads.bin")).expect("heads"))
            .expect("loads");
    assert!(heads_again.snapshot.steps >= heads.snapshot.steps);
}

#[test]
fn sigterm_stops_cleanly_and_saves_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let child = agent()
        .args(["--source", "demo", "--fps", "500", "--save-every-s", "60", "--model"])
        .arg(model())
        .arg("--state")
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(1500));
    let status =
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("state saved on exit"), "{stderr}");
    ReplayBuffer::from_bytes(&std::fs::read(state.join("replay.bin")).expect("replay"), "replay")
        .expect("loads");
}

#[test]
fn sigkill_at_random_moments_never_leaves_a_state_that_fails_to_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    // Kill times spread over start-up, the first saves and steady saving (every 20 ms).
    for (round, kill_after_ms) in [700u64, 1100, 1350, 1900].into_iter().enumerate() {
        let mut child = agent()
            .args([
                "--source",
                "demo",
                "--fps",
                "2000",
                "--save-every-s",
                "0.02",
                "--replay-capacity",
                "512",
                "--model",
            ])
            .arg(model())
            .arg("--state")
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(kill_after_ms));
        child.kill().expect("SIGKILL");
        let out = child.wait_with_output().expect("wait");
        let stderr = text(&out.stderr);
        assert!(
            !stderr.contains("moved it aside"),
            "round {round}: a state file was rejected: {stderr}"
        );
        if let Ok(bytes) = std::fs::read(state.join("replay.bin")) {
            ReplayBuffer::from_bytes(&bytes, "replay")
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        if let Ok(bytes) = std::fs::read(state.join("heads.bin")) {
            HeadsState::from_bytes(&bytes).unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
    assert!(state.join("replay.bin").exists(), "some save happened before the last kill");
    let names: Vec<String> = std::fs::read_dir(&state)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(names.iter().all(|n| !n.contains("rejected")), "{names:?}");
}

#[test]
fn a_corrupt_state_file_is_set_aside_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    std::fs::write(state.join("replay.bin"), b"SCREPLAY but then garbage").expect("write");
    std::fs::write(state.join("heads.bin"), b"").expect("write");
    let out = run(agent()
        .args(["--source", "demo", "--frames", "20", "--fps", "0", "--model"])
        .arg(model())
        .arg("--state")
        .arg(&state));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("WARN") && stderr.contains("moved it aside"), "{stderr}");
    let names: Vec<String> = std::fs::read_dir(&state)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(names.iter().filter(|n| n.contains(".rejected-")).count(), 2, "{names:?}");
    let kept = names.iter().find(|n| n.starts_with("replay.bin.rejected-")).expect("kept aside");
    assert_eq!(std::fs::read(state.join(kept)).expect("read"), b"SCREPLAY but then garbage");
}

#[test]
fn bad_models_sources_and_cameras_give_one_line_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corrupt = dir.path().join("corrupt.scb");
    let mut bytes = std::fs::read(model()).expect("model");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&corrupt, &bytes).expect("write");
    let out = run(agent().args(["--source", "demo", "--frames", "1", "--model"]).arg(&corrupt));
    assert_clean_error(&out, &["corrupt.scb", "corrupt"]);

    let garbage = dir.path().join("garbage.scb");
    std::fs::write(&garbage, b"hello").expect("write");
    assert_clean_error(
        &run(agent().args(["--source", "demo", "--model"]).arg(&garbage)),
        &["garbage.scb", "not a selfclass model bundle"],
    );

    let missing = dir.path().join("missing.scb");
    assert_clean_error(
        &run(agent().args(["--source", "demo", "--model"]).arg(&missing)),
        &["missing.scb", "--model"],
    );

    assert_clean_error(
        &run(agent().args(["--source", "/no/such/folder", "--model"]).arg(model())),
        &["/no/such/folder"],
    );

    let not_images = dir.path().join("notes.txt");
    std::fs::write(&not_images, "just text").expect("write");
    assert_clean_error(
        &run(agent().args(["--source"]).arg(&not_images).arg("--model").arg(model())),
        &["notes.txt"],
    );

    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).expect("mkdir");
    std::fs::write(broken.join("a.png"), b"\x89PNG\r\n\x1a\n truncated").expect("write");
    assert_clean_error(
        &run(agent().arg("--source").arg(&broken).arg("--model").arg(model())),
        &["a.png", "cannot decode"],
    );

    let out = run(agent().args(["--camera", "0", "--model"]).arg(model()));
    if cfg!(feature = "camera") {
        assert_clean_error(&out, &["camera 0"]);
    } else {
        assert_clean_error(&out, &["camera 0", "--features camera"]);
    }

    assert_clean_error(&run(agent().args(["--model"]).arg(model())), &["--source"]);
}

/// A Y4M stream of the first `frames` demo-like images (a gray gradient moving), mono.
fn y4m_stream(frames: usize) -> Vec<u8> {
    let mut out = b"YUV4MPEG2 W32 H24 F30:1 Ip A1:1 Cmono\n".to_vec();
    for f in 0..frames {
        out.extend_from_slice(b"FRAME\n");
        out.extend((0..32 * 24).map(|i| ((i % 32) * 8 + f) as u8));
    }
    out
}

#[test]
fn y4m_on_standard_input_and_image_folders_are_sources() {
    let mut child = agent()
        .args(["--source", "-", "--fps", "0", "--no-adapt", "--model"])
        .arg(model())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(&y4m_stream(12)).expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json_lines(&out.stdout).len(), 12);

    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..5u8 {
        image::GrayImage::from_fn(40, 30, |x, _| {
            image::Luma([(x as u8).wrapping_mul(6).wrapping_add(i)])
        })
        .save(dir.path().join(format!("frame-{i}.png")))
        .expect("save");
    }
    let out = run(agent().arg("--source").arg(dir.path()).arg("--model").arg(model()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json_lines(&out.stdout).len(), 5);

    let mut truncated = y4m_stream(3);
    truncated.truncate(truncated.len() - 10);
    let file = dir.path().join("cut.y4m");
    std::fs::write(&file, truncated).expect("write");
    let out = run(agent().arg("--source").arg(&file).arg("--model").arg(model()));
    assert_clean_error(&out, &["cut.y4m", "truncated"]);
}

#[test]
fn discover_writes_clusters_sheets_and_an_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("found");
    let started = Instant::now();
    let out = run(agent()
        .args(["discover", "--source", "demo", "--limit", "400", "--model"])
        .arg(model())
        .arg("--out")
        .arg(&out_dir));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("clusters in 400 items")
            && stdout.contains("ACC")
            && stdout.contains("ARI"),
        "{stdout}"
    );

    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out_dir.join("clusters.json")).expect("clusters.json"),
    )
    .expect("json");
    assert_eq!(report["items"], 400);
    let clusters = report["clusters"].as_array().expect("clusters");
    assert!(!clusters.is_empty());
    let total: u64 = clusters.iter().map(|c| c["size"].as_u64().expect("size")).sum();
    assert_eq!(total, 400, "every item in exactly one cluster of the chosen head");
    for c in clusters {
        let sheet = c["sheet"].as_str().expect("sheet");
        let png = image::open(out_dir.join(sheet)).expect("a readable PNG");
        assert!(png.width() >= 64 && png.height() >= 64);
        assert!(c["mean_confidence"].as_f64().is_some_and(|m| m > 0.0 && m <= 1.0));
        assert!(!c["exemplars"].as_array().expect("exemplars").is_empty());
    }
    assert!(report["heads"][0]["scores"]["acc"].as_f64().is_some());
    let html = std::fs::read_to_string(out_dir.join("index.html")).expect("index.html");
    assert!(html.contains("<img src=\"cluster-") && html.contains("</html>"));
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn discover_reads_a_state_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let out = run(agent()
        .args(["--source", "demo", "--frames", "200", "--fps", "0", "--no-adapt", "--model"])
        .arg(model())
        .arg("--state")
        .arg(&state));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out_dir = dir.path().join("found");
    // A sheet left by an earlier run goes; the user's own files stay.
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    std::fs::write(out_dir.join("cluster-999.png"), b"old").expect("old sheet");
    std::fs::write(out_dir.join("notes.txt"), b"mine").expect("user file");
    let out = run(agent()
        .args(["discover", "--model"])
        .arg(model())
        .arg("--state")
        .arg(&state)
        .arg("--out")
        .arg(&out_dir));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out_dir.join("clusters.json")).expect("clusters.json"),
    )
    .expect("json");
    assert!(report["items"].as_u64().is_some_and(|n| n > 0));
    assert!(out_dir.join("index.html").exists());
    assert!(!out_dir.join("cluster-999.png").exists() && out_dir.join("notes.txt").exists());
    // The replay keeps a thumbnail of every frame: each cluster gets its contact sheet.
    let clusters = report["clusters"].as_array().expect("clusters");
    assert!(!clusters.is_empty(), "{report}");
    for cluster in clusters {
        let sheet = cluster["sheet"].as_str().unwrap_or_else(|| panic!("no sheet: {cluster}"));
        let picture = image::open(out_dir.join(sheet)).expect("the sheet is a PNG").into_luma8();
        // Bright garments on black, on a dark grey sheet (a missing thumbnail is mid grey).
        assert!(picture.pixels().filter(|p| p.0[0] > 160).count() > 50, "{sheet} shows no garment");
    }

    let missing = run(agent()
        .args(["discover", "--model"])
        .arg(model())
        .arg("--state")
        .arg(dir.path().join("empty"))
        .arg("--out")
        .arg(&out_dir));
    assert_clean_error(&missing, &["replay.bin"]);
}
