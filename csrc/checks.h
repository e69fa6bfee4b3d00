// Input checks mirroring gpd_kernels/_checks.py and reference.py: the same order, exception
// types (TypeError / ValueError) and message text as the Python path, so both CPU backends
// fail alike.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gpd {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Python's tuple(shape) and repr(float), for messages that read as the Python path's.
std::string py_shape(at::IntArrayRef sizes);
std::string py_float(double value);

void check_float_tensor(const char* name, const at::Tensor& t);
void check_rank(const char* name, const at::Tensor& t, int64_t rank, const char* layout);
void check_same_shape(const char* reference_name, const at::Tensor& reference,
                      const std::vector<NamedTensor>& others);
void check_same_device(const std::vector<NamedTensor>& tensors);
void check_per_sample(const char* name, const at::Tensor& t, int64_t batch);
void check_loss_params(double alpha_s, double alpha_t, double gamma);

// The checks of gpd_kernels.reference.check_guided_inputs; `per_sample` in schema order.
void check_guided_inputs(const char* lead_name, const at::Tensor& lead, const at::Tensor& u_cond,
                         const std::optional<at::Tensor>& u_uncond,
                         const std::optional<at::Tensor>& guidance,
                         const std::vector<NamedTensor>& per_sample);

}  // namespace gpd
