"""Model transforms applied before sharding, and the parameter names engines key their state by.

Parallelism is applied to a finished single-device model in a fixed order (torchtitan's `parallelize.py`):
activation checkpointing, compile, then sharding (FSDP2 or DeepSpeed ZeRO). The unit of all three is a
block, and the model names its blocks: `block_lists` (a class attribute) holds the dotted names of the
`nn.ModuleList`s whose elements are the blocks, e.g. `("encoder.blocks", "decoder.blocks")`. Nothing here
imports an engine backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn

BLOCK_LISTS_ATTR = "block_lists"
"""Attribute a model sets to name its blocks (see the module docstring)."""
_AC_PREFIX = "_checkpoint_wrapped_module."
_COMPILE_PREFIX = "_orig_mod."


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The `(name, ModuleList)` pairs `model.block_lists` names.

    Raises:
        TypeError: the model does not set `block_lists`, or a name is not an `nn.ModuleList` of it.
    """
    names = getattr(model, BLOCK_LISTS_ATTR, None)
    if names is None:
        raise TypeError(
            f"{type(model).__name__} does not name its blocks: set the class attribute {BLOCK_LISTS_ATTR} to the "
            "dotted names of the nn.ModuleLists whose elements are its transformer blocks (the units of activation "
            "checkpointing, compile and FSDP2 sharding), e.g. block_lists = ('blocks',)"
        )
    if isinstance(names, str):
        raise TypeError(f"{type(model).__name__}.{BLOCK_LISTS_ATTR} must be a tuple of names, got the string {names!r}")
    out = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise TypeError(f"{type(model).__name__}.{BLOCK_LISTS_ATTR} names {name!r}, which it has not") from exc
        if not isinstance(module, nn.ModuleList):
            raise TypeError(
                f"{type(model).__name__}.{BLOCK_LISTS_ATTR} names {name!r}, a {type(module).__name__}, not an nn.ModuleList"
            )
        out.append((name, module))
    return out


def iter_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's blocks, `(name, module)`, in `block_lists` order: the units of AC, compile and sharding."""
    for name, blocks in block_lists(model):
        for idx, block in enumerate(blocks):
            yield f"{name}.{idx}", block


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block in a non-reentrant checkpoint wrapper (FQNs stay loadable). Returns the count wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    count = 0
    for _, blocks in block_lists(model):
        for idx in range(len(blocks)):
            if type(blocks[idx]).__name__ != "CheckpointWrapper":
                blocks[idx] = checkpoint_wrapper(blocks[idx])
                count += 1
    return count


def apply_compile(model: nn.Module) -> int:
    """`torch.compile` each block in place (`nn.Module.compile` keeps parameter names). Returns the count.

    A model that declares no blocks (`block_lists = ()`, or lists that are empty) is compiled whole.
    """
    blocks = [block for _, block in iter_blocks(model)] or [model]
    for block in blocks:
        block.compile()
    return len(blocks)


def clean_name(name: str) -> str:
    """Parameter name without activation-checkpoint / compile wrapper segments (the checkpoint key)."""
    return name.replace(_AC_PREFIX, "").replace(_COMPILE_PREFIX, "")


def trainable_names(model: nn.Module, params: Iterable[nn.Parameter] | None) -> list[str]:
    """Names of the parameters to optimize: `params` (identity match) or every `requires_grad` one."""
    if params is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    wanted = {id(p) for p in params}
    names = [n for n, p in model.named_parameters() if id(p) in wanted]
    if len(names) != len(wanted):
        raise ValueError("build_engine(params=...) contains tensors that are not parameters of the model")
    return names
