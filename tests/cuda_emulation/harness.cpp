// C entry points over the torch-free launchers, for ctypes (tests/test_cuda_emulated.py).
#include "../../csrc/cuda/kernels/gated_conv2d.cu"

extern "C" {

const char* emu_masks_to_indices(const uint8_t* mask, int rows, int cols, int32_t* idx, int32_t* cnt) {
  return pydecouple::cuda::gated_masks_to_indices(mask, rows, cols, idx, cnt, nullptr);
}

// sizes: N, C_in, H, W, C_out, KH, KW, Ho, Wo, groups, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w, relu, dtype
const char* emu_gated_conv2d_forward(const void* x, const void* weight, const void* weight_oihw, const void* bias,
                                     void* out, const int32_t* in_idx, const int32_t* in_cnt, const int32_t* out_idx,
                                     const int32_t* out_cnt, const uint8_t* in_mask, const int32_t* out_idx_all,
                                     const int32_t* out_cnt_all, const int64_t* sizes, const int64_t* sx,
                                     const int64_t* so) {
  pydecouple::cuda::GatedConvParams p;
  p.x = x;
  p.weight = weight;
  p.weight_oihw = weight_oihw;
  p.bias = bias;
  p.out = out;
  p.in_idx = in_idx;
  p.in_cnt = in_cnt;
  p.out_idx = out_idx;
  p.out_cnt = out_cnt;
  p.in_mask = in_mask;
  p.out_idx_all = out_idx_all;
  p.out_cnt_all = out_cnt_all;
  int* fields[] = {&p.N, &p.C_in, &p.H, &p.W, &p.C_out, &p.KH, &p.KW, &p.Ho, &p.Wo, &p.groups,
                   &p.stride_h, &p.stride_w, &p.pad_t, &p.pad_l, &p.dil_h, &p.dil_w};
  for (int i = 0; i < 16; ++i) *fields[i] = static_cast<int>(sizes[i]);
  p.relu = sizes[16] != 0;
  p.dtype = static_cast<pydecouple::cuda::DType>(sizes[17]);
  for (int i = 0; i < 4; ++i) {
    p.sx[i] = sx[i];
    p.so[i] = so[i];
  }
  return pydecouple::cuda::gated_conv2d_forward(p, nullptr);
}

int emu_uses_direct_kernel(int cin_g, int cout_g, int groups) {
  return pydecouple::cuda::uses_direct_kernel(cin_g, cout_g, groups) ? 1 : 0;
}
}
