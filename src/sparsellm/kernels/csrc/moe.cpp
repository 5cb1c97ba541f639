// A mixture-of-experts MLP (activations/moe/layer.py) at inference, float32 throughout.
//
// moe_token: one decoding token in a single call: the router (logits, softmax, top-k, weights) and
// y = sum_j w_j * down_j (silu(gate_j x) * up_j x) over the token's k experts j. At one token the
// torch path costs ~6 calls for routing and ~7 per expert, each ~10 us: as much as reading the
// expert's weights. The two expert stages (gate / up rows, then down rows) are each one parallel
// loop over dot products, and only the chosen experts' rows are read.
//
// moe_tokens: many tokens, routed by the caller. Each expert multiplies only its own tokens, ~32 of
// 256 at E = 8, top-1; a BLAS GEMM of so few rows spends much of its time packing the weights (it
// packs them anew on every call), which left the layer at half a dense MLP's speed. Here the
// weights are read in place: both operands of every product are rows contiguous along the summed
// dimension (x and gate / up rows; activations and down rows), so one tile of 3 tokens x 8 weight
// rows is 24 vector dot products, whose lanes a transposing reduction sums. A tile's rows are 4
// neurons' gate and up rows, then 8 down rows; threads split the neurons, then the outputs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/silu.h>
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

// The tile of moe_tokens: 3 token rows (a) against `Rows` weight rows (b), `depth` columns of each,
// one vector accumulator per dot product. The reduction takes them a vector's lanes at a time and
// pairs them (halves, quarters, ...), so that log2(lanes) rounds of two shuffles and an add leave
// that many sums in one vector, the sum of accumulator i in lane bitreverse(i). On AVX-512 a tile is
// 3 x 8 in 16-lane vectors (3 x 8 measured 5-10 % faster than 2 x 8: fewer loads per FMA; 4 x 6 the
// same, 2 x 12 slower). AVX2 has 16 vector registers, not 32: there the 8 rows run as two tiles of
// 3 x 4 in 8-lane vectors (12 accumulators, 3 token vectors and one weight vector); the 3 x 8 tile
// in 8-lane halves spilled, at a tenth of a dense MLP's speed on a Zen 3.
using Float16 = float __attribute__((vector_size(64)));
constexpr int kTileTokens = 3, kTileRows = 8;
constexpr int64_t kDepth = 768;  // columns per pass: a tile's 8 weight rows (24 KiB) stay in L1

template <typename Vec> constexpr int kLanes = sizeof(Vec) / sizeof(float);
constexpr int log2_of(int n) { return n > 1 ? 1 + log2_of(n / 2) : 0; }
constexpr int reverse_bits(int value, int bits) {
  int reversed = 0;
  for (int b = 0; b < bits; ++b) reversed |= ((value >> b) & 1) << (bits - 1 - b);
  return reversed;
}
// Where accumulator i's sum lands after the reduction: its group of `Lanes`, at its reduced lane.
template <int Lanes> constexpr int lane_of(int i) { return i / Lanes * Lanes + reverse_bits(i % Lanes, log2_of(Lanes)); }

template <typename Vec> inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One round of the reduction: the lanes of a and b folded into one vector, each half of a group of
// 2g lanes (g = lanes / 2 >> Round) the pairwise sums of one operand's lanes there, a's first.
constexpr int fold_lane(int lanes, int round, int lane, bool upper) {
  const int g = (lanes / 2) >> round, group = lane / (2 * g), within = lane % (2 * g);
  return (within < g ? within : lanes + within - g) + group * 2 * g + (upper ? g : 0);
}
template <int Round, bool Upper, typename Vec, size_t... Lane>
inline Vec fold_half(Vec a, Vec b, std::index_sequence<Lane...>) {
  return __builtin_shufflevector(a, b, fold_lane(kLanes<Vec>, Round, Lane, Upper)...);
}
template <int Round, typename Vec> inline Vec fold(Vec a, Vec b) {
  constexpr auto lanes = std::make_index_sequence<kLanes<Vec>>();
  return fold_half<Round, false>(a, b, lanes) + fold_half<Round, true>(a, b, lanes);
}
// acc[0] = the sums of acc[0 .. lanes), in reduced lane order.
template <int Round = 0, typename Vec> inline void reduce(Vec* acc) {
  if constexpr ((kLanes<Vec> / 2 >> Round) >= 1) {
    for (int i = 0; i < (kLanes<Vec> / 2 >> Round); ++i) acc[i] = fold<Round>(acc[2 * i], acc[2 * i + 1]);
    reduce<Round + 1>(acc);
  }
}

