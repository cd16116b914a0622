// ATen glue for the CUDA gated convolution: checks, allocation, masks to index
// lists on the device, then the torch-free launchers in kernels/. Registers
//   pydecouple::gated_conv2d_cuda(Tensor x, Tensor weight, Tensor? bias,
//       Tensor? out_mask, Tensor? in_mask, int[] stride, int[] padding,
//       int[] dilation, int groups, bool relu) -> Tensor
// with padding (top, bottom, left, right), as pydecouple/_backend.py calls it.
// No host synchronisation: safe under CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <utility>

#include "kernels/gated_conv2d.cuh"

namespace pydecouple {
namespace {

constexpr const char* kOp = "pydecouple::gated_conv2d_cuda: ";

// Kept-first int32 index lists and int32 counts per row of a bool (rows, cols) mask.
std::pair<at::Tensor, at::Tensor> masks_to_indices(const at::Tensor& mask, int64_t rows, int64_t cols,
                                                   cudaStream_t stream) {
  const at::Tensor m = mask.reshape({rows, cols}).contiguous();
  at::Tensor idx = at::empty({rows, cols}, m.options().dtype(at::kInt));
  at::Tensor cnt = at::empty({rows}, m.options().dtype(at::kInt));
  const char* err = cuda::gated_masks_to_indices(reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>()),
                                                 static_cast<int>(rows), static_cast<int>(cols),
                                                 idx.mutable_data_ptr<int32_t>(), cnt.mutable_data_ptr<int32_t>(),
                                                 stream);
  TORCH_CHECK(err == nullptr, kOp, err);
  return {idx, cnt};
}

void check_mask(const std::optional<at::Tensor>& mask, const char* name, const at::Tensor& x, int64_t n,
                int64_t c) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool, kOp, "argument '", name, "' must be a bool tensor, got ",
              m.scalar_type());
  TORCH_CHECK(m.device() == x.device(), kOp, "argument '", name, "' must be on ", x.device(), ", got ",
              m.device());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == n && m.size(1) == c, kOp, "argument '", name, "' must have shape (",
              n, ", ", c, "), got ", m.sizes());
}

