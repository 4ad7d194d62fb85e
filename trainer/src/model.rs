//! The Self-Classifier network: a convolutional backbone, the projection MLP, the
//! L2-normalised embedding, and the weight-normalised classifier heads.
//!
//! Two backbones: `plain`, the reference network (3x3 conv blocks with batch norm and
//! ReLU, stride 1 then 2, global average pooling), and `resnet`, a compact ResNet of basic
//! blocks whose width and depth are parameters. Parameters live in candle `Var`s; batch
//! norm running averages live beside them as plain vectors, since nothing differentiates
//! them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::Context;
use crate::kernels::{BatchNormOp, BatchStats, Conv2dOp, ConvGeometry, ScaleShiftOp};
use crate::{Error, Result};

/// Momentum of the batch-norm running averages (PyTorch's convention: weight of the new
/// batch).
const BN_MOMENTUM: f32 = 0.1;
/// Added to the variance in batch norm.
pub const BN_EPS: f32 = 1e-5;
/// Slope of LeakyReLU for negative inputs in the projection MLP.
pub const LEAKY_SLOPE: f32 = 0.01;
/// Norms below this do not shrink further when embeddings are L2-normalised.
pub const NORM_EPS: f32 = 1e-7;

/// The convolutional part of the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackboneConfig {
    /// 3x3 conv + batch norm + ReLU blocks, the first with stride 1, the rest stride 2.
    Plain {
        /// Output channels of each block.
        widths: Vec<usize>,
    },
    /// A stem conv, then stages of basic residual blocks; each stage doubles the width and
    /// (after the first) halves the resolution.
    Resnet {
        /// Channels of the stem and first stage.
        width: usize,
        /// Residual blocks in each stage.
        blocks: Vec<usize>,
    },
}

/// Everything that fixes the shapes of the network's parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Image channels (1 or 3).
    pub in_channels: usize,
    /// The backbone.
    pub backbone: BackboneConfig,
    /// Hidden width of the projection MLP.
    pub hidden: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Classes of each head.
    pub heads: Vec<usize>,
}

impl ModelConfig {
    /// The reference network: four blocks 32-64-128-256, MLP 256-512-128, heads 10 20 40 80.
    pub fn reference(in_channels: usize) -> Self {
        ModelConfig {
            in_channels,
            backbone: BackboneConfig::Plain { widths: vec![32, 64, 128, 256] },
            hidden: 512,
            dim: 128,
            heads: vec![10, 20, 40, 80],
        }
    }

    /// Checks the configuration once, before any parameter is made.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.in_channels, 1 | 3) {
            return Err(Error::config(format!(
                "{} input channels: only 1 or 3 are supported",
                self.in_channels
            )));
        }
        match &self.backbone {
            BackboneConfig::Plain { widths } if widths.is_empty() || widths.contains(&0) => {
                return Err(Error::config("plain backbone needs at least one non-zero width"));
            }
            BackboneConfig::Resnet { width, blocks }
                if *width == 0 || blocks.is_empty() || blocks.contains(&0) =>
            {
                return Err(Error::config(
                    "resnet needs a non-zero width and at least one block per stage",
                ));
            }
            _ => {}
        }
        if self.hidden == 0 || self.dim == 0 {
            return Err(Error::config("MLP hidden width and embedding dimension must be positive"));
        }
        if self.heads.is_empty() || self.heads.iter().any(|&k| k < 2) {
            return Err(Error::config("give at least one head, each with at least 2 classes"));
        }
        Ok(())
    }

    /// Channels out of the backbone.
    pub fn feature_dim(&self) -> usize {
        match &self.backbone {
            BackboneConfig::Plain { widths } => widths.last().copied().unwrap_or(0),
            BackboneConfig::Resnet { width, blocks } => width << (blocks.len() - 1),
        }
    }
}

/// Whether layers use our CPU kernels or candle's stock operations (any device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// im2col convolution and fused batch norm (CPU only).
    Fast,
    /// candle's own conv2d and batch norm built from tensor operations.
    Stock,
}

