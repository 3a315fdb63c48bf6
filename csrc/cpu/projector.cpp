// CPU kernels of mmfast::projector and mmfast::projector_splice (and their backwards).
//
// The projector is GEMM-bound. In bfloat16 on a CPU with avx512_bf16 its GEMMs are tiles of
// our own dot-product kernel driven by packed_gemm (csrc/cpu/vec/packed_gemm.h), and the
// elementwise work is done in each output tile's epilogue (the backward from 384 tokens):
//   forward   act = gelu(x w1^T + b1) (and h = x w1^T + b1 kept for the backward) in the first
//             GEMM's tiles; out = b2 + act w2^T, rows written straight to their destination
//             (the splice's placeholder rows) by the second's
//   backward  the tiles of g w2 turn into grad_h = (g w2) * gelu'(h) and act = gelu(h)
//             (recomputed from the saved h), both stored transposed: they are the row-major
//             A operands of dw1 = grad_h^T x and dw2^T = act^T g (b1's gradient summed there too)
// Elsewhere the GEMMs go through oneDNN (float32: see onednn_linear) or ATen (MKL / oneDNN; in
// bfloat16 and float16 on CPUs without their kernels, float32 GEMMs on widened operands: see
// gemm), with everything between them in one vectorized pass over rows
// (csrc/cpu/vec/bias_gelu.cpp):
//   forward   h = x w1^T, then one pass h += b1, act = gelu(h); out = b2 + act w2^T
//   backward  grad_h = g w2, then one pass over the saved h that recomputes act = gelu(h) and
//             turns grad_h into grad_h * gelu'(h) (plus b1's gradient); then the weight GEMMs.
// Only x and h are saved for the backward (the activation is recomputed, never stored).
// The splice writes the second GEMM's rows straight into their placeholder rows of the output
// (whose other rows are copied from embeds): in float32, by panels of output columns over all
// rows; in other dtypes without packed_gemm every long run of consecutive placeholders is one
// GEMM into that slice.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

#include "common/projector.h"
#include "cpu/huge_pages.h"
#include "cpu/isa.h"
#include "cpu/row_blocks.h"
#include "cpu/vec/bias_gelu.h"
#include "cpu/vec/fma_gemm.h"
#include "cpu/vec/packed_gemm.h"
#include "cpu/vec/transpose.h"

namespace mmfast::cpu {

namespace {

using at::Tensor;

// Placeholder runs at least this long get their own GEMM straight into the output; shorter
// runs are gathered and done together (a GEMM call costs tens of microseconds here).
constexpr int64_t kMinDirectRun = 32;

// Output columns per GEMM of the float32 splice's column panels (one [N, 512] panel at a
// time; wider panels measured no faster).
constexpr int64_t kSplicePanelCols = 512;

Tensor as_rows(const Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// An optional bias, contiguous, or an undefined tensor when there is none.
Tensor contiguous_bias(const std::optional<Tensor>& b) {
  return b.has_value() && b->defined() ? b->contiguous() : Tensor();
}

// input [M, K] @ weight[N, K]^T (+ bias [N]) -> [M, N] through oneDNN's matmul (the op behind
// torch.compile's CPU linear fusions), or an undefined tensor where it does not apply: other
// dtypes, or float32 where f32_gemm_onednn() (isa.h) says no. In float32, ATen's mm calls
// MKL's sgemm, which on Zen 4 runs 9-12% below oneDNN at the projector's forward GEMMs and
// the backward's g w2 (measured side by side: 192 vs 214, 177 vs 196, 191 vs 208 GFLOP/s),
// and so do the backward's weight-gradient GEMMs when given K-contiguous operands
// (backward_rows_onednn). On an Intel Xeon (Sapphire Rapids class) MKL was as fast or faster
// (4608 x 4096 x 4096: 229 against 213 GFLOP/s, best of 8), and there the transposes that
// backward_rows_onednn adds bought nothing: float32 training steps took 1.06-1.30x eager's
// time in suite runs (0.87-1.11x through MKL). bfloat16 and float16 GEMMs already go to oneDNN through ATen.
using OnednnLinear = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                            c10::string_view, c10::List<std::optional<c10::Scalar>>,
                            std::optional<c10::string_view>);

// oneDNN's linear op, when this torch build has it (warns once when it does not).
const std::optional<c10::TypedOperatorHandle<OnednnLinear>>& onednn_linear_op() {
  static const auto op = [] {
    const auto handle = at::hasMKLDNN()
                            ? c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""})
                            : std::nullopt;
    if (!handle.has_value()) {
      TORCH_WARN_ONCE("mmfast projector: this torch build has no oneDNN linear "
                      "(mkldnn::_linear_pointwise); float32 GEMMs go through at::mm instead");
      return std::optional<c10::TypedOperatorHandle<OnednnLinear>>();
    }
    return std::optional<c10::TypedOperatorHandle<OnednnLinear>>(handle->typed<OnednnLinear>());
  }();
  return op;
}

Tensor onednn_linear(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  if (input.scalar_type() != at::kFloat || input.size(0) == 0 || input.size(1) == 0 ||
      weight.size(0) == 0 || !f32_gemm_onednn()) {
    return Tensor();
  }
  const auto& op = onednn_linear_op();
  if (!op.has_value()) return Tensor();
  const std::optional<Tensor> b =
      bias.has_value() && bias->defined() ? std::optional<Tensor>(*bias) : std::nullopt;
  return op->call(input, weight, b, "none", c10::List<std::optional<c10::Scalar>>(),
                  std::nullopt);
}

// m [R, C] float32 -> m^T [C, R] written into dst (unit column stride, any row stride). By
// bands of 64 rows of m: each band writes 256 bytes of every row of m^T. ATen's copy of a
// transposed view ran at ~2 GB/s (InternVL's 1792 x 4096: 29 ms).
void transpose_float_into(const Tensor& m, const Tensor& dst) {
  const Tensor src = m.stride(1) == 1 ? m : m.contiguous();
  const int64_t rows = src.size(0);
  const int64_t cols = src.size(1);
  TORCH_INTERNAL_ASSERT(dst.size(0) == cols && dst.size(1) == rows && dst.stride(1) == 1);
  constexpr int64_t kBand = 64;
  const auto kernel = MMFAST_PICK_ISA(transpose32);
  const float* s = src.const_data_ptr<float>();
  float* d = dst.mutable_data_ptr<float>();
  at::parallel_for(0, ceil_div(rows, kBand), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b * kBand;
      kernel(s + r * src.stride(0), src.stride(0), d + r, dst.stride(0),
             std::min(kBand, rows - r), cols);
    }
  });
}

// m [R, C] float32 -> m^T [C, R], contiguous, in the storage of `into` when it is contiguous
// and large enough, else in a new buffer.
Tensor transposed_float(const Tensor& m, const Tensor& into = Tensor()) {
  const int64_t rows = m.size(0);
  const int64_t cols = m.size(1);
  Tensor dst = into.defined() && into.is_contiguous() && into.numel() >= rows * cols
                   ? into.view(-1).narrow(0, 0, rows * cols).view({cols, rows})
                   : at::empty({cols, rows}, m.options());
  transpose_float_into(m, dst);
  return dst;
}

