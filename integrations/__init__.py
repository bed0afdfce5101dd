"""Framework adapters, importable as ``infl_plugin.integrations.*``.

Each adapter only translates framework events into calls on the framework-free core.
"""
