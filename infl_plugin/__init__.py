"""infl_plugin: EK-FAC influence functions that ride along with normal training.

Data flows one way: hooks → statistics → factors → attributor → reporting. See README.md.
"""

from .results.artifacts import AttributionResult, read_artifacts
from .scoring.attributor import Attributor, PreconditionedQueries, TopK
from .config.influence import InfluenceConfig
from .run.data import AttributionData, build_attribution_data
from .errors import (BatchFormatError, ConfigurationError, FactorsFileError, InfluenceError, InputOrderError,
                     StateFileError)
from .curvature.factors import Factors, LayerFactors
from .curvature.fitting import fit_factors
from .curvature.layers import TrackedLayer, select_layers
from .curvature.memory import MemoryEstimate, estimate_memory
from .config.options import AttributionOptions
from .report.protocol import Reporter
from .report.tensorboard import TensorBoardReporter
from .run.schedule import AttributionSchedule, Reason
from .run.session import InfluenceSession
from .scoring.streaming.scorer import StreamedScores, StreamingScorer
from .tasks import CausalLMTask, ClassificationTask, RegressionTask, Task
from .report.token_report import TokenReporter
from .scoring.streaming.tracker import InfluenceTracker

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
