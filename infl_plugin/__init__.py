"""infl_plugin: EK-FAC influence functions that ride along with normal training.

Data flows one way: hooks → statistics → factors → attributor → reporting. See README.md.
"""

from .artifacts import AttributionResult, read_artifacts
from .attributor import Attributor, PreconditionedQueries, TopK
from .config import InfluenceConfig
from .data import AttributionData, build_attribution_data
from .errors import (BatchFormatError, ConfigurationError, FactorsFileError, InfluenceError, InputOrderError,
                     StateFileError)
from .factors import Factors, LayerFactors
from .fitting import fit_factors
from .layers import TrackedLayer, select_layers
from .memory import MemoryEstimate, estimate_memory
from .options import AttributionOptions
from .reporting import Reporter, TensorBoardReporter
from .schedule import AttributionSchedule, Reason
from .session import InfluenceSession
from .streaming import StreamedScores, StreamingScorer
from .tasks import CausalLMTask, ClassificationTask, RegressionTask, Task
from .token_report import TokenReporter
from .tracker import InfluenceTracker

__version__ = "0.1.0"

__all__ = [
    "AttributionData",
    "AttributionOptions",
    "AttributionResult",
    "AttributionSchedule",
    "Attributor",
    "BatchFormatError",
    "CausalLMTask",
    "ClassificationTask",
    "ConfigurationError",
    "Factors",
    "FactorsFileError",
    "InfluenceConfig",
    "InfluenceError",
    "InfluenceSession",
    "InfluenceTracker",
    "InputOrderError",
    "LayerFactors",
    "MemoryEstimate",
    "PreconditionedQueries",
    "Reason",
    "RegressionTask",
    "Reporter",
    "StateFileError",
    "StreamedScores",
    "StreamingScorer",
    "Task",
    "TensorBoardReporter",
    "TokenReporter",
    "TopK",
    "TrackedLayer",
    "build_attribution_data",
    "estimate_memory",
    "fit_factors",
    "read_artifacts",
    "select_layers",
]
