//! From tract's simplified graph to a [`ConvNet`]: walks the nodes in evaluation order
//! and recognises the chain the trainer exports (and PyTorch exports of the same
//! networks): `Conv`, bias `Add`, `Max` with zero (ReLU), `LeakyRelu`, per-channel `Mul`,
//! `Reduce Sum` over the pixels (global average pooling, with its `Mul` by `1 / (H W)`),
//! `EinSum` with a constant matrix (a dense layer), axis changes of a vector, and the
//! L2-normalisation tail `x * recip(max(sqrt(sum(x^2)), eps))`. Anything else is a
//! reason to keep tract's plan.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::cnn::conv::KernelFormat;
use tract_onnx::tract_core::ops::cnn::{Conv as TractConv, PaddingSpec};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::{DataFormat, LeakyRelu, Reduce, Reducer};

use super::kernel::{Activation, Isa};
use super::{Conv, ConvNet, Layer};

/// Where the L2-normalisation tail has got to: the vector being normalised, and the last
/// value of the tail.
#[derive(Debug, Clone, Copy)]
enum Tail {
    Squared(OutletId, OutletId),
    Summed(OutletId, OutletId),
    Rooted(OutletId, OutletId),
    Clamped(OutletId, OutletId, f32),
    Inverted(OutletId, OutletId, f32),
}

