"""Configuration: the YAML schema, loading and validation with line-numbered errors."""

from agentproxy.config.loader import load
from agentproxy.config.model import Config
from agentproxy.config.yamldoc import ConfigError, Issue

__all__ = ["Config", "ConfigError", "Issue", "load"]
