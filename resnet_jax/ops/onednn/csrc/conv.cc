// oneDNN convolutions for XLA:CPU, called from jitted JAX code through the XLA FFI (jax.ffi.ffi_call).
//
// Why: XLA:CPU's own convolutions (YNNPACK/Eigen) run well below oneDNN's direct kernels on the ResNet layer
// shapes, and XLA lowers the kernel gradient worse still (figures: docs/ops.md). These handlers run
// oneDNN's kernels on XLA's buffers with no copies: activations stay NHWC (oneDNN "nhwc"), kernels stay HWIO
// (oneDNN "hwio", or "hwigo" when grouped) and are reordered into the kernel's preferred blocked layout on the
// way in (out, for the kernel gradient). Everything XLA fuses well (BatchNorm, ReLU, adds, the optimizer) stays
// in XLA; the forward handler can also apply a bias, a residual add and a ReLU as oneDNN post-ops, which saves
// a pass over the output when BatchNorm is folded into the convolution for inference. The residual arrives in
// the output buffer itself (the caller aliases it to the result) and is added by oneDNN's "sum" post-op, so the
// convolution reads and writes one buffer instead of reading one and writing a second.
//
// Dilated (atrous) kernels are oneDNN's own: the "dilation" attribute is XLA's tap spacing (1: none).
//
// Three handlers, one per pass: ResnetJaxConvForward (x, w[, bias][, residual]) -> y,
// ResnetJaxConvBackwardData (dy, w) -> dx, ResnetJaxConvBackwardWeights (x, dy) -> dw.
// Primitives are created once per shape and cached; buffers for reordered weights and oneDNN's scratchpad are
// per calling thread, so concurrent calls from XLA's threads never share memory (common.h).

#include <cstring>
#include <initializer_list>
#include <map>
#include <optional>
#include <sstream>

#include "common.h"

namespace ffi = xla::ffi;
using dnnl::algorithm;
using dnnl::memory;
using dnnl::prop_kind;
using tag = memory::format_tag;

namespace {

using resnet_jax::Engine;
using resnet_jax::Run;
using resnet_jax::Stream;

thread_local resnet_jax::ThreadBuffer weights_buffer;
thread_local resnet_jax::ThreadBuffer scratch_buffer;

// Geometry of one convolution, from the XLA buffers and the attributes.
struct Shape {
  int64_t n, h, w, c, kh, kw, o, oh, ow, groups;
  int64_t strides[2], pad_lo[2], pad_hi[2], dilation[2];
  memory::data_type dtype;

  memory::dims Src() const { return {n, c, h, w}; }
  memory::dims Dst() const { return {n, o, oh, ow}; }
  memory::dims Weights() const {
    if (groups == 1) return {o, c, kh, kw};
    return {groups, o / groups, c / groups, kh, kw};
  }
  tag WeightsTag() const { return groups == 1 ? tag::hwio : tag::hwigo; }
  memory::dims StridesDims() const { return {strides[0], strides[1]}; }
  // oneDNN counts the gaps between a kernel's taps (0: none), XLA and JAX the tap spacing (1: none).
  memory::dims Dilates() const { return {dilation[0] - 1, dilation[1] - 1}; }
  memory::dims PadLo() const { return {pad_lo[0], pad_lo[1]}; }
  memory::dims PadHi() const { return {pad_hi[0], pad_hi[1]}; }

  // Whether some tap of the kernel reads only padding at every output position (an input smaller than the
  // kernel's reach: a 1-pixel-wide image at a stride-2 3x3). oneDNN's bfloat16 kernel gradient leaves such taps'
  // float32 accumulators in the scratchpad as it found them: stale values of an earlier call, up to 1e31, came
  // back as their gradient (which is 0).
  bool HasDeadTap() const {
    const int64_t in[2] = {h, w}, out[2] = {oh, ow}, taps[2] = {kh, kw};
    for (int d = 0; d < 2; ++d)
      for (int64_t k = 0; k < taps[d]; ++k) {
        bool reads = false;
        for (int64_t i = 0; i < out[d] && !reads; ++i) {
          const int64_t at = i * strides[d] - pad_lo[d] + k * dilation[d];
          reads = at >= 0 && at < in[d];
        }
        if (!reads) return true;
      }
    return false;
  }