Tensor defined_or_empty(const Tensor& t, const Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

// Whether the unfused path's GEMMs in a's dtype are float32 GEMMs on widened operands (isa.h).
bool widened_gemm(const Tensor& a) {
  return (a.scalar_type() == at::kBFloat16 && bf16_gemm_widened()) ||
         (a.scalar_type() == at::kHalf && f16_gemm_widened());
}

// Output columns per float32 GEMM in gemm's widened form: its float32 copy of b and its float32
// result are one panel of them at a time (LLaVA-1.5-7B's w2 would be a 64 MiB copy whole).
constexpr int64_t kWidenedPanelCols = 512;

// Whether the unfused path's GEMMs in a's dtype run on fma_gemm (isa.h).
bool fma_path(const Tensor& a) {
  switch (a.scalar_type()) {
    case at::kFloat: return f32_gemm_fma();
    case at::kBFloat16: return bf16_gemm_fma();
    case at::kHalf: return f16_gemm_fma();
    default: return false;
  }
}

// fma_gemm's description of a [M, K] @ b [K, N] (any strides), epilogue kStore into out
// [M, N] (unit column stride), plus bias [N] when defined.
FmaGemm fma_over(const Tensor& a, const Tensor& b, const Tensor& out, const Tensor& bias) {
  TORCH_INTERNAL_ASSERT(out.stride(1) == 1 && a.scalar_type() == b.scalar_type());
  FmaGemm g;
  g.m = a.size(0);
  g.k = a.size(1);
  g.n = b.size(1);
  g.dtype = a.scalar_type();
  g.a = a.const_data_ptr();
  g.a_rs = a.stride(0);
  g.a_cs = a.stride(1);
  g.b = b.const_data_ptr();
  g.b_rs = b.stride(0);
  g.b_cs = b.stride(1);
  g.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  g.out = out.mutable_data_ptr();
  g.ldo = out.stride(0);
  return g;
}

// g with its packed panel of B on huge pages from 8 MiB on (one [512 x 4096] float32 panel)
void run_fma_gemm(FmaGemm g) {
  const auto panel = empty_huge_paged({fma_panel_numel(g)}, at::TensorOptions(at::kFloat));
  g.panel = panel.mutable_data_ptr<float>();
  MMFAST_PICK_ISA(fma_gemm)(g);
}

// a [M, K] @ b [K, N] (+ bias [N]) on the unfused path. Where fma_path, on fma_gemm. Where
// widened_gemm (float16 on AVX-512 CPUs without avx512_fp16, bfloat16 in the generic build on
// CPUs without AVX-512 or when forced: there ATen's GEMMs in these dtypes are scalar loops,
// 0.4-16 GFLOP/s on a Zen 3 against 20-60 in float32), float32 GEMMs on float32 copies
// of the operands, rounded once: the products and float32 sums of a GEMM that accumulates in
// float32, at float32 GEMM speed. a is widened whole, b and the result a panel of
// kWidenedPanelCols columns at a time.
Tensor gemm(const Tensor& a, const Tensor& b, const std::optional<Tensor>& bias = std::nullopt) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (fma_path(a)) {
    auto out = at::empty({a.size(0), b.size(1)}, a.options());
    run_fma_gemm(fma_over(a, b, out, contiguous_bias(bias)));
    return out;
  }
  if (!widened_gemm(a)) return has_bias ? at::addmm(*bias, a, b) : at::mm(a, b);
  const auto a32 = a.to(at::kFloat);
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  for (int64_t j0 = 0; j0 < b.size(1); j0 += kWidenedPanelCols) {
    const int64_t cols = std::min(kWidenedPanelCols, b.size(1) - j0);
    const auto b32 = b.narrow(1, j0, cols).to(at::kFloat);
    out.narrow(1, j0, cols).copy_(has_bias ? at::addmm(bias->narrow(0, j0, cols).to(at::kFloat),
                                                       a32, b32)
                                           : at::mm(a32, b32));
  }
  return out;
}

// h [N, H] (pre-activation, without b1) -> h += b1, act = gelu(h). In place (act is h's
// buffer, h is lost) when !keep_h.
Tensor bias_gelu_keep(Tensor& h, const std::optional<Tensor>& b1, bool tanh_form, bool keep_h) {
  auto act = keep_h ? at::empty_like(h) : h;
  const int64_t cols = h.size(1);
  const Tensor bias = contiguous_bias(b1);
  const auto kernel = MMFAST_PICK_ISA(bias_gelu_keep_rows);
  at::parallel_for(0, h.size(0), row_grain(cols), [&](int64_t r0, int64_t r1) {
    kernel(h.scalar_type(), h.mutable_data_ptr(), bias.defined() ? bias.const_data_ptr() : nullptr,
           act.mutable_data_ptr(), r0, r1, cols, tanh_form);
  });
  return act;
}

using BF16 = c10::BFloat16;

// bfloat16 GEMMs through packed_gemm: on CPUs with avx512_bf16 (AMX tiles where the CPU has
// AMX-BF16), where they run faster than ATen's (packed_gemm.h; bf16_tile_gemm in isa.h), and
// for non-empty operands (a GEMM over K = 0 is left to ATen).
bool use_packed_gemm(const Tensor& x, std::initializer_list<int64_t> sizes) {
  return x.scalar_type() == at::kBFloat16 && bf16_tile_gemm() &&
         std::all_of(sizes.begin(), sizes.end(), [](int64_t s) { return s > 0; });
}

// first, then second, in one parallel region: a thread out of first's work items goes on to
// second's, so the threads wait for each other only at the end of second. The two must be
// independent (neither reads what the other writes).
void run_packed_gemms(const PackedGemm& first, const PackedGemm& second) {
  GemmQueue first_queue(first, bf16_gemm_amx()), second_queue(second, bf16_gemm_amx());
  const auto kernel = MMFAST_PICK_ISA(packed_gemm_bf16);
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    if (first.m > 0 && first.n > 0) kernel(first, &first_queue, threads);
    if (second.m > 0 && second.n > 0) kernel(second, &second_queue, threads);
  });
}

void run_packed_gemm(const PackedGemm& g) {
  if (g.m > 0 && g.n > 0) run_packed_gemms(g, PackedGemm());
}

