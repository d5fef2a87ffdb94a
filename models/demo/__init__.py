"""The demo model: a small Qwen2 decoder trained here on a checkable synthetic task."""