at::Tensor gated_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& out_mask, const std::optional<at::Tensor>& in_mask,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             int64_t groups, bool relu) {
  TORCH_CHECK(x.is_cuda(), kOp, "argument 'x' must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 4, kOp, "argument 'x' must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, kOp, "argument 'weight' must be 4-D (Cout, Cin/groups, KH, KW), got ",
              weight.dim(), "-D");
  TORCH_CHECK(weight.device() == x.device(), kOp, "argument 'weight' must be on ", x.device(), ", got ",
              weight.device());
  const at::ScalarType st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, kOp,
              "argument 'x' must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(weight.scalar_type() == st, kOp, "argument 'weight' must have x's dtype ", st, ", got ",
              weight.scalar_type());
  TORCH_CHECK(stride.size() == 2 && dilation.size() == 2 && padding.size() == 4, kOp,
              "stride and dilation must have 2 entries and padding 4 (top, bottom, left, right), got ",
              stride.size(), ", ", dilation.size(), " and ", padding.size());
  TORCH_CHECK(groups >= 1, kOp, "argument 'groups' must be positive, got ", groups);
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t cout = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(cin % groups == 0 && cout % groups == 0 && weight.size(1) * groups == cin, kOp,
              "weight of shape ", weight.sizes(), " does not fit x with ", cin, " channels and groups=", groups);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == st && bias->dim() == 1 &&
                    bias->size(0) == cout,
                kOp, "argument 'bias' must be a (", cout, ",) ", st, " tensor on ", x.device(), ", got ",
                bias->sizes(), " ", bias->scalar_type(), " on ", bias->device());
  }
  check_mask(out_mask, "out_mask", x, n, cout);
  check_mask(in_mask, "in_mask", x, n, cin);
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1 && dilation[i] >= 1, kOp, "stride and dilation must be positive");
  }
  for (int i = 0; i < 4; ++i) TORCH_CHECK(padding[i] >= 0, kOp, "padding must be non-negative");
  const int64_t ho = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t wo = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(ho >= 1 && wo >= 1, kOp, "the dilated kernel is larger than the padded input");
  TORCH_CHECK(n <= 65535 && ho * wo < (int64_t(1) << 31) && cin < (int64_t(1) << 31) &&
                  cout < (int64_t(1) << 31),
              kOp, "the problem is too large for the kernel's launch (N <= 65535)");

  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // The Triton launcher's rule too: channels_last out exactly when x is
  // channels_last-strided and not contiguous.
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({n, cout, ho, wo}, x.options(),
                             channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;

  const int64_t cin_g = cin / groups, cout_g = cout / groups;
  cuda::GatedConvParams p;
  p.x = x.const_data_ptr();
  p.out = out.mutable_data_ptr();
  at::Tensor bias_c, weight_p, weight_c;
  if (bias.has_value()) {
    bias_c = bias->contiguous();
    p.bias = bias_c.const_data_ptr();
  }
  // Index lists and tensors they are read from live until the kernel is queued;
  // the caching allocator keeps their memory valid for the stream afterwards.
  at::Tensor in_idx, in_cnt, out_idx, out_cnt, out_idx_all, out_cnt_all, in_mask_c;
  if (cuda::uses_direct_kernel(static_cast<int>(cin_g), static_cast<int>(cout_g), static_cast<int>(groups))) {
    weight_c = weight.contiguous();
    p.weight_oihw = weight_c.const_data_ptr();
    if (out_mask.has_value()) {
      std::tie(out_idx_all, out_cnt_all) = masks_to_indices(*out_mask, n, cout, stream);
      p.out_idx_all = out_idx_all.const_data_ptr<int32_t>();
      p.out_cnt_all = out_cnt_all.const_data_ptr<int32_t>();
    }
    if (in_mask.has_value()) {
      in_mask_c = in_mask->contiguous();
      p.in_mask = reinterpret_cast<const uint8_t*>(in_mask_c.const_data_ptr<bool>());
    }
  } else {
    weight_p = weight.permute({2, 3, 1, 0}).contiguous();  // (KH, KW, Cin/groups, Cout)
    p.weight = weight_p.const_data_ptr();
    if (out_mask.has_value()) {
      std::tie(out_idx, out_cnt) = masks_to_indices(*out_mask, n * groups, cout_g, stream);
      p.out_idx = out_idx.const_data_ptr<int32_t>();
      p.out_cnt = out_cnt.const_data_ptr<int32_t>();
    }
    if (in_mask.has_value()) {
      std::tie(in_idx, in_cnt) = masks_to_indices(*in_mask, n * groups, cin_g, stream);
      p.in_idx = in_idx.const_data_ptr<int32_t>();
      p.in_cnt = in_cnt.const_data_ptr<int32_t>();
    }
  }
  p.N = static_cast<int>(n);
  p.C_in = static_cast<int>(cin);
  p.H = static_cast<int>(h);
  p.W = static_cast<int>(w);
  p.C_out = static_cast<int>(cout);
  p.KH = static_cast<int>(kh);
  p.KW = static_cast<int>(kw);
  p.Ho = static_cast<int>(ho);
  p.Wo = static_cast<int>(wo);
  p.groups = static_cast<int>(groups);
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.pad_t = static_cast<int>(padding[0]);
  p.pad_l = static_cast<int>(padding[2]);
  p.dil_h = static_cast<int>(dilation[0]);
  p.dil_w = static_cast<int>(dilation[1]);
  for (int i = 0; i < 4; ++i) {
    p.sx[i] = x.stride(i);
    p.so[i] = out.stride(i);
  }
  p.relu = relu;
  p.dtype = st == at::kFloat ? cuda::DType::kFloat32
                             : (st == at::kHalf ? cuda::DType::kFloat16 : cuda::DType::kBFloat16);
  const char* err = cuda::gated_conv2d_forward(p, stream);
  TORCH_CHECK(err == nullptr, kOp, err);
  return out;
}

}  // namespace
}  // namespace pydecouple

TORCH_LIBRARY_FRAGMENT(pydecouple, m) {
  m.def(
      "gated_conv2d_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor? out_mask, Tensor? in_mask, "
      "int[] stride, int[] padding, int[] dilation, int groups, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(pydecouple, CUDA, m) { m.impl("gated_conv2d_cuda", &pydecouple::gated_conv2d_cuda); }