Tensor unit_stride(const Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// a [M, K] as packed_gemm's A operand: unit column stride, K even (an odd K gets a zero column,
// matching the zero row packed_gemm packs into B).
Tensor even_k_operand(const Tensor& a) {
  if (a.size(1) % 2 != 0) return at::constant_pad_nd(a, {0, 1});
  return a.stride(1) == 1 ? a : a.contiguous();
}

// [rows, cols] with an even row stride whose padding column (odd cols) is zero: a buffer the
// epilogues fill that is then a packed_gemm A operand with K = cols.
Tensor even_k_buffer(int64_t rows, int64_t cols, const Tensor& like) {
  auto buf = empty_huge_paged({rows, cols + cols % 2}, like.options());
  if (cols % 2 != 0) buf.narrow(1, cols, 1).zero_();
  return buf;
}

// g's B operand: b [N, K] (B^T: a weight as stored) when b_nk, else b [K, N]; b has unit
// column stride and outlives the GEMM.
void set_b(PackedGemm& g, const Tensor& b, bool b_nk) {
  TORCH_INTERNAL_ASSERT(b.stride(1) == 1);
  g.n = b.size(b_nk ? 0 : 1);
  g.b = b.const_data_ptr<BF16>();
  g.ldb = b.stride(0);
  g.b_k = b.size(b_nk ? 1 : 0);
  g.b_nk = b_nk;
}

// A GEMM of a [M, K] (from even_k_operand, or a view of an even_k_buffer: an odd K is read
// with its zero padding column) by B (set_b).
PackedGemm gemm_over(const Tensor& a, const Tensor& b, bool b_nk, GemmEpilogue epilogue) {
  TORCH_INTERNAL_ASSERT(a.stride(1) == 1 && a.stride(0) >= a.size(1) + a.size(1) % 2);
  PackedGemm g;
  g.m = a.size(0);
  g.k = a.size(1) + a.size(1) % 2;
  g.a = a.const_data_ptr<BF16>();
  g.lda = a.stride(0);
  set_b(g, b, b_nk);
  g.epilogue = epilogue;
  return g;
}

// A GEMM of A [M, K] given as AMX A tiles (PackedGemm::a_tiled) by B^T = b [N, K] (a weight as
// stored, see set_b); epilogue kStore.
PackedGemm gemm_over_tiles(const BF16* a_tiles, int64_t m, int64_t k, const Tensor& b) {
  TORCH_INTERNAL_ASSERT(k % 2 == 0 && b.size(1) <= k);
  PackedGemm g;
  g.m = m;
  g.k = k;
  g.a = a_tiles;
  g.a_tiled = true;
  g.lda = ceil_div(k, kAmxTileDepth) * kAmxTileDepth;
  set_b(g, b, true);
  g.epilogue = GemmEpilogue::kStore;
  return g;
}

// Packs g's B (given as rows, no row map) once for all of g's panels into `buffer` (bfloat16, at
// least packed_b_numel(g) elements, outliving the GEMM), which g then reads.
void pack_b_once(PackedGemm& g, Tensor& buffer) {
  TORCH_INTERNAL_ASSERT(!g.b_nk && g.b_rows == nullptr && buffer.numel() >= packed_b_numel(g));
  BF16* dst = buffer.mutable_data_ptr<BF16>();
  const auto kernel = MMFAST_PICK_ISA(pack_b_rows_bf16);
  at::parallel_for(0, g.k / 2, 64, [&](int64_t p0, int64_t p1) {
    kernel(g.b, g.ldb, g.b_k, g.k, g.n, bf16_gemm_amx(), p0, p1, dst);
  });
  g.b_packed = dst;
}

// Fewest tokens for the packed backward (see backward_rows).
constexpr int64_t kPackedBackwardMinRows = 384;

// Panels of A from which a GEMM on AMX tiles reads B packed once ahead rather than packed by
// its work items per panel: the forward's weights (see forward_packed) and dw1's x.
constexpr int64_t kPackOncePanels = 3;

Tensor projector_pack_weight_cpu(const Tensor& w);

// Bytes of the activation per panel of rows in the packed forward (a part of L3).
constexpr int64_t kActPanelBytes = int64_t(8) << 20;

// The forward through packed_gemm: out2[rows[k] (or k), :] = b2 + gelu(x2[k] w1^T + b1) w2^T
// for x2 [N, Cin]; returns h [N, H] (when keep_h). It runs by panels of rows: a panel's
// activation (<= kActPanelBytes) is still in L3 when the second GEMM reads it, rather than an
// [N, H] tensor written to memory, faulted in page by page, and read back. Both GEMMs walk A
// in panels anyway (packed_gemm.h), so w1 and w2 are read as often as before. On AMX tiles the
// activation is written as the second GEMM's A tiles (kBiasGeluTiles), which that GEMM would
// otherwise copy it into: in same-process A/B timings (bf16, inference) the forward took
// 0.88-0.97 of the time, and its live peak fell by the copy's panel (1 image 16.1 -> 10.9 MiB,
// SigLIP 18.5 -> 13.5, LLaVA-1.5-7B 104.1 -> 96.1).
// Without h to keep (inference) and with several panels, the first GEMM of panel p + 1 runs in
// the parallel region of the second GEMM of panel p, into the other of two activation
// buffers: the threads then wait for each other once per panel, at the end of the short
// first-GEMM work items, instead of also after the second GEMM's long ones (LLaVA-1.5-13B:
// 2.1 ms each, against 0.4 ms; the forward ~1% faster in A/B timings). In training the second
// buffer stayed resident through the backward and raised the 13B step's measured peak from
// 238.5 to 246 MiB (eager: 233) for ~0.3% of the step's time, so there each GEMM has its own
// parallel region, one after the other.
// w1_packed / w2_packed: the weights packed ahead (projector_pack_weight_cpu's layout), or
// null: then every work item packs its column block of the weight itself, once per panel,
// except on AMX tiles from kPackOncePanels panels on, where they are packed once here.
Tensor forward_packed(const Tensor& x2, const Tensor& w1, const std::optional<Tensor>& b1,
                      const Tensor& w2, const std::optional<Tensor>& b2, bool tanh_form,
                      bool keep_h, Tensor& out2, const int64_t* out_rows,
                      const BF16* w1_packed = nullptr, const BF16* w2_packed = nullptr) {
  const int64_t m = x2.size(0), hid = w1.size(0);
  const auto a = even_k_operand(x2);
  const auto w1u = unit_stride(w1), w2u = unit_stride(w2);
  const Tensor bias1 = contiguous_bias(b1), bias2 = contiguous_bias(b2);
  // h goes to autograd's saved tensors only (mmfast.ops.projector returns out), so it may sit
  // on huge pages: otherwise its 4 KiB pages fault in the first GEMM's epilogue. bf16 training
  // step, same process, rounds alternating, new / old: LLaVA-1.5-7B 0.954 and 0.961,
  // 13B 1.019 and 0.947 (medians of 8-16 per-round ratios), InternVL (14 MiB of h) 1.013.
  Tensor h = keep_h ? empty_huge_paged({m, hid}, x2.options()) : Tensor();
  const int64_t ld_act = hid + hid % 2;
  const int64_t panel_rows =
      std::max<int64_t>(1, kActPanelBytes / (ld_act * 2 * kGemmRows)) * kGemmRows;
  const int64_t npanels = ceil_div(m, panel_rows);
  const bool overlap = !keep_h && npanels > 1;
  // AMX tiles run a GEMM's work 2-3x faster than vdpbf16ps, and packing each weight block
  // again for every panel becomes a large part of the forward (LLaVA-1.5-7B: 5 panels). Packing
  // once costs a pass that writes the packed copy to memory (a 4096 x 4096 weight: 13 ms on 2
  // threads, page faults included), more than packing twice into L2, hence from 3 panels.
  Tensor w1_once, w2_once;
  if (bf16_gemm_amx() && npanels >= kPackOncePanels) {
    if (w1_packed == nullptr) {
      w1_once = projector_pack_weight_cpu(w1);
      w1_packed = w1_once.const_data_ptr<BF16>();
    }
    if (w2_packed == nullptr) {
      w2_once = projector_pack_weight_cpu(w2);
      w2_packed = w2_once.const_data_ptr<BF16>();
    }
  }
  // On AMX tiles the first GEMM writes a panel's activation as the second GEMM's A tiles
  // (kBiasGeluTiles), else as rows the second GEMM reads in place.
  const bool tiles = bf16_gemm_amx();
  const int64_t tiles_k = ceil_div(ld_act, kAmxTileDepth) * kAmxTileDepth;  // a_tiled's lda
  const auto act_buffer = [&](int64_t rows) {
    return tiles ? at::empty({ceil_div(rows, kAmxTileRows) * kAmxTileRows * tiles_k},
                             x2.options())
                 : even_k_buffer(rows, hid, x2);
  };
  const std::array<Tensor, 2> acts = {act_buffer(std::min(panel_rows, m)),
                                      overlap ? act_buffer(panel_rows) : Tensor()};
  const auto buffer = [&](int64_t p) { return acts[overlap ? p % 2 : 0]; };
  const auto rows_of = [&](int64_t p) { return std::min(panel_rows, m - p * panel_rows); };
  const auto first_gemm = [&](int64_t p) {  // act of panel p into its buffer
    const int64_t r0 = p * panel_rows;
    auto g = gemm_over(a.narrow(0, r0, rows_of(p)), w1u, true,
                       tiles ? GemmEpilogue::kBiasGeluTiles : GemmEpilogue::kBiasGelu);
    g.bias = bias1.defined() ? bias1.const_data_ptr<BF16>() : nullptr;
    g.out = buffer(p).mutable_data_ptr<BF16>();
    g.ldo = tiles ? tiles_k : ld_act;
    g.out2 = keep_h ? h.mutable_data_ptr<BF16>() + r0 * hid : nullptr;
    g.ldo2 = hid;
    g.tanh_form = tanh_form;
    g.b_packed = w1_packed;
    return g;
  };
  const auto second_gemm = [&](int64_t p) {  // out rows of panel p from its buffer
    const int64_t r0 = p * panel_rows;
    PackedGemm g;
    if (tiles) {
      g = gemm_over_tiles(buffer(p).const_data_ptr<BF16>(), rows_of(p), ld_act, w2u);
    } else {
      g = gemm_over(buffer(p).narrow(0, 0, rows_of(p)).narrow(1, 0, hid), w2u, true,
                    GemmEpilogue::kStore);
    }
    g.bias = bias2.defined() ? bias2.const_data_ptr<BF16>() : nullptr;
    g.out = out2.mutable_data_ptr<BF16>() + (out_rows != nullptr ? 0 : r0 * out2.stride(0));
    g.ldo = out2.stride(0);
    g.out_rows = out_rows != nullptr ? out_rows + r0 : nullptr;
    g.b_packed = w2_packed;
    return g;
  };
  run_packed_gemm(first_gemm(0));
  for (int64_t p = 0; p < npanels; ++p) {
    if (overlap && p + 1 < npanels) {
      run_packed_gemms(second_gemm(p), first_gemm(p + 1));
    } else {
      run_packed_gemm(second_gemm(p));
      if (p + 1 < npanels) run_packed_gemm(first_gemm(p + 1));
    }
  }
  return h;
}

// x2 [N, Cin] -> (act [N, H], h [N, H]; h undefined when !keep_h)
std::pair<Tensor, Tensor> first_layer(const Tensor& x2, const Tensor& w1,
                                      const std::optional<Tensor>& b1, bool tanh_form,
                                      bool keep_h = true) {
  if (fma_path(x2)) {  // the bias and GELU in the GEMM's epilogue
    auto act = at::empty({x2.size(0), w1.size(0)}, x2.options());
    Tensor h = keep_h ? at::empty_like(act) : Tensor();
    auto g = fma_over(x2, w1.t(), act, contiguous_bias(b1));
    g.epilogue = FmaEpilogue::kBiasGelu;
    g.out2 = keep_h ? h.mutable_data_ptr() : nullptr;
    g.ldo2 = keep_h ? h.stride(0) : 0;
    g.tanh_form = tanh_form;
    run_fma_gemm(g);
    return {act, h};
  }
  // h = x2 w1^T + b1 in one oneDNN call where it applies; else the pass adds b1.
  auto h = onednn_linear(x2, w1, b1);
  const bool bias_added = h.defined();
  if (!bias_added) h = gemm(x2, w1.t());
  auto act = bias_gelu_keep(h, bias_added ? std::nullopt : b1, tanh_form, keep_h);
  return {act, keep_h ? h : Tensor()};
}

Tensor second_layer(const Tensor& act, const Tensor& w2, const std::optional<Tensor>& b2) {
  auto out = onednn_linear(act, w2, b2);
  if (out.defined()) return out;
  return gemm(act, w2.t(), b2);
}

std::tuple<Tensor, Tensor> projector_cpu(const Tensor& x, const Tensor& w1,
                                         const std::optional<Tensor>& b1, const Tensor& w2,
                                         const std::optional<Tensor>& b2,
                                         c10::string_view approximate, bool keep_h) {
  const bool tanh_form = check_projector_args("projector", x, w1, b1, w2, b2, approximate);
  const auto x2 = as_rows(x);
  Tensor out, h;
  if (use_packed_gemm(x, {x2.size(0), x2.size(1), w1.size(0), w2.size(0)})) {
    out = at::empty({x2.size(0), w2.size(0)}, x.options());
    h = forward_packed(x2, w1, b1, w2, b2, tanh_form, keep_h, out, nullptr);
  } else {
    Tensor act;
    std::tie(act, h) = first_layer(x2, w1, b1, tanh_form, keep_h);
    out = second_layer(act, w2, b2);
  }
  auto lead = x.sizes().vec();
  lead.back() = w2.size(0);
  if (!keep_h) return {out.view(lead), at::empty({0}, x.options())};
  auto h_shape = x.sizes().vec();
  h_shape.back() = w1.size(0);
  return {out.view(lead), h.view(h_shape)};
}

// Weights packed once for the tile GEMMs (inference): w [N, K] as packed_gemm's b_packed,
// [ceil(N / 64), ceil(K / 2), 64, 2], zeros past N and K. For the vdpbf16ps tiles
// packed[b, p, j, e] = w[64 b + j, 2 p + e]; for the AMX tiles each block holds the same values
// in the order [j / 16, p, j % 16, e] (BlockLayout in packed_gemm.cpp).
std::vector<int64_t> packed_weight_shape(const Tensor& w) {
  return {ceil_div(w.size(0), kPackCols), ceil_div(w.size(1), int64_t(2)), kPackCols, 2};
}

void check_tile_gemm(const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(bf16_tile_gemm(), op, ": packed weights are for mmfast's ",
                              "vdpbf16ps tile GEMMs, which do not run here (bfloat16 GEMMs: ",
                              bf16_gemm_path(), ")");
}

Tensor projector_pack_weight_cpu(const Tensor& w) {
  TORCH_CHECK_VALUE(w.dim() == 2, "projector_pack_weight: w must be 2-D [out_features, ",
                    "in_features], got shape ", w.sizes());
  TORCH_CHECK_VALUE(w.scalar_type() == at::kBFloat16,
                    "projector_pack_weight: w must be bfloat16, got ", w.scalar_type());
  check_tile_gemm("projector_pack_weight");
  auto packed = empty_huge_paged(packed_weight_shape(w), w.options());
  if (packed.numel() == 0) return packed;
  const auto wu = unit_stride(w);
  const int64_t k = packed.size(1) * 2;
  const auto kernel = MMFAST_PICK_ISA(pack_b_nk_bf16);
  at::parallel_for(0, packed.size(0), 1, [&](int64_t b0, int64_t b1) {
    kernel(wu.const_data_ptr<BF16>(), wu.stride(0), w.size(1), k, w.size(0), bf16_gemm_amx(),
           b0, b1, packed.mutable_data_ptr<BF16>());
  });
  return packed;
}

void check_packed_weight(const char* name, const Tensor& packed, const Tensor& w) {
  const auto expected = packed_weight_shape(w);
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kBFloat16 && packed.sizes() == expected &&
                        packed.is_contiguous() && packed.device() == w.device(),
                    "projector_prepacked: ", name, "_packed must be projector_pack_weight(", name,
                    "): contiguous bfloat16 of shape ", c10::IntArrayRef(expected), " on ",
                    w.device(), ", got ", packed.scalar_type(), " ", packed.sizes(),
                    packed.is_contiguous() ? "" : " (not contiguous)", " on ", packed.device());
}

