// Defines the gpd:: schemas (compiled in from gpd_kernels/schemas.txt) and registers the CPU
// kernels. Python's gpd_kernels registers CUDA, Meta and autograd on top of these.
#include <torch/library.h>

#include "gpd_native.h"
#include "gpd_schemas.h"
#include "ops.h"

TORCH_LIBRARY(gpd, m) {
  for (const char* schema : gpd::kOpSchemas) {
    m.def(schema);
  }
}

TORCH_LIBRARY_IMPL(gpd, CPU, m) {
  m.impl("freq_loss_fwd", TORCH_FN(gpd::freq_loss_fwd_cpu));
  m.impl("band_amplitude_loss_fwd", TORCH_FN(gpd::band_amplitude_loss_fwd_cpu));
  m.impl("cfg_euler_step", TORCH_FN(gpd::cfg_euler_step_cpu));
  m.impl("double_step_target", TORCH_FN(gpd::double_step_target_cpu));
  m.impl("adaln_modulate_fwd", TORCH_FN(gpd::adaln_modulate_fwd_cpu));
  m.impl("adaln_modulate_bwd", TORCH_FN(gpd::adaln_modulate_bwd_cpu));
  m.impl("gated_residual_fwd", TORCH_FN(gpd::gated_residual_fwd_cpu));
  m.impl("gated_residual_bwd", TORCH_FN(gpd::gated_residual_bwd_cpu));
}

extern "C" __attribute__((visibility("default"))) int gpd_native_schema_count() {
  return static_cast<int>(sizeof(gpd::kOpSchemas) / sizeof(gpd::kOpSchemas[0]));
}