  std::string Key(const char* op) const {
    std::ostringstream k;
    k << op << ':' << static_cast<int>(dtype) << ':' << n << 'x' << h << 'x' << w << 'x' << c << ':' << kh
      << 'x' << kw << 'x' << o << ':' << groups << ':' << strides[0] << ',' << strides[1] << ':' << pad_lo[0]
      << ',' << pad_lo[1] << ',' << pad_hi[0] << ',' << pad_hi[1] << ':' << dilation[0] << ',' << dilation[1];
    return k.str();
  }
};

std::optional<memory::data_type> DnnlType(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return memory::data_type::f32;
    case ffi::DataType::BF16: return memory::data_type::bf16;
    default: return std::nullopt;
  }
}

// Every buffer of one call in the convolution's dtype (a kernel gradient may be float32 for bfloat16 inputs).
ffi::Error SameType(std::initializer_list<ffi::DataType> types) {
  for (ffi::DataType t : types)
    if (t != *types.begin())
      return ffi::Error::InvalidArgument("oneDNN conv: the input, kernel and output must share one dtype");
  return ffi::Error::Success();
}

// x: NHWC input, w: HWIO kernel, y: NHWC output; all three come from XLA's buffers.
ffi::ErrorOr<Shape> MakeShape(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions w,
                              ffi::AnyBuffer::Dimensions y, ffi::DataType dtype,
                              ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                              int64_t groups, ffi::Span<const int64_t> dilation) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4 || strides.size() != 2 || padding.size() != 4 ||
      dilation.size() != 2)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "oneDNN conv: expected NHWC/HWIO rank-4 buffers, 2 strides, 4 pads, 2 dilations"));
  auto dt = DnnlType(dtype);
  if (!dt) return ffi::Unexpected(ffi::Error::InvalidArgument("oneDNN conv: only float32 and bfloat16 are supported"));
  Shape s{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], groups,
          {strides[0], strides[1]}, {padding[0], padding[2]}, {padding[1], padding[3]},
          {dilation[0], dilation[1]}, *dt};
  if (groups < 1 || s.c != w[2] * groups || s.o % groups != 0 || y[0] != s.n || y[3] != s.o)
    return ffi::Unexpected(ffi::Error::InvalidArgument("oneDNN conv: inconsistent channel counts or groups"));
  for (int i = 0; i < 2; ++i) {
    const int64_t k = (w[i] - 1) * s.dilation[i] + 1;  // the window a dilated kernel spans
    if (s.dilation[i] < 1 || !resnet_jax::OutputFollows(x[1 + i], s.pad_lo[i], s.pad_hi[i], k, s.strides[i], y[1 + i]))
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          "oneDNN conv: the output's height and width do not follow from the input, kernel, strides and padding"));
  }
  return s;
}

memory::desc Nhwc(const memory::dims& dims, memory::data_type dt) { return memory::desc(dims, dt, tag::nhwc); }

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Shape& s, prop_kind kind,
                                                      const memory::desc* bias,
                                                      const dnnl::primitive_attr& attr) {
  memory::desc weights(s.Weights(), s.dtype, tag::any);
  memory::desc src = Nhwc(s.Src(), s.dtype), dst = Nhwc(s.Dst(), s.dtype);
  if (bias)
    return {Engine(), kind, algorithm::convolution_direct, src, weights, *bias, dst, s.StridesDims(),
            s.Dilates(), s.PadLo(), s.PadHi(), attr};
  return {Engine(), kind, algorithm::convolution_direct, src, weights, dst, s.StridesDims(), s.Dilates(),
          s.PadLo(), s.PadHi(), attr};
}

// A cached primitive plus what its callers need: the user-side layouts and the reorder between them.
struct Entry {
  dnnl::primitive prim;
  memory::desc user_weights, prim_weights, scratchpad;
  dnnl::reorder weights_reorder;  // user <-> primitive weights layout; empty when they agree
  bool reorder_weights = false;
};

