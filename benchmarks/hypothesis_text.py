"""What a partial hypothesis's text costs per chunk: the whole hypothesis decoded anew, against
the incremental :class:`~sparse_rnnt.streaming.stream.HypothesisText`, side by side.

    python -m benchmarks.hypothesis_text [--tokens 1000,3000,10000] > rows.jsonl

A character tokenizer is trained on a fixed text; a hypothesis of N tokens is drawn with about
one word start in five tokens (as in text), and one more token is appended 20 times. Per row: N,
``whole_us`` (``tokenizer.decode`` of the whole hypothesis per call, what every partial cost
before), ``incremental_us`` (one ``HypothesisText`` call per appended token) and their ratio.
Medians of 5 rounds. The first line printed is the machine and versions (commit and date).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TEXT = ["the quick brown fox jumps over the lazy dog", "het is één uur en de zon schijnt",
        "la ruïne est près de la rivière", "zij zeggen dat 't niet kan"]


def run(lengths: list[int], rounds: int = 5, appends: int = 20) -> list[dict[str, Any]]:
    """One row per hypothesis length (see the module docstring)."""
    from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig
    from sparse_rnnt.streaming.stream import HypothesisText, WordStarts

    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer.train(TEXT, TokenizerConfig(model_type="char"), Path(tmp) / "t.model")
    starts = WordStarts.of(tok)
    assert starts is not None
    rng = random.Random(0)
    ids = [i for i in range(tok.vocab_size) if i != tok.blank]
    word = sorted(starts.words | starts.space)
    rows = []
    for n in lengths:
        tokens = [rng.choice(word) if rng.random() < 0.2 else rng.choice(ids) for _ in range(n + appends)]
        whole, inc = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i in range(n, n + appends):
                tok.decode(tokens[: i + 1])
            whole.append((time.perf_counter() - t0) / appends)
            text = HypothesisText(tok, starts)
            text(tokens[:n], 0)  # the hypothesis so far, as after earlier chunks
            t0 = time.perf_counter()
            for i in range(n, n + appends):
                out = text(tokens[: i + 1], i)
            inc.append((time.perf_counter() - t0) / appends)
            assert out == tok.decode(tokens[: n + appends])
        w, c = statistics.median(whole), statistics.median(inc)
        rows.append({"bench": "hypothesis_text", "tokens": n, "whole_us": 1e6 * w, "incremental_us": 1e6 * c,
                     "speedup": w / c})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="100,1000,3000,10000", help="comma-separated hypothesis lengths")
    args = parser.parse_args(argv)
    try:
        lengths = [int(x) for x in args.tokens.split(",")]
    except ValueError:
        parser.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if not lengths or min(lengths) < 1:
        parser.error("--tokens must be integers >= 1")
    from benchmarks.env import environment

    print(json.dumps({"environment": environment()}), flush=True)
    for row in run(lengths):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
