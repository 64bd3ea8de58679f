// The schemas of every archext op (csrc/registration.cpp), defined by one function so that the
// emulated CUDA build (csrc/emu/) registers the same ones under archext_emu and archext_cpu.
#pragma once

#include <torch/library.h>

namespace archext {

void define_ops(torch::Library& m);

}  // namespace archext