// Weights in the layout the primitive wants: the user's buffer itself, or a reordered per-thread copy.
memory PrimitiveWeights(const Entry& e, void* user_data) {
  memory user(e.user_weights, Engine(), user_data);
  if (!e.reorder_weights) return user;
  memory prim(e.prim_weights, Engine(), weights_buffer.Get(e.prim_weights.get_size()));
  e.weights_reorder.execute(Stream(), user, prim);
  return prim;
}

// A forward's weights in the primitive's layout, kept between calls: a folded inference model passes the same
// kernels every call, and reordering them every time took 14.6 of ~25 ms of a bfloat16 ResNet-50's batch-1
// inference on AMX (BENCHMARKS.md). Only forwards with a bias keep theirs, the folded BatchNorm's convolutions
// (training's convolutions have none: their weights change every step, and keeping them cost a ResNet-50
// training process up to 300 MB of memory for nothing). A kept layout is used only while the caller's buffer
// holds, byte for byte, the weights it was made from (compared with a copy of them, about a quarter of a
// reorder's time), so new weights at a reused address, a training step's among them, are reordered again.
// Entries are per (primitive, address), the primitive named by its cached Entry, which lives as long as the
// process; beyond kKeptBytes the least recently used go. Calls are serialised (Run), so one table serves every
// thread.
class KeptWeights {
 public:
  memory Get(const Entry& e, void* user_data) {
    memory user(e.user_weights, Engine(), user_data);
    if (!e.reorder_weights) return user;
    const size_t user_size = e.user_weights.get_size(), prim_size = e.prim_weights.get_size();
    auto it = kept_.try_emplace({&e, user_data}).first;
    Kept& k = it->second;
    k.used = ++clock_;
    memory prim(e.prim_weights, Engine(), k.packed.Get(prim_size));
    if (k.user.size() != user_size || std::memcmp(k.user.data(), user_data, user_size) != 0) {
      k.user.clear();  // no match until the reorder has run: an exception on the way leaves nothing to reuse
      e.weights_reorder.execute(Stream(), user, prim);
      const char* bytes = static_cast<const char*>(user_data);
      k.user.assign(bytes, bytes + user_size);
      if (k.bytes == 0) {
        k.bytes = user_size + prim_size;
        total_ += k.bytes;
        Evict(it->first);
      }
    }
    return prim;
  }

 private:
  static constexpr size_t kKeptBytes = size_t(1) << 30;  // ResNet-50's float32 kernels: 2 x 102 MB
  using Key = std::pair<const Entry*, const void*>;
  struct Kept {
    std::vector<char> user;  // the caller's weights the packed layout was made from
    resnet_jax::ThreadBuffer packed;
    uint64_t used = 0;
    size_t bytes = 0;
  };

  void Evict(const Key& keep) {
    while (total_ > kKeptBytes && kept_.size() > 1) {
      auto oldest = kept_.end();
      for (auto it = kept_.begin(); it != kept_.end(); ++it)
        if (it->first != keep && (oldest == kept_.end() || it->second.used < oldest->second.used)) oldest = it;
      total_ -= oldest->second.bytes;
      kept_.erase(oldest);
    }
  }

  std::map<Key, Kept> kept_;
  uint64_t clock_ = 0;
  size_t total_ = 0;
};

KeptWeights kept_weights;

