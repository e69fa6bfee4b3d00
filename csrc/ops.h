// CPU kernels of the gpd:: ops (schemas in gpd_kernels/schemas.txt, semantics in DESIGN.md 4).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace gpd {

std::tuple<at::Tensor, at::Tensor> freq_loss_fwd_cpu(const at::Tensor& pred,
                                                     const at::Tensor& target, double alpha_s,
                                                     double alpha_t, double gamma, bool need_grad);

std::tuple<at::Tensor, at::Tensor> cfg_euler_step_cpu(const at::Tensor& x,
                                                      const at::Tensor& u_cond,
                                                      const std::optional<at::Tensor>& u_uncond,
                                                      const std::optional<at::Tensor>& guidance,
                                                      const at::Tensor& sigma_from,
                                                      const at::Tensor& sigma_to);

at::Tensor double_step_target_cpu(const at::Tensor& g1, const at::Tensor& u_cond,
                                  const std::optional<at::Tensor>& u_uncond,
                                  const std::optional<at::Tensor>& guidance,
                                  const at::Tensor& s_a, const at::Tensor& s_b,
                                  const at::Tensor& s_c);

}  // namespace gpd
