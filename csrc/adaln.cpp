// adaLN modulation of a DiT block (gpd_kernels/adaln.py): LayerNorm without affine then
// x_hat (1 + scale) + shift, and the gated residual x + gate y, forward and backward. The
// modulation vectors are per sample ([B, D] or [B, 1, D]) or per token ([B, L, D]: Wan2.2-TI2V,
// whose tokens have timesteps of their own). Math in fp32 (fp64 for fp64 inputs), rows in
// parallel, outputs in x's dtype as the Triton kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace gpd {
namespace {

// gpd_kernels.adaln.modulation_vector: whether `vec` is per token for x [B, L, D] ([B, L, D]);
// per sample it is [B, 1, D] or [B, D]. Same checks and messages as the Python path.
bool per_token(const char* name, const at::Tensor& vec, const at::Tensor& x) {
  check_float_tensor(name, vec);
  const int64_t batch = x.size(0), len = x.size(1), dim = x.size(2);
  const std::vector<int64_t> shape = vec.sizes().vec();
  const bool fits = shape == std::vector<int64_t>{batch, 1, dim} ||
                    shape == std::vector<int64_t>{batch, dim} ||
                    shape == std::vector<int64_t>{batch, len, dim};
  TORCH_CHECK_VALUE(fits, name, " must be [", batch, ", 1, ", dim, "] or [", batch, ", ", dim,
                    "] (per sample) or [", batch, ", ", len, ", ", dim,
                    "] (per token) for x of shape ", py_shape(x.sizes()), ", got ",
                    py_shape(vec.sizes()));
  TORCH_CHECK_VALUE(vec.device() == x.device(), name, " must be on ", x.device(),
                    " like x, got ", vec.device());
  return vec.dim() == 3 && vec.size(1) != 1;
}

void check_tokens(const char* name, const at::Tensor& x) {
  check_float_tensor(name, x);
  check_rank(name, x, 3, "[B, L, D]");
}

// Offset of row `row` (= b L + t) of a vector: its own row per token, its sample's otherwise.
inline int64_t vector_row(int64_t row, int64_t len, int64_t dim, bool token) {
  return (token ? row : row / len) * dim;
}

template <typename acc_t>
using Acc = std::conditional_t<std::is_same_v<acc_t, double>, double, float>;

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_fwd_cpu(const at::Tensor& x,
                                                                      const at::Tensor& shift,
                                                                      const at::Tensor& scale,
                                                                      double eps) {
  check_tokens("x", x);
  const bool token = per_token("shift", shift, x);
  TORCH_CHECK_VALUE(per_token("scale", scale, x) == token,
                    "shift and scale must both be per sample or both per token, got shift ",
                    py_shape(shift.sizes()), " and scale ", py_shape(scale.sizes()),
                    " for x of shape ", py_shape(x.sizes()));
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0, got ", py_float(eps));
  const at::Tensor xc = x.contiguous();
  const int64_t len = x.size(1), dim = x.size(2), rows = x.size(0) * len;
  at::Tensor out = at::empty_like(xc);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adaln_fwd", [&] {
    using acc_t = Acc<scalar_t>;
    const at::Tensor sh = shift.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const at::Tensor sc = scale.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const acc_t* shp = sh.const_data_ptr<acc_t>();
    const acc_t* scp = sc.const_data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    float* mp = mean.data_ptr<float>();
    float* rp = rstd.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t first, int64_t end) {
      for (int64_t row = first; row < end; ++row) {
        const scalar_t* xr = xp + row * dim;
        acc_t sum = 0;
        for (int64_t i = 0; i < dim; ++i) sum += static_cast<acc_t>(xr[i]);
        const acc_t mu = sum / dim;
        acc_t var = 0;
        for (int64_t i = 0; i < dim; ++i) {
          const acc_t c = static_cast<acc_t>(xr[i]) - mu;
          var += c * c;
        }
        const acc_t inv = acc_t(1) / std::sqrt(var / dim + static_cast<acc_t>(eps));
        const int64_t v = vector_row(row, len, dim, token);
        for (int64_t i = 0; i < dim; ++i) {
          const acc_t hat = (static_cast<acc_t>(xr[i]) - mu) * inv;
          op[row * dim + i] = static_cast<scalar_t>(hat * (1 + scp[v + i]) + shp[v + i]);
        }
        mp[row] = static_cast<float>(mu);
        rp[row] = static_cast<float>(inv);
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& mean, const at::Tensor& rstd) {
  check_tokens("x", x);
  check_same_shape("x", x, {{"grad_out", &grad_out}});
  const bool token = per_token("scale", scale, x);
  const int64_t batch = x.size(0), len = x.size(1), dim = x.size(2), rows = batch * len;
  for (const auto& [name, t] : {NamedTensor{"mean", &mean}, NamedTensor{"rstd", &rstd}}) {
    check_float_tensor(name, *t);
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == rows, name, " must be the forward's (",
                      rows, ",) (one per row of x), got ", py_shape(t->sizes()));
  }
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  const at::Tensor mean_f = mean.to(at::kFloat).contiguous();
  const at::Tensor rstd_f = rstd.to(at::kFloat).contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  // Per row: d shift = grad_out and d scale = grad_out x_hat; per sample summed over L.
  at::Tensor dshift = at::empty({batch, len, dim}, x.options().dtype(at::kFloat));
  at::Tensor dscale = at::empty_like(dshift);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adaln_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    const at::Tensor sc = scale.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const at::Tensor go = gc.to(c10::CppTypeToScalarType<acc_t>::value);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const acc_t* gp = go.const_data_ptr<acc_t>();
    const acc_t* scp = sc.const_data_ptr<acc_t>();
    const float* mp = mean_f.const_data_ptr<float>();
    const float* rp = rstd_f.const_data_ptr<float>();
    scalar_t* dxp = grad_x.data_ptr<scalar_t>();
    float* dsh = dshift.data_ptr<float>();
    float* dsc = dscale.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t first, int64_t end) {
      for (int64_t row = first; row < end; ++row) {
        const int64_t base = row * dim, v = vector_row(row, len, dim, token);
        const acc_t mu = mp[row], inv = rp[row];
        // grad_x = rstd (g - mean(g) - x_hat mean(g x_hat)), g = grad_out (1 + scale)
        acc_t sum_g = 0, sum_gx = 0;
        for (int64_t i = 0; i < dim; ++i) {
          const acc_t hat = (static_cast<acc_t>(xp[base + i]) - mu) * inv;
          const acc_t go = gp[base + i];
          const acc_t g = go * (1 + scp[v + i]);
          sum_g += g;
          sum_gx += g * hat;
          dsh[base + i] = static_cast<float>(go);
          dsc[base + i] = static_cast<float>(go * hat);
        }
        const acc_t mean_g = sum_g / dim, mean_gx = sum_gx / dim;
        for (int64_t i = 0; i < dim; ++i) {
          const acc_t hat = (static_cast<acc_t>(xp[base + i]) - mu) * inv;
          const acc_t g = gp[base + i] * (1 + scp[v + i]);
          dxp[base + i] = static_cast<scalar_t>(inv * (g - mean_g - hat * mean_gx));
        }
      }
    });
  });
  if (!token) {
    dshift = dshift.sum(1);
    dscale = dscale.sum(1);
  }
  return {grad_x, dshift.reshape(scale.sizes()).to(scale.scalar_type()),
          dscale.reshape(scale.sizes()).to(scale.scalar_type())};
}

