#include "checks.h"

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <sstream>

namespace gpd {
namespace {

constexpr c10::ScalarType kFloatDtypes[] = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};

std::string py_dtype(c10::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

}  // namespace

std::string py_shape(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// Python's repr(float): shortest round-trip digits, positional for exponents in [-4, 16).
std::string py_float(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value,
                                    std::chars_format::scientific);
  const std::string sci(buffer, result.ptr);
  const size_t e_pos = sci.find('e');
  const int exponent = std::atoi(sci.c_str() + e_pos + 1);
  const bool negative = sci[0] == '-';
  std::string digits;
  for (size_t i = negative ? 1 : 0; i < e_pos; ++i) {
    if (sci[i] != '.') digits += sci[i];
  }
  std::string text = negative ? "-" : "";
  if (exponent < -4 || exponent >= 16) {
    text += digits.substr(0, 1);
    if (digits.size() > 1) text += "." + digits.substr(1);
    text += exponent < 0 ? "e-" : "e+";
    const std::string magnitude = std::to_string(std::abs(exponent));
    text += (magnitude.size() < 2 ? "0" : "") + magnitude;
  } else if (exponent < 0) {
    text += "0." + std::string(-exponent - 1, '0') + digits;
  } else {
    if (digits.size() <= static_cast<size_t>(exponent) + 1) {
      digits += std::string(exponent + 1 - digits.size(), '0');
    }
    const std::string fraction = digits.substr(exponent + 1);
    text += digits.substr(0, exponent + 1) + "." + (fraction.empty() ? "0" : fraction);
  }
  return text;
}

void check_float_tensor(const char* name, const at::Tensor& t) {
  for (const auto dtype : kFloatDtypes) {
    if (t.scalar_type() == dtype) return;
  }
  TORCH_CHECK_TYPE(false, name, ": expected dtype in (float32, bfloat16, float16, float64), got ",
                   py_dtype(t.scalar_type()));
}

void check_rank(const char* name, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, name, ": expected a ", rank, "-D tensor ", layout,
                    ", got shape ", py_shape(t.sizes()));
}

void check_same_shape(const char* reference_name, const at::Tensor& reference,
                      const std::vector<NamedTensor>& others) {
  for (const auto& [name, t] : others) {
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(t->sizes() == reference.sizes(), name, ": expected shape ",
                      py_shape(reference.sizes()), " (that of ", reference_name, "), got ",
                      py_shape(t->sizes()));
  }
}

void check_same_device(const std::vector<NamedTensor>& tensors) {
  bool mixed = false;
  std::ostringstream listing;
  const at::Tensor* first = nullptr;
  for (const auto& [name, t] : tensors) {
    if (t == nullptr) continue;
    if (first == nullptr) {
      first = t;
    } else {
      listing << ", ";
      mixed = mixed || t->device() != first->device();
    }
    listing << name << " on " << t->device();
  }
  TORCH_CHECK_VALUE(!mixed, "expected all tensors on one device, got ", listing.str());
}

void check_per_sample(const char* name, const at::Tensor& t, int64_t batch) {
  check_float_tensor(name, t);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, name, ": expected shape (", batch,
                    ",) (one value per sample), got ", py_shape(t.sizes()));
}

void check_loss_params(double alpha_s, double alpha_t, double gamma) {
  const std::pair<const char*, double> params[] = {
      {"alpha_s", alpha_s}, {"alpha_t", alpha_t}, {"gamma", gamma}};
  for (const auto& [name, value] : params) {
    TORCH_CHECK_VALUE(value >= 0.0 && !std::isinf(value), name,
                      ": expected a finite value >= 0, got ", py_float(value));
  }
}

void check_guided_inputs(const char* lead_name, const at::Tensor& lead, const at::Tensor& u_cond,
                         const std::optional<at::Tensor>& u_uncond,
                         const std::optional<at::Tensor>& guidance,
                         const std::vector<NamedTensor>& per_sample) {
  check_float_tensor(lead_name, lead);
  TORCH_CHECK_VALUE(lead.dim() >= 1, lead_name,
                    ": expected a batched tensor [B, ...], got a 0-D tensor");
  check_float_tensor("u_cond", u_cond);
  TORCH_CHECK_VALUE(u_uncond.has_value() == guidance.has_value(),
                    "guidance is required exactly when u_uncond is given; got u_uncond=",
                    u_uncond.has_value() ? "a tensor" : "None",
                    ", guidance=", guidance.has_value() ? "a tensor" : "None");
  const at::Tensor* uncond = u_uncond.has_value() ? &*u_uncond : nullptr;
  if (uncond != nullptr) check_float_tensor("u_uncond", *uncond);
  check_same_shape(lead_name, lead, {{"u_cond", &u_cond}, {"u_uncond", uncond}});
  std::vector<NamedTensor> scalars = per_sample;
  if (guidance.has_value()) scalars.emplace_back("guidance", &*guidance);
  for (const auto& [name, t] : scalars) check_per_sample(name, *t, lead.size(0));
  std::vector<NamedTensor> all = {{lead_name, &lead}, {"u_cond", &u_cond}, {"u_uncond", uncond}};
  all.insert(all.end(), scalars.begin(), scalars.end());
  check_same_device(all);
}

}  // namespace gpd
