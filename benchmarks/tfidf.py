"""TF-IDF candidates: how much of the unfiltered top-10 do the top-N TF-IDF candidates recover?

The language-model example (``examples/hf_causal_lm.py``): its byte-level BPE tokenizer, its
64-token passages of the CPython language reference (``pydoc_data.topics``, topics "with", "for"
and "lambda" held out) and its GPT-2 (4 layers, width 64), trained here with a plain AdamW loop
(batch 16, learning rate 3e-3). Queries: the example's three prompt + completion queries and every
passage of the held-out topics. At the final parameters, EK-FAC factors are fitted on the training
passages and every query is scored against every passage (``candidates="all"``); per query the
top 10 by score (most helpful) and by absolute score (most influential either way) are the reference.
``candidates="tfidf"`` keeps per query the N passages most similar by TF-IDF (scikit-learn, word
unigrams of the decoded text, as `infl_plugin.run.candidates` does with a tokenizer); the table gives
the share of the reference top 10 inside those N, averaged over queries, next to the share a random
subset of N would hold in expectation (N / passages).

    python benchmarks/tfidf.py            # ~2 min on 2 cores
    python benchmarks/tfidf.py --quick    # 1 epoch on 1500 passages
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from pydoc_data.topics import topics

from common import ROOT, setup_threads, table, write_section

sys.path.insert(0, str(ROOT / "examples"))

import infl_plugin as ip  # noqa: E402
from hf_causal_lm import HELD_OUT, Collate, passages, query_examples, train_tokenizer  # noqa: E402
from infl_plugin.run.candidates import TfidfIndex  # noqa: E402
from infl_plugin.run.data import make_loader  # noqa: E402

SIZES = (10, 50, 100, 200, 500, 1000)


def train(model: torch.nn.Module, items: list[dict], collate: Collate, epochs: int, seed: int) -> None:
    """Plain AdamW training on shuffled batches of 16 (the example's recipe without warm-up)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(items, batch_size=16, shuffle=True, collate_fn=collate, generator=generator)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def recovered(reference: torch.Tensor, candidates: torch.Tensor) -> float:
    """Mean over queries of |reference top-k ∩ candidates| / k (``[Q, k]`` and ``[Q, N]`` indices)."""
    shares = [len(set(r.tolist()) & set(c.tolist())) / r.numel() for r, c in zip(reference, candidates)]
    return sum(shares) / len(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-passages", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.max_passages = 1, args.max_passages or 1500
    setup_threads()
    from transformers import GPT2Config, GPT2LMHeadModel

    started = time.perf_counter()
    train_texts = [text for name, text in sorted(topics.items()) if name not in HELD_OUT]
    tokenizer = train_tokenizer(train_texts)
    items = passages(train_texts, tokenizer, 64)[: args.max_passages]
    held_out = passages([topics[name] for name in HELD_OUT], tokenizer, 64)
    queries = [{"input_ids": q["input_ids"], "labels": q["labels"]} for q in query_examples(tokenizer)] + held_out
    collate = Collate(tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=4, n_head=4,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    train(model, items, collate, args.epochs, args.seed)
    trained_s = time.perf_counter() - started

    config = ip.InfluenceConfig(strategy="ekfac", module_types=["Conv1D"])
    task = ip.CausalLMTask()
    train_loader = make_loader(items, 32, collate)
    factors = ip.fit_factors(model, task, train_loader, config)
    scores = ip.Attributor(model, task, factors, config).pairwise_scores(make_loader(queries, 32, collate), train_loader)
    scored_s = time.perf_counter() - started - trained_s

    decode = tokenizer.decode
    index = TfidfIndex([decode(p["input_ids"]) for p in items])
    query_texts = [decode(q["input_ids"]) for q in queries]
    sizes = [n for n in SIZES if n < len(items)]
    nearest = index.top(query_texts, max(sizes))  # [Q, max N], most similar first
    top_helpful = scores.topk(10, dim=1).indices
    top_abs = scores.abs().topk(10, dim=1).indices
    rows = []
    for n in sizes:
        rows.append([n, f"{100 * n / len(items):.1f} %", f"{100 * recovered(top_helpful, nearest[:, :n]):.1f} %",
                     f"{100 * recovered(top_abs, nearest[:, :n]):.1f} %", f"{100 * min(1.0, n / len(items)):.1f} %"])
    body = (f"{len(items)} training passages of 64 tokens, {len(queries)} queries (3 prompt + completion, "
            f"{len(held_out)} held-out passages), {args.epochs} epoch(s) of AdamW; EK-FAC on the 16 Conv1D layers. "
            f"Training {trained_s:.0f}s, factors + full scoring {scored_s:.0f}s.\n\n"
            + table(["TF-IDF candidates N per query", "N / passages", "top-10 helpful recovered",
                     "top-10 by abs(score) recovered", "random N (expected)"], rows)
            + "\n\nReading: TF-IDF keeps the passages sharing rare words with the query. Its recall of the "
              "influence top 10 is the price of skipping the other passages; the paper applies it to pick "
              "~10k candidates out of a pre-training corpus, where scoring everything is out of reach.")
    print(body)
    write_section("TF-IDF candidates", body)


if __name__ == "__main__":
    main()
