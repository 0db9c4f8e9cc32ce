// The host fast path of gradclip._C: the common call of the public functions in one C++ call.
//
// gradclip/clip.py hands the caller's parameters (a list, tuple, single tensor, generator or any
// iterable) to one of the functions below. They read each `.grad` in C++ (the parameters of an
// unstarted `module.parameters()` generator from the module tree itself: csrc/module_walk.cpp),
// validate, pick the backend exactly as gradclip.routing would (GRADCLIP_BACKEND and `backend=`;
// the per-dtype choice itself is gradclip.backends.choose, called once per (request, device,
// dtype, p) and cached here) and call the backend's op `gradclip::{backend}_{op}` through the c10
// dispatcher with a cached typed handle: no Python per tensor.
//
// Served: every gradient an exact torch.Tensor (or Parameter) on ONE cpu/cuda device, strided,
// fp32/fp16/bf16, no conj/neg/zero/functional/Python-key tensor, p in {1, 2, inf}, max_norm and
// clip_value plain non-negative numbers, no gradient listed twice (for a kernel backend), one
// backend for the whole list, no __torch_function__ mode active. Anything else returns
// `(handback,)`: the object gradclip/clip.py continues the Python routing on, which is the
// caller's own object, or the list already drawn from an iterator (a generator cannot be read
// twice), so every error and warning still comes from gradclip/routing.py. Nothing is modified
// before the op call, and the op call is the same one the Python path would make.
//
// Hot path costs: no host synchronisation, no heap allocation of our own once warm (the tensor
// vector is thread-local and reused), one dict lookup and two getenv() per call, the GIL released
// around the native (cpu, cuda) kernels as torch's own ops do.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "module.h"
#include "module_walk.h"
#include "pointer_set.h"

namespace py = pybind11;