/// The network of `model` (simplified, batch of one, `c x h x w` input) as a [`ConvNet`]
/// with `isa`'s kernels, or why it is not one.
pub(crate) fn lower(
    model: &TypedModel,
    chw: (usize, usize, usize),
    isa: Isa,
) -> Result<ConvNet, String> {
    let inputs = model.input_outlets().map_err(|e| e.to_string())?;
    let outputs = model.output_outlets().map_err(|e| e.to_string())?;
    let (&[input], &[output]) = (inputs, outputs) else {
        return Err("not one input and one output".into());
    };
    let mut layers: Vec<Layer> = Vec::new();
    let mut current = input;
    let mut tail: Option<Tail> = None;
    let order = model.eval_order().map_err(|e| e.to_string())?;
    for id in order {
        let node = &model.nodes()[id];
        if id == input.node {
            continue;
        }
        let konst = |i: usize| -> Option<Arc<Tensor>> {
            node.inputs
                .get(i)
                .and_then(|o| model.outlet_fact(*o).ok())
                .and_then(|f| f.konst.clone())
        };
        // The constant beside the varying input `v` of a two-input node.
        let other = |v: usize| if node.inputs.len() == 2 { konst(1 - v) } else { None };
        if node.inputs.is_empty() {
            if model.outlet_fact(OutletId::new(id, 0)).is_ok_and(|f| f.konst.is_some()) {
                continue;
            }
            return Err(format!("node {} has no inputs and is not a constant", node.name));
        }
        let here = OutletId::new(id, 0);
        let shape = output_shape(model, here)?;
        // The one varying input and the constants of a two-input node.
        let variable: Vec<(usize, OutletId)> = node
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, o)| model.outlet_fact(**o).map_or(true, |f| f.konst.is_none()))
            .map(|(i, o)| (i, *o))
            .collect();
        let unsupported =
            || format!("node {} ({}) is outside the supported chain", node.name, node.op.name());

        if let Some(state) = tail {
            tail = Some(match (state, bin_name(node).unwrap_or("")) {
                (Tail::Squared(x, s), _) if only(&variable, s) && node.op_is::<Reduce>() => {
                    let reduce = node.op_as::<Reduce>().ok_or_else(unsupported)?;
                    if !matches!(reduce.reducer, Reducer::Sum)
                        || shape.iter().product::<usize>() != 1
                    {
                        return Err(unsupported());
                    }
                    Tail::Summed(x, here)
                }
                (Tail::Summed(x, s), _)
                    if only(&variable, s) && unary_name(node) == Some("Sqrt") =>
                {
                    Tail::Rooted(x, here)
                }
                (Tail::Rooted(x, r), "Max") if only(&variable, r) => {
                    let eps = scalar(&other(variable[0].0)).ok_or_else(unsupported)?;
                    Tail::Clamped(x, here, eps)
                }
                (Tail::Clamped(x, m, eps), _)
                    if only(&variable, m) && unary_name(node) == Some("Recip") =>
                {
                    Tail::Inverted(x, here, eps)
                }
                (Tail::Inverted(x, r, eps), "Mul") | (Tail::Clamped(x, r, eps), "Div")
                    if variable.len() == 2
                        && variable.iter().any(|v| v.1 == x)
                        && variable.iter().any(|v| v.1 == r)
                        && (bin_name(node) == Some("Mul")
                            || (node.inputs[0] == x && node.inputs[1] == r)) =>
                {
                    layers.push(Layer::Normalize { eps });
                    current = here;
                    tail = None;
                    continue;
                }
                _ => return Err(unsupported()),
            });
            continue;
        }

        if !only(&variable, current) {
            return Err(format!(
                "node {} ({}) does not follow the chain from the input",
                node.name,
                node.op.name()
            ));
        }
        let current_shape = output_shape(model, current)?;
        if let Some(conv) = node.op_as::<TractConv>() {
            layers.push(Layer::Conv(
                lower_conv(conv, &konst(1), &konst(2), &current_shape).ok_or_else(unsupported)?,
            ));
        } else if let Some(bin) = node.op_as::<TypedBinOp>() {
            let k = other(variable[0].0).ok_or_else(unsupported)?;
            let channels = per_channel(&k, &shape).ok_or_else(unsupported)?;
            let last = layers.last_mut().ok_or_else(unsupported)?;
            match (bin.0.name(), last) {
                ("Max", Layer::Conv(conv))
                    if conv.activation == Activation::Identity
                        && channels.iter().all(|&v| v == 0.0) =>
                {
                    conv.activation = Activation::Relu;
                }
                ("Add", Layer::Conv(conv)) if conv.activation == Activation::Identity => {
                    let cout = conv.cout;
                    conv.bias.iter_mut().zip(broadcast(&channels, cout)).for_each(|(b, v)| *b += v);
                }
                ("Mul", Layer::Conv(conv)) if conv.activation == Activation::Identity => {
                    let cout = conv.cout;
                    conv.scale_outputs(&broadcast(&channels, cout));
                }
                ("Mul", Layer::GlobalPool { scale }) if channels.len() == 1 => {
                    *scale *= channels[0]
                }
                _ => return Err(unsupported()),
            }
        } else if let Some(reduce) = node.op_as::<Reduce>() {
            let pixels_axes = current_shape.len() == 4 && {
                let mut axes = reduce.axes.to_vec();
                axes.sort_unstable();
                axes == [2, 3]
            };
            if !(matches!(reduce.reducer, Reducer::Sum) && pixels_axes) {
                return Err(unsupported());
            }
            layers.push(Layer::GlobalPool { scale: 1.0 });
        } else if let Some(einsum) = node.op_as::<EinSum>() {
            let k = other(variable[0].0).ok_or_else(unsupported)?;
            layers.push(Layer::Conv(
                lower_dense(einsum, variable[0].0, &k, &current_shape, &shape)
                    .ok_or_else(unsupported)?,
            ));
        } else if let Some(ew) = node.op_as::<ElementWiseOp>() {
            if let Some(leaky) = ew.0.downcast_ref::<LeakyRelu>() {
                match layers.last_mut() {
                    Some(Layer::Conv(conv)) if conv.activation == Activation::Identity => {
                        conv.activation = Activation::Leaky(leaky.alpha);
                    }
                    _ => return Err(unsupported()),
                }
            } else if ew.0.name() == "Square" && vector(&current_shape) {
                tail = Some(Tail::Squared(current, here));
                continue;
            } else {
                return Err(unsupported());
            }
        } else if node.op_is::<AxisOp>() && vector(&current_shape) && vector(&shape) {
            // Reshaping a vector moves no value.
        } else {
            return Err(unsupported());
        }
        current = here;
    }
    if tail.is_some() {
        return Err("the graph ends inside an L2 normalisation".into());
    }
    if current != output {
        return Err("the chain does not end at the graph's output".into());
    }
    let net = ConvNet::new(layers, chw, isa).ok_or("the layers' shapes do not chain")?;
    if !net.output_is_vector() {
        // The kernels' images are channels-last; an image output would come out transposed.
        return Err("the output is an image, not a vector".into());
    }
    let expected: usize = output_shape(model, output)?.iter().product();
    if net.output_len() != expected {
        return Err(format!("{} outputs computed, the graph has {expected}", net.output_len()));
    }
    Ok(net)
}

