"""What the user declares: `InfluenceConfig`, `AttributionOptions`, the allowed values. No torch math."""

from .influence import InfluenceConfig, plain_fields, reject_unknown_fields, resolve_config
from .options import AttributionOptions, resolve_options

__all__ = ["AttributionOptions", "InfluenceConfig", "plain_fields", "reject_unknown_fields", "resolve_config",
           "resolve_options"]
