"""se-inject: retrofit Squeeze-and-Excitation blocks into pretrained PyTorch vision models."""

from .api import apply_plan as apply_plan
from .api import find_sites as find_sites
from .api import inject_se as inject_se
from .api import remove_se as remove_se
from .block import SEBlock as SEBlock
from .block import SEConfig as SEConfig
from .checkpoint import load as load
from .checkpoint import save as save
from .errors import SEInjectError as SEInjectError
from .finetune import HeadNotFoundError as HeadNotFoundError
from .finetune import find_head as find_head
from .finetune import freeze_except_se as freeze_except_se
from .finetune import param_groups as param_groups
from .finetune import se_modules as se_modules
from .finetune import se_parameters as se_parameters
from .finetune import se_state_dict_keys as se_state_dict_keys
from .gates import GateStats as GateStats
from .gates import gate_statistics as gate_statistics
from .plan import Plan as Plan
from .plan import Site as Site
from .plan import SiteKind as SiteKind
from .plan import Skipped as Skipped
from .plan import SkipReason as SkipReason

__version__ = "0.1.0"

__all__ = [
    "SEBlock",
    "SEConfig",
    "SEInjectError",
    "HeadNotFoundError",
    "GateStats",
    "Plan",
    "Site",
    "SiteKind",
    "Skipped",
    "SkipReason",
    "apply_plan",
    "find_sites",
    "find_head",
    "freeze_except_se",
    "gate_statistics",
    "inject_se",
    "load",
    "remove_se",
    "save",
    "se_modules",
    "param_groups",
    "se_parameters",
    "se_state_dict_keys",
]