namespace gradclip {
namespace {

// The ops the fast path calls, in the order of kOpNames.
enum Op : int { kTotalNorm = 0, kClipGradNorm, kClipGradsWithNorm, kClipGradValue, kPerParamNorms, kNumOps };
constexpr std::array<const char*, kNumOps> kOpNames = {"total_norm", "clip_grad_norm_", "clip_grads_with_norm_",
                                                       "clip_grad_value_", "per_param_norms"};

// Norm types the kernels serve, as a small code; 0 is "no norm involved" (clip_grads_with_norm_,
// clip_grad_value_), which every backend serves.
enum PClass : int8_t { kNoNorm = 0, kP1, kP2, kPInf };

constexpr int kMaxBackends = 8;

struct ChoiceKey {
  int8_t requested, device_type, device_index, dtype, pclass, interpret;
  bool operator==(const ChoiceKey& o) const { return std::memcmp(this, &o, sizeof(ChoiceKey)) == 0; }
};

// The op signatures, as the schemas in gradclip/ops.py give them to C++ kernels.
using TotalNormFn = at::Tensor(at::TensorList, double);
using ClipGradNormFn = at::Tensor(at::TensorList, double, double);
using ClipGradsWithNormFn = void(at::TensorList, double, const at::Tensor&);
using ClipGradValueFn = void(at::TensorList, double);
using PerParamNormsFn = std::tuple<at::Tensor, at::Tensor>(at::TensorList, double);

// Typed handles of one backend's ops, found on first use.
struct BackendOps {
  std::array<bool, kNumOps> looked_up{};
  std::array<bool, kNumOps> plain{};  // no kernel of its own above the backend (see below_autograd)
  std::optional<c10::TypedOperatorHandle<TotalNormFn>> total_norm;
  std::optional<c10::TypedOperatorHandle<ClipGradNormFn>> clip_grad_norm;
  std::optional<c10::TypedOperatorHandle<ClipGradsWithNormFn>> clip_grads_with_norm;
  std::optional<c10::TypedOperatorHandle<ClipGradValueFn>> clip_grad_value;
  std::optional<c10::TypedOperatorHandle<PerParamNormsFn>> per_param_norms;
};

struct State {
  PyObject* backends_dict = nullptr;  // gradclip.backends.__dict__ (kept alive by the module)
  PyObject* choose_key = nullptr;     // interned "choose"
  PyObject* choose_seen = nullptr;    // the backends.choose the cache was filled with
  std::vector<std::string> names;     // gradclip.backends.CHOICES
  int auto_index = -1;
  std::array<bool, kMaxBackends> native{};  // C++ kernels: the GIL is released around them
  std::array<bool, kMaxBackends> reference{};
  std::vector<std::pair<ChoiceKey, int8_t>> choices;  // cached backends.choose results
  std::array<BackendOps, kMaxBackends> ops;
  uint64_t served = 0, unserved = 0;
};

// Built on first use under the GIL and never destroyed (it holds Python objects, which must not be
// released after the interpreter is gone).
State& state() {
  static State* s = [] {
    auto* st = new State();
    py::module_ backends = py::module_::import("gradclip.backends");
    st->backends_dict = backends.attr("__dict__").ptr();
    Py_INCREF(st->backends_dict);
    st->choose_key = PyUnicode_InternFromString("choose");
    for (auto name : backends.attr("CHOICES")) st->names.push_back(name.cast<std::string>());
    TORCH_CHECK(st->names.size() <= kMaxBackends, "gradclip._C: too many backends");
    for (size_t i = 0; i < st->names.size(); ++i) {
      const std::string& n = st->names[i];
      if (n == "auto") st->auto_index = static_cast<int>(i);
      st->native[i] = n == "cpu" || n == "cuda";
      st->reference[i] = n == "reference";
    }
    TORCH_CHECK(st->auto_index >= 0, "gradclip._C: gradclip.backends.CHOICES lacks 'auto'");
    return st;
  }();
  return *s;
}

// ---- Scalars: what routing.check_bound / check_norm_type accept without a question ---------------
bool plain_number(PyObject* obj, double* out) {
  if (PyFloat_Check(obj)) {
    *out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  if (PyLong_CheckExact(obj)) {
    *out = PyLong_AsDouble(obj);
    if (*out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();  // too large for a double: float() raises the same OverflowError in Python
      return false;
    }
    return true;
  }
  return false;
}

// A bound routing.check_bound would accept (not NaN, not negative).
bool bound(PyObject* obj, double* out) { return plain_number(obj, out) && !std::isnan(*out) && *out >= 0; }

bool norm_class(PyObject* obj, double* p, PClass* cls) {
  if (!plain_number(obj, p)) return false;
  if (*p == 1.0) *cls = kP1;
  else if (*p == 2.0) *cls = kP2;
  else if (std::isinf(*p) && *p > 0) *cls = kPInf;
  else return false;
  return true;
}

// The backend asked for (routing.requested): the argument, GRADCLIP_BACKEND overriding "auto".
// -1 for anything routing.requested would reject.
int requested_index(State& st, PyObject* backend) {
  if (!PyUnicode_Check(backend)) return -1;
  Py_ssize_t size = 0;
  const char* name = PyUnicode_AsUTF8AndSize(backend, &size);
  if (name == nullptr) {
    PyErr_Clear();
    return -1;
  }
  if (std::strcmp(name, "auto") == 0) {
    const char* env = std::getenv("GRADCLIP_BACKEND");
    if (env != nullptr && env[0] != '\0') name = env;
  }
  for (size_t i = 0; i < st.names.size(); ++i) {
    if (st.names[i] == name) return static_cast<int>(i);
  }
  return -1;
}

// ---- Gathering the gradients -------------------------------------------------------------------
constexpr uint8_t dtype_bit(at::ScalarType t) {
  return t == at::kFloat ? 1 : t == at::kHalf ? 2 : t == at::kBFloat16 ? 4 : 0;
}
constexpr std::array<at::ScalarType, 3> kBitDtypes = {at::kFloat, at::kHalf, at::kBFloat16};

const c10::DispatchKeySet kUnservedKeys = c10::DispatchKeySet({
    c10::DispatchKey::Python,
    c10::DispatchKey::PythonTLSSnapshot,
    c10::DispatchKey::Functionalize,
    c10::DispatchKey::Conjugate,
    c10::DispatchKey::Negative,
    c10::DispatchKey::ZeroTensor,
    c10::DispatchKey::FuncTorchBatched,
    c10::DispatchKey::FuncTorchGradWrapper,
    c10::DispatchKey::Batched,
    c10::DispatchKey::Sparse,
    c10::DispatchKey::SparseCsr,
    c10::DispatchKey::Quantized,
    c10::DispatchKey::NestedTensor,
});

struct Gathered {
  std::vector<at::Tensor> grads;
  std::vector<PyObject*> walked;  // the items of a module.parameters() generator read in C++
  at::Device device{at::kCPU};
  uint8_t dtypes = 0;
  c10::DispatchKeySet keys;  // union of the gradients' key sets
};

// Adds `g` to `out` if the fast path serves it; false otherwise.
bool take(const at::Tensor& g, Gathered& out) {
  c10::TensorImpl* impl = g.unsafeGetTensorImpl();
  PyObject* obj = impl->pyobj_slot()->load_pyobj();
  if (obj != nullptr && !THPVariable_CheckExact(obj)) return false;  // a Tensor subclass (DTensor, ...)
  if (impl->layout() != at::kStrided || impl->key_set().has_any(kUnservedKeys)) return false;
  const uint8_t bit = dtype_bit(impl->dtype().toScalarType());
  if (bit == 0) return false;  // fp64, complex, integer, bool: the Python path decides or raises
  const at::Device device = impl->device();
  if (out.grads.empty()) {
    if (device.type() != at::kCPU && device.type() != at::kCUDA) return false;
    out.device = device;
  } else if (device != out.device) {
    return false;  // several devices: one group per device, in the Python routing
  }
  out.dtypes |= bit;
  out.keys = out.keys | impl->key_set();
  out.grads.push_back(g);
  return true;
}

// What `parameters` holds, read without Python per element where it is a list, tuple, tensor or an
// unstarted module.parameters() generator (csrc/module_walk.cpp). On return `items` are borrowed
// from `container`, from `walked` or from `drawn` (the list drawn from any other iterator).
struct Items {
  PyObject* const* data = nullptr;
  Py_ssize_t size = 0;
  PyObject* single = nullptr;
  py::object drawn;           // set when the input was an iterator we consumed
  PyObject* walked = nullptr;  // the generator whose module tree was read instead of running it
};

// False on a Python error (an iterator that raised), which the caller propagates.
bool items_of(PyObject* parameters, Items& items, std::vector<PyObject*>& walked) {
  if (THPVariable_Check(parameters)) {
    items.single = parameters;
    items.data = &items.single;
    items.size = 1;
    return true;
  }
  if (PyList_CheckExact(parameters)) {
    items.data = PySequence_Fast_ITEMS(parameters);
    items.size = PyList_GET_SIZE(parameters);
    return true;
  }
  if (PyTuple_CheckExact(parameters)) {
    items.data = PySequence_Fast_ITEMS(parameters);
    items.size = PyTuple_GET_SIZE(parameters);
    return true;
  }
  if (walk_module_parameters(parameters, walked)) {
    // Left unstarted until the call is served (plan), so a hand-back still gets the whole generator.
    items.walked = parameters;
    items.data = walked.data();
    items.size = static_cast<Py_ssize_t>(walked.size());
    return true;
  }
  PyObject* iterator = PyObject_GetIter(parameters);
  if (iterator == nullptr) {
    PyErr_Clear();  // not iterable: routing.as_list raises the same TypeError
    return true;    // no items; the caller hands `parameters` back
  }
  // list(parameters), as routing.as_list does: draws everything, so Python can continue on it.
  PyObject* drawn = PySequence_List(iterator);
  Py_DECREF(iterator);
  if (drawn == nullptr) return false;
  items.drawn = py::reinterpret_steal<py::object>(drawn);
  items.data = PySequence_Fast_ITEMS(drawn);
  items.size = PyList_GET_SIZE(drawn);
  return true;
}

// Reads every item's `.grad` (of_params) or every item itself into `out`. False: not served.
bool gather(const Items& items, bool of_params, Gathered& out) {
  for (Py_ssize_t i = 0; i < items.size; ++i) {
    PyObject* item = items.data[i];
    if (!THPVariable_CheckExact(item)) return false;  // None, a subclass, or a duck-typed object
    const at::Tensor& t = THPVariable_Unpack(item);
    if (!of_params) {
      if (!take(t, out)) return false;
      continue;
    }
    // What t.is_leaf() and t.grad() read, in one call instead of five (a third of the time at
    // 2,000 gradients). No autograd metadata: a leaf without a gradient.
    auto* meta = static_cast<torch::autograd::AutogradMeta*>(t.unsafeGetTensorImpl()->autograd_meta());
    if (meta == nullptr) continue;
    if (meta->grad_fn_) return false;  // `.grad` of a non-leaf warns in torch: the Python path does it
    const at::Tensor& g = meta->grad_;
    if (g.defined() && !take(g, out)) return false;
  }
  return !out.grads.empty();  // nothing to clip: the Python path returns (and warns) as it does
}

// ---- Backend choice ------------------------------------------------------------------------------
// backends.choose(requested, device, dtype, norm_type) for one dtype: the backend index, or -1
// (it raised, or named a backend we do not know: the Python path reproduces the outcome).
int choose(State& st, int requested, const at::Device& device, at::ScalarType dtype, PClass pclass) {
  const char* interpret_env = std::getenv("TRITON_INTERPRET");
  const bool interpret = interpret_env != nullptr && std::strcmp(interpret_env, "1") == 0;
  const ChoiceKey key{static_cast<int8_t>(requested),
                      static_cast<int8_t>(device.type()),
                      static_cast<int8_t>(device.index()),
                      static_cast<int8_t>(dtype),
                      static_cast<int8_t>(pclass),
                      static_cast<int8_t>(interpret)};
  PyObject* choose_fn = PyDict_GetItem(st.backends_dict, st.choose_key);  // borrowed
  if (choose_fn == nullptr) return -1;
  if (choose_fn != st.choose_seen) {  // backends.choose replaced (tests): forget what it said
    st.choices.clear();
    st.choose_seen = choose_fn;
  }
  for (const auto& [k, index] : st.choices) {
    if (k == key) return index;
  }
  py::object norm_type = py::none();
  if (pclass != kNoNorm) {
    norm_type = py::float_(pclass == kP1 ? 1.0 : pclass == kP2 ? 2.0 : std::numeric_limits<double>::infinity());
  }
  py::object py_device = py::reinterpret_steal<py::object>(THPDevice_New(device));
  py::handle py_dtype(reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype)));
  py::str py_requested(st.names[requested]);
  PyObject* result =
      PyObject_CallFunctionObjArgs(choose_fn, py_requested.ptr(), py_device.ptr(), py_dtype.ptr(), norm_type.ptr(), nullptr);
  if (result == nullptr) {
    PyErr_Clear();  // BackendUnavailableError and the like: raised again by the Python routing
    return -1;
  }
  int index = -1;
  if (PyUnicode_Check(result)) {
    const char* name = PyUnicode_AsUTF8(result);
    if (name == nullptr) PyErr_Clear();
    for (size_t i = 0; name != nullptr && i < st.names.size(); ++i) {
      if (st.names[i] == name && static_cast<int>(i) != st.auto_index) index = static_cast<int>(i);
    }
  }
  Py_DECREF(result);
  if (index >= 0) st.choices.emplace_back(key, static_cast<int8_t>(index));
  return index;
}

// One backend for every dtype present, as routing.plan's single-device case; -1 otherwise.
int choose_for(State& st, int requested, const Gathered& g, PClass pclass) {
  int chosen = -1;
  for (int bit = 0; bit < 3; ++bit) {
    if (!(g.dtypes & (1 << bit))) continue;
    const int b = choose(st, requested, g.device, kBitDtypes[bit], pclass);
    if (b < 0 || (chosen >= 0 && b != chosen)) return -1;
    chosen = b;
  }
  return chosen;
}

// True when some gradient appears twice (routing._no_repeated_kernel_writes): the kernels write
// each gradient once. A reused thread-local set of the TensorImpl pointers.
bool repeats(const std::vector<at::Tensor>& grads) {
  const size_t n = grads.size();
  if (n < 2) return false;
  if (n <= 8) {
    for (size_t i = 1; i < n; ++i)
      for (size_t j = 0; j < i; ++j)
        if (grads[i].unsafeGetTensorImpl() == grads[j].unsafeGetTensorImpl()) return true;
    return false;
  }
  thread_local PointerSet seen;
  seen.clear(n);
  for (const at::Tensor& g : grads) {
    if (!seen.insert(g.unsafeGetTensorImpl())) return true;
  }
  return false;
}

// True when `op` has no kernel of its own above the backend (so below_autograd may skip that level).
bool plain(const c10::OperatorHandle& op) {
  for (auto k : {c10::DispatchKey::Autograd, c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutogradCUDA,
                 c10::DispatchKey::CompositeImplicitAutograd, c10::DispatchKey::ADInplaceOrView}) {
    if (op.hasKernelForDispatchKey(k)) return false;
  }
  return true;
}

template <typename Sig>
const c10::TypedOperatorHandle<Sig>* typed_handle(State& st, int backend, Op op,
                                                  std::optional<c10::TypedOperatorHandle<Sig>>& slot) {
  bool& looked_up = st.ops[backend].looked_up[op];
  if (!looked_up) {
    looked_up = true;
    const std::string name = "gradclip::" + st.names[backend] + "_" + kOpNames[op];
    auto found = c10::Dispatcher::singleton().findSchema({name, ""});
    if (found.has_value()) {
      slot.emplace(found->typed<Sig>());
      st.ops[backend].plain[op] = plain(*found);
    }
  }
  return slot.has_value() ? &*slot : nullptr;
}

// Is `op` of `backend` registered? (Every family in gradclip.backends.CHOICES has its schemas.)
bool has_op(State& st, int backend, Op op) {
  BackendOps& ops = st.ops[backend];
  switch (op) {
    case kTotalNorm:
      return typed_handle(st, backend, op, ops.total_norm) != nullptr;
    case kClipGradNorm:
      return typed_handle(st, backend, op, ops.clip_grad_norm) != nullptr;
    case kClipGradsWithNorm:
      return typed_handle(st, backend, op, ops.clip_grads_with_norm) != nullptr;
    case kClipGradValue:
      return typed_handle(st, backend, op, ops.clip_grad_value) != nullptr;
    case kPerParamNorms:
      return typed_handle(st, backend, op, ops.per_param_norms) != nullptr;
    default:
      return false;
  }
}

// ---- One call -------------------------------------------------------------------------------------
// Thread-local scratch, reused so the hot path allocates nothing once warm; a nested call (a
// dispatch mode calling back into gradclip from inside an op) gets its own.
class ScratchLease {
 public:
  ScratchLease() {
    thread_local Gathered scratch;
    thread_local bool busy = false;
    if (!busy) {
      gathered_ = &scratch;
      busy_ = &busy;
      busy = true;
    } else {
      own_ = std::make_unique<Gathered>();
      gathered_ = own_.get();
    }
    gathered_->grads.clear();
    gathered_->walked.clear();
    gathered_->dtypes = 0;
    gathered_->keys = c10::DispatchKeySet();
  }
  ~ScratchLease() {
    gathered_->grads.clear();  // drop our references to the gradients now
    if (busy_ != nullptr) *busy_ = false;
  }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  Gathered& gathered() { return *gathered_; }

