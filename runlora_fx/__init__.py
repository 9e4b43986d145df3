"""runlora-fx: a torch.compile backend that rewrites every LoRA linear into its cheapest
equivalent contraction order, then hands the graph to Inductor."""

from runlora_fx.backend import Backend, runlora
from runlora_fx.choice.chooser import Chooser
from runlora_fx.choice.criteria import CRITERIA, Candidate, Decision, choose
from runlora_fx.compile_model import compile
from runlora_fx.cost.cost import Cost, cost_of
from runlora_fx.explainer import Explanation, explain
from runlora_fx.ir.merge_check import MergeCheck
from runlora_fx.ir.plans import Dropout, Plan, plans_for, reference_plan
from runlora_fx.ir.precision import Precision
from runlora_fx.ir.rounding import Rounding
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup, SkippedSite
from runlora_fx.options import Options, parse_options
from runlora_fx.report.graph_report import GraphReport
from runlora_fx.report.outside import Outside
from runlora_fx.weight_guard import StaleMergeCheck

__all__ = [
    "Adapter",
    "Backend",
    "CRITERIA",
    "Candidate",
    "Chooser",
    "Cost",
    "Decision",
    "Dropout",
    "Explanation",
    "GraphReport",
    "LoraSite",
    "MergeCheck",
    "Options",
    "Outside",
    "Plan",
    "Precision",
    "Rounding",
    "SiteGroup",
    "SkippedSite",
    "StaleMergeCheck",
    "choose",
    "compile",
    "cost_of",
    "explain",
    "parse_options",
    "plans_for",
    "reference_plan",
    "runlora",
]
