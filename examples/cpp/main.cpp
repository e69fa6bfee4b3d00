// What a C++ (libtorch) trainer does to use the fused GPD ops: link libgpd_native, look the
// ops up in the dispatcher, call them on tensors. Each result is checked against a small
// inline computation; the exit status is the number of failed checks.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <complex>
#include <cstdio>
#include <optional>
#include <tuple>

#include "gpd_native.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  failures += ok ? 0 : 1;
}

using FreqLossFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      double, double, double, bool);
using CfgEulerFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&,
                                                      const std::optional<at::Tensor>&,
                                                      const at::Tensor&, const at::Tensor&);
using TargetFn = at::Tensor(const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&);

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// sum_k w_k |D_k|^2 / n for a 1-D signal, D its orthonormal DFT, w_k = 1 + c f(k)^gamma.
double weighted_spectrum_1d(const at::Tensor& d, double c, double gamma) {
  const int64_t n = d.numel();
  const auto values = d.to(at::kDouble).contiguous();
  const double* x = values.const_data_ptr<double>();
  double total = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    std::complex<double> coefficient = 0.0;
    for (int64_t m = 0; m < n; ++m) {
      coefficient += x[m] * std::polar(1.0, -2.0 * M_PI * static_cast<double>(k * m % n) / n);
    }
    const double freq = static_cast<double>(std::min(k, n - k)) / (n / 2.0);
    total += (1.0 + c * std::pow(freq, gamma)) * std::norm(coefficient) / n;
  }
  return total / n;
}

}  // namespace

int main() {
  expect(gpd_native_schema_count() == 8, "libgpd_native defines the 8 gpd:: schemas");
  const auto freq_loss = find_op<FreqLossFn>("gpd::freq_loss_fwd");
  const auto cfg_euler_step = find_op<CfgEulerFn>("gpd::cfg_euler_step");
  const auto double_step_target = find_op<TargetFn>("gpd::double_step_target");
  at::manual_seed(0);

  {  // With alpha = 0 the frequency loss is the MSE and its gradient 2 d / numel.
    const auto pred = at::randn({2, 3, 5, 6, 7}), target = at::randn({2, 3, 5, 6, 7});
    const auto [loss, grad] = freq_loss.call(pred, target, 0.0, 0.0, 1.0, true);
    const auto d = pred - target;
    expect(at::allclose(loss, d.square().mean(), 1e-5, 1e-7), "freq_loss, alpha = 0: MSE");
    expect(at::allclose(grad, 2 * d / d.numel(), 1e-5, 1e-8), "freq_loss, alpha = 0: gradient");
  }
  {  // Only W longer than 1: the weighted spectrum of a 1-D signal, by an explicit DFT.
    const double alpha_s = 1.5, gamma = 2.0;
    const auto pred = at::randn({1, 1, 1, 1, 11}), target = at::randn({1, 1, 1, 1, 11});
    const auto [loss, grad] = freq_loss.call(pred, target, alpha_s, 0.7, gamma, false);
    const double expected = weighted_spectrum_1d(pred - target, alpha_s / 2, gamma);
    expect(std::abs(loss.item<double>() - expected) <= 1e-5 * expected,
           "freq_loss, W axis: explicit DFT");
    expect(grad.numel() == 0, "freq_loss, need_grad = false: empty gradient");
  }
  {  // One guided Euler step and the two-step target, elementwise.
    const auto x = at::randn({3, 4, 5}), cond = at::randn({3, 4, 5}), uncond = at::randn({3, 4, 5});
    const auto w = at::tensor({1.0f, 4.5f, 6.0f}), s_a = at::tensor({1.0f, 0.6f, 0.3f});
    const auto s_b = at::tensor({0.9f, 0.5f, 0.2f}), s_c = at::tensor({0.8f, 0.4f, 0.1f});
    const auto [x_b, g1] = cfg_euler_step.call(x, cond, uncond, w, s_a, s_b);
    const auto per_sample = [](const at::Tensor& s) { return s.view({3, 1, 1}); };
    const auto g_expected = uncond + per_sample(w) * (cond - uncond);
    expect(at::allclose(g1, g_expected, 1e-6, 1e-6), "cfg_euler_step: guided velocity");
    expect(at::allclose(x_b, x + per_sample(s_b - s_a) * g_expected, 1e-6, 1e-6),
           "cfg_euler_step: Euler step");
    const auto cond2 = at::randn({3, 4, 5});
    const auto u_star = double_step_target.call(g1, cond2, std::nullopt, std::nullopt, s_a, s_b,
                                                s_c);
    // x_a + (s_c - s_a) u* must land where the two Euler steps land.
    const auto x_c = x_b + per_sample(s_c - s_b) * cond2;
    expect(at::allclose(x + per_sample(s_c - s_a) * u_star, x_c, 1e-5, 1e-5),
           "double_step_target: one step of u* equals the two steps");
  }
  std::printf("%d failed\n", failures);
  return failures;
}