// The inference forward of projector (no h, no autograd) with both weights packed ahead.
Tensor projector_prepacked_cpu(const Tensor& x, const Tensor& w1, const Tensor& w1_packed,
                               const std::optional<Tensor>& b1, const Tensor& w2,
                               const Tensor& w2_packed, const std::optional<Tensor>& b2,
                               c10::string_view approximate) {
  const bool tanh_form =
      check_projector_args("projector_prepacked", x, w1, b1, w2, b2, approximate);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kBFloat16,
                    "projector_prepacked: x must be bfloat16, got ", x.scalar_type());
  check_tile_gemm("projector_prepacked");
  check_packed_weight("w1", w1_packed, w1);
  check_packed_weight("w2", w2_packed, w2);
  const auto x2 = as_rows(x);
  if (!use_packed_gemm(x, {x2.size(0), x2.size(1), w1.size(0), w2.size(0)})) {
    // an empty operand (no tile GEMM to run): the op's own path
    return std::get<0>(projector_cpu(x, w1, b1, w2, b2, approximate, false));
  }
  auto out = at::empty({x2.size(0), w2.size(0)}, x.options());
  forward_packed(x2, w1, b1, w2, b2, tanh_form, false, out, nullptr,
                 w1_packed.const_data_ptr<BF16>(), w2_packed.const_data_ptr<BF16>());
  auto lead = x.sizes().vec();
  lead.back() = w2.size(0);
  return out.view(lead);
}

// [nblocks, H] float32 zeros for the blocks' bias partials, or undefined when b1 gets no
// gradient.
Tensor bias_partials(const Tensor& h2, int64_t nblocks, bool needed) {
  return needed ? at::zeros({std::max<int64_t>(nblocks, 1), h2.size(1)},
                            h2.options().dtype(at::kFloat))
                : Tensor();
}

// grad_h^T [H, M] as the head hands it to the first layer's node (projector_linked_cpu): row
// stride M rounded up to even, the padding column zero (the packed GEMM's A operand as is).
// The fake kernel (mmfast/ops/projector.py) gives the same strides.
Tensor link_gradient_buffer(int64_t hidden, int64_t m, const Tensor& like) {
  return even_k_buffer(hidden, m, like).narrow(1, 0, m);
}

