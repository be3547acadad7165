"""A peer: the same projection written with Quix Streams, as a user of it would.

Each event is decoded by the Strata codec, then a stateful step keeps the
key's latest record and every version of it in Quix's RocksDB state store
(state is per message key, ``tenant/key``, as Strata's L2 is). Binary fields
are base64 text, since the store serialises values as JSON. Everything else
is Quix's defaults: changelog topics on, at-least-once, commits every 5 s and
on exit. The clock runs from building the application until ``run`` returns
after the last event, its final commit included.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
import warnings
from typing import Any

from bench.context import Context
from bench.dataset import Dataset
from bench.registry import Measurement, Skip, ratio, stage, target
from schemas.codec import Codec


@stage("quix", "the same projection built on Quix Streams (RocksDB state)", order=60)
def quix(ctx: Context) -> list[Measurement]:
    """One run of the Quix Streams projection over the dataset topic."""
    with warnings.catch_warnings():
        # authlib, a dependency of quixstreams, warns about its own imports and
        # puts an "always" filter first when imported: import it, then ignore.
        with contextlib.suppress(ImportError):
            import authlib.deprecate  # noqa: F401
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import quixstreams
        except ImportError as exc:
            raise Skip(f"quixstreams is not installed ({exc})") from exc
        data = ctx.dataset()
        seconds = _run(quixstreams, ctx, data)
    return [
        Measurement(
            "quix.projection",
            data.events / seconds,
            "events/s",
            "peer: Quix Streams projection (state + changelog)",
        )
    ]


def _run(qs: Any, ctx: Context, data: Dataset) -> float:
    from quixstreams.models.serializers import Deserializer

    class StrataEvents(Deserializer):  # type: ignore[misc]
        """Message values decoded by the Strata codec."""

        def __init__(self) -> None:
            super().__init__()
            self.codec = Codec()

        def __call__(self, value: bytes, ctx: object) -> Any:
            return self.codec.decode(value)

    def remember(event: Any, state: Any) -> int:
        version = int(state.get("version", 0)) + 1
        record = {
            "event_id": event.event_id,
            "version": version,
            "cls": event.cls,
            "agent": event.agent,
            "time_ms": event.time_ms,
            "key_id": event.key_id,
            "key_version": event.key_version,
            "nonce": base64.b64encode(event.nonce).decode(),
            "ciphertext": base64.b64encode(event.ciphertext).decode(),
            "content_hash": base64.b64encode(event.content_hash).decode(),
        }
        state.set("latest", record)
        state.set(f"v{version:010d}", record)
        state.set("version", version)
        return version

    state_dir = ctx.fresh_data_dir("quix-state")
    began = time.perf_counter()
    app = qs.Application(
        broker_address=data.settings.kafka_bootstrap,
        consumer_group=ctx.fresh_name("quix"),
        auto_offset_reset="earliest",
        state_dir=str(state_dir),
        loglevel=logging.WARNING,
    )
    topic = app.topic(
        data.topic, value_deserializer=StrataEvents(), key_deserializer="bytes"
    )
    app.dataframe(topic).apply(remember, stateful=True)
    app.run(count=data.events, collect=False)
    return time.perf_counter() - began


ratio(
    "worker.full_vs_quix",
    "worker.full",
    "quix.projection",
    "projection (FULL) / Quix Streams projection",
)
target("worker.full_vs_quix", ">=", 1.2)
