"""Hessian hooks: grouping of Linears by shared input, and the exact XᵀX sums over unmasked tokens."""

from __future__ import annotations

import weakref

import pytest
import torch
from bounds import FP32_U, assert_within, xtx_bound
from torch import nn

from gptq_fsdp.core.hessian import HessianGroup, packed_size, unpack_symmetric, upper_blocks
from gptq_fsdp.core.linalg import float32_matmul_precision
from gptq_fsdp.model.hooks import HessianHooks


def full(group: HessianGroup) -> torch.Tensor:
    """The group's float64 sum as the whole symmetric matrix."""
    return unpack_symmetric(group.sum, group.columns, torch.float64)


HIDDEN = 12


class Block(nn.Module):
    """q/k/v read one tensor, o reads another, `twice` runs on two inputs, `pooled` sees a 2-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.o = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.twice = nn.Linear(HIDDEN, HIDDEN)
        self.pooled = nn.Linear(HIDDEN, 3)

    def inputs(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Every Linear's input(s), computed exactly as forward does."""
        mixed = torch.tanh(self.q(x) * self.k(x) + self.v(x))
        out = self.o(mixed)
        second = out * 0.5 + x
        return {"qkv": [x], "o": [mixed], "twice": [out, second], "pooled": [x.mean(dim=1)]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.tanh(self.q(x) * self.k(x) + self.v(x))
        out = self.o(mixed)
        y = self.twice(out) + self.twice(out * 0.5 + x)
        return y.sum() + self.pooled(x.mean(dim=1)).sum()


def masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or x.dim() < 3:
        return x.reshape(-1, x.shape[-1])
    return x[mask.bool()]


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for batch, seq in [(2, 5), (3, 7), (1, 4), (2, 6)]:
        x = torch.randn(batch, seq, HIDDEN, generator=gen) * 3 + 1
        mask = torch.ones(batch, seq, dtype=torch.long)
        if batch > 1:
            mask[1, seq - 3 :] = 0  # right padding on the second row
        batches.append((x, mask))
    batches[2] = (batches[2][0], None)  # one forward without a mask: every token counts
    return batches


@pytest.fixture(scope="module")
def block() -> Block:
    torch.manual_seed(0)
    return Block()


@pytest.fixture(scope="module")
def accumulated(block):
    modules = {name: getattr(block, name) for name in ("q", "k", "v", "o", "twice", "pooled")}
    hooks = HessianHooks(modules)
    batches = make_batches()
    with torch.no_grad(), hooks.attached():
        for x, mask in batches:
            hooks.start_forward(mask)
            block(x)
    return hooks, batches


def reference(block: Block, batches, key: str) -> tuple[torch.Tensor, int, torch.Tensor]:
    """float64 XᵀX over the unmasked tokens of every input of `key`, the token count, and the bound on
    the fp32 accumulation's distance from it (each call's rows are one fp32 matmul)."""
    with torch.no_grad():
        inputs = [masked_rows(inp, mask) for x, mask in batches for inp in block.inputs(x)[key]]
    total = sum(rows.double().T @ rows.double() for rows in inputs)
    return total, sum(rows.shape[0] for rows in inputs), xtx_bound(inputs)


def group_by_names(hooks: HessianHooks) -> dict[frozenset, HessianGroup]:
    return {frozenset(g.names): g for g in hooks.groups}


def test_groups_by_shared_input(accumulated):
    hooks, _ = accumulated
    groups = group_by_names(hooks)
    assert set(groups) == {frozenset("qkv"), frozenset({"o"}), frozenset({"twice"}), frozenset({"pooled"})}
    assert len(hooks.groups) == 4  # one accumulator per distinct input, no duplicates
    assert sorted(n for g in hooks.groups for n in g.names) == sorted(["q", "k", "v", "o", "twice", "pooled"])
    for group in hooks.groups:
        assert group.columns == HIDDEN and group.sum.numel() == packed_size(upper_blocks(HIDDEN, "cpu"))
        assert group.sum.dtype == torch.float64  # order-independent sums


@pytest.mark.parametrize("key, names", [("qkv", "qkv"), ("o", {"o"}), ("twice", {"twice"}), ("pooled", {"pooled"})])
def test_sums_equal_xtx_over_unmasked_tokens(block, accumulated, key, names):
    hooks, batches = accumulated
    group = group_by_names(hooks)[frozenset(names)]
    expected, tokens, bound = reference(block, batches, key)
    assert group.tokens == tokens
    assert_within(full(group), expected, bound, "ΣXᵀX")
    # hessian(): float64 -> fp32, times fp32(2/n): three roundings against the one of the reference cast.
    torch.testing.assert_close(group.hessian(), (full(group) * 2 / tokens).float(), rtol=4 * FP32_U, atol=0)
    exact = 2 * expected / tokens
    assert_within(group.hessian(), exact, 2 / tokens * bound + 4 * FP32_U * exact.abs(), "H = 2ΣXᵀX/n")


def test_token_counts(accumulated):
    hooks, batches = accumulated
    groups = group_by_names(hooks)
    unmasked = sum(x.shape[0] * x.shape[1] if m is None else int(m.sum()) for x, m in batches)
    all_tokens = sum(x.shape[0] * x.shape[1] for x, _ in batches)
    assert unmasked < all_tokens  # the padding really is there
    assert groups[frozenset("qkv")].tokens == unmasked
    assert groups[frozenset({"o"})].tokens == unmasked
    assert groups[frozenset({"twice"})].tokens == 2 * unmasked  # two calls per forward
    # A 2-D input does not line up with the [batch, seq] mask: taken whole, one row per sample.
    assert groups[frozenset({"pooled"})].tokens == sum(x.shape[0] for x, _ in batches)


def test_padding_changes_nothing(block):
    """Garbage in padded positions must not reach the sums."""
    modules = {"q": block.q, "k": block.k, "v": block.v}
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    garbage = x.clone()
    garbage[1, 2:] = 1e3
    sums = []
    for inp in (x, garbage):
        hooks = HessianHooks(modules)
        with torch.no_grad(), hooks.attached():
            hooks.start_forward(mask)
            block.q(inp), block.k(inp), block.v(inp)
        (group,) = hooks.groups
        assert group.tokens == 8
        sums.append(group.sum)
    # The same 8 unmasked rows go into the same fp32 matmul in both runs (same shapes, same thread count).
    torch.testing.assert_close(sums[0], sums[1], rtol=0, atol=0)


def test_hooks_detach_on_exit(block, accumulated):
    hooks, _ = accumulated
    for name in ("q", "k", "v", "o", "twice", "pooled"):
        assert len(getattr(block, name)._forward_pre_hooks) == 0
    before = [g.sum.clone() for g in hooks.groups]
    with torch.no_grad():
        hooks.start_forward(None)
        block(torch.randn(2, 3, HIDDEN, generator=torch.Generator().manual_seed(2)))
    for group, old in zip(hooks.groups, before, strict=True):
        assert torch.equal(group.sum, old)


def test_group_without_tokens_has_zero_hessian():
    group = HessianGroup(["unused"], 5, torch.device("cpu"))
    assert group.tokens == 0
    h = group.hessian()
    assert h.shape == (5, 5) and torch.isfinite(h).all() and not h.any()


def test_group_add_accumulates_in_fp32():
    group = HessianGroup(["x"], 4, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(10, 4, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(3, 4, dtype=torch.bfloat16, generator=gen)
    group.add(a)
    group.add(b)
    rows = torch.cat([a, b]).double()
    assert group.tokens == 13 and group.sum.dtype == torch.float64
    assert_within(full(group), rows.T @ rows, xtx_bound([a, b]), "ΣXᵀX of bf16 rows")


@pytest.mark.parametrize("ambient", ["highest", "medium"])
@pytest.mark.parametrize("dtype,fast", [(torch.bfloat16, "medium"), (torch.float16, "high")])
def test_16_bit_activations_lose_nothing_in_reduced_precision_xtx(ambient, dtype, fast, monkeypatch):
    """16-bit activations take the reduced-precision matmul path (fp32 accumulation) at any setting,
    and the result equals the float64 product to fp32 rounding."""
    x = (torch.randn(2048, 768, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    precisions = []
    mm = torch.mm

    def recording_mm(*args, **kwargs):
        precisions.append(torch.get_float32_matmul_precision())
        return mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    group = HessianGroup(["x"], 768, torch.device("cpu"))
    with float32_matmul_precision(ambient):
        group.add(x)
    assert precisions and set(precisions) == {fast}
    exact = x.double().T @ x.double()
    # Products of 16-bit values are exact in fp32: only the 2048-term fp32 sums round (γ_2048·|X|ᵀ|X|).
    # Products rounded to 16 bits, or 16-bit accumulation, would be off by ~2^-8 relative: far outside.
    assert_within(full(group), exact, xtx_bound([x]), f"XᵀX of {dtype} rows")
    assert xtx_bound([x]).max() < 2**-8 / 16 * exact.abs().max()  # the bound tells those apart


# ------------------------------------------------------------------------------------- real Llama layer


def test_real_llama_layer_groups_and_sums(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    modules = {f"model.layers.0.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    assert len(modules) == 7

    normed: list[torch.Tensor] = []  # what q/k/v read: the input layernorm's output
    handle = layer.input_layernorm.register_forward_hook(lambda m, a, out: normed.append(out))
    gen = torch.Generator().manual_seed(0)
    masks = [torch.tensor([[1] * 10, [1] * 6 + [0] * 4]), torch.tensor([[1] * 7 + [0] * 3, [1] * 10])]
    hooks = HessianHooks(modules)
    try:
        with torch.no_grad(), hooks.attached():
            for mask in masks:
                ids = torch.randint(0, 1000, mask.shape, generator=gen)
                hooks.start_forward(mask)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()

    p = "model.layers.0."
    groups = group_by_names(hooks)
    assert set(groups) == {
        frozenset({p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"}),
        frozenset({p + "self_attn.o_proj"}),
        frozenset({p + "mlp.gate_proj", p + "mlp.up_proj"}),
        frozenset({p + "mlp.down_proj"}),
    }
    unmasked = sum(int(m.sum()) for m in masks)
    assert all(g.tokens == unmasked for g in hooks.groups)
    qkv = groups[frozenset({p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"})]
    assert len(normed) == len(masks)
    rows = [masked_rows(h, m).double() for h, m in zip(normed, masks, strict=True)]
    expected = sum(r.T @ r for r in rows)
    assert_within(full(qkv), expected, xtx_bound(rows), "q/k/v ΣXᵀX")
    assert groups[frozenset({p + "mlp.down_proj"})].columns == 128


def test_symmetric_blocks_equal_the_full_product_and_any_summation_order():
    columns = 1000  # three column blocks
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(64, columns, generator=gen) for _ in range(6)]
    forward, backward = (
        HessianGroup(["w"], columns, torch.device("cpu")),
        HessianGroup(["w"], columns, torch.device("cpu")),
    )
    for x in batches:
        forward.add(x)
    split = [HessianGroup(["w"], columns, torch.device("cpu")) for _ in range(2)]
    for i, x in enumerate(batches):  # as two ranks would: each its half, then summed
        split[i // 3].add(x)
    for x in reversed(batches):
        backward.add(x)
    reference = sum(x.double().T @ x.double() for x in batches)
    whole = full(forward)
    assert_within(whole, reference, xtx_bound(batches), "blocked ΣXᵀX")
    assert torch.equal(whole, whole.T)  # the lower blocks are copies of the upper ones
    # Only the blocks on and above the diagonal are kept: 6 of 9 at three blocks a side.
    assert len(upper_blocks(columns, "cpu")) == 6
    assert forward.sum.numel() == sum((b - a) * (d - c) for a, b, c, d in upper_blocks(columns, "cpu")) < columns**2
    # Each batch's fp32 block products are the same tensors in every run (same shapes, same thread
    # count); only the order of their float64 sum differs, and float64 holds a sum of six fp32 values
    # exactly when they span less than 2^(53-24-3) in magnitude, as every entry here does (asserted):
    # so the fp32 Hessians are identical whatever the order of the batches or the split over ranks.
    products = torch.stack([unpack_symmetric(torch.cat([(x[:, a:b].T @ x[:, c:d]).flatten()
                            for a, b, c, d in upper_blocks(columns, "cpu")]), columns, torch.float64)
                            for x in batches]).abs()  # fmt: skip
    assert (products.amax(0) < 2**26 * products.amin(0)).all()
    assert torch.equal(forward.hessian(), backward.hessian())
    merged = HessianGroup(["w"], columns, torch.device("cpu"))
    merged.sum, merged.tokens = split[0].sum + split[1].sum, split[0].tokens + split[1].tokens
    assert torch.equal(forward.hessian(), merged.hessian())


def test_forwards_stop_after_the_last_target_input(block):
    modules = {name: getattr(block, name) for name in ("q", "k", "v", "o")}  # each runs once per forward
    tail_calls = []
    handle = block.twice.register_forward_hook(lambda *_: tail_calls.append(1))
    hooks = HessianHooks(modules)
    batches = make_batches()
    try:
        with torch.no_grad(), hooks.attached():
            for x, mask in batches:
                with hooks.forward(mask):
                    block(x)
    finally:
        handle.remove()
    # Only the first forward runs past `o` (it learns the call order); the others stop there.
    assert len(tail_calls) == 2
    by_name = {n: g for g in hooks.groups for n in g.names}
    for key, names in (("qkv", ["q", "k", "v"]), ("o", ["o"])):
        expected, tokens, bound = reference(block, batches, key)
        assert_within(full(by_name[names[0]]), expected, bound, key)
        assert by_name[names[0]].tokens == tokens


def test_accumulation_never_waits_for_the_device():
    """XᵀX accumulation and the hooks (masked batch included) make no host-syncing op after the
    forward's start (where the CPU mask is read once)."""
    from host_syncs import HostSyncs

    group = HessianGroup(["w"], 1000, torch.device("cpu"))  # several symmetric column blocks
    with HostSyncs() as syncs:
        gen = torch.Generator().manual_seed(6)
        group.add(torch.randn(64, 1000, generator=gen))
        group.add(torch.randn(64, 1000, generator=gen).bfloat16())
    assert syncs.total == 0, syncs.ops

    linear = nn.Linear(16, 8)
    hooks = HessianHooks({"linear": linear})
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    with hooks.attached():
        for _ in range(2):
            hooks.start_forward(mask)  # reads the CPU mask: the one place that may
            with HostSyncs() as syncs:
                linear(torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(7)))
            assert syncs.total == 0, syncs.ops


def test_unpacking_checks_the_layout():
    group = HessianGroup(["w"], 1000, torch.device("cpu"))
    with pytest.raises(ValueError, match="upper blocks of a 999-column matrix"):
        unpack_symmetric(group.sum, 999, torch.float32)


def test_hooks_keep_no_input_alive():
    """A paused true-sequential forward holds every batch's frames; the hooks must not also keep the
    inputs of the Linears it has passed (they only need them for identity within the forward)."""
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    hooks = HessianHooks({"first": first, "second": second}, stop_early=False)
    inputs: list[weakref.ref] = []
    first.register_forward_pre_hook(lambda m, a: inputs.append(weakref.ref(a[0])))
    with torch.no_grad(), hooks.attached(), hooks.forward(None):
        x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(8))
        out = second(first(x * 2))  # first's input is a temporary, dead once first returns
        assert inputs[0]() is None
    assert out.shape == (2, 3, 8) and [g.names for g in hooks.groups] == [["first"], ["second"]]
