//! Workloads that run one operation in a loop and nothing else, for profilers
//! (`valgrind --tool=callgrind`, `perf`): `selfclass-bench --profile WHAT`.

use anyhow::Result;
use ndarray::Array4;
use selfclass_runtime::backbone::Backbone;
use selfclass_runtime::bundle::Bundle;

use crate::adapt_step;
use crate::context::Context;

/// What to run under the profiler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// The embedding network at batch 1.
    Embed1,
    /// The embedding network at batch 64.
    Embed64,
    /// The head adaptation step (batch 256, the default model's heads).
    Adapt,
}

pub fn run(ctx: &Context, workload: Workload, iters: usize) -> Result<()> {
    let bundle = Bundle::load(&ctx.model)?;
    match workload {
        Workload::Embed1 | Workload::Embed64 => {
            let batch = if workload == Workload::Embed1 { 1 } else { 64 };
            let net = Backbone::from_bundle(&bundle)?;
            let (c, h, w) = net.input_chw();
            let images = Array4::from_elem((batch, c, h, w), 0.5f32);
            for _ in 0..iters {
                net.embed(images.view())?;
            }
        }
        Workload::Adapt => adapt_step::profile(&bundle, iters)?,
    }
    Ok(())
}
