"""The error a config check raises (vlmflow.checks runs the checks, each stage owns its
own): the config key, the value and what would work, before the first job runs."""


class ConfigError(ValueError):
    """A config value that passed the schema but cannot be used."""
