"""C++ (ATen + OpenMP) CPU kernels, shipped as sources and JIT-compiled by fastalign.ops._cpp."""
