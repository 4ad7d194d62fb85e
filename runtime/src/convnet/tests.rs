//! The kernels against a direct f64 evaluation of the same layers, on every instruction
//! set this processor has, over shapes that exercise partial panels and tiles, asymmetric
//! padding, strides, dilation (merged and unmerged kernel rows) and threads.

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::kernel::{Activation, Isa};
use super::team::Team;
use super::{balanced_cuts, Conv, ConvNet, Layer, Workspace};

/// A convolution's shape: `(cout, cin, kh, kw)`, stride, dilation, padding.
type Shape = ((usize, usize, usize, usize), (usize, usize), (usize, usize), [usize; 4]);

fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2Fma].into_iter().filter(|isa| isa.available()).collect()
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

/// `N x C x H x W` through one convolution, directly from the definition, in f64.
fn reference(
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    weights: &[f32],
    bias: &[f32],
    ((co, ci, kh, kw), (sh, sw), (dh, dw), pad): Shape,
    activation: Activation,
) -> (Vec<f64>, (usize, usize)) {
    assert_eq!(ci, c);
    let oh = (h + pad[0] + pad[2] - (dh * (kh - 1) + 1)) / sh + 1;
    let ow = (w + pad[1] + pad[3] - (dw * (kw - 1) + 1)) / sw + 1;
    let mut out = vec![0.0; n * co * oh * ow];
    for i in 0..n {
        for o in 0..co {
            for y in 0..oh {
                for xo in 0..ow {
                    let mut sum = bias[o] as f64;
                    for cc in 0..c {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let yy = (y * sh + ky * dh) as isize - pad[0] as isize;
                                let xx = (xo * sw + kx * dw) as isize - pad[1] as isize;
                                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                                    continue;
                                }
                                let v = x[((i * c + cc) * h + yy as usize) * w + xx as usize];
                                sum +=
                                    v as f64 * weights[((o * c + cc) * kh + ky) * kw + kx] as f64;
                            }
                        }
                    }
                    let v = activation.apply(sum as f32) as f64;
                    // Channels last, as the network's output rows are.
                    out[((i * oh + y) * ow + xo) * co + o] = v;
                }
            }
        }
    }
    (out, (oh, ow))
}

fn check(shape: Shape, (n, h, w): (usize, usize, usize), activation: Activation, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let ((co, ci, kh, kw), stride, dilation, pad) = shape;
    let weights = random(&mut rng, co * ci * kh * kw);
    let bias = random(&mut rng, co);
    let x = random(&mut rng, n * ci * h * w);
    let (want, (oh, ow)) = reference(&x, (n, ci, h, w), &weights, &bias, shape, activation);
    let threads = Team::new(2).expect("thread team");
    for isa in isas() {
        let mut conv = Conv::new(&weights, &bias, (co, ci, kh, kw), stride, dilation, pad);
        conv.activation = activation;
        let net = ConvNet::new(vec![Layer::Conv(conv)], (ci, h, w), isa).expect("chains");
        assert_eq!(net.output_len(), co * oh * ow);
        let mut work = Workspace::default();
        let mut one = vec![0.0; n * net.output_len()];
        net.run(&x, n, &mut one, &mut work, None);
        let worst = one.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        assert!(worst < 1e-4, "{isa:?} {shape:?} on {n}x{h}x{w}: off by {worst}");
        // Threads, chunking and tiling never change a pixel's order of summation.
        let mut two = vec![0.0; n * net.output_len()];
        net.run(&x, n, &mut two, &mut work, Some(&threads));
        assert_eq!(one, two, "{isa:?} {shape:?}: two threads differ from one");
    }
}

#[test]
fn convolutions_match_their_definition() {
    let a = Activation::Identity;
    // The default model's layers.
    check(((32, 1, 3, 3), (1, 1), (1, 1), [1; 4]), (2, 28, 28), Activation::Relu, 1);
    // Thirteen images make several cache-sized chunks: threads take whole chunks.
    check(((64, 32, 3, 3), (2, 2), (1, 1), [1; 4]), (13, 28, 28), Activation::Relu, 2);
    check(((64, 32, 3, 3), (2, 2), (1, 1), [1; 4]), (1, 28, 28), Activation::Relu, 2);
    check(((256, 128, 3, 3), (2, 2), (1, 1), [1; 4]), (3, 7, 7), Activation::Relu, 3);
    // Partial panels, odd tiles, asymmetric padding, rectangular kernels and strides.
    check(((45, 3, 5, 3), (2, 1), (1, 1), [2, 0, 1, 1]), (3, 11, 9), a, 4);
    check(((7, 5, 1, 1), (1, 1), (1, 1), [0; 4]), (5, 6, 7), Activation::Leaky(0.1), 5);
    check(((33, 4, 3, 3), (3, 3), (1, 1), [0, 2, 2, 0]), (2, 10, 13), a, 6);
    // Dilation: across rows only (kernel rows still merged), and along them.
    check(((16, 3, 3, 3), (1, 1), (2, 1), [2, 1, 2, 1]), (2, 9, 8), Activation::Relu, 7);
    check(((40, 6, 3, 2), (1, 2), (2, 3), [1, 3, 0, 2]), (1, 12, 15), a, 8);
    // Output rows whose whole receptive field is padding: bias and activation only.
    check(((8, 2, 2, 2), (1, 1), (1, 1), [3, 0, 0, 0]), (1, 4, 4), Activation::Leaky(0.5), 9);
}