// sums[m * kTileRows + r] += a[m] . b[r] for m < tokens (the a[m] past them repeat the last), r <
// Rows. `ahead`, if set, is prefetched along (one line per 16 columns). PinWeights keeps each weight
// vector in a register for its FMAs: left alone, GCC folds the load into every one, and 18 loads per
// 16 FMAs halved the 2-token tile's speed on AVX-512 (71 -> 149 GFLOP/s on one core, operands in L1).
template <typename Vec, int Rows, bool PinWeights>
inline __attribute__((always_inline)) void tile_dots(const float* const* a, const float* const* b, int64_t depth,
                                                     const float* ahead, int64_t tokens, float* sums) {
  constexpr int lanes = kLanes<Vec>, count = kTileTokens * Rows, slots = (count + lanes - 1) / lanes * lanes;
  Vec acc[slots] = {};
  const int64_t whole = depth & ~int64_t{lanes - 1};
  for (int64_t k = 0; k < whole; k += lanes) {
    if (ahead && k % 16 == 0) __builtin_prefetch(ahead + k, 0, 2);  // to L2: L1 holds this tile's rows
    Vec x[kTileTokens];
    for (int m = 0; m < kTileTokens; ++m) x[m] = load<Vec>(a[m] + k);
    for (int r = 0; r < Rows; ++r) {
      Vec w = load<Vec>(b[r] + k);
      if constexpr (PinWeights && lanes == 16) asm("" : "+v"(w));
      if constexpr (PinWeights && lanes == 8) asm("" : "+x"(w));
      for (int m = 0; m < kTileTokens; ++m) acc[m * Rows + r] += x[m] * w;
    }
  }
  float reduced[slots];
  for (int v = 0; v < slots; v += lanes) {
    reduce(acc + v);
    std::memcpy(reduced + v, &acc[v], sizeof acc[v]);
  }
  for (int m = 0; m < tokens; ++m)
    for (int r = 0; r < Rows; ++r) {
      float sum = reduced[lane_of<lanes>(m * Rows + r)];
      for (int64_t k = whole; k < depth; ++k) sum += a[m][k] * b[r][k];  // the last < `lanes` columns
      sums[m * kTileRows + r] += sum;
    }
}

// sums[i * 8 + r] += rows[index[i]] . b[r] for i < count, with `ld` floats between rows: the
// columns in even passes of at most kDepth, within a pass the tokens kTileTokens at a time against
// the same 8 rows (`Rows` at a time). With so few tokens per expert the weights take as long to
// arrive from memory as to multiply: the 8 rows `next` (the caller's next tile, or null) are
// prefetched meanwhile, a row per group of tokens.
template <typename Vec, int Rows, bool PinWeights>
inline __attribute__((always_inline)) void tile_products(const float* rows, int64_t ld, const int64_t* index,
                                                         int64_t count, const float* const* b, int64_t depth,
                                                         const float* const* next, float* sums) {
  const int64_t passes = (depth + kDepth - 1) / kDepth, width = (depth / passes + 15) & ~int64_t{15};
  for (int64_t k0 = 0; k0 < depth; k0 += width) {
    const int64_t columns = std::min(width, depth - k0);
    const float* part[kTileRows];
    for (int r = 0; r < kTileRows; ++r) part[r] = b[r] + k0;
    for (int64_t i = 0; i < count; i += kTileTokens) {
      const int64_t group = std::min<int64_t>(kTileTokens, count - i);
      const float* a[kTileTokens];
      for (int m = 0; m < kTileTokens; ++m) a[m] = rows + index[i + std::min<int64_t>(m, group - 1)] * ld + k0;
      const float* ahead = next ? next[(i / kTileTokens) % kTileRows] + k0 : nullptr;
      for (int r0 = 0; r0 < kTileRows; r0 += Rows)
        tile_dots<Vec, Rows, PinWeights>(a, part + r0, columns, r0 == 0 ? ahead : nullptr, group,
                                         sums + i * kTileRows + r0);
    }
  }
}

