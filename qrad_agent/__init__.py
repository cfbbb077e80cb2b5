"""qrad-agent: the agent for compute radiators."""

__version__ = "0.1.0"
