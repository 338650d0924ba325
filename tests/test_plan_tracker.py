"""The allocation tracker against hand-computed sizes and against a scan of the live tensors; the
CUDA autocast emulation against CUDA's documented cast lists."""

from __future__ import annotations

import gc

import pytest
import torch

from naruto_lora.plan.memtrack import (
    CUDA_BLOCK_BYTES,
    HOST_PREFIX,
    AllocationTracker,
    cuda_autocast_policy,
)


def _block(nbytes: int) -> int:
    return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


def test_peak_and_release_of_known_allocations():
    with AllocationTracker() as tracker:
        a = torch.empty(1000)  # 4000 bytes -> 4096
        b = torch.empty(2000, dtype=torch.float16)  # 4000 -> 4096
        view = a[:10]  # no new storage
        del a  # the view keeps the storage alive
        assert tracker.total == 8192
        del view
        assert tracker.total == 4096
        with tracker.labelled("weights"):
            c = torch.empty(300, dtype=torch.float64)  # 2400 -> 2560
        assert tracker.live["weights"] == 2560
        del b, c
    assert tracker.total == 0
    assert tracker.peak.total_bytes == 8192
    assert tracker.peak.by_label == {"activations": 8192}


def test_host_labels_are_tracked_but_not_counted():
    with AllocationTracker() as tracker:
        with tracker.labelled(HOST_PREFIX + "ema"):
            shadow = torch.empty(1024)
        device = torch.empty(256)
        assert tracker.total == 1024
        assert tracker.live[HOST_PREFIX + "ema"] == 4096
        del shadow, device


def test_relabel_moves_bytes_between_labels():
    with AllocationTracker() as tracker:
        grad = torch.empty(128)
        tracker.relabel([grad, None], "lora_grads")
        assert tracker.live["activations"] == 0
        assert tracker.live["lora_grads"] == 512
        assert tracker.total == 512


def _live_storage_bytes(tracked: set[int]) -> int:
    """An independent count: every live tensor the garbage collector can see whose storage the
    tracker knows, each storage once."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.layout == torch.strided:
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key in tracked and key:
                seen[key] = _block(storage.nbytes())
    return sum(seen.values())


def test_total_matches_the_live_tensors_after_a_training_step():
    torch.manual_seed(0)
    with AllocationTracker() as tracker:
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)
        )
        optimizer = torch.optim.AdamW(model.parameters())
        x = torch.randn(32, 64)
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        del loss  # no autograd graph left: every live tensor is visible to gc
        gc.collect()
        pointers = {t.untyped_storage().data_ptr() for t in _tensors_of(model, optimizer, x)}
        assert tracker.total == _live_storage_bytes(pointers)
        assert tracker.total > 0
        assert tracker.peak.total_bytes >= tracker.total


def _tensors_of(model, optimizer, x):
    yield x
    for p in model.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def test_peak_of_a_linear_layer_forward_and_backward_by_hand():
    """y = x @ W.T with x [n, k], W [m, k] (W requires grad, x does not): forward keeps x and
    y; backward makes grad_y ([n, m], ones) and grad_W ([m, k]), and frees nothing before
    grad_W exists (y is held by the test)."""
    n, k, m = 64, 128, 32
    with AllocationTracker(block_bytes=1) as tracker:
        x = torch.randn(n, k)
        weight = torch.randn(m, k, requires_grad=True)
        y = x @ weight.T
        y.backward(torch.ones(n, m))
        expected = 4 * (n * k + m * k + n * m + n * m + m * k)
        assert tracker.peak.total_bytes == expected


def test_cuda_autocast_policy_casts_like_cuda():
    """CUDA autocast runs group_norm, layer_norm, softmax and nearest upsampling in fp32 and
    linear / conv / attention in the low precision (the CUDA op lists of the torch.amp docs);
    CPU autocast keeps the norms in the low precision."""
    x = torch.randn(2, 8, 4, 4)
    w = torch.randn(8, 8, 3, 3)
    tokens = torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.group_norm(x.bfloat16(), 2).dtype == torch.bfloat16
    with cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.nn.functional.conv2d(x, w, padding=1)
        assert h.dtype == torch.bfloat16
        assert torch.nn.functional.group_norm(h, 2).dtype == torch.float32
        assert torch.nn.functional.layer_norm(tokens.bfloat16(), (8,)).dtype == torch.float32
        assert torch.nn.functional.interpolate(h, scale_factor=2.0).dtype == torch.float32
        assert torch.softmax(tokens.bfloat16(), -1).dtype == torch.float32
        linear = torch.nn.functional.linear(tokens, torch.randn(4, 8))
        assert linear.dtype == torch.bfloat16
        attention = torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)
        assert attention.dtype == torch.bfloat16
    # Scoped: once the policy is gone, CPU autocast is CPU autocast again.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.group_norm(x.bfloat16(), 2).dtype == torch.bfloat16


def test_checkpointed_recompute_casts_as_the_forward_did():
    """Checkpointing recomputes the forward inside backward; the policy must still be active
    there or the recomputed tensors' dtypes differ and torch refuses."""
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    with cuda_autocast_policy():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        out.float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("fake", [False, True])
def test_tracker_sees_fake_tensors_like_real_ones(fake):
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode, AllocationTracker() as tracker:
        a = torch.empty(3000)
        b = a.view(30, 100).t().contiguous()  # a copy: new storage
        del a
        assert tracker.total == _block(12000)  # only b's storage is left
        del b
    assert tracker.peak.total_bytes == 2 * _block(12000)
