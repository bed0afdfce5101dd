"""infl_plugin: EK-FAC influence functions that ride along with normal training.

Data flows one way: hooks → statistics → factors → attributor → reporting. See README.md.
"""

from .artifacts import read_artifacts
from .attributor import Attributor, PreconditionedQueries, TopK
from .config import InfluenceConfig
from .factors import Factors, LayerFactors
from .fitting import fit_factors
from .layers import TrackedLayer, select_layers
from .session import InfluenceSession
from .tasks import CausalLMTask, ClassificationTask, RegressionTask, Task
from .tracker import InfluenceTracker

__version__ = "0.1.0"

__all__ = [
    "Attributor",
    "CausalLMTask",
    "ClassificationTask",
    "Factors",
    "InfluenceConfig",
    "InfluenceSession",
    "InfluenceTracker",
    "LayerFactors",
    "PreconditionedQueries",
    "RegressionTask",
    "Task",
    "TopK",
    "TrackedLayer",
    "fit_factors",
    "read_artifacts",
    "select_layers",
]
