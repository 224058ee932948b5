"""A Python worker for the compose cluster: text statistics the nodes do not have.

Serves ``text_stats(text)`` (resource ``python``): words, distinct words, the most common
word and the text's sentiment. It connects to ``MPREG_URL`` and, when
``MPREG_WORKER_TOKEN_FILE`` names a file, presents the token in it (nodes with
credentials accept no worker without one). It reconnects when its node restarts and
leaves cleanly on SIGTERM.

    MPREG_URL=ws://node-b:9000 python text_worker.py
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal

from mpreg_worker import Worker

POSITIVE = {"good", "great", "excellent", "amazing", "wonderful", "love"}
NEGATIVE = {"bad", "terrible", "awful", "horrible", "hate", "broken"}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token_file = os.environ.get("MPREG_WORKER_TOKEN_FILE")
    token = open(token_file, encoding="utf-8").read().strip() if token_file else None
    worker = Worker(os.environ.get("MPREG_URL", "ws://127.0.0.1:6666"), os.environ.get("MPREG_WORKER_NAME", "text"),
                    token=token)

    @worker.function(resources=["python"], version="1.0.0")
    def text_stats(text: str) -> dict:
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, not {type(text).__name__}")
        words = [w.strip(".,!?;:").lower() for w in text.split()]
        words = [w for w in words if w]
        counts = collections.Counter(words)
        score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        return {
            "words": len(words),
            "distinct": len(counts),
            "most_common": counts.most_common(1)[0][0] if counts else None,
            "sentiment": "positive" if score > 0 else "negative" if score < 0 else "neutral",
        }

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.stop()))
        await worker.run()

    asyncio.run(run())


if __name__ == "__main__":
    main()
