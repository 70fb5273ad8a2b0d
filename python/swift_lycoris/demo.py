"""The main job of the README: train an adapter through ``swift_lycoris.kohya`` — the same
calls kohya's train_network.py makes — on a small built-in diffusion model with synthetic
data (no downloads), then save it with kohya metadata, describe it, and plot the loss.

    python -m swift_lycoris.demo [--algo loha] [--steps 120] [--out demo-adapter.safetensors]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import kohya
from .plot import write_loss_plot


def tiny_models(seed: int):
    """A small SD-style UNet and CLIP text encoder built from configs (random weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))
    return unet, text_encoder


def synthetic_data(count: int, seed: int):
    """Fixed latents, noise, timesteps and token ids: the adapter learns to denoise them."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(count, 4, 8, 8, generator=generator)
    noise = torch.randn(count, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (count,), generator=generator)
    tokens = torch.randint(0, 1000, (count, 16), generator=generator)
    alphas = torch.cos(timesteps.float() / 1000 * torch.pi / 2) ** 2
    noisy = alphas.sqrt().view(-1, 1, 1, 1) * latents + (1 - alphas).sqrt().view(-1, 1, 1, 1) * noise
    return noisy, noise, timesteps, tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", default=os.environ.get("ALGO", "loha"), help=f"one of {', '.join(kohya.COMPUTED_ALGORITHMS)}")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default="demo-adapter.safetensors")
    parser.add_argument("--plot", default="demo-loss.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.algo not in kohya.COMPUTED_ALGORITHMS:
        print(f"swift_lycoris.demo: unknown algorithm {args.algo!r}; choose one of {', '.join(kohya.COMPUTED_ALGORITHMS)}",
              file=sys.stderr)
        return 2
    from tqdm import tqdm

    unet, text_encoder = tiny_models(args.seed)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    noisy, noise, timesteps, tokens = synthetic_data(16, args.seed + 1)

    network_args = {"algo": args.algo, "preset": "full"}
    network = kohya.create_network(1.0, args.dim, args.alpha, None, text_encoder, unet, **network_args)
    network.apply_to(text_encoder, unet, True, True)
    groups, _ = network.prepare_optimizer_params(args.lr, args.lr, args.lr)
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    network.prepare_grad_etc(text_encoder, unet)
    network.on_epoch_start(text_encoder, unet)
    modules = len(network.lora_names)
    parameters = sum(p.numel() for p in network.parameters())
    print(f"training {args.algo} on {modules} layers of a tiny UNet + CLIP ({parameters} adapter parameters), {args.steps} steps")

    losses = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), unit="step", dynamic_ncols=True)
    for step in bar:
        network.on_step_start(text_encoder, unet)
        index = torch.arange(step * args.batch, (step + 1) * args.batch) % noisy.shape[0]
        hidden = text_encoder(tokens[index])[0]
        prediction = unet(noisy[index], timesteps[index], encoder_hidden_states=hidden).sample
        loss = torch.nn.functional.mse_loss(prediction, noise[index])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    elapsed = time.perf_counter() - start
    bar.close()

    metadata = {
        "ss_network_module": "swift_lycoris.kohya", "ss_network_dim": str(args.dim), "ss_network_alpha": str(args.alpha),
        "ss_network_args": json.dumps(network_args), "ss_steps": str(args.steps), "ss_learning_rate": str(args.lr),
        "ss_training_comment": "swift_lycoris demo: tiny UNet + CLIP, synthetic data",
    }
    network.save_weights(args.out, torch.float32, metadata)
    scale = write_loss_plot(args.plot, losses, args.algo)
    first, last = sum(losses[:5]) / min(5, len(losses)), sum(losses[-5:]) / min(5, len(losses))
    print(f"loss {first:.4f} → {last:.4f} (mean of the first / last 5 steps), {args.steps / elapsed:.1f} steps/s")
    print(f"saved {args.out}; loss curve {args.plot} (matplotlib, {scale} scale)")
    beside_server = Path(network.core.server.binary).parent / "lycoris"
    lycoris = str(beside_server) if beside_server.exists() else shutil.which("lycoris")
    if lycoris:
        subprocess.run([lycoris, "info", args.out], check=False)
    network.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
