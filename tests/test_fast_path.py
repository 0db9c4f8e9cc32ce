"""The native host fast path (gradclip.fast_path, csrc/fast_path.cpp) against the Python routing.

Every case runs twice on identical inputs, once with the fast path and once without it, and must
give bitwise the same norm, the same gradient bits, the same exception (type and message) and the
same warnings. Separate tests show the fast path really serves the common case (so it cannot
silently fall back) and really declines every case it must leave to the Python routing.
"""

from __future__ import annotations

import math
import warnings

import conftest
import pytest
import torch
from conftest import clone_params

import gradclip
from gradclip import fast_path, routing

pytestmark = pytest.mark.skipif(
    fast_path.native() is None, reason="gradclip._C (the native fast path) is not built"
)

SERVED_DTYPES = {
    "fp32": [torch.float32],
    "fp16": [torch.float16],
    "bf16": [torch.bfloat16],
    "mixed": [torch.float32, torch.bfloat16, torch.float16],
}
SERVED_P = [1.0, 2.0, math.inf]
FUNCTIONS = (
    "clip_grad_norm_",
    "get_total_norm",
    "clip_grads_with_norm_",
    "clip_grad_value_",
    "per_param_norms",
)
NORM_FUNCTIONS = ("clip_grad_norm_", "get_total_norm", "per_param_norms")
TENSOR_FUNCTIONS = ("get_total_norm", "per_param_norms")  # take tensors, not parameters


