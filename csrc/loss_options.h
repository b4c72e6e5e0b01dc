// The scalar options of the losses. Their schemas (myext.cpp) give them as
// separate arguments, which the registration of each op (csrc/<op>.h)
// gathers here once; its checks and every kernel below it then take them
// whole. A new option is a field here, its schema argument, its check and its
// math in each kernel: no signature between them changes.
#pragma once

#include <cstdint>

namespace myext {

struct LossOptions {
  int64_t reduction;        // as at::Reduction: 0 none, 1 mean, 2 sum
  int64_t ignore_index;     // a class-index target that adds nothing
  double label_smoothing;   // eps of q = (1 - eps) target + eps / C, in [0, 1]
  double lse_square_scale;  // lambda of the z-loss lambda lse^2; 0: none
  double softcap;           // logits capped at softcap tanh(x / softcap); 0: none
  double temperature;       // z = cap(x) / temperature, > 0; 1: none
  bool entropy;             // forward also gives each row's entropy of softmax(z)
};

}  // namespace myext
