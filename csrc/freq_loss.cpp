// Frequency-weighted latent loss on the CPU by the real circulant route (DESIGN.md 4).
//
// The weight w = 1 + c_s (f_H^g + f_W^g) + alpha_t f_T^g, c_s = alpha_s / 2, is a sum of
// per-axis terms, so by Parseval sum(w |D|^2) = d . G with
//   G = d + c_s (A_H d + A_W d) + alpha_t A_T d,
// A_X the real symmetric circulant whose eigenvalues are f_X^g. The loss is d . G / numel
// and the gradient 2 G / numel: three real matrix products per (b, c) slice, no FFT.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "latent_loss.h"
#include "ops.h"

namespace gpd {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Row-major n x n circulant A with A[i][j] = a[(i - j) mod n],
// a[m] = (1/n) sum_k f(k)^gamma cos(2 pi k m / n): real because f(k) = f(n - k).
at::Tensor circulant_matrix(int64_t n, double gamma, at::ScalarType dtype) {
  std::vector<double> eigenvalue(n);
  for (int64_t k = 0; k < n; ++k) {
    const double freq = static_cast<double>(std::min(k, n - k)) / (static_cast<double>(n) / 2.0);
    eigenvalue[k] = std::pow(freq, gamma);
  }
  std::vector<double> first_column(n);
  for (int64_t m = 0; m < n; ++m) {
    double sum = 0.0;
    for (int64_t k = 0; k < n; ++k) {
      // (k * m) mod n keeps the cosine argument in [0, 2 pi) for accuracy at large n.
      sum += eigenvalue[k] * std::cos(2.0 * kPi * static_cast<double>((k * m) % n) / n);
    }
    first_column[m] = sum / static_cast<double>(n);
  }
  at::Tensor matrix = at::empty({n, n}, at::TensorOptions().dtype(at::kDouble));
  double* entries = matrix.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      entries[i * n + j] = first_column[(i - j + n) % n];
    }
  }
  return matrix.to(dtype);
}

// Adds the identity term (G = g + d), returns d . G in double and leaves g = scale * G.
// Independent lane sums let the loop vectorise; one running sum would serialise on its adds.
template <typename acc_t>
double finish_slice(const acc_t* d, acc_t* g, int64_t n, acc_t scale) {
  constexpr int64_t kLanes = 8;
  double lanes[kLanes] = {};
  const int64_t bulk = n - n % kLanes;
  for (int64_t i = 0; i < bulk; i += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const acc_t total = g[i + lane] + d[i + lane];
      lanes[lane] += static_cast<double>(d[i + lane] * total);
      g[i + lane] = total * scale;
    }
  }
  for (int64_t i = bulk; i < n; ++i) {
    const acc_t total = g[i] + d[i];
    lanes[0] += static_cast<double>(d[i] * total);
    g[i] = total * scale;
  }
  double sum = 0.0;
  for (const double lane : lanes) sum += lane;
  return sum;
}

