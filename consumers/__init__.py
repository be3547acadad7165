"""Consumers of the memory topic: the projection worker and the dead-letter tools."""

from consumers.worker import Worker, WorkerReport

__all__ = ["Worker", "WorkerReport"]
