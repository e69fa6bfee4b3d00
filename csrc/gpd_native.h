// Public header of libgpd_native for C++ (libtorch) consumers.
//
// Linking the library registers the gpd:: ops with the PyTorch dispatcher (its schemas come
// from gpd_kernels/schemas.txt); call them through c10::Dispatcher, e.g.
//   c10::Dispatcher::singleton().findSchemaOrThrow("gpd::freq_loss_fwd", "")
// Semantics: DESIGN.md section 4 and the gpd_kernels docstrings.
#pragma once

extern "C" {
// The number of gpd:: schemas the library defined. Referencing it also keeps the library
// linked under --as-needed, where an unreferenced library would be dropped.
int gpd_native_schema_count();
}
