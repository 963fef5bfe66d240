"""The config's sections, one module per concern; :mod:`fedlora.config.schema` puts them together."""
