// A mixture-of-experts MLP (activations/moe/layer.py) at inference, float32 throughout, on experts
// packed for it (pack_gate_up / pack_down in layouts.py): every expert's weights as panels of 16 outputs,
// each panel stored input-major, so a panel row is the 16 weights one input feeds (one 64-byte line):
//   gate_up (E, ceil(F / 8), H, 16): panel p, row h = gate rows 8p .. 8p+7, then up rows 8p .. 8p+7, at h
//   down (E, ceil(H / 16), F, 16):   panel p, row f = down rows 16p .. 16p+15 at column f
// (zeros past the last neuron / output). Each expert multiplies only its own tokens, ~32 of 256 at
// E = 8, top-1. A BLAS GEMM of so few rows spends much of its time packing the weights, anew on every
// call; dot products of the weight rows in place (the previous kernel here) ran at 0.6-0.8x of the
// dense MLP with the same active parameters. Packed once, the weights stream contiguously through
// an outer-product tile: 6 tokens x 16 columns of accumulators (12 x 16 on AVX-512), a weight row
// loaded once per 6 FMAs, no reductions, and the panel's next rows prefetched while the first group
// of tokens uses them.
//
// moe_experts: tokens routed by the caller. moe_token: one decoding token, routed here too: at one
// token the torch path costs ~6 calls for routing and ~7 per expert, each ~10 us, as much as reading
// the expert's weights.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

namespace sparsellm {
namespace {

// GCC vector types: ymm on AVX2 / AVX-512, two xmm otherwise; zmm on AVX-512.
using Float8 = float __attribute__((vector_size(32)));
using Float16 = float __attribute__((vector_size(64)));

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

constexpr int64_t kPanel = 16;   // columns per panel: one 64-byte line of float32
constexpr int64_t kDepth = 256;  // panel rows per pass: 16 KiB, held in L1 for every token group

template <typename Vec> constexpr int kLanes = sizeof(Vec) / sizeof(float);
template <typename Vec> inline __attribute__((always_inline)) Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// c[m * kPanel + n] += sum over k < depth of a[k * Group + m] * b[k * kPanel + n], for m < Rows.
// `ahead`, if set, is prefetched into L2 along (one line per row): the next pass (or panel).
template <typename Vec, int Rows, int Group>
inline __attribute__((always_inline)) void panel_tile(const float* a, const float* b, int64_t depth, float* c,
                                                      const float* ahead) {
  constexpr int vectors = kPanel / kLanes<Vec>;
  // zeroed, not loaded from c, and the weights not pinned (asm): either puts vectors on the stack
  Vec acc[Rows * vectors] = {};
  for (int64_t k = 0; k < depth; ++k) {
    if (ahead) __builtin_prefetch(ahead + k * kPanel, 0, 2);
    Vec w[vectors];
    for (int v = 0; v < vectors; ++v) w[v] = load<Vec>(b + k * kPanel + v * kLanes<Vec>);
    for (int m = 0; m < Rows; ++m)
      for (int v = 0; v < vectors; ++v) acc[m * vectors + v] += a[k * Group + m] * w[v];  // the token broadcast
  }
  for (int i = 0; i < Rows * vectors; ++i) {
    const Vec sum = load<Vec>(c + i * kLanes<Vec>) + acc[i];
    std::memcpy(c + i * kLanes<Vec>, &sum, sizeof(Vec));
  }
}

template <typename Vec, int Group, int Rows = Group>
inline __attribute__((always_inline)) void panel_tile_rows(int rows, const float* a, const float* b, int64_t depth,
                                                           float* c, const float* ahead) {
  if constexpr (Rows > 0) {
    if (rows == Rows) return panel_tile<Vec, Rows, Group>(a, b, depth, c, ahead);
    panel_tile_rows<Vec, Group, Rows - 1>(rows, a, b, depth, c, ahead);
  }
}

// sums[i * kPanel + n] = row i of `a` times column n of one panel, for i < rows. `a` holds the rows
// `Group` at a time, each group column-major (a[(g * depth + k) * Group + m] = row g * Group + m at
// column k); `panel` is depth x kPanel. Passes of kDepth panel rows, within a pass every group.
template <typename Vec, int Group>
inline __attribute__((always_inline)) void panel_products(const float* a, int64_t rows, const float* panel,
                                                          int64_t depth, float* sums) {
  std::fill(sums, sums + rows * kPanel, 0.0f);
  for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
    const int64_t columns = std::min(kDepth, depth - k0);
    for (int64_t i = 0; i < rows; i += Group)
      panel_tile_rows<Vec, Group>(static_cast<int>(std::min<int64_t>(Group, rows - i)), a + (i * depth + k0 * Group),
                                  panel + k0 * kPanel, columns, sums + i * kPanel,
                                  i == 0 ? panel + (k0 + kDepth) * kPanel : nullptr);
  }
}

using PanelProducts = void (*)(const float*, int64_t, const float*, int64_t, float*);
// AVX-512: 12 x 16 accumulators in 12 zmm; AVX2: 6 x 16 in 12 ymm (+ 2 weight vectors and a token:
// 15 of 16 registers); CPUs without AVX2: correct, not tuned (each ymm is two xmm, and they spill).
constexpr int kGroupAvx512 = 12, kGroup = 6;
__attribute__((target("avx512f"))) void panel_products_avx512(const float* a, int64_t rows, const float* panel,
                                                              int64_t depth, float* sums) {
  panel_products<Float16, kGroupAvx512>(a, rows, panel, depth, sums);
}
__attribute__((target("avx2,fma"))) void panel_products_avx2(const float* a, int64_t rows, const float* panel,
                                                             int64_t depth, float* sums) {
  panel_products<Float8, kGroup>(a, rows, panel, depth, sums);
}
void panel_products_plain(const float* a, int64_t rows, const float* panel, int64_t depth, float* sums) {
  panel_products<Float8, kGroup>(a, rows, panel, depth, sums);
}

// e^x in float32 (Cephes' expf: 2^n times a degree-7 polynomial of the remainder, ~1 ulp), x
// clamped to [-87, 88] where float32 ends.
inline __attribute__((always_inline)) Float8 exp8(Float8 x) {
  using Int8 = int32_t __attribute__((vector_size(32)));
  x = x < -87.0f ? Float8{} - 87.0f : x;
  x = x > 88.0f ? Float8{} + 88.0f : x;
  const Float8 n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln 2): 1.5 * 2^23 drops the fraction
  const Float8 r = x - n * 0.693359375f + n * 2.12194440e-4f;       // x - n ln 2, ln 2 in two parts
  Float8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Int8 exponent = (__builtin_convertvector(n, Int8) + 127) << 23;
  Float8 two_to_n;
  std::memcpy(&two_to_n, &exponent, sizeof two_to_n);
  return p * two_to_n;
}

