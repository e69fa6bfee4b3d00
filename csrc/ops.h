// CPU kernels of the gpd:: ops (schemas in gpd_kernels/schemas.txt, semantics in DESIGN.md 4).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace gpd {

std::tuple<at::Tensor, at::Tensor> freq_loss_fwd_cpu(const at::Tensor& pred,
                                                     const at::Tensor& target, double alpha_s,
                                                     double alpha_t, double gamma, bool need_grad);

// Band-amplitude loss (band_amplitude_loss.cpp): (float32 loss, float32 d loss / d pred or
// an empty tensor).
std::tuple<at::Tensor, at::Tensor> band_amplitude_loss_fwd_cpu(const at::Tensor& pred,
                                                               const at::Tensor& target,
                                                               bool need_grad);

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

// adaLN (adaln.cpp): modulation vectors per sample ([B, D] or [B, 1, D]) or per token
// ([B, L, D]); mean and rstd are float32 [B L]; gradients of the vectors in their shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_fwd_cpu(const at::Tensor& x,
                                                                      const at::Tensor& shift,
                                                                      const at::Tensor& scale,
                                                                      double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& mean, const at::Tensor& rstd);

at::Tensor gated_residual_fwd_cpu(const at::Tensor& x, const at::Tensor& y,
                                  const at::Tensor& gate);

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd_cpu(const at::Tensor& grad_out,
                                                          const at::Tensor& y,
                                                          const at::Tensor& gate);

}  // namespace gpd