/// Training (batch statistics, running averages updated) or inference (running averages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics; running averages are updated.
    Train,
    /// Running averages; nothing is updated.
    Eval,
}

/// Batch norm parameters and running averages of one layer.
#[derive(Debug)]
pub struct BatchNorm {
    /// Learned scale.
    pub gamma: Var,
    /// Learned shift.
    pub beta: Var,
    /// Running mean of each channel.
    pub running_mean: Vec<f32>,
    /// Running (unbiased) variance of each channel.
    pub running_var: Vec<f32>,
}

impl BatchNorm {
    fn new(channels: usize, device: &Device) -> Result<Self> {
        Ok(BatchNorm {
            gamma: Var::ones(channels, DType::F32, device).ctx("batch norm init")?,
            beta: Var::zeros(channels, DType::F32, device).ctx("batch norm init")?,
            running_mean: vec![0.0; channels],
            running_var: vec![1.0; channels],
        })
    }

    /// Folds the running averages into a per-channel scale and shift.
    pub fn folded(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let gamma = self.gamma.as_tensor().to_vec1::<f32>().ctx("batch norm fold")?;
        let beta = self.beta.as_tensor().to_vec1::<f32>().ctx("batch norm fold")?;
        let scale: Vec<f32> =
            gamma.iter().zip(&self.running_var).map(|(g, v)| g / (v + BN_EPS).sqrt()).collect();
        let shift =
            beta.iter().zip(&self.running_mean).zip(&scale).map(|((b, m), s)| b - m * s).collect();
        Ok((scale, shift))
    }

    fn update_running(&mut self, mean: &[f32], variance: &[f32], count: usize) {
        let unbias = if count > 1 { count as f32 / (count as f32 - 1.0) } else { 1.0 };
        for c in 0..self.running_mean.len() {
            self.running_mean[c] =
                (1.0 - BN_MOMENTUM) * self.running_mean[c] + BN_MOMENTUM * mean[c];
            self.running_var[c] =
                (1.0 - BN_MOMENTUM) * self.running_var[c] + BN_MOMENTUM * variance[c] * unbias;
        }
    }

    /// Normalises `x` (`N x C` or `N x C x H x W`), then ReLU if `relu`.
    fn forward(&mut self, x: &Tensor, relu: bool, mode: Mode, kernels: Kernels) -> Result<Tensor> {
        let op = "batch norm";
        match (mode, kernels) {
            (Mode::Train, Kernels::Fast) => {
                let stats = Arc::new(Mutex::new(BatchStats::default()));
                let bn = BatchNormOp { eps: BN_EPS, relu, stats: stats.clone() };
                let y = x.contiguous().ctx(op)?.apply_op3(&self.gamma, &self.beta, bn).ctx(op)?;
                let stats =
                    stats.lock().map_err(|_| Error::config("batch statistics lock poisoned"))?;
                let (mean, variance, count) =
                    (stats.mean.clone(), stats.variance.clone(), stats.count);
                drop(stats);
                self.update_running(&mean, &variance, count);
                Ok(y)
            }
            (Mode::Train, Kernels::Stock) => {
                let shape = channel_shape(x);
                let axes: Vec<usize> = (0..x.rank()).filter(|&a| a != 1).collect();
                let count = x.elem_count() / x.dim(1).ctx(op)?;
                let mean = x.mean_keepdim(axes.clone()).ctx(op)?;
                let centred = x.broadcast_sub(&mean).ctx(op)?;
                let variance = centred.sqr().and_then(|s| s.mean_keepdim(axes)).ctx(op)?;
                let inv_std = (variance.clone() + BN_EPS as f64)
                    .and_then(|v| v.sqrt())
                    .and_then(|v| v.recip())
                    .ctx(op)?;
                let gamma = self.gamma.reshape(shape.clone()).ctx(op)?;
                let beta = self.beta.reshape(shape).ctx(op)?;
                let y = centred
                    .broadcast_mul(&inv_std)
                    .and_then(|t| t.broadcast_mul(&gamma))
                    .and_then(|t| t.broadcast_add(&beta))
                    .ctx(op)?;
                let mean = mean.flatten_all().and_then(|t| t.to_vec1::<f32>()).ctx(op)?;
                let variance = variance.flatten_all().and_then(|t| t.to_vec1::<f32>()).ctx(op)?;
                self.update_running(&mean, &variance, count);
                if relu {
                    y.relu().ctx(op)
                } else {
                    Ok(y)
                }
            }
            (Mode::Eval, Kernels::Fast) => {
                let (scale, shift) = self.folded()?;
                x.contiguous()
                    .and_then(|x| x.apply_op1_no_bwd(&ScaleShiftOp { scale, shift, relu }))
                    .ctx(op)
            }
            (Mode::Eval, Kernels::Stock) => {
                let (scale, shift) = self.folded()?;
                let shape = channel_shape(x);
                let scale = Tensor::from_vec(scale, shape.clone(), x.device()).ctx(op)?;
                let shift = Tensor::from_vec(shift, shape, x.device()).ctx(op)?;
                let y = x.broadcast_mul(&scale).and_then(|t| t.broadcast_add(&shift)).ctx(op)?;
                if relu {
                    y.relu().ctx(op)
                } else {
                    Ok(y)
                }
            }
        }
    }
}

