"""oneDNN packed linear layers (grpo.backend.onednn) compute what the plain layers compute, and only without gradients."""

import subprocess
import sys

import pytest
import torch

from grpo.config import RolloutConfig
from grpo.backend.onednn import available, install, packed_linears, uninstall
from grpo.rollout import generate

from conftest import ROOT, make_model, make_tokenizer

pytestmark = pytest.mark.skipif(not available(torch.nn.Linear(2, 2)), reason="torch built without oneDNN")


def test_logits_equal_the_plain_layers_and_layers_are_restored():
    model = make_model(60, seed=0)
    ids = torch.randint(60, (3, 11))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with packed_linears(model):
            packed = model(input_ids=ids).logits
            assert hasattr(model.model.layers[0].mlp.up_proj, "_onednn_cache")
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    layer = model.model.layers[0].mlp.up_proj
    assert "forward" not in vars(layer) and not hasattr(layer, "_onednn_cache")


def test_bf16_autocast_and_bias():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(16, 24), torch.randn(4, 5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x)
        with packed_linears(layer):
            packed = layer(x)
    assert packed.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(packed, plain, atol=1e-2, rtol=1e-2)


def test_bf16_without_cpu_support_keeps_the_plain_layer(monkeypatch):
    """On a CPU without oneDNN's bf16 kernels (AVX2 only), a bf16 layer runs its own forward instead of failing
    in the weight reorder; fp32 layers are still packed."""
    import grpo.backend.onednn

    monkeypatch.setattr(grpo.backend.onednn, "packs", lambda dtype: dtype == torch.float32)
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(16, 24), torch.randn(4, 16)
    with torch.no_grad(), packed_linears(layer):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        assert not hasattr(layer, "_onednn_cache")
        layer(x)
        assert layer._onednn_cache[0][2] == torch.float32


def test_gradients_take_the_plain_layer():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 8), torch.randn(3, 8)
    expected = torch.autograd.grad(layer(x).sum(), layer.weight)[0]
    with packed_linears(layer):
        got = torch.autograd.grad(layer(x).sum(), layer.weight)[0]
    assert torch.equal(got, expected)


def test_installed_packing_follows_weight_updates_and_training_passes_drop_it():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 8), torch.randn(3, 8)
    install(layer)
    with torch.no_grad():
        before = layer(x)
        layer.weight.add_(1.0)  # as an optimizer step does: in place, the version counter moves
        after = layer(x)
        torch.testing.assert_close(after, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(before, after) and layer._onednn_cache is not None
    layer(x).sum().backward()  # a training pass: the plain layer, and the packed copy is dropped
    assert "_onednn_cache" not in vars(layer)
    uninstall(layer)
    assert "forward" not in vars(layer)


def test_a_training_pass_drops_every_packed_copy_of_the_model():
    """Even of layers it does not call: the fused head reads the tied output embedding's weight directly."""
    model = make_model(60, seed=0)
    ids = torch.randint(60, (2, 5))
    install(model)
    with torch.no_grad():
        model(input_ids=ids)
    assert model.lm_head._onednn_cache is not None
    model.model(input_ids=ids).last_hidden_state.sum().backward()  # the decoder only, with gradients
    assert not any("_onednn_cache" in vars(m) for m in model.modules())
    uninstall(model)


def test_packed_copies_are_released_after_a_fused_optimizer_step():
    """A fused AdamW step changes the weight in place without moving its version counter, so the packed copy
    would go stale; the backend calls release_packed_copies after every step."""
    from grpo.backend.cpu import release_packed_copies

    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 8), torch.randn(3, 8)
    install(layer)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        layer(x)  # packs
    version = layer.weight._version
    layer.weight.grad, layer.bias.grad = torch.ones(8, 8), torch.ones(8)
    optimizer.step()
    assert layer.weight._version == version  # why the version alone cannot tell
    release_packed_copies(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    uninstall(layer)


def test_greedy_generation_is_unchanged():
    tok = make_tokenizer()
    tok.padding_side = "left"
    model = make_model(len(tok), seed=2)
    cfg = RolloutConfig(max_completion_length=12)
    prompts = ["What is 1 + 2?", "Hi"]
    plain = generate(model, tok, prompts, 2, cfg, greedy=True)
    with packed_linears(model):
        packed = generate(model, tok, prompts, 2, cfg, greedy=True)
    assert torch.equal(packed.completion_ids, plain.completion_ids)
    assert "forward" not in vars(model.lm_head)


def test_freed_large_blocks_are_reused_without_page_faults():
    """grpo.backend.allocator: after a few rounds, allocating and freeing 113 MB tensors touches no new pages."""
    script = (
        "import resource, torch\n"
        "from grpo.backend.allocator import keep_freed_memory\n"
        "assert keep_freed_memory()\n"
        "faults = []\n"
        "for _ in range(8):\n"
        "    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    z = torch.zeros(49152, 576); e = torch.randn(64, 49152).exp(); del z, e\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)\n"
        "print(faults)\n"
        "assert faults[0] > 20000 and faults[-1] < 1000, faults\n"
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc only")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
