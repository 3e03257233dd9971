"""initserve: reproducible neural-network weight initialisation.

The same spec gives the same bytes on every replica, CPU or GPU; any slice of a tensor can be
generated alone and equals that slice of the whole. See docs/ALGORITHM.md for the contract.
"""

from initserve.engine import TensorSource, generate, shard_region
from initserve.plan import ALGORITHM_VERSION, Plan, TensorPlan, plan
from initserve.schemes import CATALOGUE, catalogue_json
from initserve.spec import Spec, SpecError, parse_spec

__version__ = "0.1.0"

__all__ = [
    "ALGORITHM_VERSION",
    "CATALOGUE",
    "Plan",
    "Spec",
    "SpecError",
    "TensorPlan",
    "TensorSource",
    "__version__",
    "catalogue_json",
    "generate",
    "parse_spec",
    "plan",
    "shard_region",
]
