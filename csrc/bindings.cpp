// Python bindings of the fastalign CPU kernels. Signatures mirror the pure-PyTorch backends in
// fastalign/ops/token_logprobs.py and linear_logprobs.py (optional tensors are None).
#include <torch/extension.h>

#include "common.h"

namespace fastalign {  // defined in gae.cpp
std::tuple<at::Tensor, at::Tensor> gae_fwd(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam);
}  // namespace fastalign

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastalign fused log-prob kernels (ATen + OpenMP, CPU)";
  m.def("token_logprobs_fwd", &fastalign::token_logprobs_fwd, "token log-probs forward", py::arg("logits"),
        py::arg("labels"), py::arg("ignore_index"), py::arg("inv_temperature"), py::arg("with_entropy"));
  m.def("token_logprobs_bwd", &fastalign::token_logprobs_bwd, "token log-probs backward", py::arg("logits"),
        py::arg("labels"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"),
        py::arg("ignore_index"), py::arg("inv_temperature"));
  m.def("linear_logprobs_fwd", &fastalign::linear_logprobs_fwd, "linear log-probs forward", py::arg("hidden"),
        py::arg("weight"), py::arg("bias"), py::arg("labels"), py::arg("ignore_index"), py::arg("inv_temperature"),
        py::arg("with_entropy"), py::arg("chunk_size"), py::arg("filter_block"), py::arg("order"));
  m.def("linear_logprobs_bwd", &fastalign::linear_logprobs_bwd, "linear log-probs backward", py::arg("hidden"),
        py::arg("weight"), py::arg("bias"), py::arg("labels"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("ignore_index"), py::arg("inv_temperature"),
        py::arg("chunk_size"), py::arg("need_hidden"), py::arg("need_weight"), py::arg("need_bias"),
        py::arg("keep"), py::arg("filter_block"), py::arg("compact"), py::arg("order"));
  m.def("gae_fwd", &fastalign::gae_fwd, "generalised advantage estimation (reverse scan per row)",
        py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"), py::arg("lam"));
}
