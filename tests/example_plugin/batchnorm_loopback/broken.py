"""A plugin whose import fails, as one with a missing dependency would."""

raise ImportError("simulated missing dependency of the broken example plugin")