at::Tensor gated_residual_fwd_cpu(const at::Tensor& x, const at::Tensor& y,
                                  const at::Tensor& gate) {
  check_tokens("x", x);
  check_tokens("y", y);
  check_same_shape("x", x, {{"y", &y}});
  check_same_device({{"x", &x}, {"y", &y}});
  const bool token = per_token("gate", gate, x);
  const int64_t len = x.size(1), dim = x.size(2), rows = x.size(0) * len;
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_fwd", [&] {
    using acc_t = Acc<scalar_t>;
    const at::Tensor yc = y.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const at::Tensor gc = gate.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const acc_t* yp = yc.const_data_ptr<acc_t>();
    const acc_t* gp = gc.const_data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t first, int64_t end) {
      for (int64_t row = first; row < end; ++row) {
        const int64_t base = row * dim, v = vector_row(row, len, dim, token);
        for (int64_t i = 0; i < dim; ++i) {
          op[base + i] = static_cast<scalar_t>(static_cast<acc_t>(xp[base + i]) +
                                               gp[v + i] * yp[base + i]);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd_cpu(const at::Tensor& grad_out,
                                                          const at::Tensor& y,
                                                          const at::Tensor& gate) {
  check_tokens("y", y);
  check_same_shape("y", y, {{"grad_out", &grad_out}});
  const bool token = per_token("gate", gate, y);
  const int64_t batch = y.size(0), len = y.size(1), dim = y.size(2), rows = batch * len;
  const at::Tensor yc = y.contiguous();
  at::Tensor grad_y = at::empty_like(yc);
  at::Tensor dgate = at::empty({batch, len, dim}, y.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "gated_bwd", [&] {
    using acc_t = Acc<scalar_t>;
    const at::Tensor gc = gate.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const at::Tensor go = grad_out.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    const acc_t* gp = gc.const_data_ptr<acc_t>();
    const acc_t* op = go.const_data_ptr<acc_t>();
    scalar_t* dyp = grad_y.data_ptr<scalar_t>();
    float* dgp = dgate.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t first, int64_t end) {
      for (int64_t row = first; row < end; ++row) {
        const int64_t base = row * dim, v = vector_row(row, len, dim, token);
        for (int64_t i = 0; i < dim; ++i) {
          dyp[base + i] = static_cast<scalar_t>(op[base + i] * gp[v + i]);
          dgp[base + i] = static_cast<float>(op[base + i] * static_cast<acc_t>(yp[base + i]));
        }
      }
    });
  });
  if (!token) dgate = dgate.sum(1);
  return {grad_y, dgate.reshape(gate.sizes()).to(gate.scalar_type())};
}

}  // namespace gpd
