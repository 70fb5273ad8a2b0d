#!/usr/bin/env python3
"""Fine-tunes a small causal language model with swift_lycoris.create_lycoris — not only
diffusion models.

A transformers Llama built from a tiny config with random weights (nothing is
downloaded) learns a generated character-level text. The base weights stay frozen; per
algorithm the example trains the adapters with AdamW, prints the loss falling, saves the
adapter, reloads it onto a fresh copy of the base model (the same logits) and merges it
into the weights (the same logits without the server).

    python examples/causal_lm.py --algos lora,lokr,dora --steps 80 [--json summary.json]

DoRA is LyCORIS's `dora_wd` (`weight_decompose`) on LoRA: the server reads each layer's
base weight once, at creation, to normalise W0 + ΔW.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import swift_lycoris

# name -> create_lycoris keyword arguments
ALGORITHMS = {
    "lora": dict(algo="lora", linear_dim=8, linear_alpha=8.0),
    "lokr": dict(algo="lokr", linear_dim=8, linear_alpha=8.0, factor=4),
    "loha": dict(algo="loha", linear_dim=4, linear_alpha=4.0),
    "dora": dict(algo="lora", linear_dim=8, linear_alpha=8.0, dora_wd=True),
}


def corpus(length: int = 4096, seed: int = 0) -> str:
    """A generated text with structure to learn: words drawn from a small vocabulary,
    each followed by its own fixed successor most of the time."""
    words = ["swift", "lycoris", "adapter", "rank", "kernel", "tensor", "orbit", "delta"]
    g = torch.Generator().manual_seed(seed)
    text, word = [], 0
    while sum(len(w) + 1 for w in text) < length:
        text.append(words[word])
        word = (word + 1) % len(words) if torch.rand((), generator=g) < 0.8 else int(torch.randint(len(words), (), generator=g))
    return " ".join(text)


def base_model(vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def batches(ids: torch.Tensor, steps: int, batch: int = 8, length: int = 48, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(len(ids) - length - 1, (batch,), generator=g)
        yield torch.stack([ids[s:s + length] for s in starts.tolist()])


def train_one(name: str, kwargs: dict, ids, vocab: int, steps: int, out_dir: Path, seed: int) -> dict:
    model = base_model(vocab, seed)
    network = swift_lycoris.create_lycoris(model, seed=seed, **kwargs)
    network.apply_to()
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3)
    losses = []
    for step, tokens in enumerate(batches(ids, steps)):
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        if step % max(1, steps // 8) == 0 or step == steps - 1:
            print(f"  {name:5s} step {step:4d}  loss {losses[-1]:.4f}", flush=True)

    network.eval()
    probe = ids[:48].unsqueeze(0)
    with torch.no_grad():
        trained = model(input_ids=probe).logits
        untouched = base_model(vocab, seed)(input_ids=probe).logits
    path = out_dir / f"{name}.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "swift_lycoris", "example": "causal_lm"})

    # Reload onto a fresh copy of the same base model.
    fresh = base_model(vocab, seed)
    reloaded = swift_lycoris.create_lycoris_from_weights(1.0, str(path), fresh)
    reloaded.apply_to()
    reloaded.eval()
    with torch.no_grad():
        again = fresh(input_ids=probe).logits
    # Merge into the weights: the model then runs without the server.
    reloaded.merge_to()
    with torch.no_grad():
        merged = fresh(input_ids=probe).logits
    reloaded.close()
    network.close()
    scale = float(trained.abs().max())
    return {
        "first_loss": sum(losses[:5]) / 5, "last_loss": sum(losses[-5:]) / 5,
        "adapter_effect": float((trained - untouched).abs().max()) / scale,
        "reload_error": float((again - trained).abs().max()) / scale,
        "merge_error": float((merged - trained).abs().max()) / scale,
        "file": str(path),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", default="lora,lokr,dora", help=f"comma-separated, of {', '.join(ALGORITHMS)}")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="where the adapters go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write the summary there")
    args = parser.parse_args(argv)
    names = [a.strip() for a in args.algos.split(",") if a.strip()]
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        parser.error(f"unknown algorithm(s) {unknown}; choose from {list(ALGORITHMS)}")

    text = corpus()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="causal_lm-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in names:
        print(f"{name}:", flush=True)
        summary[name] = train_one(name, ALGORITHMS[name], ids, len(chars), args.steps, out_dir, args.seed)
        result = summary[name]
        print(f"  loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}; the adapter moves the logits by "
              f"{result['adapter_effect']:.2f} (relative); reloaded adapter: max rel. "
              f"logit error {result['reload_error']:.1e}; merged weights: {result['merge_error']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
