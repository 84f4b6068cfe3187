"""se-inject: retrofit Squeeze-and-Excitation blocks into pretrained PyTorch vision models.

The names below are imported on first use (PEP 562), so ``import se_inject`` and the CLI's
``--help`` cost no torch, timm or torchvision import; ``from se_inject import inject_se`` works
as usual. The explicit imports under ``TYPE_CHECKING`` are what type checkers and IDEs read.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import apply_plan as apply_plan
    from .api import find_sites as find_sites
    from .api import inject_se as inject_se
    from .api import remove_se as remove_se
    from .errors import ArchitectureMismatchError as ArchitectureMismatchError
    from .errors import CheckpointError as CheckpointError
    from .errors import ConfigError as ConfigError
    from .errors import GateMismatchError as GateMismatchError
    from .errors import InputError as InputError
    from .errors import ModelArgsError as ModelArgsError
    from .errors import NoSitesError as NoSitesError
    from .errors import OutputPathError as OutputPathError
    from .errors import PlanMismatchError as PlanMismatchError
    from .errors import SEInjectError as SEInjectError
    from .errors import SelectionError as SelectionError
    from .errors import UnfaithfulRebuildError as UnfaithfulRebuildError
    from .errors import UnknownModelError as UnknownModelError
    from .errors import UnknownTagError as UnknownTagError
    from .errors import UnsafeCheckpointError as UnsafeCheckpointError
    from .errors import WeightsError as WeightsError
    from .inject.finetune import HeadNotFoundError as HeadNotFoundError
    from .inject.finetune import find_head as find_head
    from .inject.finetune import freeze_except_se as freeze_except_se
    from .inject.finetune import param_groups as param_groups
    from .inject.finetune import se_modules as se_modules
    from .inject.finetune import se_parameters as se_parameters
    from .inject.finetune import se_state_dict_keys as se_state_dict_keys
    from .io.checkpoint import save as save
    from .io.restore import load as load
    from .plan import Plan as Plan
    from .plan import Site as Site
    from .plan import SiteKind as SiteKind
    from .plan import Skipped as Skipped
    from .plan import SkipReason as SkipReason
    from .plan import Unanalysed as Unanalysed
    from .report.gate_statistics import gate_statistics as gate_statistics
    from .report.summary import Report as Report
    from .request import SEConfig as SEConfig
    from .request import Selection as Selection
    from .se_block import SEBlock as SEBlock
    from .workflow import inject_named as inject_named

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "apply_plan": "api",
    "find_sites": "api",
    "inject_se": "api",
    "remove_se": "api",
    "SEBlock": "se_block",
    "SEConfig": "request",
    "Selection": "request",
    "load": "io.restore",
    "save": "io.checkpoint",
    "SEInjectError": "errors",
    "ConfigError": "errors",
    "GateMismatchError": "errors",
    "InputError": "errors",
    "SelectionError": "errors",
    "NoSitesError": "errors",
    "PlanMismatchError": "errors",
    "UnknownModelError": "errors",
    "UnknownTagError": "errors",
    "WeightsError": "errors",
    "CheckpointError": "errors",
    "UnsafeCheckpointError": "errors",
    "OutputPathError": "errors",
    "UnfaithfulRebuildError": "errors",
    "ModelArgsError": "errors",
    "ArchitectureMismatchError": "errors",
    "HeadNotFoundError": "inject.finetune",
    "gate_statistics": "report.gate_statistics",
    "find_head": "inject.finetune",
    "freeze_except_se": "inject.finetune",
    "param_groups": "inject.finetune",
    "se_modules": "inject.finetune",
    "se_parameters": "inject.finetune",
    "se_state_dict_keys": "inject.finetune",
    "Plan": "plan",
    "Site": "plan",
    "SiteKind": "plan",
    "Skipped": "plan",
    "SkipReason": "plan",
    "Unanalysed": "plan",
    "Report": "report.summary",
    "inject_named": "workflow",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'se_inject' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
