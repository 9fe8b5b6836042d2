"""TopK SAE training on synthetic data with a planted sparse dictionary (no language model loaded)."""

import pytest
import torch

from safetyscope.sae import load_sae
from safetyscope.training import TrainConfig, evaluate, train_topk_sae


def planted(n: int, d: int = 32, n_atoms: int = 64, active: int = 4, seed: int = 0) -> torch.Tensor:
    """n samples, each a sparse non-negative mix of ``active`` of ``n_atoms`` fixed unit atoms (one dictionary
    for every seed; ``seed`` picks the samples)."""
    gd = torch.Generator().manual_seed(1234)
    atoms = torch.randn(n_atoms, d, generator=gd)
    atoms /= atoms.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=gd) * 3  # a non-zero mean that b_dec must absorb
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, n_atoms, generator=g).argsort(dim=1)[:, :active]
    codes = torch.zeros(n, n_atoms).scatter_(1, idx, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes @ atoms + offset + 0.01 * torch.randn(n, d, generator=g)


@pytest.fixture
def one_thread():
    # tiny matrices: threads only add overhead (and contention on a busy CI machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_topk_sae_learns_planted_dictionary(tmp_path, one_thread):
    x = planted(10_000)
    cfg = TrainConfig(layer=3, d_sae=128, k=8, epochs=12, batch_tokens=256, lr=3e-3, dead_tokens=3_000,
                      held_out=0.05, seed=0)
    sae, m = train_topk_sae(x, cfg)
    assert m["held_out_fvu"] < 0.3, m["held_out_fvu"]
    assert 0 < m["held_out_l0"] <= 8
    norms = sae.W_dec.norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    # the saved SAE reads raw activations (input scaling folded back) ...
    fresh = planted(500, seed=1)  # unseen samples of the same dictionary
    assert evaluate(sae, fresh)["fvu"] < 0.3
    # ... and round-trips through save_pretrained / load_sae with identical codes
    sae.save_pretrained(tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    assert back.cfg.k == 8 and back.cfg.d_sae == 128 and back.cfg.layer == 3
    assert torch.equal(sae.encode(fresh), back.encode(fresh))
    assert back.fingerprint() == sae.fingerprint()
