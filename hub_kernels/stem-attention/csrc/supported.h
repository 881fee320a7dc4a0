// What the stem-attention kernel supports and which of its two kernels runs a call: stated once.
//
// Used by the dispatch (block_sparse_attn_dispatch.cu), by the op's input checks
// (torch_binding.cpp) and, through the ops `kernel_path` and `kernel_path_reason`, by the Python
// wrapper's supports() / kernel_for() and by the stem `hub` executor's choice. Plain C++17, no
// CUDA or torch headers, so that it also builds with a host compiler alone.
#pragma once

#include <string>

namespace stem_attn {

// Element type codes of q, k and v (the `dtype` argument of the kernel_path op).
enum DtypeCode : int { kFloat16 = 0, kBFloat16 = 1 };

// Kernel paths: what kernel_path returns, and what its `sm` argument may ask for.
enum KernelPath : int {
  kUnsupported = 0,  // as a request (`sm`): choose (auto)
  kSm80 = 80,        // mma.sync + cp.async kernel, compute capability 8.0 or newer
  kSm90 = 90,        // wgmma + TMA kernel, compute capability 9.0 (sm_90a code)
};
constexpr int kAuto = 0;

// The argument that rules a call out (kNone: it runs).
enum class Why : int { kNone, kRequest, kDtype, kHeadDim, kBlockSize, kDevice, kSm90 };

struct Support {
  int path;  // KernelPath; kUnsupported when `why` is not kNone
  Why why;
};

constexpr bool supported_head_dim(int d) { return d == 64 || d == 128 || d == 256; }
constexpr bool supported_block_size(int b) { return b == 64 || b == 128 || b == 256; }
// The sm90 kernel works on query tiles of 128 rows, so a plan block must hold whole tiles.
constexpr bool sm90_head_dim(int d) { return d == 64 || d == 128 || d == 256; }
constexpr bool sm90_block_size(int b) { return b == 128 || b == 256; }

// The kernel that runs (dtype, head dim, plan block size) on a device of compute capability
// cc_major.cc_minor. `sm`: kAuto (the sm90 kernel where it applies, else the sm80 kernel), kSm80
// (the sm80 kernel wherever the call is supported) or kSm90 (the sm90 kernel, unsupported where it
// does not apply).
constexpr Support kernel_path(int dtype, int head_dim, int block_size, int cc_major, int cc_minor, int sm = kAuto) {
  if (sm != kAuto && sm != kSm80 && sm != kSm90) return {kUnsupported, Why::kRequest};
  if (dtype != kFloat16 && dtype != kBFloat16) return {kUnsupported, Why::kDtype};
  if (!supported_head_dim(head_dim)) return {kUnsupported, Why::kHeadDim};
  if (!supported_block_size(block_size)) return {kUnsupported, Why::kBlockSize};
  if (cc_major < 8) return {kUnsupported, Why::kDevice};
  const bool sm90 = cc_major == 9 && cc_minor == 0 && sm90_head_dim(head_dim) && sm90_block_size(block_size);
  if (sm == kSm80) return {kSm80, Why::kNone};
  if (sm == kSm90 && !sm90) return {kUnsupported, Why::kSm90};
  return {sm90 ? kSm90 : kSm80, Why::kNone};
}

// Why kernel_path rules the call out, in words ("" when it runs).
inline std::string kernel_path_reason(int dtype, int head_dim, int block_size, int cc_major, int cc_minor,
                                      int sm = kAuto) {
  const std::string cc = std::to_string(cc_major) + "." + std::to_string(cc_minor);
  switch (kernel_path(dtype, head_dim, block_size, cc_major, cc_minor, sm).why) {
    case Why::kNone:
      return "";
    case Why::kRequest:
      return "kernel request " + std::to_string(sm) + " is not one of 0 (auto), 80 (sm80), 90 (sm90)";
    case Why::kDtype:
      return "dtype is not supported (float16, bfloat16)";
    case Why::kHeadDim:
      return "head dim " + std::to_string(head_dim) + " is not supported (64, 128, 256)";
    case Why::kBlockSize:
      return "plan block size " + std::to_string(block_size) + " is not supported (64, 128, 256)";
    case Why::kDevice:
      return "needs compute capability 8.0 or newer, the device has " + cc;
    case Why::kSm90:
      return "the sm90 kernel needs compute capability 9.0, head dim 64, 128 or 256 and plan blocks of 128 or 256 "
             "tokens; got compute capability " +
             cc + ", head dim " + std::to_string(head_dim) + ", plan block size " + std::to_string(block_size);
  }
  return "unknown reason";
}

}  // namespace stem_attn