fn channel_shape(x: &Tensor) -> Vec<usize> {
    let mut shape = vec![1usize; x.rank()];
    shape[1] = x.dims()[1];
    shape
}

fn uniform(rng: &mut ChaCha8Rng, shape: &[usize], bound: f32, device: &Device) -> Result<Var> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.gen_range(-bound..bound)).collect();
    Tensor::from_vec(values, shape, device).and_then(|t| Var::from_tensor(&t)).ctx("parameter init")
}

/// A convolution without bias followed by batch norm and optionally ReLU.
#[derive(Debug)]
pub struct ConvBn {
    /// `out x in x k x k`.
    pub weight: Var,
    /// Kernel, stride, padding.
    pub geometry: ConvGeometry,
    /// The batch norm after the convolution.
    pub bn: BatchNorm,
    /// Whether ReLU follows the batch norm.
    pub relu: bool,
}

impl ConvBn {
    fn new(
        rng: &mut ChaCha8Rng,
        (in_c, out_c): (usize, usize),
        geometry: ConvGeometry,
        relu: bool,
        device: &Device,
    ) -> Result<Self> {
        let fan_in = in_c * geometry.kernel * geometry.kernel;
        let shape = [out_c, in_c, geometry.kernel, geometry.kernel];
        let weight = uniform(rng, &shape, 1.0 / (fan_in as f32).sqrt(), device)?;
        Ok(ConvBn { weight, geometry, bn: BatchNorm::new(out_c, device)?, relu })
    }

    fn forward(&mut self, x: &Tensor, mode: Mode, kernels: Kernels) -> Result<Tensor> {
        let op = "convolution";
        let conv = Conv2dOp { geometry: self.geometry };
        let y = match (mode, kernels) {
            (Mode::Train, Kernels::Fast) => {
                x.contiguous().and_then(|x| x.apply_op2(&self.weight, conv)).ctx(op)?
            }
            (Mode::Eval, Kernels::Fast) => x
                .contiguous()
                .and_then(|x| x.apply_op2_no_bwd(self.weight.as_tensor(), &conv))
                .ctx(op)?,
            (_, Kernels::Stock) => {
                x.conv2d(&self.weight, self.geometry.padding, self.geometry.stride, 1, 1).ctx(op)?
            }
        };
        self.bn.forward(&y, self.relu, mode, kernels)
    }
}

/// A fully connected layer with bias.
#[derive(Debug)]
pub struct Linear {
    /// `out x in`.
    pub weight: Var,
    /// `out`.
    pub bias: Var,
}