def make_params(shapes, dtypes, seed=0, scale=3.0, none_every=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        if not (none_every and i % none_every == 0):
            p.grad = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
        params.append(p)
    return params


def bits(t):
    """The bits of `t` (its values for sparse and meta tensors), or None."""
    if t is None:
        return None
    if t.is_sparse:
        t = t.to_dense()
    if t.is_meta:
        return ("meta", t.dtype, tuple(t.shape))
    return t.detach().resolve_neg().reshape(-1).view(torch.uint8).clone()


def same_bits(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def call(function, params, max_norm=1.0, norm_type=2.0, total=None, **kw):
    """One public call on `params` (a list of parameters; how they are passed is kw['form'])."""
    form = kw.pop("form", "list")
    wrap = {
        "list": lambda ps: ps,
        "tuple": tuple,
        "generator": lambda ps: (p for p in ps),
        "single": lambda ps: ps[0],
        "dict-values": lambda ps: {i: p for i, p in enumerate(ps)}.values(),
    }[form]
    if function == "clip_grad_norm_":
        return gradclip.clip_grad_norm_(wrap(params), max_norm, norm_type, **kw)
    if function == "get_total_norm":
        return gradclip.get_total_norm(wrap([p.grad for p in params]), norm_type, **kw)
    if function == "per_param_norms":
        return gradclip.per_param_norms(wrap([p.grad for p in params]), norm_type, **kw)
    if function == "clip_grads_with_norm_":
        norm = torch.tensor(7.5) if total is None else total
        return gradclip.clip_grads_with_norm_(wrap(params), max_norm, norm, **kw)
    return gradclip.clip_grad_value_(wrap(params), max_norm, **kw)


def outcome(fast: bool, function, params, *args, **kw):
    """(result bits, gradient bits, (exception type, message), warnings) of one call."""
    previous = fast_path.set_enabled(fast)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result, error = call(function, params, *args, **kw), None
            except Exception as exc:  # noqa: BLE001 (the exception is what is compared)
                result, error = None, (type(exc), str(exc))
    finally:
        fast_path.set_enabled(previous)
    grads = [bits(p.grad) for p in params]
    result_bits = (result.dtype, result.device, bits(result)) if isinstance(result, torch.Tensor) else result
    return result_bits, grads, error, [(w.category, str(w.message), w.filename) for w in caught]


def assert_same(function, params, *args, **kw):
    """Both paths on identical inputs: identical outcome. Returns the fast path's outcome.
    `params` is a list (cloned for each path) or a function making a fresh list each time (for
    inputs a clone would not keep: a gradient listed twice, a negative view)."""
    make = params if callable(params) else (lambda: clone_params(params))
    fast = outcome(True, function, make(), *args, **kw)
    slow = outcome(False, function, make(), *args, **kw)
    assert fast[2] == slow[2], "different exceptions"
    assert fast[3] == slow[3], "different warnings"
    if isinstance(fast[0], tuple):
        assert fast[0][:2] == slow[0][:2]
        assert same_bits(fast[0][2], slow[0][2]), "different norm bits"
    else:
        assert fast[0] == slow[0]
    for a, b in zip(fast[1], slow[1], strict=True):
        assert same_bits(a, b), "different gradient bits"
    return fast


def served(fn) -> bool:
    """True when `fn()` was served by the fast path (one served call, nothing handed back)."""
    before = fast_path.counts()
    fn()
    after = fast_path.counts()
    return (after[0] - before[0], after[1] - before[1]) == (1, 0)


# --- the adversarial grid: identical results, and the fast path serves it ----------------------


@pytest.mark.parametrize("shapes", list(conftest.SHAPE_GRID.values()), ids=list(conftest.SHAPE_GRID))
@pytest.mark.parametrize("dtypes", list(SERVED_DTYPES.values()), ids=list(SERVED_DTYPES))
@pytest.mark.parametrize("function", FUNCTIONS)
def test_grid_identical_and_served(function, dtypes, shapes):
    params = make_params(shapes, dtypes)
    for p in SERVED_P if function in NORM_FUNCTIONS else [2.0]:
        # Clipping and not (1e30 would not fit fp16 as a clamp value: torch raises for it too).
        for bound in (1e-2, 1e4 if function == "clip_grad_value_" else 1e30):
            assert_same(function, params, bound, p)
            assert served(lambda: call(function, clone_params(params), bound, p))  # noqa: B023


@pytest.mark.parametrize("form", ["list", "tuple", "generator", "single", "dict-values"])
@pytest.mark.parametrize("function", FUNCTIONS)
def test_input_forms(function, form):
    params = make_params([(5,), (3, 2), (7,)], [torch.float32])
    assert_same(function, params, 0.5, form=form)
    assert served(lambda: call(function, clone_params(params), 0.5, form=form))


@pytest.mark.parametrize("function", FUNCTIONS)
def test_none_grads_are_skipped(function):
    if function in TENSOR_FUNCTIONS:
        pytest.skip("takes tensors, not parameters")
    params = make_params([(4,)] * 7, [torch.float32, torch.bfloat16], none_every=3)
    assert_same(function, params, 0.3)
    assert served(lambda: call(function, clone_params(params), 0.3))


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("form", ["list", "generator"])
def test_nothing_to_clip_goes_to_python(function, form):
    """Empty inputs, and parameters without gradients: the Python routing returns (and warns for
    an empty generator, from gradclip.routing, at the same place)."""
    empty = assert_same(function, [], 1.0, form=form)
    if form == "generator":
        assert [w[1] for w in empty[3]] == [
            f"`{'tensors' if function in TENSOR_FUNCTIONS else 'parameters'}` is an empty generator, "
            "no gradient clipping will occur."
        ]
    if function not in TENSOR_FUNCTIONS:
        assert_same(function, make_params([(3,), (2,)], [torch.float32], none_every=1), 1.0, form=form)


def test_env_and_backend_argument(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    params = make_params([(6,), (9,)], [torch.float32])
    for backend in ("auto", "cpu", "reference", "cuda", "triton", "bogus"):
        for function in FUNCTIONS:
            assert_same(function, params, 0.5, backend=backend)
    assert fast_path.plan("clip_grad_norm_", params, 2.0, "cpu") == "cpu"
    assert fast_path.plan("clip_grad_norm_", params, 2.0, "reference") == "reference"
    assert fast_path.plan("clip_grad_norm_", params, 2.0, "cuda") is None  # raises in Python
    monkeypatch.setenv("GRADCLIP_BACKEND", "reference")
    assert fast_path.plan("clip_grad_norm_", params) == "reference"
    assert_same("clip_grad_norm_", params, 0.5)
    monkeypatch.setenv("GRADCLIP_BACKEND", "cuda")
    assert fast_path.plan("clip_grad_norm_", params) is None
    assert_same("clip_grad_norm_", params, 0.5)  # BackendUnavailableError, from Python
    monkeypatch.setenv("GRADCLIP_BACKEND", "bogus")
    assert_same("clip_grad_norm_", params, 0.5)  # ValueError, from Python
    monkeypatch.setenv("GRADCLIP_BACKEND", "")
    assert fast_path.plan("clip_grad_norm_", params) == "cpu"


# --- what the fast path must hand back, with identical outcomes ---------------------------------


class Subclass(torch.Tensor):
    pass


def _fallback_cases():
    def grads_as(fn):
        def make():
            params = make_params([(4,), (3,)], [torch.float32])
            for p in params:
                p.grad = fn(p.grad)
            return params

        return make

    base = lambda: make_params([(4,), (3,)], [torch.float32])  # noqa: E731
    return {
        "fp64": (lambda: make_params([(4,), (3,)], [torch.float64]), {}),
        "complex": (lambda: make_params([(4,)], [torch.complex64]), {}),
        "fp32-and-fp64": (lambda: make_params([(4,), (3,)], [torch.float32, torch.float64]), {}),
        "p=3": (base, {"norm_type": 3.0}),
        "p=0.5": (base, {"norm_type": 0.5}),
        "p=0": (base, {"norm_type": 0.0}),
        "p=-inf": (base, {"norm_type": -math.inf}),
        "p=nan": (base, {"norm_type": math.nan}),
        "max_norm=nan": (base, {"max_norm": math.nan}),
        "max_norm<0": (base, {"max_norm": -1.0}),
        "max_norm-str": (base, {"max_norm": "1.0"}),
        "max_norm-tensor": (base, {"max_norm": torch.tensor(0.5)}),
        "grad-subclass": (grads_as(lambda g: g.as_subclass(Subclass)), {}),
        "sparse": (grads_as(lambda g: g.to_sparse()), {}),
        "second-device": (
            lambda: (
                make_params([(4,)], [torch.float32])
                + [torch.nn.Parameter(torch.zeros(3, device="meta")).requires_grad_()]
            ),
            {},
        ),
        "neg-view": (grads_as(lambda g: torch._neg_view(g)), {}),
        "listed-twice": (lambda: (lambda ps: ps + ps[:1])(base()), {}),
        "error_if_nonfinite": (base, {"error_if_nonfinite": True}),
        "error_if_nonfinite-nan": (
            grads_as(lambda g: g.fill_(math.nan)),
            {"error_if_nonfinite": True},
        ),
    }


FALLBACKS = _fallback_cases()


@pytest.mark.parametrize("case", list(FALLBACKS))
@pytest.mark.parametrize("function", FUNCTIONS)
def test_fallbacks_identical(function, case):
    make, kw = FALLBACKS[case]
    kw = dict(kw)
    if "error_if_nonfinite" in kw and function not in ("clip_grad_norm_", "get_total_norm"):
        pytest.skip("no error_if_nonfinite argument")
    if "norm_type" in kw and function not in NORM_FUNCTIONS:
        pytest.skip("no norm_type argument")
    if "max_norm" in kw and function in TENSOR_FUNCTIONS:
        pytest.skip("no max_norm argument")
    max_norm = kw.pop("max_norm", 0.5)
    if case == "second-device":
        base = make

        def make():
            params = base()
            params[-1].grad = torch.ones(3, device="meta")
            return params

    for form in ("list", "generator"):
        assert_same(function, make, max_norm, form=form, **kw)
        before = fast_path.counts()[0]
        outcome(True, function, make(), max_norm, form=form, **kw)
        assert fast_path.counts()[0] == before, "the fast path served a case it must hand back"


@pytest.mark.parametrize("function", ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_"])
def test_non_leaf_parameter_goes_to_python(function):
    leaf = torch.nn.Parameter(torch.randn(4))
    non_leaf = leaf * 2
    non_leaf.retain_grad()
    (non_leaf.sum() * 3).backward()
    plain = make_params([(3,)], [torch.float32])
    assert fast_path.plan(function, [plain[0], non_leaf], 2.0) is None
    assert fast_path.plan(function, plain, 2.0) == "cpu"


def test_duck_typed_parameters_and_bad_iterables():
    class Duck:
        grad = torch.ones(3)

    assert_same("clip_grad_norm_", [], 1.0)
    params = make_params([(3,)], [torch.float32])
    assert fast_path.plan("clip_grad_norm_", [params[0], Duck()]) is None
    for bad, error in (
        (3, TypeError),
        (None, TypeError),
        ("abc", AttributeError),
        ([Duck(), 1], AttributeError),
    ):
        with pytest.raises(error) as fast:
            gradclip.clip_grad_norm_(bad, 1.0)
        fast_path.set_enabled(False)
        try:
            with pytest.raises(error) as slow:
                gradclip.clip_grad_norm_(bad, 1.0)
        finally:
            fast_path.set_enabled(True)
        assert str(fast.value) == str(slow.value)


def test_an_iterator_that_raises_propagates():
    params = make_params([(3,), (4,)], [torch.float32])

    def broken():
        yield params[0]
        raise KeyError("boom")

    for enabled in (True, False):
        fast_path.set_enabled(enabled)
        try:
            with pytest.raises(KeyError, match="boom"):
                gradclip.clip_grad_norm_(broken(), 1.0)
        finally:
            fast_path.set_enabled(True)


def test_a_consumed_generator_is_handed_back_whole():
    """fp64 gradients are declined after the generator was drawn: Python must see every item."""
    params = make_params([(3,), (4,), (5,)], [torch.float64])
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    before = fast_path.counts()[1]
    total = gradclip.clip_grad_norm_((p for p in params), 1e30)
    assert fast_path.counts()[1] == before + 1
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)


def test_torch_function_mode_sees_the_python_call():
    class Recorder(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    params = make_params([(4,)], [torch.float32])
    with Recorder() as mode:
        assert fast_path.plan("clip_grad_norm_", params) is None
        gradclip.clip_grad_norm_(params, 0.1)
    assert mode.names, "the mode saw nothing: the fast path served under a torch function mode"


def test_requires_grad_gradients_are_not_recorded():
    params = make_params([(4,), (5,)], [torch.float32])
    for p in params:
        p.grad.requires_grad_(True)
    assert_same("clip_grad_norm_", params, 0.1)
    total = gradclip.clip_grad_norm_(params, 0.1)
    assert total.grad_fn is None and all(p.grad.grad_fn is None for p in params)


def test_dispatch_mode_and_profiler_see_the_op():
    """Redispatching below autograd must not hide the op from a dispatch mode or the profiler."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    params = make_params([(4,), (5,)], [torch.float32])
    with Ops() as mode:
        gradclip.clip_grad_norm_(params, 0.1)
    assert "gradclip.cpu_clip_grad_norm_.default" in mode.ops
    with torch.profiler.profile() as prof:
        gradclip.clip_grad_norm_(params, 0.1)
    assert "gradclip::cpu_clip_grad_norm_" in [e.name for e in prof.events()]


# --- it really serves, and only outside torch.compile -----------------------------------------------


def test_the_common_case_never_touches_the_python_routing(monkeypatch):
    """With every routing function broken, the common call of each function still works."""

    def broken(*args, **kwargs):
        raise AssertionError("the Python routing ran: the fast path did not serve")

    params = make_params([(64,), (3, 5), (1,)], [torch.float32, torch.bfloat16])
    expected = torch.nn.utils.get_total_norm([p.grad.float() for p in params])
    for name in (
        "as_list",
        "grads_of",
        "check_grads",
        "plan",
        "total_norm",
        "check_bound",
        "check_norm_type",
    ):
        monkeypatch.setattr(routing, name, broken)
    torch.testing.assert_close(gradclip.get_total_norm([p.grad for p in params]), expected, rtol=2e-6, atol=0)
    torch.testing.assert_close(gradclip.clip_grad_norm_(iter(params), 1e30), expected, rtol=2e-6, atol=0)
    per_param = gradclip.per_param_norms(tuple(p.grad for p in params))
    torch.testing.assert_close(per_param[0], params[0].grad.norm(), rtol=2e-6, atol=0)
    gradclip.clip_grads_with_norm_(params, 1.0, torch.tensor(2.0))
    gradclip.clip_grad_value_(params, 0.25)
    assert all(float(p.grad.abs().max()) <= 0.25 for p in params)
    monkeypatch.undo()
    # The check above can fail: a case the fast path declines reaches the broken routing.
    monkeypatch.setattr(routing, "grads_of", broken)
    with pytest.raises(AssertionError, match="Python routing ran"):
        gradclip.clip_grad_norm_(make_params([(3,)], [torch.float64]), 1.0)


def test_fast_path_switch_and_counts():
    params = make_params([(3,)], [torch.float32])
    fast_path.set_enabled(False)
    try:
        assert fast_path.native() is None
        assert not served(lambda: gradclip.clip_grad_norm_(params, 1.0))
    finally:
        fast_path.set_enabled(True)
    assert served(lambda: gradclip.clip_grad_norm_(params, 1.0))


def test_backend_choice_follows_a_replaced_choose(monkeypatch):
    """The C++ cache of backends.choose results is dropped when backends.choose is replaced."""
    from gradclip import backends

    params = make_params([(3,)], [torch.float32])
    assert fast_path.plan("clip_grad_norm_", params) == "cpu"
    monkeypatch.setattr(backends, "choose", lambda requested, device, dtype, norm_type: "reference")
    assert fast_path.plan("clip_grad_norm_", params) == "reference"
    monkeypatch.undo()
    assert fast_path.plan("clip_grad_norm_", params) == "cpu"


def test_under_compile_the_python_path_is_traced():
    params = make_params([(8,), (3,)], [torch.float32])
    theirs = clone_params(params)

    @torch.compile(fullgraph=True, backend="eager")
    def step(ps):
        return gradclip.clip_grad_norm_(ps, 0.5)

    before = fast_path.counts()
    total = step(params)
    assert fast_path.counts() == before, "the fast path ran inside a compiled region"
    expected = gradclip.clip_grad_norm_(theirs, 0.5)
    assert torch.equal(total, expected)
    for a, b in zip(params, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_comparison_can_fail():
    """A deliberately different outcome is caught by assert_same."""
    params = make_params([(4,)], [torch.float32])
    fast = outcome(True, "clip_grad_norm_", clone_params(params), 0.1)
    slow = outcome(True, "clip_grad_norm_", clone_params(params), 0.2)
    assert not torch.equal(fast[1][0], slow[1][0])


def test_tensor_table_key_matches_the_python_key():
    """_C.tensor_table_key (for the Triton table cache) against the key triton_backend builds in Python."""
    import struct

    triton_backend = pytest.importorskip("gradclip.triton_backend")  # its Python density check

    native = fast_path.native()
    base = torch.randn(6, 8)
    cases = [
        torch.randn(5),
        base.t(),  # dense, not contiguous
        base[:, :4],  # not dense
        torch.randn(3, 1, 4).expand(3, 1, 4),
        torch.randn(0),
        torch.randn(4, dtype=torch.bfloat16),
        torch.tensor(2.0, dtype=torch.float16),
        base[::2],
    ]

    for k in range(len(cases)):
        tensors = cases[: k + 1]
        dense, total, key = native.tensor_table_key(tensors)
        assert dense == all(g.is_contiguous() or triton_backend._is_dense(g) for g in tensors)
        assert total == sum(g.numel() for g in tensors)
        entries = [struct.unpack_from("<Qqq", key, 24 * i) for i in range(len(tensors))]
        assert [e[0] for e in entries] == [g.data_ptr() for g in tensors]
        assert [e[1] for e in entries] == [g.numel() for g in tensors]
        assert len({e[2] for e in entries}) == len({g.dtype for g in tensors})
    a, b = torch.randn(4), torch.randn(4)
    assert native.tensor_table_key([a, b])[2] == native.tensor_table_key((a, b))[2]
    assert native.tensor_table_key([a, b])[2] != native.tensor_table_key([b, a])[2]
    assert native.tensor_table_key([a])[2] != native.tensor_table_key([a.to(torch.float16)])[2]
    with pytest.raises(TypeError, match="not a tensor"):
        native.tensor_table_key([a, 3])


# --- module.parameters(): the module tree read in C++ (csrc/module_walk.cpp) ---------------------


def _walk():
    return fast_path._load().module_parameters_walk


def tricky_tree():
    """Shared submodules and parameters, None children and parameters, a tied parameter
    registered twice, a module reachable along two paths, and a parameter without a gradient."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 3)
    inner = torch.nn.Sequential(shared, torch.nn.Linear(3, 2))
    root = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), shared, inner)
    root.add_module("empty_slot", None)
    root.extra = torch.nn.Linear(2, 2)
    root.extra.bias = None
    root.register_parameter("tied", root[0].weight)
    root.register_parameter("absent", None)
    root.frozen = torch.nn.Parameter(torch.ones(5), requires_grad=False)
    root.again = inner
    for p in root.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    return root


@pytest.mark.parametrize("recurse", [True, False])
def test_walk_gives_what_the_generator_gives(recurse):
    module = tricky_tree()
    expected = list(module.parameters(recurse=recurse))
    walked = _walk()(module.parameters(recurse=recurse))
    assert walked is not None, "the walk declined a plain module tree"
    assert [id(p) for p in walked] == [id(p) for p in expected]
    for name in ("extra", "again"):  # submodules too, and a module that is not the root
        sub = getattr(module, name)
        assert [id(p) for p in _walk()(sub.parameters())] == [id(p) for p in sub.parameters()]


def test_walk_leaves_the_generator_unstarted_until_served():
    module = tricky_tree()
    gen = module.parameters()
    assert _walk()(gen) is not None
    assert len(list(gen)) == len(list(module.parameters()))  # the walk drew nothing
    gen = module.parameters()
    total = gradclip.clip_grad_norm_(gen, 1e30)
    assert list(gen) == [], "a served call leaves the generator exhausted, as list() does"
    expected = torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])
    torch.testing.assert_close(total, expected, rtol=2e-6, atol=0)