 private:
  Gathered* gathered_ = nullptr;
  bool* busy_ = nullptr;
  std::unique_ptr<Gathered> own_;
};

// Gathers and plans one call; -1: not served, else the backend index.
int plan(State& st, PyObject* parameters, bool of_params, PyObject* backend, PClass pclass, Op op, Items& items,
         Gathered& g) {
  const int requested = requested_index(st, backend);
  if (requested < 0) return -1;
  if (at::impl::torch_function_mode_enabled()) return -1;  // a mode sees the Python call instead
  if (!items_of(parameters, items, g.walked)) throw py::error_already_set();
  if (!gather(items, of_params, g)) return -1;
  const int chosen = choose_for(st, requested, g, pclass);
  if (chosen < 0) return -1;
  if (!st.reference[chosen] && repeats(g.grads)) return -1;
  if (!has_op(st, chosen, op)) return -1;
  if (items.walked != nullptr) finish_walked_generator(items.walked);  // drawn, as list() leaves it
  return chosen;
}

py::object unserved(State& st, PyObject* parameters, const Items& items) {
  ++st.unserved;
  py::object handback = items.drawn ? items.drawn : py::reinterpret_borrow<py::object>(parameters);
  return py::make_tuple(handback);
}

// The key set to redispatch the op with, straight to its backend kernel, when the only dispatch
// keys above the backend are autograd's: under no_grad the autograd fallback of a custom op only
// redispatches, after boxing the whole gradient list (a quarter of the op call at 2,000 tensors).
// nullopt (a normal call) while a profiler or observer is recording (it then sees the op), under
// autocast, functionalization, a dispatch mode or any other key, or for an op with its own autograd
// kernel.
std::optional<c10::DispatchKeySet> below_autograd(const Gathered& g, bool plain_op) {
  if (!plain_op || at::getStepCallbacksUnlessEmpty(at::RecordScope::FUNCTION).has_value()) return std::nullopt;
  static const c10::DispatchKeySet skippable =
      c10::autograd_dispatch_keyset_with_ADInplaceOrView |
      c10::DispatchKeySet({c10::DispatchKey::BackendSelect, c10::DispatchKey::CPU, c10::DispatchKey::CUDA});
  const c10::impl::LocalDispatchKeySet local = c10::impl::tls_local_dispatch_key_set();
  const c10::DispatchKeySet full = (g.keys | local.included_) - local.excluded_;
  if ((full - skippable).highestFunctionalityKey() != c10::DispatchKey::Undefined) return std::nullopt;
  return c10::DispatchKeySet(g.device.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
}

// Runs the op with grad mode off (the Python path runs under torch.no_grad()), without the GIL
// for the C++ kernels. `fn(keys)` calls the op, redispatching with `keys` when they are set.
template <typename Fn>
auto run(State& st, int backend, Op op, const Gathered& g, Fn&& fn) {
  ++st.served;
  at::NoGradGuard no_grad;
  const std::optional<c10::DispatchKeySet> keys = below_autograd(g, st.ops[backend].plain[op]);
  if (st.native[backend]) {
    py::gil_scoped_release release;
    return fn(keys);
  }
  return fn(keys);
}

py::object wrap(at::Tensor t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t))); }

