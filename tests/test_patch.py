"""patch_torch / unpatch_torch (issue 11): routing, re-entrant holds, exceptions, unpatch_torch()."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.utils.clip_grad

import gradclip
from gradclip import patch

ORIGINAL = {
    name: getattr(torch.nn.utils, name)
    for name in ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_")
}


@pytest.fixture(autouse=True)
def _restored():
    gradclip.unpatch_torch()
    yield
    gradclip.unpatch_torch()
    assert_restored()


# torch.nn.utils.clip_grad has no get_total_norm under that name in torch 2.13
IN_CLIP_GRAD = {
    name: getattr(torch.nn.utils.clip_grad, name)
    for name in ORIGINAL
    if hasattr(torch.nn.utils.clip_grad, name)
}


def assert_patched() -> None:
    for name in ORIGINAL:
        assert getattr(torch.nn.utils, name) is getattr(gradclip, name), name
    for name in IN_CLIP_GRAD:
        assert getattr(torch.nn.utils.clip_grad, name) is getattr(gradclip, name), name
    assert patch.is_patched()


def assert_restored() -> None:
    for name, original in ORIGINAL.items():
        assert getattr(torch.nn.utils, name) is original, name
    for name, original in IN_CLIP_GRAD.items():
        assert getattr(torch.nn.utils.clip_grad, name) is original, name
    assert not patch.is_patched()


def test_patched_calls_reach_gradclip():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    p.grad = torch.full((2,), 60000.0, dtype=torch.float16)
    with gradclip.patch_torch():
        assert_patched()
        assert torch.nn.utils.clip_grad_norm_(p, 1.0).isfinite()  # torch's own gives inf here
    assert_restored()


def test_nested_blocks_restore_only_at_the_outermost_exit():
    with gradclip.patch_torch():
        with gradclip.patch_torch():
            with gradclip.patch_torch():
                assert_patched()
            assert_patched()
        assert_patched()  # issue 11: the inner exit unpatched here
    assert_restored()


def test_global_patch_survives_a_library_block():
    gradclip.patch_torch()
    with gradclip.patch_torch():  # e.g. a library that patches around its own training step
        assert_patched()
    assert_patched()
    gradclip.unpatch_torch()
    assert_restored()


def test_global_patch_taken_inside_a_block_outlives_it():
    with gradclip.patch_torch():
        gradclip.patch_torch()
    assert_patched()


def test_repeated_global_patch_is_undone_by_one_unpatch():
    gradclip.patch_torch()
    gradclip.patch_torch()
    assert_patched()
    gradclip.unpatch_torch()
    assert_restored()
    gradclip.unpatch_torch()  # a no-op
    assert_restored()


def test_unpatch_inside_blocks_restores_now_and_the_exits_do_nothing():
    with gradclip.patch_torch():
        with gradclip.patch_torch():
            gradclip.unpatch_torch()
            assert_restored()
        assert_restored()
        with gradclip.patch_torch():  # a fresh patch inside the stale block
            assert_patched()
        assert_restored()
    assert_restored()


@pytest.mark.parametrize("depth", [1, 2])
def test_an_exception_in_the_block_restores_and_propagates(depth):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with gradclip.patch_torch():
            if depth == 1:
                raise Boom
            with pytest.raises(Boom):
                with gradclip.patch_torch():
                    raise Boom
            assert_patched()  # the inner block's exception released only its own hold
            raise Boom
    assert_restored()


def test_the_same_object_can_be_entered_again_and_nested_in_itself():
    hold = gradclip.patch_torch()
    with hold:
        assert_patched()
    assert_restored()
    with hold:  # re-entry: the block holds the patch again
        with hold:
            assert_patched()
        assert_patched()
    assert_restored()


def test_holds_from_threads():
    barrier = threading.Barrier(4)
    errors = []

    def worker():
        try:
            for i in range(50):
                with gradclip.patch_torch():
                    if i == 0:
                        barrier.wait(timeout=10)  # all four blocks open at once
                    assert_patched()
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert_restored()
