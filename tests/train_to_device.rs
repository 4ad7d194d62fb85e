//! The first milestone end to end, on the Fashion-MNIST sample the repository ships: the
//! trainer learns a (small) model without labels and writes a bundle; the device library
//! loads that file and computes what the trainer computed; the agent's pipeline runs it on
//! a stream and adapts its heads on the device, and the state it saves loads again.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use selfclass_firmware_host::agent::{self, AgentConfig, Pacing};
use selfclass_firmware_host::pipeline::Model as DeviceModel;
use selfclass_firmware_host::source::{self, SourceSpec};
use selfclass_firmware_host::state::StateDir;
use selfclass_runtime::bundle::Bundle;
use selfclass_runtime::idx;
use selfclass_trainer::augment::AugmentConfig;
use selfclass_trainer::data::{Dataset, Split};
use selfclass_trainer::model::{BackboneConfig, ModelConfig};
use selfclass_trainer::optim::OptimizerKind;
use selfclass_trainer::refit::{self, RefitConfig};
use selfclass_trainer::train::{self, RunInputs, TrainConfig};
use selfclass_trainer::{eval, export};

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-sample")
}

/// A network small enough to train in seconds on two cores, with two heads.
fn small_config(mean: Vec<f32>, std: Vec<f32>) -> TrainConfig {
    TrainConfig {
        model: ModelConfig {
            in_channels: 1,
            backbone: BackboneConfig::Plain { widths: vec![8, 16, 16, 32] },
            hidden: 64,
            dim: 32,
            heads: vec![10, 20],
        },
        augment: AugmentConfig { mean, std, ..AugmentConfig::default() },
        epochs: 2,
        batch_size: 128,
        optimizer: OptimizerKind::Adamw { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        lr: 2e-3,
        weight_decay: 1e-4,
        warmup_epochs: 0.5,
        final_lr_fraction: 0.0,
        row_temperature: 0.1,
        col_temperature: 0.05,
        nn_queue: 0,
        seed: 7,
        knn_bank: 0,
        knn_k: 20,
    }
}

#[test]
fn a_model_trained_here_runs_and_adapts_on_the_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let train_set = Dataset::load(&sample(), Split::Train).expect("the shipped sample");
    let test_set = Dataset::load(&sample(), Split::Test).expect("the shipped sample");
    let (mean, std) = train::channel_stats(&train_set);
    let config = small_config(mean.clone(), std.clone());
    let inputs = RunInputs {
        train: Arc::new(train_set.clone()),
        test: None,
        out_dir: dir.path().join("run"),
        resume: false,
        stop_after: None,
        progress: false,
        command_line: "train_to_device test".into(),
    };
    let mut output = train::run(config, inputs, &Device::Cpu).expect("training");
    // The run's last stage, as `sc-train train` does it: the heads fitted again on the
    // frozen backbone, the lowest-loss candidate kept.
    let refit = RefitConfig { restarts: 2, epochs: 2, views: 2, lr: 1e-2 };
    let record =
        refit::refit_heads(&mut output.model, &output.state, &train_set, &refit, None, false)
            .expect("head refit");
    for head in &record.heads {
        assert!(head.losses.iter().all(|l| head.losses[head.chosen] <= *l), "{head:?}");
    }
    let bundle = export::build_bundle(&mut output.model, &output.state, &train_set, 256, "test")
        .expect("export");
    let path = dir.path().join("model.scb");
    bundle.save(&path).expect("save");

    // The device library, from the file, computes what the trainer computes.
    let z = eval::embed_dataset(&mut output.model, &test_set, &mean, &std).expect("embed");
    let (trainer_clusters, _) = eval::predict(&output.model, &z).expect("predict");
    let loaded = Bundle::load(&path).expect("the bundle loads");
    let images = idx::read_images(&sample().join("t10k-images-idx3-ubyte.gz")).expect("images");
    let device = selfclass::classify_idx(&loaded, &images, 100).expect("classify");
    assert_eq!(device.clusters.len(), 2);
    for (head, (ours, theirs)) in device.clusters.iter().zip(&trainer_clusters).enumerate() {
        let agree = ours.iter().zip(theirs).filter(|(a, b)| a == b).count();
        // f16 weights against f32: near-ties may flip, nothing more.
        assert!(agree * 100 >= ours.len() * 97, "head {head}: {agree} of {} agree", ours.len());
        // Sixteen steps from random weights only begin to spread the classes; more than one
        // cluster shows the network's output depends on the image.
        let used: std::collections::HashSet<_> = ours.iter().collect();
        assert!(used.len() >= 2, "head {head} puts everything in one cluster");
    }
    for row in device.embeddings.rows() {
        let norm = row.dot(&row).sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "embedding norm {norm}");
    }

    // The agent's pipeline runs it on the demo stream and adapts on the device.
    let model = DeviceModel::load(&path).expect("the agent loads it");
    let stream = source::open(&SourceSpec::Demo, 1, true).expect("demo");
    let state = dir.path().join("state");
    let config = AgentConfig {
        pacing: Pacing::Lockstep,
        max_predictions: Some(3000),
        events: Some(dir.path().join("events.jsonl")),
        state: Some(state.clone()),
        adapt_budget_ms: 1000,
        ..AgentConfig::default()
    };
    let summary =
        agent::run(&model, stream, &config, Arc::new(AtomicBool::new(false))).expect("agent");
    assert_eq!(summary.predictions, 3000);
    assert!(summary.adapt_steps > 0, "no adaptation step in {summary:?}");
    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).expect("events");
    assert_eq!(events.lines().count(), 3000);

    let restored = StateDir::open(&state)
        .and_then(|s| s.restore(&loaded.digest().expect("digest"), 32))
        .expect("state");
    assert!(restored.rejected.is_empty(), "{:?}", restored.rejected);
    let heads = restored.heads.expect("adapted heads saved");
    assert!(heads.snapshot.steps > 0);
    assert!(restored.replay.is_some_and(|r| !r.is_empty()));
}