// in_t: the inputs' dtype; acc_t: the arithmetic and output dtype.
template <typename in_t, typename acc_t>
double freq_loss_kernel(const at::Tensor& pred, const at::Tensor& target, double alpha_s,
                        double alpha_t, double gamma, const at::Tensor& grad) {
  const int64_t slices = pred.size(0) * pred.size(1);
  const int64_t len_t = pred.size(2), len_h = pred.size(3), len_w = pred.size(4);
  const int64_t slice_numel = len_t * len_h * len_w;
  const double numel = static_cast<double>(pred.numel());
  const double coef_s = alpha_s / 2.0;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor mat_w, mat_h, mat_t;
  if (coef_s != 0) {
    mat_w = circulant_matrix(len_w, gamma, options.dtype().toScalarType());
    // One batched product over T: the H-axis matrix broadcast along the batch.
    mat_h = circulant_matrix(len_h, gamma, options.dtype().toScalarType())
                .expand({len_t, len_h, len_h});
  }
  if (alpha_t != 0) mat_t = circulant_matrix(len_t, gamma, options.dtype().toScalarType());
  const in_t* pred_data = pred.const_data_ptr<in_t>();
  const in_t* target_data = target.const_data_ptr<in_t>();
  acc_t* grad_data = grad.defined() ? grad.data_ptr<acc_t>() : nullptr;
  const acc_t grad_scale = static_cast<acc_t>(2.0 / numel);
  std::vector<double> slice_loss(slices, 0.0);

  // One slice per task keeps d and G (2 x T*H*W values) in that core's cache. at::parallel_for
  // (OpenMP underneath) marks the region so the products inside run single-threaded instead
  // of nesting a second thread team; a lone slice gets the products' own threading instead.
  at::parallel_for(0, slices, 1, [&](int64_t first_slice, int64_t end_slice) {
    at::Tensor diff = at::empty({len_t, len_h, len_w}, options);
    at::Tensor scratch = grad_data == nullptr ? at::empty({len_t, len_h, len_w}, options)
                                              : at::Tensor();
    for (int64_t slice = first_slice; slice < end_slice; ++slice) {
      const in_t* p = pred_data + slice * slice_numel;
      const in_t* q = target_data + slice * slice_numel;
      acc_t* d = diff.data_ptr<acc_t>();
      for (int64_t i = 0; i < slice_numel; ++i) {
        d[i] = static_cast<acc_t>(p[i]) - static_cast<acc_t>(q[i]);
      }
      at::Tensor g_slice = grad_data != nullptr
                               ? at::from_blob(grad_data + slice * slice_numel,
                                               {len_t, len_h, len_w}, options)
                               : scratch;
      // g accumulates the circulant terms; the identity term joins in the last pass.
      bool g_written = false;
      if (coef_s != 0) {
        g_slice.view({len_t * len_h, len_w})
            .addmm_(diff.view({len_t * len_h, len_w}), mat_w, /*beta=*/0, /*alpha=*/coef_s);
        g_slice.baddbmm_(mat_h, diff, /*beta=*/1, /*alpha=*/coef_s);
        g_written = true;
      }
      if (alpha_t != 0) {
        g_slice.view({len_t, len_h * len_w})
            .addmm_(mat_t, diff.view({len_t, len_h * len_w}), /*beta=*/g_written ? 1 : 0,
                    /*alpha=*/alpha_t);
        g_written = true;
      }
      if (!g_written) g_slice.zero_();
      slice_loss[slice] = finish_slice(d, g_slice.data_ptr<acc_t>(), slice_numel, grad_scale);
    }
  });
  double total = 0.0;
  for (const double loss : slice_loss) total += loss;  // fixed order: deterministic
  return total / numel;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> freq_loss_fwd_cpu(const at::Tensor& pred,
                                                     const at::Tensor& target, double alpha_s,
                                                     double alpha_t, double gamma, bool need_grad) {
  // The checks and their order of gpd_kernels.reference.check_freq_loss_inputs.
  check_float_tensor("pred", pred);
  check_float_tensor("target", target);
  check_rank("pred", pred, 5, "[B, C, T, H, W]");
  check_same_shape("pred", pred, {{"target", &target}});
  check_same_device({{"pred", &pred}, {"target", &target}});
  check_loss_params(alpha_s, alpha_t, gamma);

  if (pred.numel() == 0) {  // 0 / 0, as the reference's mean over nothing
    const auto out_options = pred.options().dtype(at::kFloat);
    return {at::scalar_tensor(std::nan(""), out_options),
            at::empty(need_grad ? pred.sizes() : at::IntArrayRef{0}, out_options)};
  }
  return run_latent_loss(pred, target, need_grad,
                         [&](auto input, auto acc, const at::Tensor& p, const at::Tensor& t,
                             at::Tensor& grad) {
                           return freq_loss_kernel<decltype(input), decltype(acc)>(
                               p, t, alpha_s, alpha_t, gamma, grad);
                         });
}

}  // namespace gpd
