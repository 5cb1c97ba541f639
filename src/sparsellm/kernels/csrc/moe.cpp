// One decoding token through a mixture-of-experts MLP (activations/moe/layer.py) in a single call:
// the router (logits, softmax, top-k, weights) and y = sum_j w_j * down_j (silu(gate_j x) * up_j x)
// over the token's k experts j. At one token the torch path costs ~6 calls for routing and ~7 per
// expert, each ~10 us: as much as reading the expert's weights. Here the two expert stages (gate / up
// rows, then down rows) are each one parallel loop over dot products, and only the chosen experts'
// rows are read. Float32 throughout.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace sparsellm {
namespace {

// Two 8-float vector accumulators (GCC vector types: ymm on AVX2 / AVX-512, two xmm otherwise),
// compiled for AVX-512, AVX2 + FMA and plain x86-64, picked at load time by the CPU.
using Float8 = float __attribute__((vector_size(32)));

__attribute__((target_clones("avx512f", "arch=haswell", "default"))) float dot(const float* a, const float* b,
                                                                                int64_t n) {
  Float8 first = {}, second = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    Float8 a0, a1, b0, b1;
    std::memcpy(&a0, a + i, 32), std::memcpy(&a1, a + i + 8, 32);
    std::memcpy(&b0, b + i, 32), std::memcpy(&b1, b + i + 8, 32);
    first += a0 * b0;
    second += a1 * b1;
  }
  const Float8 lanes = first + second;
  float sum = 0.0f;
  for (int j = 0; j < 8; ++j) sum += lanes[j];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

enum Weighting : int64_t { kSoftmax = 0, kNormalized = 1, kOnes = 2 };  // layer.py's WEIGHTINGS, in order

bool is_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(); }

// The layer's routing for one token, as MoELayer.route computes it: logits = W x + b, p = softmax,
// the k largest p (ties to the lower expert), and their weights. Returns (logits, probs, experts, weights).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& x, const at::Tensor& router,
                                                                 const at::Tensor& bias, int64_t top_k,
                                                                 int64_t weighting) {
  const int64_t hidden = x.size(0), num_experts = router.size(0);
  at::Tensor logits = at::empty({num_experts}, x.options()), probs = at::empty({num_experts}, x.options());
  at::Tensor experts = at::empty({top_k}, x.options().dtype(at::kLong)), weights = at::empty({top_k}, x.options());
  float* logit = logits.data_ptr<float>();
  float* prob = probs.data_ptr<float>();
  for (int64_t e = 0; e < num_experts; ++e)
    logit[e] = dot(router.data_ptr<float>() + e * hidden, x.data_ptr<float>(), hidden) +
               (bias.numel() ? bias.data_ptr<float>()[e] : 0.0f);
  float top = logit[0], total = 0.0f;
  for (int64_t e = 1; e < num_experts; ++e) top = std::max(top, logit[e]);
  for (int64_t e = 0; e < num_experts; ++e) total += prob[e] = std::exp(logit[e] - top);
  for (int64_t e = 0; e < num_experts; ++e) prob[e] /= total;
  int64_t* chosen = experts.data_ptr<int64_t>();
  float* weight = weights.data_ptr<float>();
  std::vector<bool> taken(num_experts);
  float chosen_total = 0.0f;
  for (int64_t j = 0; j < top_k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < num_experts; ++e)
      if (!taken[e] && (best < 0 || prob[e] > prob[best])) best = e;
    taken[best] = true;
    chosen[j] = best;
    weight[j] = weighting == kOnes ? 1.0f : prob[best];
    chosen_total += prob[best];
  }
  if (weighting == kNormalized)
    for (int64_t j = 0; j < top_k; ++j) weight[j] /= chosen_total;
  return {logits, probs, experts, weights};
}

// One token through a layer: x (H,), router (E, H) and bias (E,) or empty, gate_up (E, 2F, H),
// down (E, H, F), all float32. Returns (output (H,), logits, probs, experts (k,), weights (k,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_token(
    const at::Tensor& x, const at::Tensor& router, const at::Tensor& bias, const at::Tensor& gate_up,
    const at::Tensor& down, int64_t top_k, int64_t weighting) {
  if (!is_f32(x) || !is_f32(router) || !is_f32(gate_up) || !is_f32(down) || x.dim() != 1 || router.dim() != 2 ||
      gate_up.dim() != 3 || down.dim() != 3)
    throw std::invalid_argument("moe_token: contiguous float32 x (H,), router (E, H), gate_up (E, 2F, H), down (E, H, F)");
  const int64_t hidden = x.size(0), num_experts = gate_up.size(0), width = gate_up.size(1) / 2;
  if (router.size(0) != num_experts || router.size(1) != hidden || gate_up.size(1) != 2 * width ||
      gate_up.size(2) != hidden || down.size(0) != num_experts || down.size(1) != hidden || down.size(2) != width)
    throw std::invalid_argument("moe_token: router (E, H), gate_up (E, 2F, H) and down (E, H, F) do not match x (H,)");
  if (bias.numel() && (!is_f32(bias) || bias.numel() != num_experts))
    throw std::invalid_argument("moe_token: the router bias must be empty or a contiguous (E,) float32 tensor");
  if (top_k < 1 || top_k > num_experts || weighting < kSoftmax || weighting > kOnes)
    throw std::invalid_argument("moe_token: top-k in [1, E] and a known weighting");
  auto [logits, probs, experts, weights] = route(x, router, bias, top_k, weighting);

  const int64_t* chosen = experts.data_ptr<int64_t>();
  const float* scale = weights.data_ptr<float>();
  const float* input = x.data_ptr<float>();
  const float* up_rows = gate_up.data_ptr<float>();
  const float* down_rows = down.data_ptr<float>();
  std::vector<float> activations(top_k * width);
  // stage 1: each chosen neuron's silu(gate) * up, scaled by its expert's weight
  at::parallel_for(0, top_k * width, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j = i / width, f = i % width;
      const float* expert_rows = up_rows + chosen[j] * 2 * width * hidden;
      const float gate = dot(expert_rows + f * hidden, input, hidden);
      const float up = dot(expert_rows + (width + f) * hidden, input, hidden);
      activations[i] = gate / (1.0f + std::exp(-gate)) * up * scale[j];
    }
  });
  // stage 2: every output, summed over the chosen experts' down rows
  at::Tensor output = at::empty({hidden}, x.options());
  float* out = output.data_ptr<float>();
  at::parallel_for(0, hidden, 64, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      float sum = 0.0f;
      for (int64_t j = 0; j < top_k; ++j)
        sum += dot(down_rows + (chosen[j] * hidden + h) * width, activations.data() + j * width, width);
      out[h] = sum;
    }
  });
  return {output, logits, probs, experts, weights};
}

}  // namespace

void bind_moe(pybind11::module& m) {
  m.def("moe_token", &moe_token, "one token through an MoE layer (float32, SiLU-gated experts): routed, run, summed");
}

}  // namespace sparsellm