__attribute__((target("avx512f"))) void tile_products_avx512(const float* rows, int64_t ld, const int64_t* index,
                                                             int64_t count, const float* const* b, int64_t depth,
                                                             const float* const* next, float* sums) {
  tile_products<Float16, kTileRows, true>(rows, ld, index, count, b, depth, next, sums);
}
__attribute__((target("avx2,fma"))) void tile_products_avx2(const float* rows, int64_t ld, const int64_t* index,
                                                            int64_t count, const float* const* b, int64_t depth,
                                                            const float* const* next, float* sums) {
  tile_products<Float8, kTileRows / 2, true>(rows, ld, index, count, b, depth, next, sums);
}
// CPUs without AVX2: correct, not tuned (each 8-lane vector is two SSE registers).
void tile_products_plain(const float* rows, int64_t ld, const int64_t* index, int64_t count, const float* const* b,
                         int64_t depth, const float* const* next, float* sums) {
  tile_products<Float8, kTileRows / 2, false>(rows, ld, index, count, b, depth, next, sums);
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

// Tokens routed by the caller through a layer's experts: x (N, H); experts (N, k) int64, -1 where an
// assignment was dropped; weights (N, k); gate_up (E, 2F, H), down (E, H, F); all float32.
// Returns y (N, H), y[t] = sum over t's kept assignments j of weights[t, j] * expert_j(x[t]).
// allow_avx512 = false runs the AVX2 (or, without it, plain) build of the tiles (tests force it).
at::Tensor moe_tokens(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                      const at::Tensor& gate_up, const at::Tensor& down, bool allow_avx512) {
  if (!is_f32(x) || !is_f32(weights) || !is_f32(gate_up) || !is_f32(down) || x.dim() != 2 || gate_up.dim() != 3 ||
      down.dim() != 3 || experts.scalar_type() != at::kLong || !experts.is_contiguous() || experts.dim() != 2)
    throw std::invalid_argument(
        "moe_tokens: contiguous float32 x (N, H), int64 experts (N, k), float32 weights (N, k), gate_up (E, 2F, H), "
        "down (E, H, F)");
  const int64_t tokens = x.size(0), hidden = x.size(1), top_k = experts.size(1);
  const int64_t num_experts = gate_up.size(0), width = gate_up.size(1) / 2;
  if (experts.size(0) != tokens || weights.sizes() != experts.sizes() || gate_up.size(1) != 2 * width ||
      gate_up.size(2) != hidden || down.size(0) != num_experts || down.size(1) != hidden || down.size(2) != width ||
      width == 0)
    throw std::invalid_argument("moe_tokens: x, experts, weights, gate_up and down do not match");

  // the kept assignments grouped by expert (a counting sort), in token order within each expert
  const int64_t* chosen = experts.data_ptr<int64_t>();
  const float* weight = weights.data_ptr<float>();
  std::vector<int64_t> start(num_experts + 1, 0);
  for (int64_t i = 0; i < tokens * top_k; ++i) {
    if (chosen[i] >= num_experts) throw std::invalid_argument("moe_tokens: an expert index is out of range");
    if (chosen[i] >= 0) ++start[chosen[i] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) start[e + 1] += start[e];
  std::vector<int64_t> token_of(start[num_experts]), cursor(start.begin(), start.end() - 1);
  std::vector<float> scale_of(start[num_experts]);
  for (int64_t i = 0; i < tokens * top_k; ++i)
    if (chosen[i] >= 0) token_of[cursor[chosen[i]]] = i / top_k, scale_of[cursor[chosen[i]]++] = weight[i];

  __builtin_cpu_init();
  const auto tile_products_here = allow_avx512 && __builtin_cpu_supports("avx512f") ? tile_products_avx512
                                  : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                                      ? tile_products_avx2
                                      : tile_products_plain;
  const float* input = x.data_ptr<float>();
  const float* up_rows = gate_up.data_ptr<float>();
  const float* down_rows = down.data_ptr<float>();
  // one row per assignment: gate x, made the activations in place; (up x) times the assignment's weight
  at::Tensor activations = at::empty({start[num_experts], width}, x.options()), scaled_ups = at::empty_like(activations);
  float* gates = activations.data_ptr<float>();
  float* ups = scaled_ups.data_ptr<float>();
  constexpr int kNeurons = kTileRows / 2;                      // a tile's rows: 4 gate rows, then their 4 up rows
  // A stage's tiles, expert by expert, each thread taking the same share of every expert's blocks;
  // rows(e, block, b) fills a block's 8 weight rows, run(e, block, b, next) multiplies them.
  const auto each_tile = [&](int64_t blocks, const auto& rows, const auto& run) {
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      std::vector<int64_t> busy;
      for (int64_t e = 0; e < num_experts; ++e)
        if (start[e + 1] > start[e]) busy.push_back(e);
      for (size_t j = 0; j < busy.size(); ++j)
        for (int64_t block = block_begin; block < block_end; ++block) {
          const float *b[kTileRows], *next[kTileRows];
          rows(busy[j], block, b);
          const bool last = block + 1 == block_end, has_next = !last || j + 1 < busy.size();
          if (has_next) rows(last ? busy[j + 1] : busy[j], last ? block_begin : block + 1, next);
          run(busy[j], block, b, has_next ? next : nullptr);
        }
    });
  };
  // stage 1: gate x and (up x) * weight, threads splitting each expert's neurons; then activations =
  // silu(gate x) * that, by torch's vectorised SiLU (a scalar exp per neuron here cost ~7 % of the call)
  const auto gate_up_rows = [&](int64_t e, int64_t block, const float** b) {
    const int64_t f0 = block * kNeurons, neurons = std::min<int64_t>(kNeurons, width - f0);
    for (int q = 0; q < kNeurons; ++q) {  // past the last neuron: repeat it, drop the sums
      const int64_t f = f0 + std::min<int64_t>(q, neurons - 1);
      b[q] = up_rows + (e * 2 * width + f) * hidden, b[kNeurons + q] = up_rows + (e * 2 * width + width + f) * hidden;
    }
  };
  each_tile((width + kNeurons - 1) / kNeurons, gate_up_rows, [&](int64_t e, int64_t block, const float* const* b,
                                                                 const float* const* next) {
    const int64_t first = start[e], count = start[e + 1] - first;
    const int64_t f0 = block * kNeurons, neurons = std::min<int64_t>(kNeurons, width - f0);
    thread_local std::vector<float> sums;
    sums.assign(count * kTileRows, 0.0f);
    tile_products_here(input, hidden, token_of.data() + first, count, b, hidden, next, sums.data());
    for (int64_t i = 0; i < count; ++i)
      for (int q = 0; q < neurons; ++q) {
        gates[(first + i) * width + f0 + q] = sums[i * kTileRows + q];
        ups[(first + i) * width + f0 + q] = sums[i * kTileRows + kNeurons + q] * scale_of[first + i];
      }
  });
  at::silu_(activations).mul_(scaled_ups);
  // stage 2: y[t] += down activations, threads splitting the outputs
  at::Tensor output = at::zeros({tokens, hidden}, x.options());
  float* out = output.data_ptr<float>();
  std::vector<int64_t> assignments(start[num_experts]);
  for (int64_t i = 0; i < start[num_experts]; ++i) assignments[i] = i;
  const auto down_rows_of = [&](int64_t e, int64_t block, const float** b) {
    const int64_t h0 = block * kTileRows, outputs = std::min<int64_t>(kTileRows, hidden - h0);
    for (int r = 0; r < kTileRows; ++r) b[r] = down_rows + (e * hidden + h0 + std::min<int64_t>(r, outputs - 1)) * width;
  };
  each_tile((hidden + kTileRows - 1) / kTileRows, down_rows_of, [&](int64_t e, int64_t block, const float* const* b,
                                                                   const float* const* next) {
    const int64_t first = start[e], count = start[e + 1] - first;
    const int64_t h0 = block * kTileRows, outputs = std::min<int64_t>(kTileRows, hidden - h0);
    thread_local std::vector<float> sums;
    sums.assign(count * kTileRows, 0.0f);
    tile_products_here(activations.data_ptr<float>(), width, assignments.data() + first, count, b, width, next, sums.data());
    for (int64_t i = 0; i < count; ++i)
      for (int r = 0; r < outputs; ++r) out[token_of[first + i] * hidden + h0 + r] += sums[i * kTileRows + r];
  });
  return output;
}

}  // namespace

void bind_moe(pybind11::module& m) {
  m.def("moe_token", &moe_token, "one token through an MoE layer (float32, SiLU-gated experts): routed, run, summed");
  m.def("moe_tokens", &moe_tokens, "routed tokens through an MoE layer's experts (float32, SiLU-gated)");
}

}  // namespace sparsellm
