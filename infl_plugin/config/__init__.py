"""What the user declares: `InfluenceConfig`, `AttributionOptions`, the allowed values. No torch math."""

from .groups import SHAPES_STATISTICS
from .influence import (CurvatureSettings, InfluenceConfig, ScoringSettings, StreamingSettings, TrackingSettings,
                        plain_fields, reject_unknown_fields, resolve_config)
from .options import AttributionOptions, resolve_options

__all__ = ["AttributionOptions", "CurvatureSettings", "InfluenceConfig", "SHAPES_STATISTICS", "ScoringSettings",
           "StreamingSettings", "TrackingSettings", "plain_fields", "reject_unknown_fields", "resolve_config",
           "resolve_options"]