// A panel's 8 neurons for `rows` token rows, from their gate and up sums (sums[i * 16 + q] and
// [i * 16 + 8 + q]): silu(gate) * up * scale[i], written to `to` + i's place in stage 2's grouped
// layout (groups of `group` rows, column-major; one row of a group per `group` floats).
inline __attribute__((always_inline)) void silu_gated(const float* sums, const float* scale, int64_t rows,
                                                      int64_t neurons, int64_t group, int64_t depth, float* to) {
  for (int64_t i = 0; i < rows; ++i) {
    const Float8 gate = load<Float8>(sums + i * kPanel), up = load<Float8>(sums + i * kPanel + kPanel / 2);
    const Float8 activation = gate * up * scale[i] / (1.0f + exp8(-gate));
    float* row = to + (i / group * depth) * group + i % group;
    for (int64_t q = 0; q < neurons; ++q) row[q * group] = activation[q];
  }
}
using SiluGated = void (*)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*);
__attribute__((target("avx2,fma"))) void silu_gated_avx2(const float* sums, const float* scale, int64_t rows,
                                                         int64_t neurons, int64_t group, int64_t depth, float* to) {
  silu_gated(sums, scale, rows, neurons, group, depth, to);
}
void silu_gated_plain(const float* sums, const float* scale, int64_t rows, int64_t neurons, int64_t group,
                      int64_t depth, float* to) {
  silu_gated(sums, scale, rows, neurons, group, depth, to);
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

bool is_panels(const at::Tensor& t) { return is_f32(t) && t.dim() == 4 && t.size(3) == kPanel; }

// Tokens through a layer's packed experts: x (N, H); experts (N, k) int64, -1 where an assignment
// was dropped; weights (N, k); gate_up (E, ceil(F / 8), H, 16), down (E, ceil(H / 16), F, 16); all
// float32. Returns y (N, H), y[t] = sum over t's kept assignments j of weights[t, j] * expert_j(x[t]).
// allow_avx512 = false runs the AVX2 (or, without it, plain) build of the tiles (tests force it).
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                       const at::Tensor& gate_up, const at::Tensor& down, bool allow_avx512) {
  if (!is_f32(x) || !is_f32(weights) || !is_panels(gate_up) || !is_panels(down) || x.dim() != 2 ||
      experts.scalar_type() != at::kLong || !experts.is_contiguous() || experts.dim() != 2)
    throw std::invalid_argument(
        "moe_experts: contiguous float32 x (N, H), int64 experts (N, k), float32 weights (N, k), gate_up panels "
        "(E, ceil(F / 8), H, 16), down panels (E, ceil(H / 16), F, 16)");
  const int64_t tokens = x.size(0), hidden = x.size(1), top_k = experts.size(1);
  const int64_t num_experts = gate_up.size(0), width = down.size(2), neurons_per_panel = kPanel / 2;
  const int64_t gate_up_panels = gate_up.size(1), down_panels = down.size(1);
  if (experts.size(0) != tokens || weights.sizes() != experts.sizes() || gate_up.size(2) != hidden ||
      down.size(0) != num_experts || width == 0 || gate_up_panels != (width + neurons_per_panel - 1) / neurons_per_panel ||
      down_panels != (hidden + kPanel - 1) / kPanel)
    throw std::invalid_argument("moe_experts: x, experts, weights and the gate_up and down panels do not match");

  // the kept assignments grouped by expert (a counting sort), in token order within each expert
  const int64_t* chosen = experts.data_ptr<int64_t>();
  const float* weight = weights.data_ptr<float>();
  std::vector<int64_t> start(num_experts + 1, 0);
  for (int64_t i = 0; i < tokens * top_k; ++i) {
    if (chosen[i] >= num_experts) throw std::invalid_argument("moe_experts: an expert index is out of range");
    if (chosen[i] >= 0) ++start[chosen[i] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) start[e + 1] += start[e];
  const int64_t assignments = start[num_experts];
  std::vector<int64_t> token_of(assignments), cursor(start.begin(), start.end() - 1);
  std::vector<float> scale_of(assignments);
  for (int64_t i = 0; i < tokens * top_k; ++i)
    if (chosen[i] >= 0) token_of[cursor[chosen[i]]] = i / top_k, scale_of[cursor[chosen[i]]++] = weight[i];
  std::vector<int64_t> busy;
  for (int64_t e = 0; e < num_experts; ++e)
    if (start[e + 1] > start[e]) busy.push_back(e);

  __builtin_cpu_init();
  const bool avx512 = allow_avx512 && __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const PanelProducts products = avx512 ? panel_products_avx512 : avx2 ? panel_products_avx2 : panel_products_plain;
  const int64_t group = avx512 ? kGroupAvx512 : kGroup;
  // An expert's rows in groups, as panel_products reads them, start at offset[e] * depth: its
  // assignments rounded up to whole groups (the rows past them are never read).
  std::vector<int64_t> offset(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e)
    offset[e + 1] = offset[e] + (start[e + 1] - start[e] + group - 1) / group * group;
  const auto packed_at = [&](int64_t e, int64_t i, int64_t k, int64_t depth) {  // row i of expert e, column k
    return offset[e] * depth + (i / group * depth + k) * group + i % group;
  };
  at::Tensor inputs = at::empty({offset[num_experts] * hidden}, x.options());
  float* packed_inputs = inputs.data_ptr<float>();
  const float* input = x.data_ptr<float>();
  at::parallel_for(0, num_experts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e)
      for (int64_t i = 0; i < start[e + 1] - start[e]; ++i) {
        const float* row = input + token_of[start[e] + i] * hidden;
        float* to = packed_inputs + packed_at(e, i, 0, hidden);
        for (int64_t k = 0; k < hidden; ++k) to[k * group] = row[k];
      }
  });

  // Every busy expert's rows (`rows`, grouped) times each of its panels (`panel_weights`: E x panels,
  // each depth x kPanel), threads splitting the panels; finish(e, p, count, sums) takes each product.
  const auto each_panel = [&](const float* rows, const float* panel_weights, int64_t panels, int64_t depth,
                              const auto& finish) {
    at::parallel_for(0, panels, 1, [&](int64_t panel_begin, int64_t panel_end) {
      std::vector<float> sums;
      for (const int64_t e : busy) {
        const int64_t count = start[e + 1] - start[e];
        sums.resize(count * kPanel);
        for (int64_t p = panel_begin; p < panel_end; ++p) {
          products(rows + offset[e] * depth, count, panel_weights + (e * panels + p) * depth * kPanel, depth,
                   sums.data());
          finish(e, p, count, sums.data());
        }
      }
    });
  };

  // stage 1: silu(gate x) * (up x) * weight, written once in the grouped layout of stage 2's input
  // (writing the gate and up sums for torch's SiLU and product instead made the call 4-14 % slower:
  // two buffers and two more passes over them)
  const SiluGated activate = avx2 ? silu_gated_avx2 : silu_gated_plain;
  at::Tensor activations = at::empty({offset[num_experts] * width}, x.options());
  float* activation = activations.data_ptr<float>();
  each_panel(packed_inputs, gate_up.data_ptr<float>(), gate_up_panels, hidden,
             [&](int64_t e, int64_t p, int64_t count, const float* sums) {
               const int64_t f0 = p * neurons_per_panel;
               activate(sums, scale_of.data() + start[e], count, std::min(neurons_per_panel, width - f0), group,
                        width, activation + packed_at(e, 0, f0, width));
             });

  // stage 2: y[t] += down activations
  at::Tensor output = at::zeros({tokens, hidden}, x.options());
  float* out = output.data_ptr<float>();
  each_panel(activation, down.data_ptr<float>(), down_panels, width,
             [&](int64_t e, int64_t p, int64_t count, const float* sums) {
               const int64_t h0 = p * kPanel, outputs = std::min(kPanel, hidden - h0);
               for (int64_t i = 0; i < count; ++i)
                 for (int64_t n = 0; n < outputs; ++n) out[token_of[start[e] + i] * hidden + h0 + n] += sums[i * kPanel + n];
             });
  return output;
}

