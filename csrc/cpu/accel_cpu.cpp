// pydecouple::accel_conv_cpu: one layer of an accelerated model in one call.
//
// An accelerated gated layer used to be ~7 calls from Python: the gate's
// mean, linear, relu, linear, compare; a host-side count of the kept
// fraction; the dispatcher; the conv. At batch 1 that Python (~35-45 us) cost
// as much as the conv it saved. Here, in C++:
//
//   gate:  z = mean_hw(x) (the engine's vector loop, in double), or
//          x_means where the layer that wrote x computed them already,
//          m = W2 relu(W1 z + b1) + b2 > 0, in float32 whatever x's dtype;
//          small MLPs in plain loops (ATen's addmm/gt cost ~20 us a layer
//          at batch 1), large ones through addmm
//   route: kept = mean(in_mask) * mean(m); above `dense_above` (the layer's
//          measured crossover) the dense conv runs, else the GEMM engine
//   conv:  y = m * relu?(conv(x) + bias), then y = relu?(y + residual)
//          (a ResNet block's last conv: mask before the add, ReLU after)
//   means: with out_means, the channel means of y as well, for the next
//          layer's gate (its x_means): taken from each block of y while
//          the epilogue has it in cache, instead of the consumer reading
//          y again (a bottleneck's 1x1 reduce reads 4x its output).
//
// x's channels that in_mask turns off must be zero (in an accelerated model
// they are: the producer wrote zeros there), so the dense route ignores it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "gated_conv2d_cpu.h"

namespace pydecouple {
namespace cpu {
namespace {

// A float32 dot product with 16 independent partial sums: vectorisable
// without reassociation (one running sum is a chain of dependent adds).
inline float dot(const float* a, const float* b, int64_t n) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int k = 0; k < 16; ++k) part[k] += a[i + k] * b[i + k];
  }
  for (; i < n; ++i) part[i & 15] += a[i] * b[i];
  float s = 0.f;
  for (int k = 0; k < 16; ++k) s += part[k];
  return s;
}

// The gate's MLP, mask[n][o] = W2 relu(W1 z[n] + b1) + b2 > 0, in float32.
// Small gates (a CIFAR ResNet's, or any at batch 1 up to ~64 channels) in
// plain loops: ATen's addmm/relu/gt cost ~20 us a layer there, as much as a
// small conv. Larger ones through addmm (BLAS). Returns the kept count.
int64_t gate_mlp(const at::Tensor& z, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                 const at::Tensor& b2, at::Tensor& mask) {
  const int64_t N = z.size(0), C = z.size(1), hid = w1.size(0), O = w2.size(0);
  bool* m = mask.data_ptr<bool>();
  if (N * hid * (C + O) > (int64_t{1} << 16)) {
    const at::Tensor logits = at::addmm(b2, at::addmm(b1, z, w1.t()).relu_(), w2.t());
    const float* l = logits.const_data_ptr<float>();
    int64_t kept = 0;
    for (int64_t i = 0; i < N * O; ++i) kept += (m[i] = l[i] > 0.f);
    return kept;
  }
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous(), b1c = b1.contiguous(), b2c = b2.contiguous();
  const float *W1 = w1c.const_data_ptr<float>(), *W2 = w2c.const_data_ptr<float>();
  const float *B1 = b1c.const_data_ptr<float>(), *B2 = b2c.const_data_ptr<float>();
  const float* zp = z.const_data_ptr<float>();
  std::vector<float> h(hid);
  int64_t kept = 0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < hid; ++j) {
      const float a = B1[j] + dot(W1 + j * C, zp + n * C, C);
      h[j] = a > 0.f ? a : 0.f;
    }
    for (int64_t o = 0; o < O; ++o) kept += (m[n * O + o] = B2[o] + dot(W2 + o * hid, h.data(), hid) > 0.f);
  }
  return kept;
}

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> accel_conv_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& in_mask_in, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
    const c10::optional<at::Tensor>& residual_in, bool residual_relu, double dense_above,
    const c10::optional<at::Tensor>& x_means, bool out_means) {
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

  at::Tensor z;
  if (x_means.has_value()) {
    z = *x_means;
    TORCH_CHECK(z.scalar_type() == at::kFloat && z.device().is_cpu() && z.sizes() == at::IntArrayRef({N, s.C}) &&
                    z.is_contiguous(),
                "accel_conv_cpu: argument 'x_means' must be a contiguous float32 CPU tensor of shape (", N, ", ", s.C,
                "), got ", dtype_name(z.scalar_type()), " ", z.sizes());
  }
  // The output's channel means, for the next layer's gate (its x_means).
  const at::Tensor zo = out_means ? at::empty({N, s.O}, x.options().dtype(at::kFloat)) : at::Tensor();

  // The gate, in float32: the channel means in the instruction set's own
  // vector loop, in double (ATen's mean over a channels_last bfloat16 batch,
  // and a scalar loop, each cost as much as a small conv), unless the
  // producer of x wrote them (x_means), which saves a read of x.
  // (check_conv admitted float32, bfloat16 and float16 only: the engine's types.)
  if (!z.defined()) {
    z = at::empty({N, s.C}, x.options().dtype(at::kFloat));
    gate_channel_means(x.contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous), z);
  }
  at::Tensor mask = at::empty({N, s.O}, x.options().dtype(at::kBool));
  const int64_t kept_filters = gate_mlp(z, w1, b1, w2, b2, mask);

  const double kept = (N ? static_cast<double>(kept_filters) / (N * s.O) : 1.0) *
                      (in_mask.defined() ? kept_fraction(in_mask) : 1.0);
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
    dense_mask_epilogue(y, mask.contiguous(), relu, res, residual_relu, zo);
  } else {
    y = gated_conv2d_gemm(x, weight, bias, mask, in_mask, s, relu, nhwc, residual, residual_relu, zo);
  }
  return {y, mask, out_means ? zo : at::empty({0}, x.options().dtype(at::kFloat))};
}

}  // namespace cpu
}  // namespace pydecouple

TORCH_LIBRARY_FRAGMENT(pydecouple, m) {
  m.def(
      "accel_conv_cpu(Tensor x, Tensor? in_mask, Tensor weight, Tensor? bias, Tensor w1, Tensor b1, Tensor w2, "
      "Tensor b2, int[] stride, int[] padding, int[] dilation, bool relu, Tensor? residual, bool residual_relu, "
      "float dense_above, Tensor? x_means=None, bool out_means=False) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pydecouple, CPU, m) { m.impl("accel_conv_cpu", &pydecouple::cpu::accel_conv_cpu); }