// The first layer's gradients from grad_t = grad_h^T [H, M] (any strides): dx [M, Cin] =
// grad_h w1 and dw1 [H, Cin] = grad_h^T x2; mask: (x, w1). zero_padded: grad_t is a view of an
// even_k_buffer, whose padding column (odd M) packed_gemm may read. Otherwise an odd M is read
// in place only by the AMX tiles, which pack A's values past B's K as zeros, and by the
// vdpbf16ps tiles from a copy with a zero column.
std::pair<Tensor, Tensor> first_layer_backward(const Tensor& grad_t, const Tensor& x2,
                                               const std::optional<Tensor>& w1,
                                               std::array<bool, 2> mask, bool zero_padded) {
  Tensor grad_x, grad_w1;
  const int64_t hid = grad_t.size(0), m = grad_t.size(1), cin = x2.size(1);
  if (mask[1]) {
    if (m >= kPackedBackwardMinRows && use_packed_gemm(grad_t, {hid, m, cin})) {
      const bool in_place = grad_t.stride(1) == 1 && grad_t.stride(0) >= m + m % 2 &&
                            (m % 2 == 0 || zero_padded || bf16_gemm_amx());
      Tensor a = grad_t;
      if (!in_place) {
        a = even_k_buffer(hid, m, grad_t).narrow(1, 0, m);
        a.copy_(grad_t);
      }
      const auto x = unit_stride(x2);
      grad_w1 = at::empty({hid, cin}, grad_t.options());
      auto p = gemm_over(a, x, false, GemmEpilogue::kStore);
      p.out = grad_w1.mutable_data_ptr<BF16>();
      p.ldo = cin;
      // With several panels of A, every work item would pack its block of x once per panel,
      // from rows a row of x apart (LLaVA-1.5-7B: 6 panels). Packed once (9 MiB there), by
      // rows in order: dw1 27.7 -> 24.2 ms, training step new / old 0.967-0.985 at 7B, 0.964
      // at 13B (same process, rounds alternating). The copy is held during this GEMM only.
      // At 2 panels (InternVL: 14 MiB of x) dw1 gained 2.8 ms, less than the pass cost.
      Tensor x_packed;
      if (bf16_gemm_amx() && gemm_panels(p) >= kPackOncePanels) {
        x_packed = empty_huge_paged({packed_b_numel(p)}, grad_t.options());
        pack_b_once(p, x_packed);
      }
      run_packed_gemm(p);
    } else if (grad_t.scalar_type() == at::kFloat && f32_gemm_onednn() && x2.is_contiguous() &&
               grad_t.is_contiguous()) {
      grad_w1 = onednn_linear(grad_t, x2.t(), std::nullopt);
    }
    if (!grad_w1.defined()) grad_w1 = gemm(grad_t, x2);
  }
  if (mask[0]) grad_x = gemm(grad_t.t(), *w1);
  return {grad_x, grad_w1};
}

// backward_rows through packed_gemm (bfloat16, grad_h needed). The GEMMs run in the order that
// holds the fewest [H, N]-sized buffers at a time: g w2 (its epilogue writes grad_h^T), then
// the gradients that need grad_h^T (dw1, dx), which is then freed, then dw2. With `link` (see
// backward_rows) grad_h^T is returned instead, and lives on through dw2. On AMX tiles dw2's
// A operand, act^T, is packed straight from h with the GELU applied (PackedGemm::a_gelu_t), so
// the activation is never stored; elsewhere g w2's epilogue also writes act^T. Measured with the
// benchmark harness's peak (LLaVA-1.5-7B, 8 images, training step), act^T and grad_h^T alive
// together with dw2 put the step's peak 23-36 MiB above eager's.
std::array<Tensor, 6> backward_rows_packed(const Tensor& g, const Tensor& x2, const Tensor& h2,
                                           const std::optional<Tensor>& w1, const Tensor& w2,
                                           bool tanh_form, std::array<bool, 5> mask, bool link) {
  std::array<Tensor, 6> grads;
  const int64_t m = g.size(0), hid = h2.size(1), hout = g.size(1);
  const bool act_from_h = bf16_gemm_amx();
  // grad_h^T (and act^T) [H, M]: row-major A operands of the weight GEMMs (tokens padded to
  // even with a zero column, as packed_gemm wants)
  auto grad_t = even_k_buffer(hid, m, g);
  auto act_t = mask[3] && !act_from_h ? even_k_buffer(hid, m, g) : Tensor();
  // one row of partials per kGemmRows-row tile (PackedGemm::bias_grad)
  Tensor partial = bias_partials(h2, ceil_div(m, kGemmRows), mask[2]);
  {
    const auto a = even_k_operand(g);
    const auto w = unit_stride(w2);
    auto p = gemm_over(a, w, false, GemmEpilogue::kGeluGradT);  // B = w2 [Hout, H]
    p.out = grad_t.mutable_data_ptr<BF16>();
    p.ldo = grad_t.stride(0);
    p.out2 = act_t.defined() ? act_t.mutable_data_ptr<BF16>() : nullptr;
    p.ldo2 = grad_t.stride(0);
    p.h = h2.const_data_ptr<BF16>();
    p.ldh = h2.stride(0);
    p.bias_grad = mask[2] ? partial.mutable_data_ptr<float>() : nullptr;
    p.tanh_form = tanh_form;
    // With several panels of g, w2's column blocks would each be packed once per panel, by
    // loads a row of w2 apart (10 KiB at 13B: a page each, so TLB misses too; ~2% of the 13B
    // training step's samples). Packed once, row by row in order, it took 0.1%. The copy is
    // as large as w2 and held during this GEMM: taken when w2 is trained (the backward then
    // holds dw2, as large, too), not when w2 is frozen and the backward's peak is lower.
    Tensor w2_packed;
    if (gemm_panels(p) > 1 && mask[3]) {
      w2_packed = empty_huge_paged({packed_b_numel(p)}, g.options());
      pack_b_once(p, w2_packed);
    }
    run_packed_gemm(p);
  }
  if (mask[2]) grads[2] = partial.sum(0).to(h2.scalar_type());
  if (mask[4]) grads[4] = g.sum(0);
  if (link) {
    grads[5] = grad_t.narrow(1, 0, m);
  } else {
    std::tie(grads[0], grads[1]) =
        first_layer_backward(grad_t.narrow(1, 0, m), x2, w1, {mask[0], mask[1]}, true);
  }
  // Free from here on (unless returned): dw2 below packs g into it.
  Tensor spare = link ? Tensor() : std::move(grad_t);
  grad_t.reset();
  if (mask[3]) {
    // dw2^T [H, Hout] = act^T g, stored transposed
    grads[3] = at::empty({hout, hid}, g.options());
    PackedGemm p;
    if (act_from_h) {  // A [H, M] = gelu(h2)^T, B = g [M, Hout]
      p.m = hid;
      p.n = hout;
      p.k = m + m % 2;
      p.a = h2.const_data_ptr<BF16>();
      p.lda = h2.stride(0);
      p.a_gelu_t = true;
      p.tanh_form = tanh_form;
      p.b = g.const_data_ptr<BF16>();
      p.ldb = g.stride(0);
      p.b_k = m;
      p.epilogue = GemmEpilogue::kStoreT;
    } else {
      p = gemm_over(act_t.narrow(1, 0, m), g, false, GemmEpilogue::kStoreT);
    }
    p.out = grads[3].mutable_data_ptr<BF16>();
    p.ldo = hid;
    // With several panels of A, every work item would pack its blocks of g once per panel:
    // LLaVA-1.5-13B's dw2 took 181 ms so, 150 with the packing after the first panel skipped
    // (a timing-only switch). Packed once into grad_h^T's storage, as large as g when H = Hout,
    // the copy needs no new memory (that storage is then held through dw2: the 13B step's
    // live peak rose from 205.9 to 212.3 MiB, eager's 231.6). Unused, it is freed first.
    if (gemm_panels(p) > 1 && spare.defined() && spare.numel() >= packed_b_numel(p)) {
      pack_b_once(p, spare);
    } else {
      spare.reset();
    }
    run_packed_gemm(p);
  }
  return grads;
}

// Blocks of the backward passes' b1 reduction (bias_block_rows): at most 64, enough tasks for
// the threads, and float32 partials of at most 64 rows.
constexpr int64_t kBiasBlocks = 64;

// From this many tokens the float32 backward transposes w2 for oneDNN's g w2 (below, oneDNN
// reorders the strided w2 itself): transposing w2 costs the same at any token count, the
// GEMM's gain grows with it. Measured (ms): SigLIP, 729 tokens, 4096^2 w2: transpose ~15,
// GEMM 118 -> 115; LLaVA-1.5-13B, 4608 tokens, 5120^2: transpose ~27, GEMM 1218 -> 1144.
constexpr int64_t kTransposeWeightMinRows = 2048;

