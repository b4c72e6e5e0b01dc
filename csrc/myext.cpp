// Operator schemas for the myext namespace. Kernels live in one file per op
// and device (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu), each checking its
// arguments with the checks of csrc/<op>.h (the losses' registration there
// gathers their options into one LossOptions, csrc/loss_options.h, and checks
// every argument); fake kernels and the autograd Functions that differentiate
// the ops are in Python, in myext/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import myext._C` loads this shared object so that the static TORCH_LIBRARY
// initialisers below run (the CPU kernels are in myext._cpu_<isa>, one build
// per vector ISA: csrc/cpu/module.cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(myext, m) {
  // relu(input @ weight.T + bias) for input (*, in_features).
  m.def("linear_relu(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  // Gradients for (input, weight, bias), each computed only where output_mask
  // asks (None elsewhere). The ReLU mask is output > 0.
  m.def(
      "linear_relu_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor output, bool[3] output_mask) -> "
      "(Tensor? grad_input, Tensor? grad_weight, Tensor? grad_bias)");
  // input (R, C); target (R,) int64 class indices or (R, C) probabilities;
  // sample_weight (R,) a factor of each row's loss (and of its share of the
  // mean's divisor), or none. reduction follows at::Reduction: 0 none, 1 mean,
  // 2 sum. lse_square_scale adds that times lse^2 to each row's loss (the
  // z-loss); softcap > 0 caps the logits at softcap * tanh(input / softcap)
  // first (0: none), and the capped logits are divided by temperature (> 0):
  // z = cap(input) / temperature. Returns the loss; for backward, each row's
  // max and log(sum(exp(z - max))), whose sum is its log-sum-exp (kept apart,
  // the softmax stays precise at any scale); the target's z (for the token
  // accuracy and the target's log-probability); the divisor of the mean (the
  // summed sample_weight * weight of the targets not ignored, or of the rows);
  // and where `entropy` asks, each row's entropy of softmax(z) from the same
  // pass (0 for ignored rows; else an empty tensor).
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, "
      "Tensor? sample_weight, int reduction, int ignore_index, "
      "float label_smoothing, float lse_square_scale, float softcap, "
      "float temperature, bool entropy) -> "
      "(Tensor loss, Tensor row_max, Tensor row_log_sum, Tensor target_logit, "
      "Tensor total_weight, Tensor row_entropy)");
  // The gradient for the logits of grad_loss * loss, plus, where given, of
  // grad_logprob * (each row's log-probability of its target, z_t - lse) and of
  // grad_entropy * (each row's entropy, forward's row_entropy, which it then
  // needs): what a loss built from the log-probabilities and the entropy (PPO,
  // GRPO) asks, in the one pass over the logits.
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, "
      "Tensor? weight, Tensor? sample_weight, Tensor row_max, Tensor row_log_sum, "
      "Tensor total_weight, Tensor? grad_logprob, Tensor? grad_entropy, "
      "Tensor? row_entropy, int reduction, int ignore_index, "
      "float label_smoothing, float lse_square_scale, float softcap, "
      "float temperature, bool entropy) -> Tensor");
  // The same gradient written over the logits (`input`), for callers that
  // have no further use for them: no second R x C buffer.
  m.def(
      "cross_entropy_backward_(Tensor grad_loss, Tensor(a!) input, "
      "Tensor target, Tensor? weight, Tensor? sample_weight, Tensor row_max, "
      "Tensor row_log_sum, Tensor total_weight, Tensor? grad_logprob, "
      "Tensor? grad_entropy, Tensor? row_entropy, int reduction, "
      "int ignore_index, float label_smoothing, float lse_square_scale, "
      "float softcap, float temperature, bool entropy) -> ()");
  // Vocabulary parallelism: the gradient of the loss over all `classes` classes
  // w.r.t. a shard of them. input (R, C_local) holds the logits of classes
  // [class_start, class_start + C_local); target (R,) int64 indices into all
  // the classes, or (R, C_local) the shard's probabilities; weight the shard's
  // class weights. row_max, row_log_sum and row_entropy are those of the whole
  // rows, row_weight (R,) each row's sum(w q) over every class (q the target
  // after label smoothing), total_weight the mean's divisor and weight_sum (a
  // scalar) the sum of every class's weight (C without weights); the rest as
  // cross_entropy_backward's. Forward needs no op of its own: the shard's
  // cross_entropy_forward gives its rows' statistics, which the
  // vocabulary-parallel Functions in myext/ops/ combine over the shards.
  m.def(
      "cross_entropy_shard_backward(Tensor grad_loss, Tensor input, Tensor target, "
      "Tensor? weight, Tensor? sample_weight, Tensor row_max, Tensor row_log_sum, "
      "Tensor row_weight, Tensor total_weight, Tensor weight_sum, "
      "Tensor? grad_logprob, Tensor? grad_entropy, Tensor? row_entropy, "
      "int reduction, int ignore_index, float label_smoothing, "
      "float lse_square_scale, float softcap, float temperature, bool entropy, "
      "int class_start, int classes) -> Tensor");

  // F.linear then cross_entropy_forward, the logits (R x V) never held whole:
  // input (R, H), linear_weight (V, H), linear_bias (V) or none; target,
  // sample_weight and the options as cross_entropy_forward's. The rows go in
  // chunks of chunk_size (0: chosen from the shapes); each chunk's logits are
  // one GEMM into a chunk-sized buffer. Where grad_mask asks and the reduction
  // is mean or sum, the same pass turns the buffer into the logits' gradient
  // (for an upstream gradient of 1) and accumulates the gradients of (input,
  // linear_weight, linear_bias), returned here (None where not asked); backward
  // only scales them. Else they are None and linear_cross_entropy_backward
  // computes them. accum_dtype is the dtype the weight gradient is summed in
  // over the chunks: None for the default (float32 for bfloat16 and float16),
  // else that or the input's own, which sums into the gradient itself and holds
  // no accumulator (a rounding per chunk, for a step's memory); last and with a
  // default, so that calls written before it keep their meaning.
  m.def(
      "linear_cross_entropy_forward(Tensor input, Tensor linear_weight, "
      "Tensor? linear_bias, Tensor target, Tensor? weight, Tensor? sample_weight, "
      "int reduction, int ignore_index, float label_smoothing, "
      "float lse_square_scale, float softcap, float temperature, bool entropy, "
      "int chunk_size, bool[3] grad_mask, ScalarType? accum_dtype=None) -> "
      "(Tensor loss, Tensor row_max, Tensor row_log_sum, Tensor target_logit, "
      "Tensor total_weight, Tensor row_entropy, Tensor? grad_input, "
      "Tensor? grad_linear_weight, Tensor? grad_linear_bias)");
  // The gradients for (input, linear_weight, linear_bias) where output_mask
  // asks, for any reduction (grad_loss (R,) for none, else a scalar) and the
  // extras' upstream gradients as cross_entropy_backward's: each chunk's
  // logits computed again and turned into their gradient with the forward's
  // row_max, row_log_sum and row_entropy.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor input, "
      "Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight, "
      "Tensor? sample_weight, Tensor row_max, Tensor row_log_sum, "
      "Tensor total_weight, Tensor? grad_logprob, Tensor? grad_entropy, "
      "Tensor? row_entropy, int reduction, int ignore_index, "
      "float label_smoothing, float lse_square_scale, float softcap, "
      "float temperature, bool entropy, int chunk_size, bool[3] output_mask, "
      "ScalarType? accum_dtype=None) -> "
      "(Tensor? grad_input, Tensor? grad_linear_weight, Tensor? grad_linear_bias)");
  // The same for a shard of the classes (vocabulary parallelism): linear_weight
  // and linear_bias hold rows [class_start, class_start + C_local) of the output
  // layer of all `classes`; target, weight, row_max, row_log_sum, row_weight,
  // weight_sum and row_entropy as cross_entropy_shard_backward's. grad_input is
  // this shard's part of the input's gradient, which the caller sums over the
  // shards.
  m.def(
      "linear_cross_entropy_shard_backward(Tensor grad_loss, Tensor input, "
      "Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight, "
      "Tensor? sample_weight, Tensor row_max, Tensor row_log_sum, "
      "Tensor row_weight, Tensor total_weight, Tensor weight_sum, "
      "Tensor? grad_logprob, Tensor? grad_entropy, Tensor? row_entropy, "
      "int reduction, int ignore_index, float label_smoothing, "
      "float lse_square_scale, float softcap, float temperature, bool entropy, "
      "int class_start, int classes, int chunk_size, bool[3] output_mask, "
      "ScalarType? accum_dtype=None) -> "
      "(Tensor? grad_input, Tensor? grad_linear_weight, Tensor? grad_linear_bias)");
}
