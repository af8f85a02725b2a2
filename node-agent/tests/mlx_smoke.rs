//! mlx-rs on this machine's real libmlx: plain array math, and the 4-bit
//! quantized matmul the Llama layers use, checked against a dense matmul of the
//! dequantized weights.

use mlx_rs::{Array, ops, random};

#[test]
fn array_math_gives_exact_small_results() {
    let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
    let b = Array::from_slice(&[5.0f32, 6.0, 7.0, 8.0], &[2, 2]);

    let product = a.matmul(&b).expect("matmul");
    let sum = ops::add(&a, &b).expect("add");
    let total = sum.sum(None).expect("sum");

    assert_eq!(product.shape(), &[2, 2]);
    assert_eq!(product.as_slice::<f32>(), &[19.0, 22.0, 43.0, 50.0]);
    assert_eq!(sum.as_slice::<f32>(), &[6.0, 8.0, 10.0, 12.0]);
    assert_eq!(total.item_exact::<f32>(), 36.0);
}

#[test]
fn quantized_matmul_matches_the_dequantized_dense_matmul() {
    const GROUP: i32 = 64;
    const BITS: i32 = 4;
    let (out_features, in_features, tokens) = (96, 256, 5);

    let key = random::key(7).expect("key");
    let (wkey, xkey) = (key.clone(), random::key(11).expect("key"));
    let w = random::normal::<f32>(&[out_features, in_features][..], None, None, &wkey)
        .expect("weights");
    let x = random::normal::<f32>(&[tokens, in_features][..], None, None, &xkey).expect("input");

    let (wq, scales, biases) = ops::quantize(&w, GROUP, BITS).expect("quantize");
    // 4-bit values packed eight to a u32.
    assert_eq!(wq.shape(), &[out_features, in_features * BITS / 32]);
    assert_eq!(scales.shape(), &[out_features, in_features / GROUP]);

    let quantized = ops::quantized_matmul(&x, &wq, &scales, &biases, true, GROUP, BITS)
        .expect("quantized_matmul");
    let dequantized = ops::dequantize(&wq, &scales, &biases, GROUP, BITS).expect("dequantize");
    let dense = x
        .matmul(dequantized.transpose().expect("transpose"))
        .expect("dense matmul");

    assert_eq!(quantized.shape(), &[tokens, out_features]);
    assert!(
        quantized
            .all_close(&dense, 1e-4, 1e-3, None)
            .expect("all_close"),
        "quantized_matmul strays from the dequantized matmul"
    );

    // And the quantization itself is only a small perturbation of the weights:
    // 4 bits over a group spanning ~6 standard deviations errs by < 0.5 per element.
    let worst = ops::abs(ops::subtract(&w, &dequantized).expect("subtract"))
        .expect("abs")
        .max(None)
        .expect("max")
        .item_exact::<f32>();
    assert!(worst < 0.5, "dequantization error {worst}");
}