impl Linear {
    fn new(rng: &mut ChaCha8Rng, in_dim: usize, out_dim: usize, device: &Device) -> Result<Self> {
        let bound = 1.0 / (in_dim as f32).sqrt();
        Ok(Linear {
            weight: uniform(rng, &[out_dim, in_dim], bound, device)?,
            bias: uniform(rng, &[out_dim], bound, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t().ctx("linear")?)
            .and_then(|y| y.broadcast_add(&self.bias))
            .ctx("linear")
    }
}

/// A basic residual block: two 3x3 conv-bn layers and a shortcut.
#[derive(Debug)]
pub struct ResidualBlock {
    /// First conv-bn-ReLU (may downsample).
    pub first: ConvBn,
    /// Second conv-bn, no ReLU before the sum.
    pub second: ConvBn,
    /// 1x1 conv-bn when the shape changes, identity otherwise.
    pub shortcut: Option<ConvBn>,
}

/// One weight-normalised head: `W = g * v / |v|` row by row, logits `z W^T`.
#[derive(Debug)]
pub struct WnHead {
    /// Directions, `classes x dim`.
    pub v: Var,
    /// Scales, `classes`.
    pub g: Var,
}

impl WnHead {
    fn new(rng: &mut ChaCha8Rng, dim: usize, classes: usize, device: &Device) -> Result<Self> {
        let v = uniform(rng, &[classes, dim], 1.0 / (dim as f32).sqrt(), device)?;
        let g = v.sqr().and_then(|s| s.sum(1)).and_then(|s| s.sqrt()).ctx("head init")?;
        Ok(WnHead { v, g: Var::from_tensor(&g).ctx("head init")? })
    }

    /// The effective weights `W` (`classes x dim`).
    pub fn weights(&self) -> Result<Tensor> {
        let op = "head weights";
        let norms = self.v.sqr().and_then(|s| s.sum_keepdim(1)).and_then(|s| s.sqrt()).ctx(op)?;
        let scale = self.g.unsqueeze(1).and_then(|g| g.broadcast_div(&norms)).ctx(op)?;
        self.v.broadcast_mul(&scale).ctx(op)
    }

    /// Logits of embeddings `z` (`N x dim`).
    pub fn logits(&self, z: &Tensor) -> Result<Tensor> {
        z.matmul(&self.weights()?.t().ctx("head logits")?).ctx("head logits")
    }
}

/// The backbone's layers.
#[derive(Debug)]
pub enum Backbone {
    /// Conv blocks in sequence.
    Plain(Vec<ConvBn>),
    /// Stem, then residual blocks.
    Resnet {
        /// The first convolution.
        stem: ConvBn,
        /// Residual blocks of all stages in order.
        blocks: Vec<ResidualBlock>,
    },
}

/// The whole network.
#[derive(Debug)]
pub struct Model {
    /// What the network looks like.
    pub config: ModelConfig,
    /// Convolutional layers.
    pub backbone: Backbone,
    /// MLP first layer.
    pub fc1: Linear,
    /// Batch norm of the MLP's hidden layer.
    pub bn1: BatchNorm,
    /// MLP second layer, to the embedding.
    pub fc2: Linear,
    /// The classifier heads.
    pub heads: Vec<WnHead>,
    /// Which kernels the layers run.
    pub kernels: Kernels,
    /// Where the tensors live.
    pub device: Device,
}

impl Model {
    /// A freshly initialised network (PyTorch's default uniform fan-in initialisation),
    /// reproducible for a seed.
    pub fn new(config: ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let conv3 = |stride| ConvGeometry { kernel: 3, stride, padding: 1 };
        let backbone = match &config.backbone {
            BackboneConfig::Plain { widths } => {
                let mut layers = Vec::new();
                let mut in_c = config.in_channels;
                for (i, &w) in widths.iter().enumerate() {
                    let stride = if i == 0 { 1 } else { 2 };
                    layers.push(ConvBn::new(&mut rng, (in_c, w), conv3(stride), true, device)?);
                    in_c = w;
                }
                Backbone::Plain(layers)
            }
            BackboneConfig::Resnet { width, blocks } => {
                let stem =
                    ConvBn::new(&mut rng, (config.in_channels, *width), conv3(1), true, device)?;
                let mut layers = Vec::new();
                let mut in_c = *width;
                for (stage, &count) in blocks.iter().enumerate() {
                    let out_c = width << stage;
                    for b in 0..count {
                        let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                        let first =
                            ConvBn::new(&mut rng, (in_c, out_c), conv3(stride), true, device)?;
                        let second =
                            ConvBn::new(&mut rng, (out_c, out_c), conv3(1), false, device)?;
                        let shortcut = if stride != 1 || in_c != out_c {
                            let one = ConvGeometry { kernel: 1, stride, padding: 0 };
                            Some(ConvBn::new(&mut rng, (in_c, out_c), one, false, device)?)
                        } else {
                            None
                        };
                        layers.push(ResidualBlock { first, second, shortcut });
                        in_c = out_c;
                    }
                }
                Backbone::Resnet { stem, blocks: layers }
            }
        };
        let fc1 = Linear::new(&mut rng, config.feature_dim(), config.hidden, device)?;
        let bn1 = BatchNorm::new(config.hidden, device)?;
        let fc2 = Linear::new(&mut rng, config.hidden, config.dim, device)?;
        let heads = config
            .heads
            .iter()
            .map(|&k| WnHead::new(&mut rng, config.dim, k, device))
            .collect::<Result<_>>()?;
        let kernels = if device.is_cpu() { Kernels::Fast } else { Kernels::Stock };
        Ok(Model { config, backbone, fc1, bn1, fc2, heads, kernels, device: device.clone() })
    }

    /// Pooled backbone features (`N x feature_dim`) of images `x` (`N x C x H x W`).
    pub fn features(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let kernels = self.kernels;
        let mut h = x.clone();
        match &mut self.backbone {
            Backbone::Plain(layers) => {
                for layer in layers {
                    h = layer.forward(&h, mode, kernels)?;
                }
            }
            Backbone::Resnet { stem, blocks } => {
                h = stem.forward(&h, mode, kernels)?;
                for block in blocks {
                    let shortcut = match &mut block.shortcut {
                        Some(s) => s.forward(&h, mode, kernels)?,
                        None => h.clone(),
                    };
                    let y = block.first.forward(&h, mode, kernels)?;
                    let y = block.second.forward(&y, mode, kernels)?;
                    h = (y + shortcut).and_then(|s| s.relu()).ctx("residual sum")?;
                }
            }
        }
        h.mean(D::Minus1).and_then(|t| t.mean(D::Minus1)).ctx("global average pooling")
    }

    /// L2-normalised embeddings (`N x dim`).
    pub fn embed(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let features = self.features(x, mode)?;
        let hidden = self.fc1.forward(&features)?;
        let hidden = self.bn1.forward(&hidden, false, mode, self.kernels)?;
        let hidden = candle_nn::ops::leaky_relu(&hidden, LEAKY_SLOPE as f64).ctx("leaky relu")?;
        let z = self.fc2.forward(&hidden)?;
        let norms = z.sqr().and_then(|s| s.sum_keepdim(1)).and_then(|s| s.sqrt()).ctx("l2 norm")?;
        let norms = norms.maximum(NORM_EPS as f64).ctx("l2 norm")?;
        z.broadcast_div(&norms).ctx("l2 norm")
    }

    /// Logits of every head for embeddings `z`.
    pub fn logits(&self, z: &Tensor) -> Result<Vec<Tensor>> {
        self.heads.iter().map(|h| h.logits(z)).collect()
    }

    /// Visits every batch norm layer with its name, in a fixed order.
    fn batch_norms_mut(&mut self) -> Vec<(String, &mut BatchNorm)> {
        let mut out = Vec::new();
        match &mut self.backbone {
            Backbone::Plain(layers) => {
                for (i, l) in layers.iter_mut().enumerate() {
                    out.push((format!("backbone.{i}.bn"), &mut l.bn));
                }
            }
            Backbone::Resnet { stem, blocks } => {
                out.push(("stem.bn".to_string(), &mut stem.bn));
                for (i, b) in blocks.iter_mut().enumerate() {
                    out.push((format!("block.{i}.first.bn"), &mut b.first.bn));
                    out.push((format!("block.{i}.second.bn"), &mut b.second.bn));
                    if let Some(s) = &mut b.shortcut {
                        out.push((format!("block.{i}.shortcut.bn"), &mut s.bn));
                    }
                }
            }
        }
        out.push(("mlp.bn".to_string(), &mut self.bn1));
        out
    }

    /// Every trainable parameter with a stable name, in a fixed order.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        let conv = |name: String, c: &ConvBn, out: &mut Vec<(String, Var)>| {
            out.push((format!("{name}.weight"), c.weight.clone()));
            out.push((format!("{name}.bn.gamma"), c.bn.gamma.clone()));
            out.push((format!("{name}.bn.beta"), c.bn.beta.clone()));
        };
        match &self.backbone {
            Backbone::Plain(layers) => {
                for (i, l) in layers.iter().enumerate() {
                    conv(format!("backbone.{i}"), l, &mut out);
                }
            }
            Backbone::Resnet { stem, blocks } => {
                conv("stem".to_string(), stem, &mut out);
                for (i, b) in blocks.iter().enumerate() {
                    conv(format!("block.{i}.first"), &b.first, &mut out);
                    conv(format!("block.{i}.second"), &b.second, &mut out);
                    if let Some(s) = &b.shortcut {
                        conv(format!("block.{i}.shortcut"), s, &mut out);
                    }
                }
            }
        }
        out.push(("mlp.fc1.weight".into(), self.fc1.weight.clone()));
        out.push(("mlp.fc1.bias".into(), self.fc1.bias.clone()));
        out.push(("mlp.bn.gamma".into(), self.bn1.gamma.clone()));
        out.push(("mlp.bn.beta".into(), self.bn1.beta.clone()));
        out.push(("mlp.fc2.weight".into(), self.fc2.weight.clone()));
        out.push(("mlp.fc2.bias".into(), self.fc2.bias.clone()));
        for (i, h) in self.heads.iter().enumerate() {
            out.push((format!("head.{i}.v"), h.v.clone()));
            out.push((format!("head.{i}.g"), h.g.clone()));
        }
        out
    }