fn output_shape(model: &TypedModel, outlet: OutletId) -> Result<Vec<usize>, String> {
    let fact = model.outlet_fact(outlet).map_err(|e| e.to_string())?;
    fact.shape
        .as_concrete()
        .map(|s| s.to_vec())
        .ok_or_else(|| format!("a value of symbolic shape {:?}", fact.shape))
}

/// Whether `variable` is exactly `outlet`.
fn only(variable: &[(usize, OutletId)], outlet: OutletId) -> bool {
    variable.len() == 1 && variable[0].1 == outlet
}

/// A value with at most one axis longer than 1.
fn vector(shape: &[usize]) -> bool {
    shape.iter().filter(|&&d| d > 1).count() <= 1
}

fn bin_name(node: &TypedNode) -> Option<&'static str> {
    let bin = node.op_as::<TypedBinOp>()?;
    ["Add", "Mul", "Max", "Div"].into_iter().find(|n| bin.0.name() == *n)
}

fn unary_name(node: &TypedNode) -> Option<&'static str> {
    let ew = node.op_as::<ElementWiseOp>()?;
    ["Sqrt", "Recip", "Square"].into_iter().find(|n| ew.0.name() == *n)
}

fn scalar(tensor: &Option<Arc<Tensor>>) -> Option<f32> {
    let s = floats(tensor.as_ref()?)?;
    (s.len() == 1).then(|| s[0])
}

/// The values of a constant that varies along the channel axis only (axis 1 of an image
/// or the one long axis of a vector) of an output of `shape`: one value, or one per
/// channel.
fn per_channel(tensor: &Arc<Tensor>, shape: &[usize]) -> Option<Vec<f32>> {
    let values = floats(tensor)?;
    let t = tensor;
    if values.len() == 1 {
        return Some(values);
    }
    let channel_axis = if shape.len() == 4 { 1 } else { shape.iter().position(|&d| d > 1)? };
    let rank = t.rank();
    if rank > shape.len() {
        return None;
    }
    // Right-aligned broadcasting: the constant's axes face the output's last `rank` axes.
    let offset = shape.len() - rank;
    let ok = t.shape().iter().enumerate().all(|(i, &d)| {
        if i + offset == channel_axis {
            d == shape[channel_axis]
        } else {
            d == 1
        }
    });
    (ok && values.len() == shape[channel_axis]).then_some(values)
}

fn broadcast(values: &[f32], n: usize) -> Vec<f32> {
    if values.len() == 1 {
        vec![values[0]; n]
    } else {
        values.to_vec()
    }
}

