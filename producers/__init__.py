"""Publishing memory events to the memory topic."""

from producers.producer import MemoryProducer, now_ms

__all__ = ["MemoryProducer", "now_ms"]
