// A tensor descriptor that crosses the Python/C++ boundary without libtorch: data pointer, dtype code,
// sizes and strides in elements, and the device (-1 = CPU, k >= 0 = CUDA device k). The Python side builds
// it from a torch tensor (vlmfast/_C_loader.py: tensor_view) and keeps the tensor alive during the call.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "checks.h"

namespace vlmfast {

// Keep in sync with vlmfast/_C_loader.py::_DTYPE_CODES.
enum class DType : int {
  Float32 = 0,
  Float16 = 1,
  BFloat16 = 2,
  Float64 = 3,
  Int64 = 4,
  Int32 = 5,
  UInt8 = 6,
  Bool = 7,
  Int16 = 8,
  Int8 = 9,
};

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
    case DType::Int64: return "int64";
    case DType::Int32: return "int32";
    case DType::UInt8: return "uint8";
    case DType::Bool: return "bool";
    case DType::Int16: return "int16";
    case DType::Int8: return "int8";
  }
  return "unknown";
}

struct TensorView {
  std::uintptr_t ptr = 0;
  DType dtype = DType::Float32;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;  // in elements
  int device = -1;               // -1: CPU, k >= 0: CUDA device k

  int64_t dim() const { return static_cast<int64_t>(sizes.size()); }
  int64_t size(int64_t i) const { return sizes.at(static_cast<size_t>(i)); }
  int64_t stride(int64_t i) const { return strides.at(static_cast<size_t>(i)); }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : sizes) n *= s;
    return n;
  }
  bool is_cuda() const { return device >= 0; }
  template <typename T>
  T* data() const { return reinterpret_cast<T*>(ptr); }
};

inline void check_view(const TensorView& t, const char* name, DType dtype, int64_t ndim, int device_kind) {
  VLMFAST_CHECK(t.ptr != 0 || t.numel() == 0, name, ": null data pointer");
  VLMFAST_CHECK(t.dtype == dtype, name, ": expected dtype ", dtype_name(dtype), ", got ", dtype_name(t.dtype));
  VLMFAST_CHECK(t.dim() == ndim, name, ": expected ", ndim, " dimensions, got ", t.dim());
  if (device_kind < 0) {
    VLMFAST_CHECK(!t.is_cuda(), name, ": expected a CPU tensor, got one on cuda:", t.device);
  } else {
    VLMFAST_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got a CPU tensor");
  }
}

inline bool is_contiguous(const TensorView& t) {
  int64_t expected = 1;
  for (int64_t i = t.dim() - 1; i >= 0; --i) {
    if (t.size(i) != 1 && t.stride(i) != expected) return false;
    expected *= t.size(i);
  }
  return true;
}

// ---- scalar conversions usable on the host (the CUDA sources use the cuda_fp16/cuda_bf16 intrinsics) ----
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {  // inf / NaN
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

}  // namespace vlmfast
