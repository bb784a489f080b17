"""Contrastive objectives, one file per method, chosen by name in `train.objective`.

Every objective is an `nn.Module` called with keyword arguments (unknown ones are ignored); the ones
added for issue 4 list the inputs they read in the class attribute `inputs`.
"""

import inspect

from torch import nn

from lipkit.errors import UserError
from lipkit.objectives.alip import ALIPLoss
from lipkit.objectives.capdec import TextOnlyCaption
from lipkit.objectives.cloc import RegionContrast
from lipkit.objectives.coca import CaptionContrast
from lipkit.objectives.conceptclip import ConceptAlignment
from lipkit.objectives.distill import Distillation
from lipkit.objectives.dreamlip import SubCaptionGrouping
from lipkit.objectives.ezclip import EZCLIPLoss
from lipkit.objectives.filip import FILIPLoss
from lipkit.objectives.glscl import GlobalLocalConsistency
from lipkit.objectives.improved_baselines import ImprovedBaselines
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.intra_modal import TripleContrast
from lipkit.objectives.itm import ImageTextMatching
from lipkit.objectives.lexlip import LexiconContrast
from lipkit.objectives.mlcd import MultiLabelClusterDiscrimination
from lipkit.objectives.multi_positive import MultiPositiveInfoNCE
from lipkit.objectives.nevlp import NoiseAdaptiveContrast
from lipkit.objectives.plip import IdentityContrast
from lipkit.objectives.priorclip import AffiliationContrast
from lipkit.objectives.refine import CLIPRefine
from lipkit.objectives.script_order import ScriptOrder
from lipkit.objectives.self_distill import LocalGlobalDistillation
from lipkit.objectives.sigmoid import SigmoidLoss
from lipkit.objectives.tcl_momentum import MomentumTripleContrast
from lipkit.objectives.unime import HardNegativeContrast
from lipkit.objectives.vdi import VisualDynamics
from lipkit.objectives.vpgtrans import ConnectorCaption, TextLanguageModel
from lipkit.objectives.wukong import ReducedTokenInteraction

OBJECTIVES: dict[str, type[nn.Module]] = {
    "infonce": InfoNCE,
    "siglip": SigmoidLoss,
    "sigmoid": SigmoidLoss,
    "filip": FILIPLoss,
    "multi_positive": MultiPositiveInfoNCE,
    "alip": ALIPLoss,
    "tcl": TripleContrast,
    "lexlip": LexiconContrast,
    "clip_refine": CLIPRefine,
    "nevlp": NoiseAdaptiveContrast,
    "unime": HardNegativeContrast,
    "wukong": ReducedTokenInteraction,
    "improved_baselines": ImprovedBaselines,
    "mlcd": MultiLabelClusterDiscrimination,
    "plip": IdentityContrast,
    "priorclip": AffiliationContrast,
    "dreamlip": SubCaptionGrouping,
    "tcl_momentum": MomentumTripleContrast,
    "rs_m_clip": LocalGlobalDistillation,
    "distill": Distillation,
    "cloc": RegionContrast,
    "conceptclip": ConceptAlignment,
    "coca": CaptionContrast,
    "capdec": TextOnlyCaption,
    "itm": ImageTextMatching,
    "text_lm": TextLanguageModel,
    "connector": ConnectorCaption,
    "ezclip": EZCLIPLoss,
    "script_order": ScriptOrder,
    "vdi": VisualDynamics,
    "glscl": GlobalLocalConsistency,
}


def build_objective(name: str, **kwargs: object) -> nn.Module:
    """The objective registered as `name`, constructed with its hyper-parameters `kwargs`."""
    if name not in OBJECTIVES:
        raise UserError(f"Unknown objective '{name}'; choose one of {', '.join(OBJECTIVES)}.")
    cls = OBJECTIVES[name]
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        options = ", ".join(accepted) if accepted else "none"
        raise UserError(
            f"Objective '{name}' has no option {', '.join(repr(k) for k in unknown)}; its options are: {options}."
        )
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise UserError(f"Objective '{name}': {e}") from e