// The functions gradclip/clip.py calls. Each returns the result (a Tensor, or None), or a 1-tuple
// holding what the Python routing must continue on.
// get_total_norm and per_param_norms: the op in `slot` on the gathered tensors, `pick` of its result.
template <typename Sig, typename Pick>
py::object norm_of_tensors(py::handle tensors, py::handle norm_type, py::handle backend, Op op,
                           std::optional<c10::TypedOperatorHandle<Sig>> BackendOps::*slot, Pick pick) {
  State& st = state();
  ScratchLease lease;
  Items items;
  double p = 0;
  PClass pclass = kNoNorm;
  if (!norm_class(norm_type.ptr(), &p, &pclass)) return unserved(st, tensors.ptr(), items);
  const int b = plan(st, tensors.ptr(), false, backend.ptr(), pclass, op, items, lease.gathered());
  if (b < 0) return unserved(st, tensors.ptr(), items);
  const auto& handle = *(st.ops[b].*slot);
  const at::TensorList grads = lease.gathered().grads;
  return wrap(pick(run(st, b, op, lease.gathered(), [&](auto keys) {
    return keys ? handle.redispatch(*keys, grads, p) : handle.call(grads, p);
  })));
}

py::object get_total_norm(py::handle tensors, py::handle norm_type, py::handle backend) {
  HANDLE_TH_ERRORS
  return norm_of_tensors(tensors, norm_type, backend, kTotalNorm, &BackendOps::total_norm,
                         [](at::Tensor total) { return total; });
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object per_param_norms(py::handle tensors, py::handle norm_type, py::handle backend) {
  HANDLE_TH_ERRORS
  return norm_of_tensors(tensors, norm_type, backend, kPerParamNorms, &BackendOps::per_param_norms,
                         [](std::tuple<at::Tensor, at::Tensor> out) { return std::get<1>(std::move(out)); });
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object clip_grad_norm(py::handle parameters, py::handle max_norm, py::handle norm_type, py::handle backend) {
  HANDLE_TH_ERRORS
  State& st = state();
  ScratchLease lease;
  Items items;
  double bound_value = 0, p = 0;
  PClass pclass = kNoNorm;
  if (!bound(max_norm.ptr(), &bound_value) || !norm_class(norm_type.ptr(), &p, &pclass))
    return unserved(st, parameters.ptr(), items);
  const int b = plan(st, parameters.ptr(), true, backend.ptr(), pclass, kClipGradNorm, items, lease.gathered());
  if (b < 0) return unserved(st, parameters.ptr(), items);
  const auto& op = *st.ops[b].clip_grad_norm;
  const at::TensorList grads = lease.gathered().grads;
  return wrap(run(st, b, kClipGradNorm, lease.gathered(), [&](auto keys) {
    return keys ? op.redispatch(*keys, grads, bound_value, p) : op.call(grads, bound_value, p);
  }));
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object clip_grads_with_norm(py::handle parameters, py::handle max_norm, py::handle total_norm,
                                py::handle backend) {
  HANDLE_TH_ERRORS
  State& st = state();
  ScratchLease lease;
  Items items;
  double bound_value = 0;
  PyObject* norm_obj = total_norm.ptr();
  // The norm must be a plain tensor too (a DTensor norm goes through the Python routing).
  if (!bound(max_norm.ptr(), &bound_value) || !THPVariable_CheckExact(norm_obj) ||
      THPVariable_Unpack(norm_obj).key_set().has_any(kUnservedKeys))
    return unserved(st, parameters.ptr(), items);
  const int b = plan(st, parameters.ptr(), true, backend.ptr(), kNoNorm, kClipGradsWithNorm, items, lease.gathered());
  if (b < 0) return unserved(st, parameters.ptr(), items);
  const auto& op = *st.ops[b].clip_grads_with_norm;
  const at::TensorList grads = lease.gathered().grads;
  const at::Tensor& norm = THPVariable_Unpack(norm_obj);
  const at::Device device = lease.gathered().device;
  run(st, b, kClipGradsWithNorm, lease.gathered(), [&](auto keys) {
    // total_norm.to(device) as clip.py does: the same tensor when it is already there.
    const at::Tensor moved = norm.to(norm.options().device(device), false, false, std::nullopt);
    if (keys && moved.key_set().has_any(kUnservedKeys)) keys = std::nullopt;
    if (keys) op.redispatch(*keys, grads, bound_value, moved);
    else op.call(grads, bound_value, moved);
  });
  return py::none();
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object clip_grad_value(py::handle parameters, py::handle clip_value, py::handle backend) {
  HANDLE_TH_ERRORS
  State& st = state();
  ScratchLease lease;
  Items items;
  double bound_value = 0;
  if (!bound(clip_value.ptr(), &bound_value)) return unserved(st, parameters.ptr(), items);
  const int b = plan(st, parameters.ptr(), true, backend.ptr(), kNoNorm, kClipGradValue, items, lease.gathered());
  if (b < 0) return unserved(st, parameters.ptr(), items);
  const auto& op = *st.ops[b].clip_grad_value;
  const at::TensorList grads = lease.gathered().grads;
  run(st, b, kClipGradValue, lease.gathered(), [&](auto keys) {
    if (keys) op.redispatch(*keys, grads, bound_value);
    else op.call(grads, bound_value);
  });
  return py::none();
  END_HANDLE_TH_ERRORS_PYBIND
}

// Test and benchmark hook: everything a call does before the op (gather, validate, choose), and the
// backend it would call, or None where the Python routing would serve.
py::object plan_only(const std::string& function, py::handle parameters, double norm_type, py::handle backend) {
  HANDLE_TH_ERRORS
  State& st = state();
  ScratchLease lease;
  Items items;
  PClass pclass = kNoNorm;
  Op op = kClipGradValue;
  bool of_params = true;
  if (function == "get_total_norm" || function == "clip_grad_norm_" || function == "per_param_norms") {
    double p = 0;
    py::float_ py_p(norm_type);
    if (!norm_class(py_p.ptr(), &p, &pclass)) return py::none();
    op = function == "get_total_norm" ? kTotalNorm : function == "per_param_norms" ? kPerParamNorms : kClipGradNorm;
    of_params = function == "clip_grad_norm_";
  } else if (function == "clip_grads_with_norm_") {
    op = kClipGradsWithNorm;
  } else {
    TORCH_CHECK_VALUE(function == "clip_grad_value_", "plan_only: unknown function ", function);
  }
  const int b = plan(st, parameters.ptr(), of_params, backend.ptr(), pclass, op, items, lease.gathered());
  if (b < 0) return py::none();
  return py::str(st.names[b]);
  END_HANDLE_TH_ERRORS_PYBIND
}

// The Triton backend's table-cache key in one pass (gradclip/triton_backend.py `_table` builds it
// in Python, ~0.6 us a tensor): (dense, total numel, key), where dense is True when every tensor's
// elements are exactly the numel consecutive elements from its data_ptr (triton_backend._is_dense),
// and key packs (data_ptr, numel, dtype) of every tensor, so equal keys mean equal tables.
bool dense_from_data_ptr(const at::Tensor& g) {
  if (g.is_contiguous()) return true;
  thread_local std::vector<std::pair<int64_t, int64_t>> dims;
  dims.clear();
  const auto sizes = g.sizes();
  const auto strides = g.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] != 1) dims.emplace_back(strides[d], sizes[d]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

py::tuple tensor_table_key(py::handle tensors) {
  PyObject* seq = tensors.ptr();
  TORCH_CHECK_TYPE(PyList_CheckExact(seq) || PyTuple_CheckExact(seq), "tensor_table_key: expected a list or tuple of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject* const* items = PySequence_Fast_ITEMS(seq);
  struct Entry {
    uint64_t ptr;
    int64_t numel;
    int64_t dtype;
  };
  static_assert(sizeof(Entry) == 24, "packed key entries");
  py::bytes key(nullptr, static_cast<size_t>(n) * sizeof(Entry));
  auto* out = reinterpret_cast<Entry*>(PyBytes_AS_STRING(key.ptr()));
  bool dense = true;
  int64_t total = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    TORCH_CHECK_TYPE(THPVariable_Check(items[i]), "tensor_table_key: item ", i, " is not a tensor");
    const at::Tensor& g = THPVariable_Unpack(items[i]);
    const int64_t numel = g.numel();
    out[i] = Entry{reinterpret_cast<uint64_t>(g.data_ptr()), numel, static_cast<int64_t>(g.scalar_type())};
    total += numel;
    dense = dense && dense_from_data_ptr(g);
  }
  return py::make_tuple(dense, total, key);
}

// Test hook: the items csrc/module_walk.cpp reads for `generator` (a list, the generator left
// unstarted), or None where it would run the generator instead.
py::object walked_items(py::handle generator) {
  std::vector<PyObject*> walked;
  if (!walk_module_parameters(generator.ptr(), walked)) return py::none();
  py::list out;
  for (PyObject* item : walked) out.append(py::handle(item));
  return std::move(out);
}

py::tuple counts() {
  State& st = state();
  return py::make_tuple(st.served, st.unserved);
}

void reset() {
  State& st = state();
  st.choices.clear();
  st.choose_seen = nullptr;
  st.served = st.unserved = 0;
}

}  // namespace

void bind_fast_path(py::module_& m) {
  m.def("fast_get_total_norm", &get_total_norm, py::arg("tensors"), py::arg("norm_type"), py::arg("backend"),
        "gradclip.get_total_norm's common case in one call; a 1-tuple (what to route in Python) otherwise");
  m.def("fast_per_param_norms", &per_param_norms, py::arg("tensors"), py::arg("norm_type"), py::arg("backend"),
        "gradclip.per_param_norms's common case in one call; a 1-tuple (what to route in Python) otherwise");
  m.def("fast_clip_grad_norm_", &clip_grad_norm, py::arg("parameters"), py::arg("max_norm"), py::arg("norm_type"),
        py::arg("backend"), "gradclip.clip_grad_norm_'s common case in one call; a 1-tuple otherwise");
  m.def("fast_clip_grads_with_norm_", &clip_grads_with_norm, py::arg("parameters"), py::arg("max_norm"),
        py::arg("total_norm"), py::arg("backend"),
        "gradclip.clip_grads_with_norm_'s common case in one call: None, or a 1-tuple otherwise");
  m.def("fast_clip_grad_value_", &clip_grad_value, py::arg("parameters"), py::arg("clip_value"), py::arg("backend"),
        "gradclip.clip_grad_value_'s common case in one call: None, or a 1-tuple otherwise");
  m.def("fast_path_plan", &plan_only, py::arg("function"), py::arg("parameters"), py::arg("norm_type"),
        py::arg("backend"), "The backend the fast path would call for this input, or None (tests, benchmarks)");
  m.def("tensor_table_key", &tensor_table_key, py::arg("tensors"),
        "(dense, total numel, key bytes of (data_ptr, numel, dtype) per tensor): the Triton table-cache key");
  m.def("module_parameters_walk", &walked_items, py::arg("generator"),
        "The items read from the module tree of an unstarted module.parameters() generator, or None (tests)");
  m.def("fast_path_counts", &counts, "(calls served, calls handed back to the Python routing)");
  m.def("fast_path_reset", &reset, "Forget cached backend choices and zero the counts (tests)");
}

}  // namespace gradclip
