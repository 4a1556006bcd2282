"""Everything on disk: paths and names (layout), the checked container, the
KV codec, history files, and the threads that read and write them."""

from .container import CacheFileError, CacheWriteError
from .layout import Layout, validate_agent_name

__all__ = ["CacheFileError", "CacheWriteError", "Layout", "validate_agent_name"]
