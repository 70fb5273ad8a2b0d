"""T-LoRA's timestep rank mask, as LyCORIS 4.1.3 exposes it (``lycoris.set_timestep_mask`` and
friends): the training loop sets the mask for the current diffusion timestep before the
forward pass, and every :class:`~swift_lycoris.LycorisNetwork` with T-LoRA modules sends it to
its server before its next adapted call (``network.set_timestep_mask``).

A mask has shape (r,) or (1, r): rank i of each T-LoRA module is multiplied by ``mask[i]``;
a module of rank r takes the first r entries and pads a shorter mask with 1s. LyCORIS keys
masks by a group id that its kohya and wrapper code never set; only group 0 is read here."""

from __future__ import annotations

import torch

_masks: dict[int, torch.Tensor] = {}
# Counts every change, so that a network sends the mask only when it changed.
_version = 0


def set_timestep_mask(mask: torch.Tensor, group_id: int = 0) -> None:
    """Sets the rank mask for the calls that follow, (r,) or (1, r)."""
    global _version
    mask = torch.as_tensor(mask).detach()
    if mask.dim() == 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 1 or mask.numel() == 0:
        raise ValueError(f"a timestep mask has shape (r,) or (1, r) with r >= 1, not {tuple(mask.shape)}")
    _masks[group_id] = mask.to("cpu", torch.float32)
    _version += 1


def get_timestep_mask(group_id: int = 0) -> torch.Tensor | None:
    """The mask set for `group_id`, as (1, r), or None."""
    mask = _masks.get(group_id)
    return None if mask is None else mask.unsqueeze(0)


def clear_timestep_mask(group_id: int = 0) -> None:
    """Every rank again."""
    global _version
    if _masks.pop(group_id, None) is not None:
        _version += 1


def compute_timestep_mask(timestep: int, max_timestep: int, max_rank: int, min_rank: int = 1,
                          alpha: float = 1.0) -> torch.Tensor:
    """A (1, max_rank) mask of 1s on the first r ranks, r = ⌊((T − t)/T)^alpha·(max_rank −
    min_rank)⌋ + min_rank (at most max_rank): few ranks at high noise, all at t = 0."""
    fraction = ((max_timestep - timestep) / max_timestep) ** alpha
    active = min(int(fraction * (max_rank - min_rank)) + min_rank, max_rank)
    mask = torch.zeros(1, max_rank)
    mask[:, :active] = 1.0
    return mask


def mask_version() -> int:
    return _version
