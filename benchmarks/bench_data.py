"""Benchmark `chatray data prepare` against a bare `tokenizers` encode_batch over the same texts.

Generates a corpus of N conversations (default 50,000) by recombining chatterbot-corpus exchanges, trains one
BPE tokenizer (excluded from both timings: it is passed to prepare as a folder), then measures in one run:

  baseline   tokenizers.Tokenizer.encode_batch over the rendered conversations (2 cores, Rust threads): the
             faster of one call over all texts and calls of 4,096 texts
  prepare    prepare_dataset() end to end: Ray start-up, read + validate + render (Ray tasks for inputs over 4 MB),
             Ray Data tokenization, label masks, Parquet shards, manifest; Ray start-up, reading and the Ray Data
             stage printed separately
and prints tokens/s for each and the ratio (target >= 0.5), plus how prepare scales with workers/shards.

    python benchmarks/bench_data.py [--conversations 50000] [--workers 1,2] [--shards 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path


def make_corpus(path: Path, n: int, seed: int = 0) -> int:
    from chatray.data.readers import iter_conversations

    convs, _ = iter_conversations(["chatterbot:english", "chatterbot:chinese"])
    pairs = [(c.messages[i]["content"], c.messages[i + 1]["content"]) for c in convs
             for i in range(0, len(c.messages) - 1, 2)]
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = []
            for u, a in rng.sample(pairs, rng.randint(1, 4)):
                msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=50_000)
    ap.add_argument("--workers", default="1,2", help="comma-separated tokenizer worker counts to measure")
    ap.add_argument("--shards", type=int, default=None, help="train shards (default: one per worker)")
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from chatray.data.prepare import prepare_dataset
    from chatray.data.readers import read_file
    from chatray.data.tokenizer import render_chat, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="chatray-bench-data-"))
    try:
        corpus = work / "corpus.jsonl"
        n_pairs = make_corpus(corpus, args.conversations)
        convs, _ = read_file(corpus)
        texts = [render_chat(c.messages)[0] for c in convs]
        print(f"corpus: {len(convs):,} conversations from {n_pairs:,} chatterbot exchanges, "
              f"{corpus.stat().st_size / 1e6:.1f} MB")
        t = time.perf_counter()
        tok = train_tokenizer(texts, 8000, max_length=args.max_length)
        print(f"tokenizer training (excluded from both): {time.perf_counter() - t:.1f}s")
        tokdir = work / "tok"
        tok.save_pretrained(tokdir)

        backend = tok.backend_tokenizer
        backend.encode_batch(texts[:1000])  # warm-up
        # The baseline is the faster of one encode_batch over all texts and calls of 4,096 texts (what prepare's
        # tasks do): on big corpora the single call slows down with the memory its millions of Encodings take.
        t = time.perf_counter()
        encs = backend.encode_batch(texts, add_special_tokens=False)
        whole_s = time.perf_counter() - t
        base_tokens = sum(len(e) for e in encs)
        del encs
        t = time.perf_counter()
        chunked_tokens = 0
        for lo in range(0, len(texts), 4096):
            chunked_tokens += sum(len(e) for e in backend.encode_batch(texts[lo:lo + 4096], add_special_tokens=False))
        chunked_s = time.perf_counter() - t
        assert chunked_tokens == base_tokens
        base_s = min(whole_s, chunked_s)
        base_tps = base_tokens / base_s
        print(f"baseline  tokenizers.encode_batch: {base_tokens:,} tokens in {base_s:.2f}s = {base_tps:,.0f} tokens/s "
              f"(the faster of one call {whole_s:.2f}s and calls of 4,096 texts {chunked_s:.2f}s)")

        results = []
        for w in [int(x) for x in args.workers.split(",")]:
            out = work / f"out-w{w}"
            t1 = time.perf_counter()
            # prepare_dataset starts (and stops) its own local Ray, as `chatray data prepare` does: the timing
            # includes Ray start-up.
            m = prepare_dataset([str(corpus)], str(out), tokenizer=str(tokdir), max_length=args.max_length,
                                shards=args.shards or w, num_workers=w, progress=False)
            total_s = time.perf_counter() - t1
            ray_s = m["timing_s"]["ray_start"]
            tokens = m["counts"]["tokens"]
            tps = tokens / total_s
            results.append((w, tps))
            print(f"prepare   workers={w} shards={m['counts']['shards']}: {tokens:,} tokens in {total_s:.1f}s "
                  f"(Ray start-up {ray_s:.1f}s; read + render {m['timing_s']['read']:.1f}s; Ray Data tokenization "
                  f"{m['timing_s']['encode']:.1f}s) -> {tps:,.0f} tokens/s; ratio vs baseline {tps / base_tps:.2f} "
                  f"incl. Ray start-up, {tokens / m['timing_s']['encode'] / base_tps:.2f} for the Ray Data stage alone")
            shutil.rmtree(out, ignore_errors=True)
        best = max(r[1] for r in results)
        print(f"RESULT ratio(best prepare incl. Ray start-up / bare encode_batch) = {best / base_tps:.2f} "
              f"(target >= 0.5)")
        if len(results) > 1:
            print("scaling: " + ", ".join(f"{w} worker(s) {tps / results[0][1]:.2f}x" for w, tps in results))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
