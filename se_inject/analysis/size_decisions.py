"""Control flow on sizes while tracing: ``if x.size(-1) != identity.size(-1):`` (a cropped
identity) decided at the analysis input, where the shapes are known, instead of failing."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch.fx as fx

__all__ = ["decide_on_sizes"]


def decide_on_sizes(tracer: Any, node: fx.Node) -> bool | None:
    """The condition ``node`` of the trace ``tracer`` is making, decided by its ``sizes`` (the
    node's value at the analysis input), with where the code branched added to its
    ``specialised``; None when it has no ``sizes`` or the condition reads data (its value is
    then a meta tensor, not a bool): fx's own error follows. The graph holds only the branch
    taken: it is specialised to that input. While ``sizes`` runs, the tracer's ``evaluating``
    is set: the modules called on meta tensors then run as themselves, not into the trace."""
    if tracer.sizes is None:
        return None
    tracer.evaluating = True
    try:
        value = tracer.sizes(tracer.graph, node)
    except Exception:  # noqa: BLE001 - not computable from sizes alone
        return None
    finally:
        tracer.evaluating = False
    if type(value) is not bool:
        return None
    caller = _user_frame()
    if caller is not None:
        where = f"{caller.f_code.co_qualname} branches on sizes ({Path(caller.f_code.co_filename).name}:{caller.f_lineno})"
        if where not in tracer.specialised:
            tracer.specialised.append(where)
    return value


def _user_frame() -> Any:
    """The frame of the code that asked ``bool()`` of a proxy (outside torch.fx and this package)."""
    frame = inspect.currentframe()
    while frame is not None:
        name = frame.f_code.co_filename
        if "torch/fx" not in name.replace("\\", "/") and not name.startswith(str(Path(__file__).parent)):
            return frame
        frame = frame.f_back
    return None