// Tiles of the float32 backward's transposing pass: 64 rows x 256 columns, 64 KiB per
// operand (stays in L2), so that every row of act^T and grad_h^T gets 256 bytes per visit.
constexpr int64_t kPassTileRows = 64;
constexpr int64_t kPassTileCols = 256;

// The float32 backward, GEMMs through oneDNN. Its matmul runs fastest when both operands are
// K-contiguous (a linear's input and weight, both row-major); a strided operand it reorders
// itself, more slowly than our own transposed copies. Measured side by side at the 13B shapes
// (ms): g^T act 1155 from g^T and act^T against 1250 in MKL's mm (the unfused path's), 1276
// in oneDNN from strided views; grad_h^T x 233 against MKL's 255. So the elementwise pass
// writes act^T and grad_h^T, transposed through a tile in L2 rather than in passes of their
// own, and g is transposed into the buffer of the raw g w2, free by then.
// The price: oneDNN sums the whole K in registers, so the weight gradients' max error against
// float64 (random inputs) is 2.6x MKL's at K = 4608 tokens (8.4e-7 of the largest value
// against 3.2e-7) and 2x at 729.
std::array<Tensor, 6> backward_rows_onednn(const Tensor& g, const Tensor& x2, const Tensor& h2,
                                           const std::optional<Tensor>& w1, const Tensor& w2,
                                           bool tanh_form, std::array<bool, 5> mask, bool link) {
  const bool need_grad_h = link || mask[0] || mask[1] || mask[2];
  const int64_t rows = h2.size(0);
  const int64_t cols = h2.size(1);
  std::array<Tensor, 6> grads;
  // [N, H] = g w2, turned into grad_h in place by the pass, then free
  Tensor raw = need_grad_h ? onednn_linear(g,
                                           rows >= kTransposeWeightMinRows ? transposed_float(w2)
                                                                           : w2.t(),
                                           std::nullopt)
                           : Tensor();
  // [H, N]
  Tensor grad_h_t = !need_grad_h ? Tensor()
                    : link       ? link_gradient_buffer(cols, rows, h2)
                                 : at::empty({cols, rows}, h2.options());
  const int64_t ld_t = need_grad_h ? grad_h_t.stride(0) : 0;
  Tensor act_t = mask[3] ? at::empty({cols, rows}, h2.options()) : Tensor();         // [H, N]
  const int64_t block = bias_block_rows(rows, cols, kBiasBlocks, kPassTileRows);
  const int64_t nblocks = ceil_div(rows, block);
  Tensor partial = bias_partials(h2, nblocks, mask[2]);
  const auto kernel = MMFAST_PICK_ISA(gelu_recompute_backward_rows);
  const auto transpose = MMFAST_PICK_ISA(transpose32);
  const float* h = h2.const_data_ptr<float>();
  float* grad = raw.defined() ? raw.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> act_tile(act_t.defined() ? kPassTileRows * kPassTileCols : 0);
    for (int64_t b = b0; b < b1; ++b) {
      float* part = partial.defined() ? partial.mutable_data_ptr<float>() + b * cols : nullptr;
      const int64_t end = std::min(rows, (b + 1) * block);
      for (int64_t r0 = b * block; r0 < end; r0 += kPassTileRows) {
        const int64_t nr = std::min(kPassTileRows, end - r0);
        for (int64_t c0 = 0; c0 < cols; c0 += kPassTileCols) {
          const int64_t nc = std::min(kPassTileCols, cols - c0);
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t off = (r0 + i) * cols + c0;
            kernel(at::kFloat, h + off, grad != nullptr ? grad + off : nullptr,
                   act_t.defined() ? act_tile.data() + i * kPassTileCols : nullptr,
                   part != nullptr ? part + c0 : nullptr, 0, 1, nc, tanh_form);
          }
          if (act_t.defined()) {
            transpose(act_tile.data(), kPassTileCols,
                      act_t.mutable_data_ptr<float>() + c0 * rows + r0, rows, nr, nc);
          }
          if (grad != nullptr) {
            transpose(grad + r0 * cols + c0, cols,
                      grad_h_t.mutable_data_ptr<float>() + c0 * ld_t + r0, ld_t, nr, nc);
          }
        }
      }
    }
  });
  if (mask[2]) grads[2] = partial.sum(0);
  if (mask[4]) grads[4] = g.sum(0);
  const auto first_layer_grads = [&] {
    if (link) {
      grads[5] = grad_h_t;
    } else if (need_grad_h) {
      std::tie(grads[0], grads[1]) =
          first_layer_backward(grad_h_t, x2, w1, {mask[0], mask[1]}, false);
    }
    grad_h_t.reset();
  };
  const auto w2_grad = [&] {
    if (mask[3]) {
      const Tensor g_t = transposed_float(g, raw);  // [Hout, N], in the raw g w2's buffer
      grads[3] = onednn_linear(g_t, act_t, std::nullopt);
    }
    raw.reset();
    act_t.reset();
  };
  // The smaller of grad_h^T [H, N] and dw1 [H, Cin] is the one live next to dw2's operands
  // and output (with `link` grad_h^T is returned, and so is live).
  if (!link && rows > x2.size(1)) {
    first_layer_grads();
    w2_grad();
  } else {
    w2_grad();
    first_layer_grads();
  }
  return grads;
}

