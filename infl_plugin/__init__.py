"""infl_plugin: EK-FAC influence functions that ride along with normal training.

Data flows one way: hooks → statistics → factors → attributor → reporting. See README.md.
"""

from .artifacts import AttributionResult, read_artifacts
from .attributor import Attributor, PreconditionedQueries, TopK
from .config import InfluenceConfig
from .errors import BatchFormatError, ConfigurationError, FactorsFileError, InfluenceError, InputOrderError
from .factors import Factors, LayerFactors
from .fitting import fit_factors
from .layers import TrackedLayer, select_layers
from .memory import MemoryEstimate, estimate_memory
from .reporting import Reporter, TensorBoardReporter
from .session import InfluenceSession
from .streaming import StreamedScores, StreamingScorer
from .tasks import CausalLMTask, ClassificationTask, RegressionTask, Task
from .token_report import TokenReporter
from .tracker import InfluenceTracker

__version__ = "0.1.0"

__all__ = [
    "AttributionResult",
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
    "RegressionTask",
    "Reporter",
    "StreamedScores",
    "StreamingScorer",
    "Task",
    "TensorBoardReporter",
    "TokenReporter",
    "TopK",
    "TrackedLayer",
    "estimate_memory",
    "fit_factors",
    "read_artifacts",
    "select_layers",
]