memory Scratchpad(const Entry& e) {
  return memory(e.scratchpad, Engine(), scratch_buffer.Get(e.scratchpad.get_size()));
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t groups,
                   ffi::Span<const int64_t> dilation, int64_t has_bias, int64_t has_residual, int64_t relu) {
  auto shape = MakeShape(x.dimensions(), w.dimensions(), y->dimensions(), x.element_type(), strides, padding,
                         groups, dilation);
  if (shape.has_error()) return shape.error();
  const Shape& s = *shape;
  if (auto error = SameType({x.element_type(), w.element_type(), y->element_type()}); error.failure()) return error;
  if (static_cast<int64_t>(rest.size()) != has_bias + has_residual)
    return ffi::Error::InvalidArgument("oneDNN conv: optional operands do not match has_bias/has_residual");
  std::optional<ffi::AnyBuffer> bias, residual;
  if (has_bias) bias = *rest.get<ffi::AnyBuffer>(0);
  if (has_residual) residual = *rest.get<ffi::AnyBuffer>(has_bias);
  std::optional<memory::data_type> bias_dt;
  if (bias) bias_dt = DnnlType(bias->element_type());
  if (bias && (!bias_dt || !resnet_jax::HasDims(bias->dimensions(), {s.o})))
    return ffi::Error::InvalidArgument("oneDNN conv: the bias must be float32 or bfloat16 of shape (O,), O the "
                                       "output channels");
  if (residual && (residual->element_type() != y->element_type() ||
                   !resnet_jax::SameDims(residual->dimensions(), y->dimensions())))
    return ffi::Error::InvalidArgument("oneDNN conv: the residual must have the output's shape and dtype");

  std::ostringstream key;
  key << s.Key("fwd") << ":b" << (bias ? static_cast<int>(*bias_dt) : -1) << ":r" << residual.has_value()
      << ":relu" << relu;
  return Run([&] {
    Entry* e = resnet_jax::Cached<Entry>(key.str(), [&] {
      dnnl::primitive_attr attr = UserScratchpad();
      dnnl::post_ops ops;
      if (residual) ops.append_sum(1.f);  // y = conv(x) + bias + y, y holding the residual
      if (relu) ops.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
      attr.set_post_ops(ops);
      memory::desc bias_md;
      if (bias) bias_md = memory::desc({s.o}, *bias_dt, tag::a);
      auto pd = ForwardDesc(s, prop_kind::forward_inference, bias ? &bias_md : nullptr, attr);
      Entry entry{dnnl::convolution_forward(pd), memory::desc(s.Weights(), s.dtype, s.WeightsTag()),
                  pd.weights_desc(), pd.scratchpad_desc()};
      entry.reorder_weights = entry.user_weights != entry.prim_weights;
      if (entry.reorder_weights)
        entry.weights_reorder = dnnl::reorder(memory(entry.user_weights, Engine(), nullptr),
                                              memory(entry.prim_weights, Engine(), nullptr));
      return entry;
    });
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, memory(Nhwc(s.Src(), s.dtype), Engine(), x.untyped_data())},
        {DNNL_ARG_WEIGHTS, bias ? kept_weights.Get(*e, w.untyped_data()) : PrimitiveWeights(*e, w.untyped_data())},
        {DNNL_ARG_DST, memory(Nhwc(s.Dst(), s.dtype), Engine(), y->untyped_data())},
        {DNNL_ARG_SCRATCHPAD, Scratchpad(*e)}};
    if (bias) args[DNNL_ARG_BIAS] = memory(memory::desc({s.o}, *bias_dt, tag::a), Engine(), bias->untyped_data());
    // XLA hands the residual's buffer over as the output when it can; otherwise (never seen) copy it there.
    if (residual && residual->untyped_data() != y->untyped_data())
      std::memcpy(y->untyped_data(), residual->untyped_data(), y->size_bytes());
    e->prim.execute(Stream(), args);
    Stream().wait();
  });
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t groups,
                        ffi::Span<const int64_t> dilation) {
  auto shape = MakeShape(dx->dimensions(), w.dimensions(), dy.dimensions(), dy.element_type(), strides, padding,
                         groups, dilation);
  if (shape.has_error()) return shape.error();
  const Shape& s = *shape;
  if (auto error = SameType({dy.element_type(), w.element_type(), dx->element_type()}); error.failure()) return error;
  return Run([&] {
    Entry* e = resnet_jax::Cached<Entry>(s.Key("bwd_data"), [&] {
      auto hint = ForwardDesc(s, prop_kind::forward_training, nullptr, dnnl::primitive_attr());
      memory::desc weights(s.Weights(), s.dtype, tag::any);
      dnnl::convolution_backward_data::primitive_desc pd(
          Engine(), algorithm::convolution_direct, Nhwc(s.Src(), s.dtype), weights, Nhwc(s.Dst(), s.dtype),
          s.StridesDims(), s.Dilates(), s.PadLo(), s.PadHi(), hint, UserScratchpad());
      Entry entry{dnnl::convolution_backward_data(pd), memory::desc(s.Weights(), s.dtype, s.WeightsTag()),
                  pd.weights_desc(), pd.scratchpad_desc()};
      entry.reorder_weights = entry.user_weights != entry.prim_weights;
      if (entry.reorder_weights)
        entry.weights_reorder = dnnl::reorder(memory(entry.user_weights, Engine(), nullptr),
                                              memory(entry.prim_weights, Engine(), nullptr));
      return entry;
    });
    e->prim.execute(Stream(), {{DNNL_ARG_DIFF_DST, memory(Nhwc(s.Dst(), s.dtype), Engine(), dy.untyped_data())},
                               {DNNL_ARG_WEIGHTS, PrimitiveWeights(*e, w.untyped_data())},
                               {DNNL_ARG_DIFF_SRC, memory(Nhwc(s.Src(), s.dtype), Engine(), dx->untyped_data())},
                               {DNNL_ARG_SCRATCHPAD, Scratchpad(*e)}});
    Stream().wait();
  });
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t groups,
                           ffi::Span<const int64_t> dilation) {
  auto shape = MakeShape(x.dimensions(), dw->dimensions(), dy.dimensions(), x.element_type(), strides, padding,
                         groups, dilation);
  if (shape.has_error()) return shape.error();
  const Shape& s = *shape;
  if (auto error = SameType({x.element_type(), dy.element_type()}); error.failure()) return error;
  auto dw_dt = DnnlType(dw->element_type());
  if (!dw_dt) return ffi::Error::InvalidArgument("oneDNN conv: the kernel gradient must be float32 or bfloat16");
  std::ostringstream key;
  key << s.Key("bwd_weights") << ":dw" << static_cast<int>(*dw_dt);
  return Run([&] {
    Entry* e = resnet_jax::Cached<Entry>(key.str(), [&] {
      auto hint = ForwardDesc(s, prop_kind::forward_training, nullptr, dnnl::primitive_attr());
      memory::desc weights(s.Weights(), *dw_dt, tag::any);
      dnnl::convolution_backward_weights::primitive_desc pd(
          Engine(), algorithm::convolution_direct, Nhwc(s.Src(), s.dtype), weights, Nhwc(s.Dst(), s.dtype),
          s.StridesDims(), s.Dilates(), s.PadLo(), s.PadHi(), hint, UserScratchpad());
      Entry entry{dnnl::convolution_backward_weights(pd), memory::desc(s.Weights(), *dw_dt, s.WeightsTag()),
                  pd.diff_weights_desc(), pd.scratchpad_desc()};
      entry.reorder_weights = entry.user_weights != entry.prim_weights;
      if (entry.reorder_weights)
        entry.weights_reorder = dnnl::reorder(memory(entry.prim_weights, Engine(), nullptr),
                                              memory(entry.user_weights, Engine(), nullptr));
      return entry;
    });
    memory user(e->user_weights, Engine(), dw->untyped_data());
    memory prim = e->reorder_weights
                      ? memory(e->prim_weights, Engine(), weights_buffer.Get(e->prim_weights.get_size()))
                      : user;
    memory scratch = Scratchpad(*e);
    if (s.HasDeadTap()) std::memset(scratch.get_data_handle(), 0, e->scratchpad.get_size());  // Shape says why
    e->prim.execute(Stream(), {{DNNL_ARG_SRC, memory(Nhwc(s.Src(), s.dtype), Engine(), x.untyped_data())},
                               {DNNL_ARG_DIFF_DST, memory(Nhwc(s.Dst(), s.dtype), Engine(), dy.untyped_data())},
                               {DNNL_ARG_DIFF_WEIGHTS, prim},
                               {DNNL_ARG_SCRATCHPAD, scratch}});
    if (e->reorder_weights) e->weights_reorder.execute(Stream(), prim, user);
    Stream().wait();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<int64_t>("groups")
                                  .Attr<ffi::Span<const int64_t>>("dilation")
                                  .Attr<int64_t>("has_bias")
                                  .Attr<int64_t>("has_residual")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvBackwardData, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<int64_t>("groups")
                                  .Attr<ffi::Span<const int64_t>>("dilation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<int64_t>("groups")
                                  .Attr<ffi::Span<const int64_t>>("dilation"));

extern "C" int ResnetJaxOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