// Gradients of the projector from g [N, Hout] (grad of its output rows), x2 [N, Cin] and the
// saved pre-activation h2 [N, H]. mask: which of (x, w1, b1, w2, b2) to compute; the others
// come back undefined and cost nothing. link: instead of dx and dw1 (mask[0], mask[1] false,
// x2 unused) grad_h^T [H, N] comes back as the sixth, for the first layer's gradients to be
// taken by first_layer_backward in an autograd node of their own (projector_linked_cpu).
std::array<Tensor, 6> backward_rows(const Tensor& g, const Tensor& x2, const Tensor& h2,
                                    const std::optional<Tensor>& w1, const Tensor& w2, bool tanh_form,
                                    std::array<bool, 5> mask, bool link = false) {
  TORCH_INTERNAL_ASSERT(!link || (!mask[0] && !mask[1]));
  const bool need_grad_h = link || mask[0] || mask[1] || mask[2];
  // Without grad_h (only w2 / b2 trained) there is no g w2 GEMM whose epilogue could make act:
  // that case stays on the unfused path below. Neither do fewer than kPackedBackwardMinRows
  // tokens: the weight GEMMs' K is the token count, and at small K packing each block of B
  // and the transposed stores cost more than the tiles save. In a timing script (7B shapes)
  // the packed backward took 1.18x the unfused one's time at 16 tokens, 1.03-1.09x at 64-256,
  // 0.99x at 384, 0.95x at 729.
  if (need_grad_h && g.size(0) >= kPackedBackwardMinRows &&
      use_packed_gemm(g, {g.size(0), g.size(1), h2.size(1)})) {
    return backward_rows_packed(g, x2, h2, w1, w2, tanh_form, mask, link);
  }
  std::array<Tensor, 6> grads;
  const int64_t rows = h2.size(0);
  const int64_t cols = h2.size(1);
  if (g.scalar_type() == at::kFloat && rows > 0 && cols > 0 && g.size(1) > 0 &&
      f32_gemm_onednn() && onednn_linear_op().has_value()) {
    return backward_rows_onednn(g, x2, h2, w1, w2, tanh_form, mask, link);
  }
  Tensor act = mask[3] ? at::empty_like(h2) : Tensor();
  Tensor grad_h;  // [N, H] = g w2, turned into grad_h
  const bool fused = need_grad_h && fma_path(g) && rows > 0 && cols > 0;
  if (fused) {  // grad_h, act and b1's partial sums in the GEMM's epilogue
    grad_h = at::empty_like(h2);
    Tensor partial = bias_partials(h2, fma_row_tiles(rows), mask[2]);
    auto f = fma_over(g, w2, grad_h, Tensor());
    f.epilogue = FmaEpilogue::kGeluGrad;
    TORCH_INTERNAL_ASSERT(h2.stride(1) == 1);
    f.h = h2.const_data_ptr();
    f.ldh = h2.stride(0);
    f.out2 = act.defined() ? act.mutable_data_ptr() : nullptr;
    f.ldo2 = act.defined() ? act.stride(0) : 0;
    f.bias_grad = mask[2] ? partial.mutable_data_ptr<float>() : nullptr;
    f.tanh_form = tanh_form;
    run_fma_gemm(f);
    if (mask[2]) grads[2] = partial.sum(0).to(h2.scalar_type());
  } else if (need_grad_h) {
    grad_h = gemm(g, w2);
  }
  Tensor grad_t;  // with link: grad_h^T in link_gradient_buffer's layout
  if (!fused && (mask[3] || need_grad_h)) {
    const int64_t block = bias_block_rows(rows, cols, kBiasBlocks);
    const int64_t nblocks = ceil_div(rows, block);
    Tensor partial = bias_partials(h2, nblocks, mask[2]);
    const auto kernel = MMFAST_PICK_ISA(gelu_recompute_backward_rows);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        kernel(h2.scalar_type(), h2.const_data_ptr(),
               grad_h.defined() ? grad_h.mutable_data_ptr() : nullptr,
               act.defined() ? act.mutable_data_ptr() : nullptr,
               partial.defined() ? partial.mutable_data_ptr<float>() + b * cols : nullptr,
               b * block, std::min(rows, (b + 1) * block), cols, tanh_form);
      }
    });
    if (mask[2]) grads[2] = partial.sum(0).to(h2.scalar_type());
  }
  if (link) {
    // transposed before dw2 exists, so that grad_h's buffer is free by then
    grad_t = link_gradient_buffer(cols, rows, h2);
    if (grad_h.scalar_type() == at::kFloat) {
      transpose_float_into(grad_h, grad_t);
    } else {
      grad_t.copy_(grad_h.t());
    }
    grad_h.reset();
  }
  if (mask[3]) {
    grads[3] = gemm(g.t(), act);
    act.reset();  // before the next GEMMs allocate: lowers the backward's peak
  }
  if (mask[4]) grads[4] = g.sum(0);
  if (link) {
    grads[5] = grad_t;
  } else if (need_grad_h) {
    std::tie(grads[0], grads[1]) =
        first_layer_backward(grad_h.t(), x2, w1, {mask[0], mask[1]}, false);
  }
  return grads;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> to_outputs(std::array<Tensor, 6>& grads,
                                                              const Tensor& x) {
  return {defined_or_empty(grads[0], x), defined_or_empty(grads[1], x),
          defined_or_empty(grads[2], x), defined_or_empty(grads[3], x),
          defined_or_empty(grads[4], x)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> projector_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& h, const std::optional<Tensor>& w1,
    const Tensor& w2, c10::string_view approximate, std::array<bool, 5> output_mask) {
  const bool tanh_form = check_projector_backward_args("projector_backward", grad_out, x, h, w1,
                                                       w2, approximate, output_mask[0]);
  TORCH_CHECK_VALUE(grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "projector_backward: grad_out must have x's leading dims, got ",
                    grad_out.sizes(), " for x ", x.sizes());
  auto grads = backward_rows(as_rows(grad_out).contiguous(), as_rows(x), as_rows(h).contiguous(),
                             w1, w2, tanh_form, output_mask);
  if (grads[0].defined()) grads[0] = grads[0].view(x.sizes());
  return to_outputs(grads, x);
}

// The training graph on CPU is two autograd nodes (mmfast/ops/projector.py): link =
// _projector_link(x, w1), an [H, M] tensor of zero strides (one element of storage) that stands
// for the first layer's output, and _projector_linked (the forward, also taking link). The
// latter's backward (projector_backward_head_cpu) returns b1's, w2's and b2's gradients and,
// as link's, grad_h^T [H, M], from which link's backward (projector_backward_tail_cpu) takes
// x's and w1's. Autograd then adds dw2 into w2.grad and frees it before dw1 exists, as eager's
// two Linear nodes do; one node returning both held them together (InternVL's shapes: two
// 32 MiB bfloat16 weights).
int64_t leading_rows(const Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

// Its errors name the op the user called: projector.
Tensor projector_link_cpu(const Tensor& x, const Tensor& w1) {
  check_projector_input("projector", x, w1);
  check_projector_operand("projector", "w1", w1, x);
  auto link = at::empty_strided({w1.size(0), leading_rows(x)}, {0, 0}, x.options());
  if (link.numel() > 0) link.as_strided({1}, {1}).zero_();  // its value: 0, not whatever was there
  return link;
}

void check_link(const char* op, const char* name, const Tensor& link, const Tensor& x,
                int64_t hidden) {
  TORCH_CHECK_VALUE(link.dim() == 2 && link.size(0) == hidden && link.size(1) == leading_rows(x),
                    op, ": ", name, " must have shape [", hidden, ", ", leading_rows(x),
                    "] (hidden, the rows of x), got ", link.sizes());
  check_projector_operand(op, name, link, x);
}

std::tuple<Tensor, Tensor> projector_linked_cpu(const Tensor& x, const Tensor& w1,
                                                const std::optional<Tensor>& b1, const Tensor& w2,
                                                const std::optional<Tensor>& b2,
                                                const Tensor& link, c10::string_view approximate) {
  check_projector_args("projector", x, w1, b1, w2, b2, approximate);
  check_link("projector", "link", link, x, w1.size(0));
  return projector_cpu(x, w1, b1, w2, b2, approximate, true);
}

// output_mask: (link, b1, w2, b2); returns their gradients (empty where not asked for).
std::tuple<Tensor, Tensor, Tensor, Tensor> projector_backward_head_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& h, const Tensor& w2,
    c10::string_view approximate, std::array<bool, 4> output_mask) {
  const char* op = "projector_backward_head";
  const bool tanh_form =
      check_projector_backward_args(op, grad_out, x, h, std::nullopt, w2, approximate, false);
  TORCH_CHECK_VALUE(grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    op, ": grad_out must have x's leading dims, got ", grad_out.sizes(), " for x ",
                    x.sizes());
  auto grads = backward_rows(as_rows(grad_out).contiguous(), as_rows(x), as_rows(h).contiguous(),
                             std::nullopt, w2, tanh_form,
                             {false, false, output_mask[1], output_mask[2], output_mask[3]},
                             output_mask[0]);
  return {defined_or_empty(grads[5], x), defined_or_empty(grads[2], x),
          defined_or_empty(grads[3], x), defined_or_empty(grads[4], x)};
}

// grad_link: grad_h^T [H, M] (any strides); output_mask: (x, w1).
std::tuple<Tensor, Tensor> projector_backward_tail_cpu(const Tensor& grad_link, const Tensor& x,
                                                       const std::optional<Tensor>& w1,
                                                       std::array<bool, 2> output_mask) {
  const char* op = "projector_backward_tail";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension [..., in_features]");
  TORCH_CHECK_VALUE(grad_link.dim() == 2, op, ": grad_link must be 2-D [hidden, ",
                    leading_rows(x), "], got ", grad_link.sizes());
  check_link(op, "grad_link", grad_link, x, grad_link.size(0));
  TORCH_CHECK_VALUE(!output_mask[0] || (w1.has_value() && w1->defined()), op,
                    ": w1 is needed for the gradient of x");
  if (w1.has_value() && w1->defined()) {
    TORCH_CHECK_VALUE(w1->dim() == 2 && w1->size(0) == grad_link.size(0) &&
                          w1->size(1) == x.size(-1),
                      op, ": w1 must have shape [", grad_link.size(0), ", ", x.size(-1), "], got ",
                      w1->sizes());
    check_projector_operand(op, "w1", *w1, x);
  }
  auto [gx, gw1] = first_layer_backward(grad_link, as_rows(x), w1, output_mask, false);
  return {gx.defined() ? gx.view(x.sizes()) : at::empty({0}, x.options()),
          defined_or_empty(gw1, x)};
}

// Positions (rows of embeds viewed as [-1, Hout]) of the True entries of image_mask, in order;
// checks that there are exactly n of them.
std::vector<int64_t> placeholder_rows(const Tensor& image_mask, int64_t n) {
  const auto mask = image_mask.contiguous();
  const bool* m = mask.const_data_ptr<bool>();
  std::vector<int64_t> rows;
  rows.reserve(n);
  for (int64_t i = 0; i < mask.numel(); ++i) {
    if (m[i]) rows.push_back(i);
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(rows.size()) == n, "projector_splice: image_mask has ",
                    rows.size(), " True positions but x has ", n,
                    " rows (one row of x per image token)");
  return rows;
}

// out2 [R, Hout] = the rows of emb2 [R, Hout] that are not placeholders (rows, ascending);
// the placeholder rows are left for the GEMMs to write.
void copy_text_rows(Tensor& out2, const Tensor& emb2, const std::vector<int64_t>& rows) {
  std::vector<std::pair<int64_t, int64_t>> gaps;  // [start, end) of each run of text rows
  int64_t next = 0;
  for (const int64_t r : rows) {
    if (r > next) gaps.emplace_back(next, r);
    next = r + 1;
  }
  if (out2.size(0) > next) gaps.emplace_back(next, out2.size(0));
  const int64_t row_bytes = out2.size(1) * out2.element_size();
  const char* src = static_cast<const char*>(emb2.const_data_ptr());
  char* dst = static_cast<char*>(out2.mutable_data_ptr());
  at::parallel_for(0, static_cast<int64_t>(gaps.size()), 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const auto [a, b] = gaps[g];
      std::memcpy(dst + a * row_bytes, src + a * row_bytes, (b - a) * row_bytes);
    }
  });
}

