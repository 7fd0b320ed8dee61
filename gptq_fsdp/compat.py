"""Every private API of torch, DeepSpeed and transformers that gptq_fsdp calls, in one place.

Each was checked on the versions in CHECKED (the ones the test suite runs on). A different version
stops with a clear error at the first private call, rather than an AttributeError deep inside a
run; GPTQ_FSDP_UNCHECKED_VERSIONS=1 turns that error into a warning (at your own risk).

- torch FSDP2: the module state's lazy init, its parameter groups and their training state
  (`torch.distributed.fsdp._fully_shard`); a module's copy without FSDP2's class that holds other
  tensors as its parameters (`Module._parameters`); tensor storages' identity (`UntypedStorage._cdata`);
  the dispatch-mode base class and pytree leaves (`torch.utils._python_dispatch`, `_pytree`) that
  let the planner see every tensor an op makes.
- DeepSpeed ZeRO-3: its per-module fetch/release hooks, taken off a layer by editing torch's
  `Module._forward_pre_hooks` / `_forward_hooks`; the partition attributes of its parameters
  (`ds_id`, `ds_tensor`, `ds_numel`, `ds_shape`, used by distributed/zero3.py); the plain
  `F.linear` that `zero.Init` keeps (`InsertPostInitMethodToModuleSubClasses.linear_bk`).
- transformers 5: the renamings and converters applied while loading and reverted while saving
  (`core_model_loading`, `conversion_mapping`, `PreTrainedModel._weight_conversions`); the experts implementation a
  `@use_experts_implementation` module dispatches to (`config._experts_implementation`).
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

# package: the release lines checked (major.minor), newest last.
CHECKED = {"torch": ("2.13",), "deepspeed": ("0.19",), "transformers": ("5.24",)}
UNCHECKED_ENV = "GPTQ_FSDP_UNCHECKED_VERSIONS"


class CompatError(RuntimeError):
    """An installed torch / DeepSpeed / transformers is not one whose private APIs were checked."""


@functools.cache
def require(package: str) -> None:
    """Stop (or warn, with GPTQ_FSDP_UNCHECKED_VERSIONS=1) unless `package` is a checked version."""
    try:
        found = version(package)
    except PackageNotFoundError:
        raise CompatError(f"{package} is not installed") from None
    line = ".".join(found.split("+")[0].split(".")[:2])
    if line in CHECKED[package]:
        return
    message = (
        f"gptq_fsdp relies on private APIs of {package} that were checked on {package} "
        f"{', '.join(CHECKED[package])}.x; {found} is installed. Install a checked version "
        f"(pip install 'gptq_fsdp' pins them), or set {UNCHECKED_ENV}=1 to try anyway"
    )
    if os.environ.get(UNCHECKED_ENV) == "1":
        warnings.warn(message, stacklevel=3)
        return
    raise CompatError(message)


# ------------------------------------------------------------------------------------- torch FSDP2


def fsdp_lazy_init(model: nn.Module) -> None:
    """FSDP2's lazy init, which normally runs in the root's first forward."""
    require("torch")
    state = model._get_fsdp_state() if hasattr(model, "_get_fsdp_state") else None
    if state is not None:
        state._lazy_init()


def unwrapped_copy(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A shallow copy of `module` as an instance of its model class (without the FSDP2 class that
    `fully_shard` mixed in, whose `__new__` would rebuild the module), holding `tensors` in place of
    the parameters of those names; its hooks are the module's, which a direct `forward` call skips."""
    require("torch")
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    copy = object.__new__(cls)
    copy.__dict__.update(module.__dict__)
    copy.__dict__["_parameters"] = {**module._parameters, **tensors}
    return copy


def fsdp_param_groups(module: nn.Module) -> list:
    """The FSDP2 module's parameter groups."""
    require("torch")
    return list(module._get_fsdp_state()._fsdp_param_groups)


def fsdp_reshards_after_forward(groups: list) -> bool:
    require("torch")
    return any(g.post_forward_mesh_info is not None for g in groups)


def fsdp_mark_idle(groups: list) -> None:
    """Set the groups back to IDLE: a forward cut short by an exception skips FSDP2's post-forward,
    and `reshard()` does nothing while a group looks mid-forward."""
    require("torch")
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    for group in groups:
        group._training_state = TrainingState.IDLE


def dispatch_mode() -> type:
    """torch's TorchDispatchMode: a subclass sees every op below autograd, with its outputs."""
    require("torch")
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def tensor_leaves(tree) -> list[torch.Tensor]:
    """The tensors of an op's output (a tensor, or nested tuples/lists of them)."""
    require("torch")
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def storage_key(tensor: torch.Tensor) -> int:
    """One number per tensor storage (views of one storage share it)."""
    require("torch")
    return tensor.untyped_storage()._cdata


# --------------------------------------------------------------------------------- DeepSpeed ZeRO-3


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def whole_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's whole shape (a partitioned ZeRO-3 parameter shows (0,) as its own)."""
    return param.ds_shape if is_zero3_param(param) else param.shape


def _is_zero_hook(hook) -> bool:
    """ZeRO-3's per-module fetch/release hooks (DeepSpeedZeRoOffload's, some wrapped by its NVTX helper)."""
    return getattr(hook, "__module__", "").startswith("deepspeed.")


