// The teacher double-step pieces (DESIGN.md 4): CFG combine + Euler step, and the
// two-step target velocity. Elementwise, memory-bound, fp32 arithmetic, per-sample scalars.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "checks.h"
#include "ops.h"

namespace gpd {
namespace {

// Work is split into chunks that never cross a sample, so each chunk reads its per-sample
// scalars once and its inner loop vectorises.
constexpr int64_t kChunk = 16384;

template <typename Body>
void for_each_sample_chunk(int64_t batch, int64_t per_sample, const Body& body) {
  const int64_t chunks_per_sample = (per_sample + kChunk - 1) / kChunk;
  const int64_t chunks = batch * chunks_per_sample;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (chunks > 1)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t sample = chunk / chunks_per_sample;
    const int64_t begin = (chunk % chunks_per_sample) * kChunk;
    const int64_t end = std::min(begin + kChunk, per_sample);
    body(sample, sample * per_sample + begin, end - begin);
  }
}

// CFG combine in fp32: u_uncond + w (u_cond - u_uncond), or u_cond without guidance. The
// multiply-add rounds once, as the Triton kernel's fma: the double product of two floats is
// exact (see gpd_kernels/double_step.py, "Rounding").
template <bool kGuided, typename u_t>
inline float guided_velocity(const u_t* __restrict__ cond, const u_t* __restrict__ uncond,
                             float w, int64_t i) {
  const float c = static_cast<float>(cond[i]);
  if constexpr (kGuided) {
    const float u = static_cast<float>(uncond[i]);
    return static_cast<float>(static_cast<double>(u) +
                              static_cast<double>(w) * static_cast<double>(c - u));
  } else {
    return c;
  }
}

// A double rounded once to x_t: float32 with round-to-odd first, so that the cast to a
// half type (round to nearest even) is the only rounding that counts.
template <typename x_t>
inline x_t round_once(double value) {
  if constexpr (std::is_same_v<x_t, double> || std::is_same_v<x_t, float>) {
    return static_cast<x_t>(value);
  } else {
    float nearest = static_cast<float>(value);
    const double back = static_cast<double>(nearest);
    std::int32_t bits;
    std::memcpy(&bits, &nearest, sizeof bits);
    if (back != value && (bits & 1) == 0) {
      bits += std::fabs(value) > std::fabs(back) ? 1 : -1;
      std::memcpy(&nearest, &bits, sizeof bits);
    }
    return static_cast<x_t>(nearest);
  }
}

// The chunk loops take __restrict__ pointers: with several same-typed (float) arrays the
// compiler would otherwise give up on proving them disjoint and not vectorise.
template <bool kGuided, typename x_t, typename u_t>
void cfg_euler_chunk(const x_t* __restrict__ x, const u_t* __restrict__ cond,
                     const u_t* __restrict__ uncond, float w, float step,
                     x_t* __restrict__ x_next, float* __restrict__ g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = guided_velocity<kGuided>(cond, uncond, w, i);
    g[i] = gi;
    x_next[i] = round_once<x_t>(static_cast<double>(x[i]) +
                                static_cast<double>(step) * static_cast<double>(gi));
  }
}

template <bool kGuided, typename g1_t, typename u_t>
void double_step_target_chunk(const g1_t* __restrict__ g1, const u_t* __restrict__ cond,
                              const u_t* __restrict__ uncond, float w, float first, float second,
                              float span, float* __restrict__ u_star, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g2 = guided_velocity<kGuided>(cond, uncond, w, i);
    u_star[i] = (first * static_cast<float>(g1[i]) + second * g2) / span;
  }
}

template <typename u_t>
struct VelocityPointers {
  const u_t* cond;
  const u_t* uncond;  // null: conditional only
  const float* guidance;
};

template <typename u_t>
VelocityPointers<u_t> velocity_pointers(const at::Tensor& u_cond,
                                        const std::optional<at::Tensor>& u_uncond,
                                        const std::optional<at::Tensor>& guidance) {
  return {u_cond.const_data_ptr<u_t>(),
          u_uncond.has_value() ? u_uncond->const_data_ptr<u_t>() : nullptr,
          guidance.has_value() ? guidance->const_data_ptr<float>() : nullptr};
}

// Contiguous u_cond / u_uncond of one dtype (both float32 when theirs differ: exact for
// half types, and the float32 rounding the reference applies anyway for float64).
std::pair<at::Tensor, std::optional<at::Tensor>> velocity_inputs(
    const at::Tensor& u_cond, const std::optional<at::Tensor>& u_uncond) {
  if (!u_uncond.has_value()) return {u_cond.contiguous(), std::nullopt};
  if (u_uncond->scalar_type() == u_cond.scalar_type()) {
    return {u_cond.contiguous(), u_uncond->contiguous()};
  }
  return {u_cond.to(at::kFloat).contiguous(), u_uncond->to(at::kFloat).contiguous()};
}

