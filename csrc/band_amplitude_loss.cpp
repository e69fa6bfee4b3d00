// Band-amplitude loss on the CPU by a real orthonormal Fourier basis (gpd_kernels/
// band_amplitude_loss.py has the derivation; gpd_kernels/reference.py the definition).
//
// Per axis, R_n is the n x n orthogonal matrix whose row r is the cosine (r <= n / 2) or sine
// (r > n / 2) of FFT bin r, scaled to unit norm. Each band is closed under k -> n - k on every
// axis, so a band's energy is the sum of the squared coefficients u = (R_T x R_H x R_W) x at
// its bins, and the gradient 2/numel sum_b (1 - ||Q_b|| / ||P_b||) P_b p is
// R^T (s * R p) with s constant per band: three real matrix products each way per (b, c)
// slice, no complex arithmetic.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "checks.h"
#include "latent_loss.h"
#include "ops.h"

namespace gpd {
namespace {

constexpr double kPi = 3.14159265358979323846;
// gpd_kernels.reference's TEMPORAL_BAND_EDGES and SPATIAL_RING_EDGES (upper, inclusive) and
// the slack its _band_of adds to each edge.
constexpr std::array<double, 3> kTemporalEdges = {0.0, 0.5, 1.0};
constexpr std::array<double, 4> kRingEdges = {0.25, 0.5, 0.75, 1.0};
constexpr double kEdgeSlack = 1e-9;
constexpr int64_t kBands = kTemporalEdges.size() * kRingEdges.size();

double axis_frequency(int64_t k, int64_t n) {
  return static_cast<double>(std::min(k, n - k)) / (static_cast<double>(n) / 2.0);
}

// torch.bucketize(value, edges + slack): how many edges lie below the value.
template <size_t N>
int64_t band_of(double value, const std::array<double, N>& edges) {
  int64_t index = 0;
  for (const double edge : edges) index += (edge + kEdgeSlack < value) ? 1 : 0;
  return index;
}

// R_n, row-major n x n, in dtype.
at::Tensor real_fourier_basis(int64_t n, at::ScalarType dtype) {
  at::Tensor basis = at::empty({n, n}, at::TensorOptions().dtype(at::kDouble));
  double* entries = basis.data_ptr<double>();
  const double norm = 1.0 / std::sqrt(static_cast<double>(n));
  for (int64_t r = 0; r < n; ++r) {
    const bool single = r == 0 || 2 * r == n;  // its own mirror bin: unit norm as it is
    const double scale = single ? norm : std::sqrt(2.0) * norm;
    for (int64_t j = 0; j < n; ++j) {
      // (r * j) mod n keeps the argument in [0, 2 pi) for accuracy at large n.
      const double angle = 2.0 * kPi * static_cast<double>((r * j) % n) / static_cast<double>(n);
      entries[r * n + j] = scale * (2 * r <= n ? std::cos(angle) : std::sin(angle));
    }
  }
  return basis.to(dtype);
}

// Band of each coefficient of a [T, H, W] slice, flat.
std::vector<int64_t> coefficient_bands(int64_t len_t, int64_t len_h, int64_t len_w) {
  std::vector<int64_t> band(len_t * len_h * len_w);
  for (int64_t t = 0; t < len_t; ++t) {
    const int64_t temporal = band_of(axis_frequency(t, len_t), kTemporalEdges);
    for (int64_t h = 0; h < len_h; ++h) {
      const double f_h = axis_frequency(h, len_h);
      for (int64_t w = 0; w < len_w; ++w) {
        const double f_w = axis_frequency(w, len_w);
        const double radius = std::sqrt((f_h * f_h + f_w * f_w) / 2.0);
        band[(t * len_h + h) * len_w + w] =
            temporal * static_cast<int64_t>(kRingEdges.size()) + band_of(radius, kRingEdges);
      }
    }
  }
  return band;
}

struct Bases {
  at::Tensor t, h, w;
};

// u = (R_T x R_H x R_W) x of one [T, H, W] slice (x in acc_t, contiguous).
at::Tensor forward_transform(const at::Tensor& x, const Bases& basis) {
  const int64_t len_t = x.size(0), len_h = x.size(1), len_w = x.size(2);
  at::Tensor u = basis.t.mm(x.view({len_t, len_h * len_w})).view({len_t, len_h, len_w});
  return basis.h.matmul(u).matmul(basis.w.t()).contiguous();
}

// x = (R_T x R_H x R_W)^T u, written into out ([T, H, W], contiguous).
void inverse_transform(const at::Tensor& u, const Bases& basis, at::Tensor& out) {
  const int64_t len_t = u.size(0), len_h = u.size(1), len_w = u.size(2);
  at::Tensor spatial = basis.h.t().matmul(u).matmul(basis.w).contiguous();
  at::Tensor flat = out.view({len_t, len_h * len_w});
  at::mm_out(flat, basis.t.t(), spatial.view({len_t, len_h * len_w}));
}

template <typename acc_t>
std::array<double, kBands> band_energies(const at::Tensor& u, const std::vector<int64_t>& band) {
  std::array<double, kBands> energy{};
  const acc_t* values = u.const_data_ptr<acc_t>();
  for (size_t i = 0; i < band.size(); ++i) {
    energy[band[i]] += static_cast<double>(values[i]) * static_cast<double>(values[i]);
  }
  return energy;
}

// in_t: the inputs' dtype; acc_t: the arithmetic and gradient dtype.
template <typename in_t, typename acc_t>
double band_amplitude_kernel(const at::Tensor& pred, const at::Tensor& target,
                             const at::Tensor& grad) {
  const int64_t slices = pred.size(0) * pred.size(1);
  const int64_t len_t = pred.size(2), len_h = pred.size(3), len_w = pred.size(4);
  const int64_t slice_numel = len_t * len_h * len_w;
  const double numel = static_cast<double>(pred.numel());
  const auto dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto options = at::TensorOptions().dtype(dtype);
  const Bases basis{real_fourier_basis(len_t, dtype), real_fourier_basis(len_h, dtype),
                    real_fourier_basis(len_w, dtype)};
  const std::vector<int64_t> band = coefficient_bands(len_t, len_h, len_w);
  const in_t* pred_data = pred.const_data_ptr<in_t>();
  const in_t* target_data = target.const_data_ptr<in_t>();
  acc_t* grad_data = grad.defined() ? grad.data_ptr<acc_t>() : nullptr;
  std::vector<double> slice_loss(slices, 0.0);

  // One slice per task (at::parallel_for runs the products inside single-threaded).
  at::parallel_for(0, slices, 1, [&](int64_t first_slice, int64_t end_slice) {
    at::Tensor x = at::empty({len_t, len_h, len_w}, options);
    for (int64_t slice = first_slice; slice < end_slice; ++slice) {
      std::array<at::Tensor, 2> coefficients;
      const in_t* sources[2] = {pred_data + slice * slice_numel,
                                target_data + slice * slice_numel};
      for (int side = 0; side < 2; ++side) {
        acc_t* values = x.data_ptr<acc_t>();
        for (int64_t i = 0; i < slice_numel; ++i) values[i] = static_cast<acc_t>(sources[side][i]);
        coefficients[side] = forward_transform(x, basis);
      }
      const auto energy_p = band_energies<acc_t>(coefficients[0], band);
      const auto energy_q = band_energies<acc_t>(coefficients[1], band);
      std::array<acc_t, kBands> scale{};
      double loss = 0.0;
      for (int64_t b = 0; b < kBands; ++b) {
        const double amp_p = std::sqrt(energy_p[b]), amp_q = std::sqrt(energy_q[b]);
        loss += (amp_p - amp_q) * (amp_p - amp_q);
        // 0 where the prediction's band is empty: a subgradient, as the reference's.
        scale[b] = amp_p > 0 ? static_cast<acc_t>(2.0 / numel * (1.0 - amp_q / amp_p)) : 0;
      }
      slice_loss[slice] = loss;
      if (grad_data == nullptr) continue;
      acc_t* u = coefficients[0].data_ptr<acc_t>();
      for (int64_t i = 0; i < slice_numel; ++i) u[i] *= scale[band[i]];
      at::Tensor out = at::from_blob(grad_data + slice * slice_numel, {len_t, len_h, len_w},
                                     options);
      inverse_transform(coefficients[0], basis, out);
    }
  });
  double total = 0.0;
  for (const double loss : slice_loss) total += loss;  // fixed order: deterministic
  return total / numel;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> band_amplitude_loss_fwd_cpu(const at::Tensor& pred,
                                                               const at::Tensor& target,
                                                               bool need_grad) {
  // The checks and their order of gpd_kernels.reference.check_latent_pair.
  check_float_tensor("pred", pred);
  check_float_tensor("target", target);
  check_rank("pred", pred, 5, "[B, C, T, H, W]");
  check_same_shape("pred", pred, {{"target", &target}});
  check_same_device({{"pred", &pred}, {"target", &target}});
  TORCH_CHECK_VALUE(pred.numel() > 0, "pred: expected a non-empty tensor, got shape ",
                    py_shape(pred.sizes()));

  return run_latent_loss(pred, target, need_grad,
                         [](auto input, auto acc, const at::Tensor& p, const at::Tensor& t,
                            at::Tensor& grad) {
                           return band_amplitude_kernel<decltype(input), decltype(acc)>(p, t,
                                                                                       grad);
                         });
}

}  // namespace gpd
