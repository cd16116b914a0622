// pydecouple::accel_conv_cpu: one layer of an accelerated model in one call.
//
// An accelerated gated layer used to be ~7 calls from Python: the gate's
// mean, linear, relu, linear, compare; a host-side count of the kept
// fraction; the dispatcher; the conv. At batch 1 that Python (~35-45 us) cost
// as much as the conv it saved. Here, in C++:
//
//   gate:  z = mean_hw(x) (float32), m = W2 relu(W1 z + b1) + b2 > 0
//          (float32 whatever x's dtype, so masks agree with the float32
//          model's except where a logit is within rounding of 0)
//   route: kept = mean(in_mask) * mean(m); above `dense_above` (the layer's
//          measured crossover) the dense conv runs, else the GEMM engine
//   conv:  y = m * relu?(conv(x) + bias), then y = relu?(y + residual)
//          (a ResNet block's last conv: mask before the add, ReLU after)
//
// x's channels that in_mask turns off must be zero (in an accelerated model
// they are: the producer wrote zeros there), so the dense route ignores it.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "gated_conv2d_cpu.h"

namespace pydecouple {
namespace cpu {
namespace {

double kept_fraction(const at::Tensor& mask) {
  const bool* p = mask.const_data_ptr<bool>();
  const int64_t n = mask.numel();
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) kept += p[i];
  return n ? static_cast<double>(kept) / n : 1.0;
}

void check_param(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.sizes() == at::IntArrayRef(shape),
              "accel_conv_cpu: argument '", name, "' must be a float32 CPU tensor of shape ", at::IntArrayRef(shape),
              ", got ", dtype_name(t.scalar_type()), " ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> accel_conv_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& in_mask_in, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
    const c10::optional<at::Tensor>& residual_in, bool residual_relu, double dense_above) {
  const ConvShape s = check_conv("accel_conv_cpu", x, weight, stride, padding, dilation, 1);
  const int64_t N = x.size(0), hid = w1.size(0);
  check_param(w1, "w1", {hid, s.C});
  check_param(b1, "b1", {hid});
  check_param(w2, "w2", {s.O, hid});
  check_param(b2, "b2", {s.O});
  at::Tensor in_mask;
  if (in_mask_in.has_value()) {
    in_mask = in_mask_in->contiguous();
    TORCH_CHECK(in_mask.scalar_type() == at::kBool && in_mask.sizes() == at::IntArrayRef({N, s.C}),
                "accel_conv_cpu: argument 'in_mask' must be bool of shape (", N, ", ", s.C, "), got ",
                dtype_name(in_mask.scalar_type()), " ", in_mask.sizes());
  }
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = *bias_in;
    TORCH_CHECK(bias.scalar_type() == x.scalar_type() && bias.sizes() == at::IntArrayRef({s.O}),
                "accel_conv_cpu: argument 'bias' must be ", dtype_name(x.scalar_type()), " of shape (", s.O,
                ",), got ", dtype_name(bias.scalar_type()), " ", bias.sizes());
  }
  const bool nhwc = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  at::Tensor residual;
  if (residual_in.has_value()) {
    residual = *residual_in;
    TORCH_CHECK(residual.sizes() == at::IntArrayRef({N, s.O, s.Ho, s.Wo}) && residual.device().is_cpu(),
                "accel_conv_cpu: argument 'residual' must be a CPU tensor of shape (", N, ", ", s.O, ", ", s.Ho, ", ",
                s.Wo, "), got ", residual.sizes());
  }

  // The gate, in float32.
  const at::Tensor z = at::mean(x, {2, 3}, false, at::kFloat);
  const at::Tensor h = at::addmm(b1, z, w1.t()).relu_();
  const at::Tensor mask = at::addmm(b2, h, w2.t()).gt_(0).to(at::kBool);

  const double kept = kept_fraction(mask) * (in_mask.defined() ? kept_fraction(in_mask) : 1.0);
  at::Tensor y;
  if (kept > dense_above || N == 0) {
    // The dense route: PyTorch's convolution (oneDNN), then the epilogue.
    at::Tensor xp = x;
    int64_t ph = padding[0], pw = padding[2];
    if (padding[0] != padding[1] || padding[2] != padding[3]) {
      xp = at::constant_pad_nd(x, {padding[2], padding[3], padding[0], padding[1]});
      ph = pw = 0;
    }
    y = at::conv2d(xp, weight, bias, {s.sh, s.sw}, {ph, pw}, {s.dh, s.dw});
    const bool y_nhwc = !y.is_contiguous();
    if (y_nhwc && !y.is_contiguous(at::MemoryFormat::ChannelsLast)) y = y.contiguous();
    const at::Tensor res = residual.defined()
        ? residual.to(y.scalar_type()).contiguous(y.is_contiguous() ? at::MemoryFormat::Contiguous
                                                                    : at::MemoryFormat::ChannelsLast)
        : at::Tensor();
    dense_mask_epilogue(y, mask.contiguous(), relu, res, residual_relu);
  } else {
    y = gated_conv2d_gemm(x, weight, bias, mask, in_mask, s, relu, nhwc, residual, residual_relu);
  }
  return {y, mask};
}

}  // namespace cpu
}  // namespace pydecouple

TORCH_LIBRARY_FRAGMENT(pydecouple, m) {
  m.def(
      "accel_conv_cpu(Tensor x, Tensor? in_mask, Tensor weight, Tensor? bias, Tensor w1, Tensor b1, Tensor w2, "
      "Tensor b2, int[] stride, int[] padding, int[] dilation, bool relu, Tensor? residual, bool residual_relu, "
      "float dense_above) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pydecouple, CPU, m) { m.impl("accel_conv_cpu", &pydecouple::cpu::accel_conv_cpu); }