    /// All parameters and running averages as named tensors (for checkpoints).
    pub fn state(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let mut out: BTreeMap<String, Tensor> = self
            .params()
            .into_iter()
            .map(|(n, v)| (format!("param.{n}"), v.as_tensor().clone()))
            .collect();
        let device = self.device.clone();
        for (name, bn) in self.batch_norms_mut() {
            let mean = Tensor::from_vec(bn.running_mean.clone(), bn.running_mean.len(), &device)
                .ctx("state")?;
            let var = Tensor::from_vec(bn.running_var.clone(), bn.running_var.len(), &device)
                .ctx("state")?;
            out.insert(format!("running.{name}.mean"), mean);
            out.insert(format!("running.{name}.var"), var);
        }
        Ok(out)
    }

    /// Restores what [`Self::state`] saved; names and shapes must match exactly.
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        origin: &std::path::Path,
    ) -> Result<()> {
        let fetch = |key: &str, dims: &[usize]| -> Result<&Tensor> {
            let t = state.get(key).ok_or_else(|| {
                Error::checkpoint(
                    origin,
                    format!("has no tensor {key}: it was made for another architecture"),
                )
            })?;
            if t.dims() != dims {
                return Err(Error::checkpoint(
                    origin,
                    format!(
                        "{key} has shape {:?}, this model needs {dims:?}: another architecture",
                        t.dims()
                    ),
                ));
            }
            Ok(t)
        };
        for (name, var) in self.params() {
            let t = fetch(&format!("param.{name}"), var.dims())?;
            var.set(&t.to_device(&self.device).ctx("load state")?).ctx("load state")?;
        }
        for (name, bn) in self.batch_norms_mut() {
            let n = bn.running_mean.len();
            bn.running_mean =
                fetch(&format!("running.{name}.mean"), &[n])?.to_vec1::<f32>().ctx("load state")?;
            bn.running_var =
                fetch(&format!("running.{name}.var"), &[n])?.to_vec1::<f32>().ctx("load state")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(n: usize, c: usize, size: usize, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f32> = (0..n * c * size * size).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(values, (n, c, size, size), &Device::Cpu).expect("images")
    }

    fn small_configs() -> Vec<ModelConfig> {
        vec![
            ModelConfig {
                in_channels: 1,
                backbone: BackboneConfig::Plain { widths: vec![4, 8, 8] },
                hidden: 16,
                dim: 8,
                heads: vec![3, 5],
            },
            ModelConfig {
                in_channels: 3,
                backbone: BackboneConfig::Resnet { width: 4, blocks: vec![1, 2] },
                hidden: 16,
                dim: 8,
                heads: vec![4],
            },
        ]
    }

    /// The fast kernels and candle's stock ops give the same embeddings and parameter
    /// gradients for whole networks, in both modes (tolerance: f32 sums in different order
    /// through a few layers, 1e-4 relative to the largest value).
    #[test]
    fn fast_and_stock_kernels_agree_on_whole_networks() {
        for config in small_configs() {
            let x = images(6, config.in_channels, 12, 1);
            let mut fast = Model::new(config.clone(), 3, &Device::Cpu).expect("model");
            let mut stock = Model::new(config, 3, &Device::Cpu).expect("model");
            stock.kernels = Kernels::Stock;
            for mode in [Mode::Train, Mode::Eval] {
                let a = fast.embed(&x, mode).expect("fast");
                let b = stock.embed(&x, mode).expect("stock");
                let diff = (&a - &b)
                    .and_then(|d| d.abs())
                    .and_then(|d| d.max_all())
                    .and_then(|d| d.to_scalar::<f32>());
                assert!(diff.expect("diff") < 1e-4, "{mode:?}");
            }
            let loss = |m: &mut Model| {
                let z = m.embed(&x, Mode::Train).expect("embed");
                let logits = m.logits(&z).expect("logits");
                let s = logits[0].sqr().and_then(|s| s.sum_all()).expect("sum");
                let grads = s.backward().expect("backward");
                m.params()
                    .into_iter()
                    .map(|(n, v)| {
                        (
                            n,
                            grads.get(&v).map(|g| {
                                g.flatten_all().and_then(|g| g.to_vec1::<f32>()).expect("grad")
                            }),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            for ((name, a), (_, b)) in loss(&mut fast).into_iter().zip(loss(&mut stock)) {
                if name.starts_with("head.1") {
                    continue;
                }
                let (a, b) = (a.expect("fast grad"), b.expect("stock grad"));
                // The absolute floor covers gradients that are zero in exact arithmetic (the
                // bias of a layer followed by batch norm), where both sides hold only
                // rounding noise.
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(worst <= 1e-3 * scale + 1e-5, "{name}: {worst} vs scale {scale}");
            }
        }
    }

    #[test]
    fn embeddings_are_unit_norm_and_state_round_trips() {
        let config = small_configs().remove(0);
        let mut model = Model::new(config.clone(), 5, &Device::Cpu).expect("model");
        let x = images(4, 1, 10, 2);
        let z = model.embed(&x, Mode::Train).expect("embed");
        let norms = z.sqr().and_then(|s| s.sum(1)).and_then(|s| s.to_vec1::<f32>()).expect("norms");
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));

        let state = model.state().expect("state");
        let mut other = Model::new(config.clone(), 6, &Device::Cpu).expect("model");
        other.load_state(&state, "mem".as_ref()).expect("load");
        let a = model.embed(&x, Mode::Eval).and_then(|t| t.to_vec2::<f32>().ctx("v")).expect("a");
        let b = other.embed(&x, Mode::Eval).and_then(|t| t.to_vec2::<f32>().ctx("v")).expect("b");
        assert_eq!(a, b);

        let wider =
            ModelConfig { backbone: BackboneConfig::Plain { widths: vec![4, 8, 16] }, ..config };
        let mut wider = Model::new(wider, 5, &Device::Cpu).expect("model");
        let err = wider.load_state(&state, "ckpt".as_ref()).expect_err("other architecture");
        assert!(err.to_string().contains("another architecture"), "{err}");
    }
}