#[test]
fn pooling_dense_and_normalisation_chain() {
    let mut rng = StdRng::seed_from_u64(11);
    let (c, h, w, d) = (5usize, 6usize, 4usize, 9usize);
    let conv_w = random(&mut rng, 12 * c * 9);
    let conv_b = random(&mut rng, 12);
    let dense_w = random(&mut rng, d * 12);
    let dense_b = random(&mut rng, d);
    let n = 7;
    let x = random(&mut rng, n * c * h * w);
    let (features, _) = reference(
        &x,
        (n, c, h, w),
        &conv_w,
        &conv_b,
        ((12, c, 3, 3), (1, 1), (1, 1), [1; 4]),
        Activation::Relu,
    );
    let want: Vec<Vec<f64>> = features
        .chunks(12 * h * w)
        .map(|image| {
            let mean: Vec<f64> = (0..12)
                .map(|o| image.iter().skip(o).step_by(12).sum::<f64>() / (h * w) as f64)
                .collect();
            let z: Vec<f64> = (0..d)
                .map(|j| {
                    dense_b[j] as f64
                        + (0..12).map(|o| dense_w[j * 12 + o] as f64 * mean[o]).sum::<f64>()
                })
                .collect();
            let norm = z.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-7);
            z.iter().map(|v| v / norm).collect()
        })
        .collect();
    for isa in isas() {
        let mut conv = Conv::new(&conv_w, &conv_b, (12, c, 3, 3), (1, 1), (1, 1), [1; 4]);
        conv.activation = Activation::Relu;
        let dense = Conv::new(&dense_w, &dense_b, (d, 12, 1, 1), (1, 1), (1, 1), [0; 4]);
        let layers = vec![
            Layer::Conv(conv),
            Layer::GlobalPool { scale: 1.0 / (h * w) as f32 },
            Layer::Conv(dense),
            Layer::Normalize { eps: 1e-7 },
        ];
        let net = ConvNet::new(layers, (c, h, w), isa).expect("chains");
        let mut out = vec![0.0; n * d];
        net.run(&x, n, &mut out, &mut Workspace::default(), None);
        for (got, want) in out.chunks(d).zip(&want) {
            for (g, w) in got.iter().zip(want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{isa:?}: {g} against {w}");
            }
        }
    }
}

#[test]
fn shapes_that_do_not_chain_are_refused() {
    let conv = Conv::new(&[0.0; 2 * 3 * 9], &[0.0; 2], (2, 3, 3, 3), (1, 1), (1, 1), [0; 4]);
    let isa = Isa::Avx2Fma;
    // Four input channels for a convolution of three.
    assert!(ConvNet::new(vec![Layer::Conv(conv.clone())], (4, 8, 8), isa).is_none());
    // An image smaller than the kernel.
    assert!(ConvNet::new(vec![Layer::Conv(conv)], (3, 2, 8), isa).is_none());
    // No output channels, or a stride of zero.
    let empty = Conv::new(&[], &[], (0, 3, 1, 1), (1, 1), (1, 1), [0; 4]);
    assert!(ConvNet::new(vec![Layer::Conv(empty)], (3, 4, 4), isa).is_none());
    let still = Conv::new(&[0.0; 3], &[0.0], (1, 3, 1, 1), (0, 1), (1, 1), [0; 4]);
    assert!(ConvNet::new(vec![Layer::Conv(still)], (3, 4, 4), isa).is_none());
    // Normalising a whole image rather than a vector.
    assert!(ConvNet::new(vec![Layer::Normalize { eps: 1e-7 }], (3, 2, 2), isa).is_none());
}

#[test]
fn work_is_cut_where_it_balances() {
    // The default model's last convolution on one image: the middle band split in two.
    assert_eq!(balanced_cuts(&[8, 12, 12, 8], 2), vec![0, 2, 4]);
    assert_eq!(balanced_cuts(&[14, 42, 42, 42], 2), vec![0, 2, 4]);
    assert_eq!(balanced_cuts(&[1; 9], 3), vec![0, 3, 6, 9]);
    // A heavy item goes to the side it unbalances least; cuts never go backwards.
    assert_eq!(balanced_cuts(&[1, 10, 1], 2), vec![0, 2, 3]);
    assert_eq!(balanced_cuts(&[30, 1, 1], 3), vec![0, 0, 1, 3]);
    assert_eq!(balanced_cuts(&[], 2), vec![0, 0, 0]);
}
