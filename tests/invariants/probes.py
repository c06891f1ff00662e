"""What the invariant tests measure: live tensor bytes, process RSS, and every hook torch can hold.

torch has no public API that lists the hooks on a module, an optimizer or a tensor, so `hook_table`
reads torch's private hook dictionaries; `test_probes.py` registers hooks through the public
``register_*`` API and fails loudly if torch stops keeping them where this module looks.
"""

from __future__ import annotations

import functools
import gc
import importlib
import os
from typing import Any

import torch
from torch import nn

#: hook dictionaries of an ``nn.Module`` (OrderedDicts id -> fn)
MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
#: hook dictionaries of a ``torch.optim.Optimizer``
OPTIMIZER_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
#: hooks a tensor (a parameter) can carry
TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")
#: process-wide hooks: (module, attribute)
GLOBAL_HOOKS = (
    ("torch.nn.modules.module", "_global_forward_hooks"),
    ("torch.nn.modules.module", "_global_forward_pre_hooks"),
    ("torch.nn.modules.module", "_global_backward_hooks"),
    ("torch.nn.modules.module", "_global_backward_pre_hooks"),
    ("torch.optim.optimizer", "_global_optimizer_pre_hooks"),
    ("torch.optim.optimizer", "_global_optimizer_post_hooks"),
)


def hook_table(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, list[Any]]:
    """Every hook function reachable from ``model`` and ``optimizer``, and the process-wide ones.

    Keys: ``"<module path>.<dict>"``, ``"param <name>.<dict>"``, ``"optimizer.<dict>"``,
    ``"global <module>.<dict>"``; values: the hook callables in registration order.
    """
    table: dict[str, list[Any]] = {}
    for name, module in model.named_modules():
        for attr in MODULE_HOOKS:
            table[f"{name or '(root)'}.{attr}"] = list(getattr(module, attr).values())
    for name, p in model.named_parameters():
        for attr in TENSOR_HOOKS:
            hooks = getattr(p, attr, None)
            table[f"param {name}.{attr}"] = list(hooks.values()) if hooks else []
    if optimizer is not None:
        for attr in OPTIMIZER_HOOKS:
            table[f"optimizer.{attr}"] = list(getattr(optimizer, attr).values())
    for mod, attr in GLOBAL_HOOKS:
        table[f"global {mod}.{attr}"] = list(getattr(importlib.import_module(mod), attr).values())
    return table


def hook_counts(table: dict[str, list[Any]]) -> dict[str, int]:
    return {key: len(fns) for key, fns in table.items()}


def is_stabwatch(fn: Any) -> bool:
    """Whether a hook callable was defined in stabwatch (closures, bound methods and partials unwrapped)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    module = getattr(fn, "__module__", None) or type(fn).__module__ or ""
    return module == "stabwatch" or module.startswith("stabwatch.")


def stabwatch_hooks(table: dict[str, list[Any]]) -> dict[str, list[str]]:
    """The stabwatch hooks in a `hook_table`, by where they sit (empty when none)."""
    found = {
        key: [getattr(fn, "__qualname__", repr(fn)) for fn in fns if is_stabwatch(fn)] for key, fns in table.items()
    }
    return {key: names for key, names in found.items() if names}


def live_tensor_bytes() -> tuple[int, int]:
    """(bytes of the distinct storages of every live Python tensor, number of such storages).

    `tracemalloc` does not see tensor storage (a 40 MB tensor shows as its ~500-byte Python object);
    this walks the objects the garbage collector tracks (tensors are tracked) and sums each storage
    once, keyed by its data pointer, so views and parameters sharing storage are not counted twice.
    """
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # type(), not isinstance: no proxy __class__ lookups
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / meta / functional tensors
            continue
        ptr = storage.data_ptr()
        if ptr:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
    return sum(seen.values()), len(seen)


def rss_bytes() -> int:
    """Resident set size of this process (``/proc/self/statm``; ``resource`` peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak, which still rises with a leak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