// out2[rows[k], :] = b2 + act[k] w2^T, in panels of output columns: one GEMM per panel over
// all rows (second_layer: oneDNN or MKL in float32), then its rows copied into place. For float32:
// oneDNN's GEMM takes no output slice, and a GEMM per placeholder run through ATen made
// MKL's sgemm repack all of w2 per run (+9% at 8 runs of 576 rows, 4096 x 4096); the
// panel's copy costs less than either.
void second_layer_by_columns(Tensor& out2, const Tensor& act, const Tensor& w2,
                             const std::optional<Tensor>& b2, const std::vector<int64_t>& rows) {
  const int64_t hout = w2.size(0), n = act.size(0);
  const bool has_b2 = b2.has_value() && b2->defined();
  const int64_t esize = out2.element_size(), ld = out2.size(1);
  char* dst = static_cast<char*>(out2.mutable_data_ptr());
  for (int64_t c0 = 0; c0 < hout; c0 += kSplicePanelCols) {
    const int64_t nc = std::min(kSplicePanelCols, hout - c0);
    const auto panel = second_layer(
        act, w2.narrow(0, c0, nc),
        has_b2 ? std::optional<Tensor>(b2->narrow(0, c0, nc)) : std::nullopt);
    const char* src = static_cast<const char*>(panel.const_data_ptr());
    at::parallel_for(0, n, row_grain(nc), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        std::memcpy(dst + (rows[k] * ld + c0) * esize, src + k * nc * esize, nc * esize);
      }
    });
  }
}

std::tuple<Tensor, Tensor> projector_splice_cpu(const Tensor& x, const Tensor& w1,
                                                const std::optional<Tensor>& b1, const Tensor& w2,
                                                const std::optional<Tensor>& b2,
                                                const Tensor& embeds, const Tensor& image_mask,
                                                c10::string_view approximate, bool keep_h) {
  const bool tanh_form = check_projector_args("projector_splice", x, w1, b1, w2, b2, approximate);
  check_splice_args("projector_splice", x, w2, embeds, image_mask);
  const auto rows = placeholder_rows(image_mask, x.size(0));
  const bool packed = use_packed_gemm(x, {x.size(0), x.size(1), w1.size(0), w2.size(0)});
  // Only the text rows come from embeds: the placeholder rows are written once, by the GEMMs.
  Tensor out;
  if (embeds.is_contiguous()) {
    out = at::empty_like(embeds, at::MemoryFormat::Contiguous);
    auto out2 = out.view({-1, out.size(-1)});
    copy_text_rows(out2, embeds.view({-1, embeds.size(-1)}), rows);
  } else {
    out = embeds.contiguous();  // a fresh copy
  }
  auto out2 = out.view({-1, out.size(-1)});
  if (packed) {
    const auto h = forward_packed(x, w1, b1, w2, b2, tanh_form, keep_h, out2, rows.data());
    return {out, keep_h ? h : at::empty({0}, x.options())};
  }
  auto [act, h] = first_layer(x, w1, b1, tanh_form, keep_h);
  if (fma_path(x) && x.size(0) > 0) {  // the second GEMM's rows written to their placeholders
    auto g = fma_over(act, w2.t(), out2, contiguous_bias(b2));
    g.out_rows = rows.data();
    run_fma_gemm(g);
    return {out, keep_h ? h : at::empty({0}, x.options())};
  }
  if (x.scalar_type() == at::kFloat && x.size(0) > 0) {
    second_layer_by_columns(out2, act, w2, b2, rows);
    return {out, keep_h ? h : at::empty({0}, x.options())};
  }
  if (widened_gemm(x)) {
    // One float32 GEMM over all rows (each run's own would widen w2 again), rounded into
    // an [N, Hout] tensor whose rows are then copied to their placeholders.
    out2.index_copy_(0, at::tensor(rows, x.options().dtype(at::kLong)),
                     second_layer(act, w2, b2));
    return {out, keep_h ? h : at::empty({0}, x.options())};
  }
  const bool has_b2 = b2.has_value() && b2->defined();
  std::vector<int64_t> scattered;  // rows of x in short runs
  for (int64_t i = 0; i < static_cast<int64_t>(rows.size());) {
    int64_t j = i + 1;  // [i, j): a run of consecutive placeholder rows
    while (j < static_cast<int64_t>(rows.size()) && rows[j] == rows[j - 1] + 1) ++j;
    if (j - i >= kMinDirectRun) {
      auto dst = out2.narrow(0, rows[i], j - i);
      auto src = act.narrow(0, i, j - i);
      if (has_b2) at::addmm_out(dst, *b2, src, w2.t()); else at::mm_out(dst, src, w2.t());
    } else {
      for (int64_t k = i; k < j; ++k) scattered.push_back(k);
    }
    i = j;
  }
  if (!scattered.empty()) {
    const auto src_idx = at::tensor(scattered, x.options().dtype(at::kLong));
    std::vector<int64_t> dst(scattered.size());
    for (size_t k = 0; k < scattered.size(); ++k) dst[k] = rows[scattered[k]];
    const auto dst_idx = at::tensor(dst, x.options().dtype(at::kLong));
    out2.index_copy_(0, dst_idx, second_layer(act.index_select(0, src_idx), w2, b2));
  }
  return {out, keep_h ? h : at::empty({0}, x.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> projector_splice_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& h, const std::optional<Tensor>& w1,
    const Tensor& w2, const Tensor& image_mask, c10::string_view approximate,
    std::array<bool, 6> output_mask) {
  const bool tanh_form = check_projector_backward_args("projector_splice_backward", grad_out, x,
                                                       h, w1, w2, approximate, output_mask[0]);
  check_splice_args("projector_splice_backward", x, w2, grad_out, image_mask, "grad_out");
  const auto rows = placeholder_rows(image_mask, x.size(0));
  auto g2 = as_rows(grad_out);
  const auto idx = at::tensor(rows, x.options().dtype(at::kLong));
  auto grads = backward_rows(g2.index_select(0, idx), x, h.contiguous(), w1, w2, tanh_form,
                             {output_mask[0], output_mask[1], output_mask[2], output_mask[3],
                              output_mask[4]});
  Tensor grad_embeds = output_mask[5] ? grad_out.masked_fill(image_mask.unsqueeze(-1), 0)
                                      : at::empty({0}, x.options());
  auto [gx, gw1, gb1, gw2, gb2] = to_outputs(grads, x);
  return {gx, gw1, gb1, gw2, gb2, grad_embeds};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("projector", &projector_cpu);
  m.impl("projector_backward", &projector_backward_cpu);
  m.impl("_projector_link", &projector_link_cpu);
  m.impl("_projector_linked", &projector_linked_cpu);
  m.impl("_projector_backward_head", &projector_backward_head_cpu);
  m.impl("_projector_backward_tail", &projector_backward_tail_cpu);
  m.impl("_projector_pack_weight", &projector_pack_weight_cpu);
  m.impl("_projector_prepacked", &projector_prepacked_cpu);
  m.impl("projector_splice", &projector_splice_cpu);
  m.impl("projector_splice_backward", &projector_splice_backward_cpu);
}

}  // namespace mmfast::cpu
