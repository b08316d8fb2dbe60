"""attnforge: TVM passes and schedules that make transformer attention fast."""

__version__ = "0.1.0"
