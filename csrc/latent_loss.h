// The dtype plumbing the two latent losses (freq_loss.cpp, band_amplitude_loss.cpp) share,
// after their input checks: float64 arithmetic when an input is float64, else float32 (as
// the references); mixed input dtypes are rare, so both inputs are brought to the arithmetic
// dtype instead of instantiating every pair; the outputs are float32 either way (the ops'
// contract): (loss, grad wrt pred, or an empty tensor when !need_grad).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>

#include <tuple>

namespace gpd {

// `kernel(input, acc, pred, target, grad)` returns the loss; `input` and `acc` are values of
// the element type read and of the accumulation type (their types pick the instantiation),
// `grad` is empty or a contiguous tensor of the accumulation dtype to fill.
template <typename Kernel>
std::tuple<at::Tensor, at::Tensor> run_latent_loss(const at::Tensor& pred,
                                                   const at::Tensor& target, bool need_grad,
                                                   Kernel&& kernel) {
  const bool wide = pred.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble;
  const auto acc_dtype = wide ? at::kDouble : at::kFloat;
  const bool mixed = pred.scalar_type() != target.scalar_type();
  const at::Tensor pred_c = mixed ? pred.to(acc_dtype).contiguous() : pred.contiguous();
  const at::Tensor target_c = mixed ? target.to(acc_dtype).contiguous() : target.contiguous();
  const auto out_options = pred.options().dtype(at::kFloat);
  at::Tensor grad_acc;
  if (need_grad) grad_acc = at::empty(pred.sizes(), pred.options().dtype(acc_dtype));
  double loss = 0.0;
  switch (pred_c.scalar_type()) {
    case at::kDouble:
      loss = kernel(double{}, double{}, pred_c, target_c, grad_acc);
      break;
    case at::kBFloat16:
      loss = kernel(at::BFloat16{}, float{}, pred_c, target_c, grad_acc);
      break;
    case at::kHalf:
      loss = kernel(at::Half{}, float{}, pred_c, target_c, grad_acc);
      break;
    default:
      loss = kernel(float{}, float{}, pred_c, target_c, grad_acc);
  }
  at::Tensor grad = need_grad ? grad_acc.to(at::kFloat) : at::empty({0}, out_options);
  return {at::scalar_tensor(loss, out_options), grad};
}

}  // namespace gpd