@contextmanager
def zero_hooks_set_aside(layer: nn.Module) -> Iterator[None]:
    """Take ZeRO's forward hooks off `layer`'s modules; put them back in their places afterwards.

    They would all-gather each submodule again on every forward call, and a forward cut short by an
    exception would leave their fetch bookkeeping behind. Other hooks (ours) stay and keep working.
    """
    require("deepspeed")
    saved = []
    for module in layer.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            snapshot = list(hooks.items())
            removed = {key for key, hook in snapshot if _is_zero_hook(hook)}
            for key in removed:
                del hooks[key]
            saved.append((hooks, snapshot, removed))
    try:
        yield
    finally:
        for hooks, snapshot, removed in saved:
            current = dict(hooks)
            hooks.clear()
            for key, hook in snapshot:
                if key in removed:
                    hooks[key] = hook
                elif key in current:
                    hooks[key] = current.pop(key)
            hooks.update(current)  # registered meanwhile


@contextmanager
def plain_linear() -> Iterator[None]:
    """`torch.nn.functional.linear` as torch defines it, inside. DeepSpeed's `zero.Init` replaces it
    process-wide (and leaves it so) with its memory-efficient autograd function, whose forward calls
    `matmul` on the transposed weight instead."""
    try:
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses
    except ImportError:
        yield
        return
    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    patched = torch.nn.functional.linear
    if original is None or patched is original:
        yield
        return
    require("deepspeed")
    torch.nn.functional.linear = original
    try:
        yield
    finally:
        torch.nn.functional.linear = patched


# ------------------------------------------------------------------------------------ transformers


def weight_conversions(model: nn.Module) -> list:
    """What transformers 5 does to this model's tensors while loading: renamings and converters
    (a converter fuses per-expert MoE weights into 3-D parameters)."""
    require("transformers")
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        # The model's class, not FSDP2's subclass of it: transformers takes that for custom code and
        # finds no conversions for it (so revert_weight_conversion would rename nothing there).
        cls = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers."))
        found = get_checkpoint_conversion_mapping(cls.__name__)
        conversions = found or get_checkpoint_conversion_mapping(model.config.model_type) or []
    return list(conversions)


def expert_converters(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(target, sources) of the loading converters that fuse per-expert tensors into one parameter:
    ("mlp.experts.gate_up_proj", ["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"])."""
    from transformers.core_model_loading import WeightConverter

    found = []
    for converter in weight_conversions(model):
        if isinstance(converter, WeightConverter):
            targets, sources = converter.target_patterns, converter.source_patterns
            targets = [targets] if isinstance(targets, str) else list(targets)
            sources = [sources] if isinstance(sources, str) else list(sources)
            if len(targets) == 1 and sources and all("*" in s for s in sources):
                found.append((targets[0], sources))
    return found


@contextmanager
def eager_experts(module: nn.Module) -> Iterator[None]:
    """`@use_experts_implementation` modules run their eager per-expert loop inside (the
    `grouped_mm`/`bmm` implementations never call F.linear on one expert's slice)."""
    require("transformers")
    config = module.config
    previous = config._experts_implementation
    config._experts_implementation = "eager"
    try:
        yield
    finally:
        config._experts_implementation = previous


def _save_renamings(model: nn.Module) -> list:
    from transformers.core_model_loading import WeightRenaming

    return [c.reverse_transform() for c in reversed(weight_conversions(model)) if isinstance(c, WeightRenaming)]


def in_file_layout(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under the names the model's own files give them, as save_pretrained writes
    them: transformers 5 renames some while loading (gpt_neox's `embed_out` is `lm_head` in memory,
    Mixtral's `block_sparse_moe` is `mlp`). Per-expert tensors of fused MoE experts, named by their
    in-memory module path (`mlp.experts.0.w1.weight_packed`), are renamed the same way."""
    from transformers.core_model_loading import apply_renamings

    renamings = _save_renamings(model)
    return {apply_renamings(name, renamings): tensor for name, tensor in tensors.items()}


def file_module_name(model: nn.Module, name: str) -> str:
    """In-memory module `name` as the model's files spell it (`in_file_layout` for modules)."""
    from transformers.core_model_loading import apply_renamings

    # Renaming patterns may need the dot after a module name (".block_sparse_moe."): rename a tensor of it.
    return apply_renamings(f"{name}.weight", _save_renamings(model)).removesuffix(".weight")


class FileNames:
    """How transformers 5 maps a model's tensors to its safetensors files, both ways: the parameter
    loading puts a file tensor into (`rename_source_key`), and the tensors save_pretrained writes for
    a parameter (`revert_weight_conversion`: per-expert pieces for fused MoE experts)."""

    def __init__(self, model: nn.Module) -> None:
        require("transformers")
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        conversions = weight_conversions(model)
        self._renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self._converters = [c for c in conversions if isinstance(c, WeightConverter)]
        # revert_weight_conversion reads these two off the model; FSDP2's subclass would hide the first.
        self._model = types.SimpleNamespace(_weight_conversions=conversions, config=model.config)

    def loaded_as(self, key: str) -> tuple[str, str | None]:
        """The parameter file tensor `key` loads into, and the converter that builds that parameter
        out of several file tensors ("[sources] -> target"), None if it is only renamed."""
        from transformers.core_model_loading import rename_source_key

        name, pattern = rename_source_key(key, self._renamings, self._converters)
        if pattern is None:
            return name, None
        converter = next(c for c in self._converters if pattern in c.source_patterns)
        return name, f"{converter.source_patterns} -> {converter.target_patterns[0]}"

    def saved_as(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors save_pretrained writes for parameter `name` holding `tensor`, by file name."""
        from transformers.core_model_loading import revert_weight_conversion

        return dict(revert_weight_conversion(self._model, {name: tensor}))