// One token through a layer: x (H,), router (E, H) and bias (E,) or empty, the packed experts as in
// moe_experts. Returns (output (H,), logits, probs, experts (k,), weights (k,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_token(
    const at::Tensor& x, const at::Tensor& router, const at::Tensor& bias, const at::Tensor& gate_up,
    const at::Tensor& down, int64_t top_k, int64_t weighting, bool allow_avx512) {
  if (!is_f32(x) || !is_f32(router) || x.dim() != 1 || router.dim() != 2 || router.size(1) != x.size(0))
    throw std::invalid_argument("moe_token: contiguous float32 x (H,) and router (E, H)");
  const int64_t num_experts = router.size(0);
  if (bias.numel() && (!is_f32(bias) || bias.numel() != num_experts))
    throw std::invalid_argument("moe_token: the router bias must be empty or a contiguous (E,) float32 tensor");
  if (top_k < 1 || top_k > num_experts || weighting < kSoftmax || weighting > kOnes || gate_up.dim() != 4 ||
      gate_up.size(0) != num_experts)
    throw std::invalid_argument("moe_token: top-k in [1, E], a known weighting, and E experts' panels");
  auto [logits, probs, experts, weights] = route(x, router, bias, top_k, weighting);
  at::Tensor output = moe_experts(x.view({1, -1}), experts.view({1, -1}), weights.view({1, -1}), gate_up, down,
                                  allow_avx512);
  return {output.view({-1}), logits, probs, experts, weights};
}

}  // namespace

void bind_moe(pybind11::module& m) {
  m.def("moe_experts", &moe_experts, "routed tokens through an MoE layer's packed experts (float32, SiLU-gated)");
  m.def("moe_token", &moe_token, "one token through an MoE layer (float32, packed SiLU-gated experts): routed, run, summed");
  m.attr("moe_panel_width") = kPanel;
}

}  // namespace sparsellm