fn lower_conv(
    op: &TractConv,
    weights: &Option<Arc<Tensor>>,
    bias: &Option<Arc<Tensor>>,
    input: &[usize],
) -> Option<Conv> {
    let spec = &op.pool_spec;
    if op.group != 1
        || op.q_params.is_some()
        || spec.kernel_shape.len() != 2
        || input.len() != 4
        || !matches!(spec.data_format, DataFormat::NCHW)
    {
        return None;
    }
    let w = floats(weights.as_ref()?)?;
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    let (cin, cout) = (spec.input_channels, spec.output_channels);
    if cin != input[1] || w.len() != cout * cin * kh * kw {
        return None;
    }
    // To O x I x KH x KW.
    let mut oihw = vec![0.0; w.len()];
    for o in 0..cout {
        for i in 0..cin {
            for y in 0..kh {
                for x in 0..kw {
                    let from = match op.kernel_fmt {
                        KernelFormat::OIHW => ((o * cin + i) * kh + y) * kw + x,
                        KernelFormat::HWIO => ((y * kw + x) * cin + i) * cout + o,
                        KernelFormat::OHWI => ((o * kh + y) * kw + x) * cin + i,
                    };
                    oihw[((o * cin + i) * kh + y) * kw + x] = w[from];
                }
            }
        }
    }
    let bias = match bias {
        None => vec![0.0; cout],
        Some(b) => {
            let b = floats(b)?;
            match b.len() {
                1 => vec![b[0]; cout],
                n if n == cout => b.to_vec(),
                _ => return None,
            }
        }
    };
    let padding = spec.computed_padding(&input[2..4]);
    if !matches!(
        spec.padding,
        PaddingSpec::Explicit(..)
            | PaddingSpec::Valid
            | PaddingSpec::SameUpper
            | PaddingSpec::SameLower
    ) {
        return None;
    }
    let pad =
        [padding[0].pad_before, padding[1].pad_before, padding[0].pad_after, padding[1].pad_after];
    let dilations = spec.dilations();
    let strides = spec.strides();
    Some(Conv::new(
        &oihw,
        &bias,
        (cout, cin, kh, kw),
        (strides[0], strides[1]),
        (dilations[0], dilations[1]),
        pad,
    ))
}

/// An `EinSum` of the vector (input `which`) with a constant matrix: `out = W x`.
fn lower_dense(
    op: &EinSum,
    which: usize,
    matrix: &Arc<Tensor>,
    input: &[usize],
    output: &[usize],
) -> Option<Conv> {
    if op.q_params.is_some() || matrix.rank() != 2 || !vector(input) || !vector(output) {
        return None;
    }
    let expr = op.axes.to_string();
    let (operands, result) = expr.split_once("->")?;
    let operands: Vec<Vec<char>> = operands.split(',').map(|s| s.chars().collect()).collect();
    let result: Vec<char> = result.chars().collect();
    if operands.len() != 2 || operands[which].len() != input.len() {
        return None;
    }
    let (x_axes, w_axes) = (&operands[which], &operands[1 - which]);
    if w_axes.len() != 2 || result.len() != output.len() {
        return None;
    }
    // The matrix has one summed axis (shared with the vector's long axis) and one kept.
    let summed = w_axes.iter().position(|a| !result.contains(a))?;
    let (k_axis, n_axis) = (w_axes[summed], w_axes[1 - summed]);
    let (k, n) = (matrix.shape()[summed], matrix.shape()[1 - summed]);
    let long = input.iter().product::<usize>();
    let x_k = x_axes.iter().position(|&a| a == k_axis)?;
    let n_out = result.iter().position(|&a| a == n_axis)?;
    let others_unit =
        x_axes.iter().zip(input).all(|(a, &d)| *a == k_axis || (d == 1 && !w_axes.contains(a)));
    if input[x_k] != k
        || long != k
        || output[n_out] != n
        || output.iter().product::<usize>() != n
        || !others_unit
    {
        return None;
    }
    let m = floats(matrix)?;
    // To `n x k` (rows of the output).
    let mut w = vec![0.0; n * k];
    for o in 0..n {
        for i in 0..k {
            w[o * k + i] = if summed == 1 { m[o * k + i] } else { m[i * n + o] };
        }
    }
    Some(Conv::new(&w, &vec![0.0; n], (n, k, 1, 1), (1, 1), (1, 1), [0; 4]))
}

/// A constant's values as f32, in standard order.
fn floats(tensor: &Tensor) -> Option<Vec<f32>> {
    let t = tensor.cast_to::<f32>().ok()?;
    let view = t.to_plain_array_view::<f32>().ok()?;
    Some(view.iter().copied().collect())
}
