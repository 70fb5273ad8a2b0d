"""Conv1d, Conv3d, LayerNorm and GroupNorm through swift_lycoris against LyCORIS 4.1.3:
the generic wrapper (``train_norm`` puts LyCORIS's ``norm`` adapter on the norm layers),
both transfers, outputs, input and parameter gradients, files both ways and merge_to."""

from __future__ import annotations

import copy

import lycoris
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _sl_oracle import (assert_grads_match, assert_rel, copy_lycoris_into_ours, lycoris_gradients, our_parameters,
                        randomize_lycoris)

import swift_lycoris as sl

RTOL = 2e-5


class Signals(nn.Module):
    """A 1-D branch (Conv1d k=3 stride 2, GroupNorm, Conv1d k=1), a 3-D branch (Conv3d
    3×3×3 padding 1, GroupNorm on 5-D activations), a LayerNorm and two Linears: every
    layer kind the server adapts besides Conv2d."""

    def __init__(self):
        super().__init__()
        self.seq_in = nn.Conv1d(4, 8, 3, stride=2, padding=1)
        self.seq_norm = nn.GroupNorm(2, 8)
        self.seq_out = nn.Conv1d(8, 6, 1)
        self.vol = nn.Conv3d(3, 6, 3, padding=1)
        self.vol_norm = nn.GroupNorm(3, 6)
        self.mix = nn.Linear(12, 10)
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, 5)

    def forward(self, inputs):
        seq, vol = inputs
        a = self.seq_out(F.silu(self.seq_norm(self.seq_in(seq)))).mean(-1)
        b = F.silu(self.vol_norm(self.vol(vol))).mean((2, 3, 4))
        return self.head(F.gelu(self.norm(self.mix(torch.cat([a, b], -1)))))


MODULES = {"lycoris_seq_in", "lycoris_seq_norm", "lycoris_seq_out", "lycoris_vol", "lycoris_vol_norm",
           "lycoris_mix", "lycoris_norm", "lycoris_head"}


def make_inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 9, generator=g), torch.randn(2, 3, 3, 4, 5, generator=g), torch.randn(2, 5, generator=g)


def pair(algo: str, transfer: str, **options):
    torch.manual_seed(11)
    base = Signals()
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    lyco = lycoris.create_lycoris(ref_model, 0.8, 4, 2.0, algo=algo, train_norm=True, **options)
    ours = sl.create_lycoris(our_model, 0.8, 4, 2.0, algo=algo, threads=1, transfer=transfer, train_norm=True, **options)
    randomize_lycoris(lyco, seed=5, std=0.3)
    copy_lycoris_into_ours(lyco, ours)
    lyco.apply_to()
    ours.apply_to()
    return base, ref_model, lyco, our_model, ours


def run(model, seq, vol, upstream):
    seq, vol = seq.clone().requires_grad_(True), vol.clone().requires_grad_(True)
    y = model((seq, vol))
    (y * upstream).sum().backward()
    return y.detach(), seq.grad, vol.grad


@pytest.mark.parametrize("transfer", ["weights", "activations"])
@pytest.mark.parametrize("algo,options", [
    ("lora", {}),
    ("lora", {"use_tucker": True}),
    ("loha", {}),
    ("lokr", {"factor": 2}),
    ("ia3", {}),
])
def test_parity_with_lycoris(algo, options, transfer):
    base, ref_model, lyco, our_model, ours = pair(algo, transfer, **options)
    try:
        assert set(ours.modules_info) == {lora.lora_name for lora in lyco.loras} == MODULES
        norms = {n for n, info in ours.modules_info.items() if info["algorithm"] == "norms"}
        assert norms == {"lycoris_seq_norm", "lycoris_vol_norm", "lycoris_norm"}
        seq, vol, upstream = make_inputs()
        lyco.train()
        ours.train()
        for step in range(2):  # the second step's ΔWs come in one batch
            y_ref, gseq_ref, gvol_ref = run(ref_model, seq, vol, upstream)
            y_our, gseq_our, gvol_our = run(our_model, seq, vol, upstream)
            y_base = base((seq, vol)).detach()
            assert (y_ref - y_base).abs().max() > 1e-2 * y_base.abs().max(), "the adapters barely change the output"
            assert_rel(y_our, y_ref, RTOL, f"step {step} output")
            assert_rel(gseq_our, gseq_ref, RTOL, f"step {step} ∂seq")
            assert_rel(gvol_our, gvol_ref, RTOL, f"step {step} ∂vol")
            assert_grads_match(lyco, ours, RTOL, f"step {step} ")
            with torch.no_grad():
                for network in (lyco, ours):
                    for p in network.parameters():
                        p.sub_(0.05 * p.grad)
                        p.grad = None
    finally:
        ours.close()


def test_files_cross_load_and_merge(tmp_path):
    """Our file loads in LyCORIS (and LyCORIS's in ours) with the same outputs; merge_to puts
    m·ΔW into the weights and m·Δb into the norm layers' biases."""
    base, ref_model, lyco, our_model, ours = pair("lora", "weights")
    seq, vol, _ = make_inputs()
    try:
        expected = our_model((seq, vol)).detach()
        assert_rel(expected, ref_model((seq, vol)).detach(), RTOL, "output")
        ours_file, theirs_file = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
        ours.save_weights(str(ours_file))
        lyco.save_weights(str(theirs_file), torch.float32, None)

        loaded_model = copy.deepcopy(base)
        loaded, _ = lycoris.create_lycoris_from_weights(0.8, str(ours_file), loaded_model)
        loaded.apply_to()
        assert_rel(loaded_model((seq, vol)).detach(), expected, RTOL, "our file in LyCORIS")

        our_loaded_model = copy.deepcopy(base)
        our_loaded = sl.create_lycoris_from_weights(0.8, str(theirs_file), our_loaded_model, threads=1)
        try:
            assert {n for n, i in our_loaded.modules_info.items() if i["algorithm"] == "norms"} == {
                "lycoris_seq_norm", "lycoris_vol_norm", "lycoris_norm"}
            our_loaded.apply_to()
            assert_rel(our_loaded_model((seq, vol)).detach(), expected, RTOL, "LyCORIS's file in ours")
        finally:
            our_loaded.close()

        biases = {name: layer.bias.detach().clone() for name, layer in ours._targets.items() if name in
                  {"lycoris_seq_norm", "lycoris_vol_norm", "lycoris_norm"}}
        ours.merge_to()
        for name, before in biases.items():
            assert not torch.equal(ours._targets[name].bias.detach(), before), f"{name}: bias not merged"
        assert_rel(our_model((seq, vol)).detach(), expected, RTOL, "merged model")
    finally:
        ours.close()


def test_norms_without_train_norm_and_without_affine():
    """Without train_norm no norm layer is adapted (LyCORIS's default); a norm layer without
    an affine weight is never one the server adapts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GroupNorm(2, 6, affine=False), nn.Linear(6, 2))
    plain = sl.create_lycoris(model, 1.0, 2, 1.0, threads=1)
    trained = sl.create_lycoris(model, 1.0, 2, 1.0, threads=1, train_norm=True)
    try:
        assert set(plain.modules_info) == {"lycoris_0", "lycoris_3"}
        assert set(trained.modules_info) == {"lycoris_0", "lycoris_1", "lycoris_3"}
        assert trained.modules_info["lycoris_1"]["algorithm"] == "norms"
        assert [k for k, _ in trained.named_parameters() if k.startswith("adapters.lycoris_1.")] == [
            "adapters.lycoris_1.w_norm", "adapters.lycoris_1.b_norm"]
    finally:
        plain.close()
        trained.close()