class NamedOverride(torch.nn.Linear):
    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        yield from reversed(list(super().named_parameters(prefix, recurse, remove_duplicate)))


class ModulesOverride(torch.nn.Sequential):
    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        yield prefix, self  # hides the children


class ParametersOverride(torch.nn.Linear):
    def parameters(self, recurse=True):
        yield self.bias
        yield self.weight


class HashOverride(torch.nn.Linear):
    def __hash__(self):
        return 1

    def __eq__(self, other):
        return isinstance(other, HashOverride)


class GetattributeOverride(torch.nn.Linear):
    def __getattribute__(self, name):
        return super().__getattribute__(name)


class Slotted(torch.nn.Linear):
    _parameters = {}  # a class attribute shadowing the instance's


@pytest.mark.parametrize(
    "make, position",
    [
        (lambda: NamedOverride(3, 2), "root"),
        (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2), ModulesOverride(torch.nn.Linear(2, 2))), "child"),
        (lambda: ParametersOverride(3, 2), "root"),
        (lambda: torch.nn.Sequential(HashOverride(2, 2), HashOverride(2, 2)), "child"),
        (lambda: torch.nn.Sequential(GetattributeOverride(2, 2)), "child"),
    ],
    ids=["named_parameters", "named_modules", "parameters", "hash-eq", "getattribute"],
)
def test_walk_declines_modules_that_iterate_their_own_way(make, position):
    """The generator then runs as before, so the call sees exactly what torch would."""
    module = make()
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    assert _walk()(module.parameters()) is None
    expected = list(module.parameters())
    assert_same("clip_grad_norm_", expected, 1e-2, 2.0)  # the list the generator really gives
    total = gradclip.clip_grad_norm_(module.parameters(), 1e30)
    torch.testing.assert_close(
        total, torch.nn.utils.get_total_norm([p.grad for p in expected]), rtol=2e-6, atol=0
    )


