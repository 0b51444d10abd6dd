"""Run configuration: the YAML schema and its loading."""

from framework.config.load import ConfigError, gradient_accumulation_steps, load_run_config
from framework.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "gradient_accumulation_steps", "load_run_config"]
