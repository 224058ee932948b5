"""The mission's ML inference pipeline with its models in Python workers.

Two nodes (the built `mpreg` binary: `MPREG_BIN`, else target/debug/mpreg) form a cluster;
three Python workers serve the models and the feature extraction, each connected to one
node; a client on the other node sends the pipelines as dependency graphs that mix the
nodes' own Rust functions (`echo`, `multiply`) with the workers' Python functions.
Every result is checked; the exit code is 1 when one is wrong.

    python python/examples/ml_inference.py
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from mpreg_worker import Client, Worker

ROOT = Path(__file__).resolve().parents[2]

# --- the models: small, real computations ------------------------------------------

# Nearest centroid over 4x4 "images" (brightness grids): a cat is bright in the middle.
CENTROIDS = {
    "cat": [0.1, 0.2, 0.2, 0.1, 0.2, 0.9, 0.9, 0.2, 0.2, 0.9, 0.9, 0.2, 0.1, 0.2, 0.2, 0.1],
    "dog": [0.9, 0.1, 0.1, 0.9, 0.1, 0.3, 0.3, 0.1, 0.1, 0.3, 0.3, 0.1, 0.9, 0.1, 0.1, 0.9],
    "bird": [0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
}
POSITIVE = {"great", "excellent", "amazing", "wonderful", "fantastic"}
NEGATIVE = {"terrible", "awful", "horrible", "bad", "disappointing"}
PLACES = {"San Francisco", "Paris", "Tokyo"}
ORGS = {"OpenAI", "MPREG", "Acme"}


def softmax(scores: dict[str, float]) -> dict[str, float]:
    top = max(scores.values())
    exp = {k: math.exp(v - top) for k, v in scores.items()}
    total = sum(exp.values())
    return {k: round(v / total, 4) for k, v in exp.items()}


def features_worker(url: str) -> Worker:
    worker = Worker(url, "Feature-Processing")

    @worker.function(resources=["preprocessing", "feature-extraction"])
    def preprocess_image(request: dict) -> dict:
        pixels = request["pixels"]
        peak = max(pixels) or 1
        return {**request, "pixels": [p / peak for p in pixels], "normalized": True,
                "trail": request.get("trail", []) + ["preprocess_image@python"]}

    @worker.function(resources=["preprocessing", "embeddings"])
    def extract_text_features(text: str) -> dict:
        words = text.replace("!", " ").replace(".", " ").split()
        return {"text": text, "word_count": len(words), "words": [w.lower() for w in words],
                "sentence_count": sum(text.count(c) for c in ".!?")}

    return worker


def vision_worker(url: str) -> Worker:
    worker = Worker(url, "Vision-Models", max_concurrency=4)

    @worker.function(resources=["vision", "image-classification"], version="2.1.0")
    async def classify_image(request: dict) -> dict:
        pixels = request["pixels"]
        distance = {k: math.dist(pixels, c) for k, c in CENTROIDS.items()}
        probabilities = softmax({k: -8 * d for k, d in distance.items()})
        label = max(probabilities, key=probabilities.get)
        return {"request_id": request["request_id"], "label": label, "probabilities": probabilities,
                "model": "nearest-centroid-4x4", "trail": request["trail"] + ["classify_image@python"]}

    return worker


def nlp_worker(url: str) -> Worker:
    worker = Worker(url, "NLP-Models", max_concurrency=4)

    @worker.function(resources=["nlp", "sentiment"])
    def analyze_sentiment(features: dict) -> dict:
        words = set(features["words"])
        positive, negative = len(words & POSITIVE), len(words & NEGATIVE)
        score = 1 / (1 + math.exp(-(positive - negative)))
        label = "positive" if score > 0.6 else "negative" if score < 0.4 else "neutral"
        return {"sentiment": label, "score": round(score, 4), "positive_words": positive}

    @worker.function(resources=["nlp", "text-analysis"])
    def extract_entities(features: dict) -> list:
        text = features["text"]
        found = [{"text": e, "label": "LOC", "start": text.index(e)} for e in PLACES if e in text]
        found += [{"text": e, "label": "ORG", "start": text.index(e)} for e in ORGS if e in text]
        return sorted(found, key=lambda e: e["start"])

    return worker


# --- the cluster --------------------------------------------------------------------


class Node:
    def __init__(self, name: str, *flags: str):
        binary = os.environ.get("MPREG_BIN") or str(ROOT / "target" / "debug" / "mpreg")
        args = [binary, "server", "start", "--port", "0", "--monitoring-port", "0", "--name", name,
                "--cluster-id", f"ml-example-{os.getpid()}", *flags]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = self.monitoring = ""
        ready = threading.Event()

        def read():
            for line in self.process.stdout:
                key, _, value = line.strip().partition("=")
                if key == "MPREG_URL":
                    self.url = value
                elif key == "MPREG_MONITORING_URL":
                    self.monitoring = value
                if self.url and self.monitoring:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(30):
            raise RuntimeError(f"node {name} did not start")

    def knows(self, fun: str) -> bool:
        with urllib.request.urlopen(self.monitoring + "/catalog", timeout=5) as reply:
            catalog = json.load(reply)
        return any(f["name"] == fun for n in catalog["nodes"] for f in n["functions"])

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def check(what: str, got, want) -> None:
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")
    print(f"    ok  {what} = {got!r}")


async def main() -> None:
    router = Node("ML-Router", "--functions", "demo")
    models = Node("Model-Host", "--peer", router.url)
    workers = [features_worker(router.url), vision_worker(models.url), nlp_worker(models.url)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        for fun in ("preprocess_image", "classify_image", "analyze_sentiment", "extract_entities"):
            for _ in range(750):
                if await asyncio.to_thread(router.knows, fun):
                    break
                await asyncio.sleep(0.02)
            else:
                raise RuntimeError(f"{fun} never reached the router's catalog")
        print("cluster: ML-Router (Rust demo functions, Python feature worker), "
              "Model-Host (Python vision and NLP workers)")
        async with await Client.connect(router.url) as client:
            print("\n  vision pipeline: echo (Rust) -> preprocess_image (Python) -> classify_image (Python)")
            image = [0.05, 0.1, 0.1, 0.05, 0.1, 0.45, 0.5, 0.1, 0.1, 0.5, 0.45, 0.1, 0.05, 0.1, 0.1, 0.05]
            r = await client.request([
                {"name": "routed", "fun": "echo", "args": [{"request_id": "req-1", "pixels": image,
                                                             "trail": ["echo@rust"]}]},
                {"name": "pre", "fun": "preprocess_image", "args": ["routed"],
                 "locs": ["preprocessing", "feature-extraction"]},
                {"name": "classified", "fun": "classify_image", "args": ["pre"],
                 "locs": ["vision"], "version_constraint": ">=2.0"},
            ])
            c = r["classified"]
            check("label", c["label"], "cat")
            check("probabilities sum to 1", round(sum(c["probabilities"].values()), 3), 1.0)
            check("trail", c["trail"], ["echo@rust", "preprocess_image@python", "classify_image@python"])
            if not c["probabilities"]["cat"] > 0.9:
                raise AssertionError(f"cat confidence too low: {c['probabilities']}")

            print("\n  text pipeline: extract_text_features -> (analyze_sentiment | extract_entities), in parallel")
            text = "MPREG is amazing! Great latency from OpenAI offices in San Francisco."
            r = await client.request([
                {"name": "features", "fun": "extract_text_features", "args": [text]},
                {"name": "sentiment", "fun": "analyze_sentiment", "args": ["features"], "locs": ["nlp"]},
                {"name": "entities", "fun": "extract_entities", "args": ["features"], "locs": ["nlp"]},
            ])
            check("sentiment", r["sentiment"]["sentiment"], "positive")
            check("positive words", r["sentiment"]["positive_words"], 2)
            check("entities", [e["text"] for e in r["entities"]], ["MPREG", "OpenAI", "San Francisco"])

            print("\n  batch: 8 requests at once, a Rust step (multiply) fed by a Python model")
            reviews = [("terrible and awful", "negative"), ("wonderful, excellent work", "positive"),
                       ("it is a chair", "neutral"), ("bad", "negative")] * 2
            answers = await asyncio.gather(*(client.request([
                {"name": "f", "fun": "extract_text_features", "args": [t]},
                {"name": "s", "fun": "analyze_sentiment", "args": ["f"]},
                {"name": "pct", "fun": "multiply", "args": ["s.score", 100]},
                {"name": "label", "fun": "echo", "args": ["s.sentiment"]},
            ]) for t, _ in reviews))
            check("labels", [a["label"] for a in answers], [want for _, want in reviews])
            check("scores are percentages", all(0 <= a["pct"] <= 100 for a in answers), True)
        print("\nML inference complete: Python models served calls routed by resources and versions,")
        print("fed by Rust functions through dependencies, across two nodes")
    finally:
        for w in workers:
            await w.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        router.stop()
        models.stop()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