def test_walk_declines_everything_but_an_unstarted_parameters_generator():
    module = tricky_tree()
    started = module.parameters()
    first = next(started)
    assert _walk()(started) is None
    assert [id(p) for p in started] == [id(p) for p in list(module.parameters())[1:]]
    assert first is next(module.parameters())
    finished = module.parameters()
    list(finished)
    assert _walk()(finished) is None
    for other in (
        module.buffers(),
        module.modules(),
        (p for p in module.parameters()),
        [module.extra.weight],
    ):
        assert _walk()(other) is None
    assert _walk()(torch.nn.Module.parameters(object.__new__(Slotted))) is None
    # recurse must be a bool (its truthiness would run Python code).
    assert _walk()(module.parameters(recurse=1)) is None


def test_module_parameters_is_served_without_running_the_generator():
    """The common call on module.parameters() never runs torch's generator chain (seen by a
    sys.setprofile hook), and the hook does see it when the fast path is off."""
    import sys  # noqa: PLC0415

    module = tricky_tree()
    expected = torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])
    # (Python 3.11 enters the parameters() frame itself to close the unstarted generator, raising
    # GeneratorExit before its first line; the functions below it are what running it costs.)
    chain = {"named_parameters", "_named_members", "named_modules"}

    def chain_calls():
        ran = []

        def hook(frame, event, arg):
            if event == "call" and frame.f_code.co_name in chain:
                ran.append(frame.f_code.co_name)

        gen = module.parameters()
        sys.setprofile(hook)
        try:
            total = gradclip.clip_grad_norm_(gen, 1e30)
        finally:
            sys.setprofile(None)
        torch.testing.assert_close(total, expected, rtol=2e-6, atol=0)
        return ran

    before = fast_path.counts()
    assert chain_calls() == []
    assert fast_path.counts()[0] == before[0] + 1
    fast_path.set_enabled(False)
    try:
        assert set(chain_calls()) == chain  # the check can fail
    finally:
        fast_path.set_enabled(True)


def test_empty_module_still_warns_as_the_python_routing_does():
    for function in ("clip_grad_norm_", "clip_grad_value_"):
        module = torch.nn.Sequential(torch.nn.Tanh())
        with warnings.catch_warnings(record=True) as fast_caught:
            warnings.simplefilter("always")
            getattr(gradclip, function)(module.parameters(), 1.0)
        fast_path.set_enabled(False)
        try:
            with warnings.catch_warnings(record=True) as slow_caught:
                warnings.simplefilter("always")
                getattr(gradclip, function)(module.parameters(), 1.0)
        finally:
            fast_path.set_enabled(True)
        assert [str(w.message) for w in fast_caught] == [str(w.message) for w in slow_caught]
        assert fast_caught, "an empty module.parameters() warns"
