//! Times one training step of the reference network (batch 256, two views, AdamW) and,
//! when PyTorch is installed, the same step of the PyTorch reference in the same run.
//!
//! `cargo run --release -p selfclass-trainer --example step_bench [-- --steps 10 --batch 256]`

use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use selfclass_trainer::augment::{AugmentConfig, Batch};
use selfclass_trainer::model::{Model, ModelConfig};
use selfclass_trainer::optim::{Optimizer, OptimizerKind};
use selfclass_trainer::train::{train_step, NnQueue, TrainConfig};

/// PyTorch's figure measured on this machine when it cannot be run live (reference README).
const REFERENCE_TORCH_STEP_S: f64 = 0.360;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn torch_step_s(batch: usize, steps: usize) -> Option<f64> {
    let script = ["../shared/reference/torch_step.py", "../../shared/reference/torch_step.py"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())?;
    let out = Command::new("python3")
        .args([script, "--batch", &batch.to_string(), "--steps", &steps.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "torch_step.py failed: {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        );
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout).lines().last()?.to_string();
    println!("pytorch: {line}");
    let json: serde_json::Value = serde_json::from_str(&line).ok()?;
    json["train_step_s"].as_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    selfclass_trainer::tune_cpu();
    let batch = arg("--batch", 256);
    let steps = arg("--steps", 10);
    let device = Device::Cpu;
    let model_config = ModelConfig::reference(1);
    let config = TrainConfig {
        model: model_config.clone(),
        augment: AugmentConfig { mean: vec![0.286], std: vec![0.353], ..AugmentConfig::default() },
        epochs: 1,
        batch_size: batch,
        optimizer: OptimizerKind::Adamw { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        lr: 1e-3,
        weight_decay: 1e-4,
        warmup_epochs: 0.0,
        final_lr_fraction: 0.0,
        row_temperature: 0.1,
        col_temperature: 0.05,
        nn_queue: 0,
        seed: 0,
        knn_bank: 0,
        knn_k: 20,
    };
    let mut model = Model::new(model_config, 0, &device)?;
    let mut optimizer = Optimizer::new(config.optimizer, config.weight_decay, model.params())?;
    let mut queue = NnQueue::new(0, 128);
    let images: Vec<f32> =
        (0..2 * batch * 28 * 28).map(|i| ((i * 7919) % 255) as f32 / 255.0).collect();
    let b = Batch { index: 0, globals: images, locals: Vec::new(), size: batch };

    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let t = Instant::now();
        train_step(&mut model, &mut optimizer, &mut queue, &b, &config, (1, 28, 28), 1e-3)?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let ours = median(times);
    println!(
        "selfclass: {{\"threads\": {}, \"batch\": {batch}, \"train_step_s\": {ours:.4}, \"train_images_per_s\": {:.1}}}",
        rayon::current_num_threads(),
        2.0 * batch as f64 / ours
    );
    let skip_torch = std::env::args().any(|a| a == "--no-torch");
    let torch_live = if skip_torch { None } else { torch_step_s(batch, steps) };
    let (torch, source) = match torch_live {
        Some(t) => (t, "measured now"),
        None => (REFERENCE_TORCH_STEP_S, "reference README figure, not measured in this run"),
    };
    println!("ratio selfclass / pytorch: {:.2} (pytorch {torch:.4} s, {source})", ours / torch);
    Ok(())
}
