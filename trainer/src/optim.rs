//! Optimisers (AdamW, SGD with momentum) and the learning-rate schedule.
//!
//! Written here rather than taken from candle-nn so that their state (moments, step
//! count) can be saved in a checkpoint and restored exactly on `--resume`.

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::Context;
use crate::{Error, Result};

/// Which update rule, with its own hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Adam with decoupled weight decay.
    Adamw {
        /// Decay of the first moment.
        beta1: f64,
        /// Decay of the second moment.
        beta2: f64,
        /// Added to the root of the second moment.
        eps: f64,
    },
    /// Stochastic gradient descent with (heavy-ball) momentum; weight decay is added to the
    /// gradient.
    Sgd {
        /// Momentum factor.
        momentum: f64,
    },
}

/// Warm-up then cosine decay: linear from `lr / warmup_steps` to `lr` over the warm-up,
/// then half a cosine down to `lr * final_fraction` at `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Learning rate at the end, as a fraction of the peak.
    pub final_fraction: f64,
}

impl Schedule {
    /// Learning rate for step `step` (counted from 0).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let floor = self.lr * self.final_fraction;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// An optimiser over a fixed list of named parameters.
pub struct Optimizer {
    kind: OptimizerKind,
    weight_decay: f64,
    params: Vec<(String, Var)>,
    /// First moment (AdamW) or momentum buffer (SGD), per parameter.
    first: Vec<Tensor>,
    /// Second moment (AdamW only).
    second: Vec<Tensor>,
    /// Updates applied so far.
    pub step: usize,
}

impl Optimizer {
    /// An optimiser for `params`, with zeroed state.
    pub fn new(kind: OptimizerKind, weight_decay: f64, params: Vec<(String, Var)>) -> Result<Self> {
        let zeros = |v: &Var| v.zeros_like().ctx("optimizer init");
        let first = params.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?;
        let second = match kind {
            OptimizerKind::Adamw { .. } => {
                params.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?
            }
            OptimizerKind::Sgd { .. } => Vec::new(),
        };
        Ok(Optimizer { kind, weight_decay, params, first, second, step: 0 })
    }

    /// Applies one update with learning rate `lr`; parameters without a gradient are left
    /// as they are.
    pub fn apply(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let op = "optimizer step";
        self.step += 1;
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(var) else { continue };
            match self.kind {
                OptimizerKind::Adamw { beta1, beta2, eps } => {
                    let m = ((&self.first[i] * beta1).ctx(op)? + (grad * (1.0 - beta1)).ctx(op)?)
                        .ctx(op)?;
                    let v = ((&self.second[i] * beta2).ctx(op)?
                        + (grad.sqr().ctx(op)? * (1.0 - beta2)).ctx(op)?)
                    .ctx(op)?;
                    let m_hat_scale = 1.0 / (1.0 - beta1.powi(self.step as i32));
                    let v_hat_scale = 1.0 / (1.0 - beta2.powi(self.step as i32));
                    let denom = (v.clone() * v_hat_scale)
                        .and_then(|t| t.sqrt())
                        .and_then(|t| t + eps)
                        .ctx(op)?;
                    let update = (m.clone() * m_hat_scale).and_then(|t| t.div(&denom)).ctx(op)?;
                    let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay)).ctx(op)?;
                    var.set(&(decayed - (update * lr).ctx(op)?).ctx(op)?).ctx(op)?;
                    self.first[i] = m;
                    self.second[i] = v;
                }
                OptimizerKind::Sgd { momentum } => {
                    let g = (grad + (var.as_tensor() * self.weight_decay).ctx(op)?).ctx(op)?;
                    let buf = ((&self.first[i] * momentum).ctx(op)? + g).ctx(op)?;
                    var.set(&(var.as_tensor() - (&buf * lr).ctx(op)?).ctx(op)?).ctx(op)?;
                    self.first[i] = buf;
                }
            }
        }
        Ok(())
    }

    /// The moments as named tensors, for a checkpoint.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("optim.first.{name}"), self.first[i].clone());
            if let Some(s) = self.second.get(i) {
                out.insert(format!("optim.second.{name}"), s.clone());
            }
        }
        out
    }

    /// Restores the moments saved by [`Self::state`] and the step count.
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        step: usize,
        origin: &std::path::Path,
    ) -> Result<()> {
        let fetch = |key: String, like: &Tensor| -> Result<Tensor> {
            let t = state.get(&key).ok_or_else(|| {
                Error::checkpoint(origin, format!("missing optimiser state {key}"))
            })?;
            if t.dims() != like.dims() {
                return Err(Error::checkpoint(
                    origin,
                    format!("optimiser state {key} has shape {:?}", t.dims()),
                ));
            }
            t.to_device(like.device()).ctx("load optimiser state")
        };
        for i in 0..self.params.len() {
            let name = self.params[i].0.clone();
            self.first[i] = fetch(format!("optim.first.{name}"), &self.first[i])?;
            if i < self.second.len() {
                self.second[i] = fetch(format!("optim.second.{name}"), &self.second[i])?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = Schedule { lr: 1.0, warmup_steps: 4, total_steps: 14, final_fraction: 0.0 };
        assert!((s.lr_at(0) - 0.25).abs() < 1e-12);
        assert!((s.lr_at(3) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(4) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(9) - 0.5).abs() < 1e-12);
        assert!(s.lr_at(14).abs() < 1e-12);
    }

    /// One AdamW step on a hand-worked case: after the first step the bias-corrected update
    /// is lr * g / (|g| + eps), i.e. lr * sign(g), on top of the decoupled decay.
    #[test]
    fn adamw_first_step_by_hand() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).expect("var");
        let loss = (var.as_tensor() * 3.0).and_then(|t| t.sum_all()).expect("loss");
        let grads = loss.backward().expect("grads");
        let kind = OptimizerKind::Adamw { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let mut opt = Optimizer::new(kind, 0.1, vec![("w".into(), var.clone())]).expect("opt");
        opt.apply(&grads, 0.01).expect("step");
        let got = var.as_tensor().to_vec1::<f32>().expect("values");
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) - 0.01];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn sgd_momentum_by_hand() {
        let var = Var::new(&[1.0f32], &Device::Cpu).expect("var");
        let mut opt = Optimizer::new(
            OptimizerKind::Sgd { momentum: 0.9 },
            0.0,
            vec![("w".into(), var.clone())],
        )
        .expect("opt");
        for _ in 0..2 {
            let grads = (var.as_tensor() * 2.0)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("g");
            opt.apply(&grads, 0.1).expect("step");
        }
        // Gradient is 2 both times: buffers 2 then 3.8; weight 1 - 0.2 - 0.38.
        let got = var.as_tensor().to_vec1::<f32>().expect("values")[0];
        assert!((got - 0.42).abs() < 1e-6, "{got}");
    }
}