std::optional<at::Tensor> per_sample_float(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->to(at::kFloat).contiguous();
}

at::Tensor per_sample_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> cfg_euler_step_cpu(const at::Tensor& x,
                                                      const at::Tensor& u_cond,
                                                      const std::optional<at::Tensor>& u_uncond,
                                                      const std::optional<at::Tensor>& guidance,
                                                      const at::Tensor& sigma_from,
                                                      const at::Tensor& sigma_to) {
  check_guided_inputs("x", x, u_cond, u_uncond, guidance,
                      {{"sigma_from", &sigma_from}, {"sigma_to", &sigma_to}});
  const at::Tensor x_c = x.contiguous();
  const auto [cond_c, uncond_c] = velocity_inputs(u_cond, u_uncond);
  const auto guidance_f = per_sample_float(guidance);
  const at::Tensor from_f = per_sample_float(sigma_from), to_f = per_sample_float(sigma_to);
  at::Tensor x_next = at::empty(x.sizes(), x.options());
  at::Tensor g = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t batch = x.size(0);
  if (x.numel() == 0) return {x_next, g};
  const int64_t per_sample = x.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gpd_cfg_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cond_c.scalar_type(), "gpd_cfg_u",
                                    [&] {
      const auto velocity = velocity_pointers<scalar_t>(cond_c, uncond_c, guidance_f);
      const x_t* x_in = x_c.const_data_ptr<x_t>();
      const float* from = from_f.const_data_ptr<float>();
      const float* to = to_f.const_data_ptr<float>();
      x_t* x_out = x_next.data_ptr<x_t>();
      float* g_out = g.data_ptr<float>();
      for_each_sample_chunk(batch, per_sample, [&](int64_t sample, int64_t start, int64_t n) {
        const float step = to[sample] - from[sample];
        if (velocity.uncond != nullptr) {
          cfg_euler_chunk<true>(x_in + start, velocity.cond + start, velocity.uncond + start,
                                velocity.guidance[sample], step, x_out + start, g_out + start, n);
        } else {
          cfg_euler_chunk<false, x_t, scalar_t>(x_in + start, velocity.cond + start, nullptr, 0.0f,
                                                step, x_out + start, g_out + start, n);
        }
      });
    });
  });
  return {x_next, g};
}

at::Tensor double_step_target_cpu(const at::Tensor& g1, const at::Tensor& u_cond,
                                  const std::optional<at::Tensor>& u_uncond,
                                  const std::optional<at::Tensor>& guidance,
                                  const at::Tensor& s_a, const at::Tensor& s_b,
                                  const at::Tensor& s_c) {
  check_guided_inputs("g1", g1, u_cond, u_uncond, guidance,
                      {{"s_a", &s_a}, {"s_b", &s_b}, {"s_c", &s_c}});
  const at::Tensor g1_c = g1.contiguous();
  const auto [cond_c, uncond_c] = velocity_inputs(u_cond, u_uncond);
  const auto guidance_f = per_sample_float(guidance);
  const at::Tensor a_f = per_sample_float(s_a), b_f = per_sample_float(s_b);
  const at::Tensor c_f = per_sample_float(s_c);
  at::Tensor u_star = at::empty(g1.sizes(), g1.options().dtype(at::kFloat));
  const int64_t batch = g1.size(0);
  if (g1.numel() == 0) return u_star;
  const int64_t per_sample = g1.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g1.scalar_type(), "gpd_target_g1",
                                  [&] {
    using g1_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cond_c.scalar_type(),
                                    "gpd_target_u", [&] {
      const auto velocity = velocity_pointers<scalar_t>(cond_c, uncond_c, guidance_f);
      const g1_t* g1_in = g1_c.const_data_ptr<g1_t>();
      const float* sa = a_f.const_data_ptr<float>();
      const float* sb = b_f.const_data_ptr<float>();
      const float* sc = c_f.const_data_ptr<float>();
      float* out = u_star.data_ptr<float>();
      for_each_sample_chunk(batch, per_sample, [&](int64_t sample, int64_t start, int64_t n) {
        const float first = sb[sample] - sa[sample];
        const float second = sc[sample] - sb[sample];
        const float span = sc[sample] - sa[sample];
        if (velocity.uncond != nullptr) {
          double_step_target_chunk<true>(g1_in + start, velocity.cond + start,
                                         velocity.uncond + start, velocity.guidance[sample],
                                         first, second, span, out + start, n);
        } else {
          double_step_target_chunk<false, g1_t, scalar_t>(g1_in + start, velocity.cond + start,
                                                          nullptr, 0.0f, first, second, span,
                                                          out + start, n);
        }
      });
    });
  });
  return u_star;
}

}  // namespace gpd
