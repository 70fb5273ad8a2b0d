"""T-LoRA through swift_lycoris.create_lycoris against LyCORIS 4.1.3: outputs, input and
parameter gradients with timestep masks set the way each library takes them, files both
ways; and, on the 3×3 convolutions LyCORIS crashes on, against plain torch math."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _sl_oracle import assert_rel, assert_step_matches, copy_lycoris_into_ours, lycoris, randomize_lycoris, run, sl
from lycoris.modules import tlora as lycoris_tlora

RTOL = 1e-4


class PointwiseNet(nn.Module):
    """conv 1×1 (8 → 12) → tokens → Linear (12 → 16) → GELU → Linear (16 → 6): the layers
    LyCORIS's T-LoRA computes."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(8, 12, 1)
        self.head = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 6))

    def forward(self, x):
        return self.head(F.silu(self.proj(x)).permute(0, 2, 3, 1))


@pytest.fixture(autouse=True)
def clear_masks():
    yield
    lycoris_tlora.clear_timestep_mask()
    sl.clear_timestep_mask()


def set_masks(mask):
    lycoris_tlora.set_timestep_mask(mask)
    sl.set_timestep_mask(mask)


def pair(transfer="auto"):
    torch.manual_seed(5)
    base = PointwiseNet()
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    lyco = lycoris.create_lycoris(ref_model, 0.8, 4, 2.0, algo="tlora")
    ours = sl.create_lycoris(our_model, 0.8, 4, 2.0, algo="tlora", threads=1, transfer=transfer)
    randomize_lycoris(lyco, seed=3, std=0.3)
    copy_lycoris_into_ours(lyco, ours)
    lyco.apply_to()
    ours.apply_to()
    return base, ref_model, lyco, our_model, ours


def inputs(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 8, 3, 4, generator=g), torch.randn(2, 3, 4, 6, generator=g)


@pytest.mark.parametrize("transfer", ["activations", "weights"])
def test_parity_with_lycoris_as_the_mask_changes(transfer):
    """No mask, then timestep 600 of 1000 (2 of 4 ranks), then 100 (4 of 4 but min 2): each
    step's output, ∂x and every parameter gradient as LyCORIS's."""
    base, ref_model, lyco, our_model, ours = pair(transfer)
    try:
        x, upstream = inputs()
        y0, _ = run(base, x)
        outputs = []
        for mask in (None, lycoris_tlora.compute_timestep_mask(600, 1000, 4), torch.tensor([[1.0, 1.0, 1.0]])):
            if mask is not None:
                set_masks(mask)
            for p in list(lyco.parameters()) + list(ours.parameters()):
                p.grad = None
            outputs.append(assert_step_matches(ref_model, our_model, lyco, ours, x, upstream, y0, RTOL, f"mask {mask}: "))
        assert (outputs[0] - outputs[1]).abs().max() > 1e-3, "the mask changes the output"
    finally:
        ours.close()


def test_files_load_both_ways(tmp_path):
    """Our file in LyCORIS and LyCORIS's file in ours give the network's outputs (the frozen
    term is rebuilt from W0's SVD on both sides)."""
    base, ref_model, lyco, our_model, ours = pair()
    try:
        x, _ = inputs(9)
        with torch.no_grad():
            expected = ref_model(x)
        ours_file, lyco_file = tmp_path / "ours.safetensors", tmp_path / "lycoris.safetensors"
        ours.save_weights(str(ours_file))
        lyco.save_weights(str(lyco_file), torch.float32, {})
        model_a = copy.deepcopy(base)
        theirs, _ = lycoris.create_lycoris_from_weights(0.8, str(ours_file), model_a)
        theirs.apply_to()
        model_b = copy.deepcopy(base)
        loaded = sl.create_lycoris_from_weights(0.8, str(lyco_file), model_b)
        loaded.apply_to()
        try:
            with torch.no_grad():
                assert_rel(model_a(x), expected, RTOL, "our file in LyCORIS")
                assert_rel(model_b(x), expected, RTOL, "LyCORIS's file in ours")
        finally:
            loaded.close()
    finally:
        ours.close()


def test_conv3x3_where_lycoris_crashes_matches_torch_math():
    """LyCORIS 4.1.3 makes Q a 1×1 kernel and crashes on a 3×3 convolution; ours keeps the
    kernel (q_layer.weight (r, in, 3, 3)) and computes y = conv(x, W0 + m·s·(P·diag(λ⊙μ)·Q −
    P₀·diag(λ₀⊙μ)·Q₀)) with P₀, λ₀, Q₀ from W0's principal SVD (computed here in float64)."""
    torch.manual_seed(2)
    layer = nn.Conv2d(4, 6, 3, padding=1)
    model = nn.Sequential(layer)
    crashing = copy.deepcopy(model)
    lyco = lycoris.create_lycoris(crashing, 1.0, 3, 1.5, algo="tlora")
    lyco.apply_to()
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(RuntimeError):
        crashing(x)

    ours = sl.create_lycoris(model, 0.7, 3, 1.5, algo="tlora", threads=1)
    try:
        ours.apply_to()
        (module,) = ours.adapters.values()
        params = dict(module.named_parameters())
        assert tuple(params["q_layer.weight"].shape) == (3, 4, 3, 3)
        assert tuple(params["p_layer.weight"].shape) == (6, 3, 1, 1)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        mask = torch.tensor([1.0, 0.0, 1.0])
        sl.set_timestep_mask(mask)
        w0 = layer.weight.detach().double()
        u, s, vh = torch.linalg.svd(w0.reshape(6, -1), full_matrices=False)
        frozen = u[:, :3] @ torch.diag(s[:3] * mask.double()) @ vh[:3]
        p = params["p_layer.weight"].detach().double().reshape(6, 3)
        q = params["q_layer.weight"].detach().double().reshape(3, -1)
        lam = params["lambda_layer"].detach().double().reshape(3)
        delta = (p @ torch.diag(lam * mask.double()) @ q - frozen) * (1.5 / 3)
        expected = F.conv2d(x.double(), w0 + 0.7 * delta.reshape(w0.shape), layer.bias.double(), padding=1)
        with torch.no_grad():
            assert_rel(model(x), expected, RTOL, "T-LoRA on a 3×3 conv")
    finally:
        ours.close()


@pytest.mark.parametrize("args", [(0, 1000, 4), (999, 1000, 4), (300, 1000, 8, 2), (500, 1000, 6, 1, 2.0), (1000, 1000, 4, 3)])
def test_compute_timestep_mask_as_lycoris(args):
    assert torch.equal(sl.compute_timestep_mask(*args), lycoris_tlora.compute_timestep_mask(*args))


def test_bad_masks_are_refused():
    for bad in (torch.ones(2, 3), torch.ones(0), torch.ones(1, 2, 2)):
        with pytest.raises(ValueError, match="timestep mask"):
            sl.set_timestep_mask(bad)
