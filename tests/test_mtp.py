"""DeepSeek-V3's MTP module (grpo.modeling.mtp) and speculative rollouts with its drafts (grpo.rollout.speculative)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, make_model, make_tokenizer
from grpo.commands.cli import main
from grpo.commands.sft import IGNORE, collate, response_and_mtp_nll, response_nll, sft_features
from grpo.config import RolloutConfig
from grpo.modeling.logprobs import cache_arg, position_ids_from_mask
from grpo.modeling.mtp import MTP_FILE, MTPModule, load_mtp, mtp_logprobs, save_mtp
from grpo.rollout.builtin import generate
from grpo.rollout.speculative import MTPDrafter, accept_drafts, generate_speculative, residual


def poor_mtp(lm, seed: int = 0, sharpness: float = 4.0) -> MTPModule:
    """An untrained MTP module with random weights whose drafts are confident and mostly wrong."""
    mtp = MTPModule.for_model(lm)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in mtp.parameters():
            p.normal_(0, 0.3)
        mtp.shared_head.norm.weight.fill_(sharpness)
    return mtp


def varied_model(tok, seed: int, scale: float = 1.0):
    """The tiny Llama with its own random output head (a tied one makes greedy decoding repeat one token)."""
    lm = make_model(len(tok), seed=seed)
    torch.manual_seed(seed)
    lm.lm_head.weight = torch.nn.Parameter(torch.randn(len(tok), lm.config.hidden_size) * scale)
    return lm


class PolicyDrafter:
    """Drafts with a copy of the policy itself (q = p), keeping its own cache as MTPDrafter does."""

    def __init__(self, model, wrong_every: int = 0):
        self.model, self.wrong_every, self.calls = copy.deepcopy(model), wrong_every, 0

    def prefill(self, lm, hidden, prompt_ids, prompt_mask, repeats, capacity):
        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=position_ids_from_mask(prompt_mask), use_cache=True)
        self.cache = out.past_key_values
        self.cache.batch_repeat_interleave(repeats)
        self.mask = prompt_mask.repeat_interleave(repeats, dim=0)

    def propose(self, lm, hidden, ids, first_real, positions):
        self.mask = torch.cat([self.mask, torch.stack([first_real.long(), torch.ones_like(first_real.long())], 1)], 1)
        logits = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                            **{cache_arg(self.model): self.cache}).logits[:, -1]
        self.calls += 1
        if self.wrong_every and self.calls % self.wrong_every == 0:  # this step's draft: the least likely token
            logits = -logits
        return logits

    def select(self, rows):
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]


@pytest.fixture
def tok():
    t = make_tokenizer()
    t.padding_side = "left"
    return t


def test_accept_and_residual_by_hand():
    p = torch.tensor([[0.2, 0.8], [0.2, 0.8]])
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    d = torch.tensor([0, 0])
    # accepted with probability p(d)/q(d) = 0.4
    assert accept_drafts(p, q, d, torch.tensor([0.39, 0.41])).tolist() == [True, False]
    assert accept_drafts(p, q, torch.tensor([1, 1]), torch.tensor([0.99, 0.0])).tolist() == [True, True]  # p > q
    torch.testing.assert_close(residual(torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.8, 0.1, 0.1]])),
                               torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(residual(torch.tensor([[0.3, 0.7]]), torch.tensor([[0.3, 0.7]])),
                               torch.tensor([[0.3, 0.7]]))


def test_mtp_loss_on_a_hand_made_three_token_example():
    """Tokens x0 x1 x2: one MTP position, pairing h_0 with x_1 and predicting x_2. Computed here by hand: with
    one position, attention returns its own value projection (RoPE does not touch values)."""
    lm = make_model(16, seed=4, hidden_size=8, heads=2)
    mtp = poor_mtp(lm, seed=1, sharpness=1.0)
    ids, mask = torch.tensor([[3, 7, 11]]), torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        h = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [1, 3, 8]
        logprobs, counted = mtp_logprobs(mtp, lm, h, ids, mask, torch.tensor([[0, 1, 1]]))

        def rms(norm, x):
            return norm.weight * x / torch.sqrt((x * x).mean() + norm.variance_epsilon)

        E, blk = lm.model.embed_tokens.weight, mtp.block
        u = mtp.eh_proj.weight @ torch.cat([rms(mtp.enorm, E[7]), rms(mtp.hnorm, h[0, 0])])
        a = blk.input_layernorm.weight * u / torch.sqrt((u * u).mean() + blk.input_layernorm.variance_epsilon)
        v = blk.self_attn.v_proj.weight @ a  # 1 key-value head of 4 dims, shared by the 2 query heads
        u = u + blk.self_attn.o_proj.weight @ v.repeat(2)
        m = blk.post_attention_layernorm.weight * u / torch.sqrt(
            (u * u).mean() + blk.post_attention_layernorm.variance_epsilon)
        mlp = blk.mlp
        u = u + mlp.down_proj.weight @ (torch.nn.functional.silu(mlp.gate_proj.weight @ m) * (mlp.up_proj.weight @ m))
        logits = lm.lm_head.weight @ rms(mtp.shared_head.norm, u)
        expected = torch.log_softmax(logits, dim=-1)[11]
    assert counted.tolist() == [[1]]
    torch.testing.assert_close(logprobs[0, 0], expected, atol=1e-5, rtol=0)
    # the SFT loss with model.mtp: the same number from collated rows (x2 is the only response token past two)
    tok = make_tokenizer()
    lm = make_model(len(tok), seed=2)
    mtp = poor_mtp(lm)
    features = [sft_features("What is 2+2?", "4", tok, 64), sft_features("Hi", "hello there", tok, 64)]
    batch = collate(features, tok.pad_token_id)
    nll, mtp_loss = response_and_mtp_nll(lm, mtp, batch, 14, 1.0)
    torch.testing.assert_close(nll, response_nll(lm, batch, 14), atol=1e-5, rtol=0)
    by_row = []
    for f in features:
        ids = torch.tensor([f[0]])
        h = lm.model(input_ids=ids).last_hidden_state
        lp, c = mtp_logprobs(mtp, lm, h, ids, torch.ones_like(ids), (torch.tensor([f[1]]) != IGNORE).long())
        by_row.append(-(lp * c).sum())
    torch.testing.assert_close(mtp_loss, sum(by_row), atol=1e-4, rtol=0)


def test_mtp_with_a_cache_equals_the_whole_sequence():
    lm = make_model(40, seed=5)
    mtp = poor_mtp(lm)
    ids = torch.randint(2, 40, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    from transformers.cache_utils import DynamicCache

    with torch.no_grad():
        h = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
        pairs, positions = mask[:, :-1] * mask[:, 1:], position_ids_from_mask(mask)[:, 1:]
        whole = mtp(lm, h[:, :-1], ids[:, 1:], pairs, positions)
        cache = DynamicCache()
        first = mtp(lm, h[:, :5], ids[:, 1:6], pairs[:, :5], positions[:, :5], cache=cache)
        second = mtp(lm, h[:, 5:8], ids[:, 6:9], pairs, positions[:, 5:], cache=cache)
    real = pairs.bool()
    torch.testing.assert_close(torch.cat([first, second], 1)[real], whole[real], atol=1e-5, rtol=0)


def test_mtp_weights_round_trip_through_a_checkpoint_in_deepseek_layout(tmp_path):
    lm = make_model(40, seed=6)
    mtp = poor_mtp(lm, seed=3)
    lm.save_pretrained(tmp_path / "model")
    assert load_mtp(tmp_path / "model", lm) is None  # a folder without one
    save_mtp(tmp_path / "model", mtp, lm.config)
    keys = set(load_file(tmp_path / "model" / MTP_FILE))
    N = lm.config.num_hidden_layers
    assert {f"model.layers.{N}.{k}" for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight",
                                              "shared_head.norm.weight", "self_attn.q_proj.weight",
                                              "mlp.down_proj.weight", "input_layernorm.weight")} <= keys
    assert json.loads((tmp_path / "model/config.json").read_text())["num_nextn_predict_layers"] == 1
    loaded = load_mtp(tmp_path / "model", lm)
    for (name, a), (_, b) in zip(mtp.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # a DeepSeek-V3 checkpoint keeps the MTP layer inside model.safetensors, with copies of the shared weights
    folder = tmp_path / "deepseek"
    lm.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    weights.update(load_file(tmp_path / "model" / MTP_FILE))
    weights[f"model.layers.{N}.embed_tokens.weight"] = lm.model.embed_tokens.weight.detach().clone()
    weights[f"model.layers.{N}.shared_head.head.weight"] = lm.lm_head.weight.detach().clone()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    from_deepseek = load_mtp(folder, lm)
    assert all(torch.equal(a, b) for a, b in zip(mtp.state_dict().values(), from_deepseek.state_dict().values()))


@pytest.mark.parametrize("drafter", ["poor_mtp", "policy", "policy_wrong_every_3"])
def test_greedy_decoding_with_drafts_writes_what_greedy_decoding_writes(tok, drafter):
    lm = varied_model(tok, seed=7)
    draft = {"poor_mtp": lambda: MTPDrafter(poor_mtp(lm)), "policy": lambda: PolicyDrafter(lm),
             "policy_wrong_every_3": lambda: PolicyDrafter(lm, wrong_every=3)}[drafter]()
    cfg = RolloutConfig(max_completion_length=24)
    prompts = ["What is 1 + 2?", "Hi", "a longer prompt than the others"]
    plain = generate(lm, tok, prompts, 2, cfg, greedy=True)
    drafted = generate_speculative(lm, draft, tok, prompts, 2, cfg, greedy=True)
    assert len(set(plain.texts)) > 1 and max(len(set(t)) for t in plain.texts) > 8  # varied, some end early
    assert torch.equal(plain.completion_ids, drafted.completion_ids), (plain.texts, drafted.texts)
    assert torch.equal(plain.completion_mask, drafted.completion_mask) and plain.texts == drafted.texts
    counts = drafted.draft_counts
    expected = {"poor_mtp": (0.0, 0.3), "policy": (1.0, 1.0), "policy_wrong_every_3": (0.3, 0.9)}[drafter]
    assert expected[0] <= counts["accepted"] / counts["drafted"] <= expected[1]


def test_acceptance_is_one_when_the_draft_is_the_policy(tok):
    lm = make_model(len(tok), seed=8)
    cfg = RolloutConfig(max_completion_length=16, temperature=1.0)
    out = generate_speculative(lm, PolicyDrafter(lm), tok, ["What is 1 + 2?", "Hi"], 4, cfg, seeds=list(range(8)))
    counts = out.draft_counts
    assert counts["drafted"] > 20 and counts["accepted"] == counts["drafted"]
    assert counts["tokens"] / counts["forwards"] > 1.6  # 2 per decoding forward; the prompt's forward gives 1


def _chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test; cells expected fewer than 5 times are pooled into one. P(chi2_k > x) = Q(k/2, x/2)."""
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    statistic = ((obs - exp) ** 2 / exp).sum().item()
    df = obs.numel() - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                   torch.tensor(statistic / 2, dtype=torch.float64)).item()


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.0, 0.8)])
def test_speculative_samples_have_the_policys_distribution(tok, temperature, top_p):
    """The first three sampled tokens of 20000 completions (fewer where the EOS comes first), drawn with a
    deliberately poor draft (accepted in a minority of steps), against the policy's exact probabilities of every
    such start. The second token is the first drafted one; the third is a bonus token or a drafted one."""
    lm = varied_model(tok, seed=9, scale=0.5)
    mtp = poor_mtp(lm, seed=2)
    cfg = RolloutConfig(max_completion_length=3, temperature=temperature, top_p=top_p)
    prompt = "What is 2 + 3?"
    n = 20000
    torch.manual_seed(0)
    out = generate_speculative(lm, MTPDrafter(mtp), tok, [prompt], n, cfg)
    acceptance = out.draft_counts["accepted"] / out.draft_counts["drafted"]
    assert 0.02 < acceptance < 0.6
    lengths = out.completion_mask.sum(dim=1).tolist()
    counts = {}
    for row, length in zip(out.completion_ids.tolist(), lengths):
        counts[tuple(row[:length])] = counts.get(tuple(row[:length]), 0) + 1
    # the exact law of the start (x1, x2, x3), a completion ending at its EOS: p(x1) p(x2 | x1) p(x3 | x1 x2)
    # under the sampler's temperature and top-p
    from grpo.rollout.builtin import token_probs

    prompt_ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id

    def next_probs(prefixes: list[tuple]) -> torch.Tensor:  # [len(prefixes), V], prefixes of one length
        rows = torch.cat([prompt_ids.expand(len(prefixes), -1), torch.tensor(prefixes, dtype=torch.long)
                          .reshape(len(prefixes), -1)], 1)
        with torch.no_grad():
            probs = token_probs(lm(input_ids=rows).logits[:, -1], temperature, top_p)
        return probs / probs.sum(dim=-1, keepdim=True)

    cells, level = {}, {(): 1.0}
    while level:
        prefixes = list(level)
        probs = next_probs(prefixes) * torch.tensor([level[q] for q in prefixes], dtype=torch.float64).unsqueeze(1)
        level = {}
        for i, token in (probs > 0).nonzero().tolist():
            cell = prefixes[i] + (token,)
            if token == eos or len(cell) == 3:
                cells[cell] = probs[i, token].item()
            else:
                level[cell] = probs[i, token].item()
    assert sum(cells.values()) > 0.99
    keys = sorted(set(cells) | set(counts))
    expected = torch.tensor([cells.get(k, 0.0) * n for k in keys], dtype=torch.float64)
    observed = torch.tensor([counts.get(k, 0) for k in keys], dtype=torch.float64)
    assert (expected >= 5).sum() >= 20  # enough cells for the test to have power
    assert _chi_square_p_value(observed, expected) > 0.01


def test_sft_trains_the_mtp_module_and_saves_it_beside_the_model(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a, "response": r}) + "\n" for q, a, r in
                            [("1+1", "2", "2 is it"), ("2+2", "4", "4 is it"), ("3+3", "6", "6 is it")]))
    assert main(["sft", str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}",
                 f"data.path={data}", "eval.path=null", "sft.batch_size=3", "train.micro_batch_size=2",
                 "train.max_steps=16", "optim.lr=1e-2", f"train.output_dir={tmp_path / 'run'}", "model.mtp={}",
                 "logging.wandb=disabled", "train.mixed_precision=fp32", "train.save_every=8"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert records[-1]["sft/mtp_loss"] < 0.5 * records[0]["sft/mtp_loss"]
    assert records[-1]["sft/loss"] < 0.5 * records[0]["sft/loss"]
    assert (tmp_path / "run/checkpoint-8" / MTP_FILE).is_file() and (tmp_path / "run/final" / MTP_FILE).is_file()
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "run/final")  # still a plain transformers folder
    mtp = load_mtp(tmp_path / "run/final", lm)
    assert mtp is not None and not torch.equal(mtp.eh_proj.weight, MTPModule.for_model(lm).eh_proj.weight)
    # resuming from the checkpoint continues with its MTP weights: the same final module
    assert main(["sft", str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}",
                 f"data.path={data}", "eval.path=null", "sft.batch_size=3", "train.micro_batch_size=2",
                 "train.max_steps=16", "optim.lr=1e-2", f"train.output_dir={tmp_path / 'run'}", "model.mtp={}",
                 "logging.wandb=disabled", "train.mixed_precision=fp32", "train.save_every=8",
                 "--resume", str(tmp_path / "run/checkpoint-8")]) == 0
    again = load_mtp(tmp_path / "run/final", lm)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(mtp.state_dict().values(), again.state_dict().values()))
    assert not math.isnan(records[-1]["sft/mtp_loss"])


def grpo_args(tiny_model_dir, length_rule, out, *extra):
    return [str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}",
            f"data.path={ROOT / 'data/arithmetic/train.jsonl'}", "data.max_samples=32", "eval.path=null",
            f"rewards=[{{fn: '{length_rule}:length_reward'}}]", "rollout.num_generations=4",
            "rollout.max_completion_length=10", "train.prompts_per_step=2", "train.micro_batch_size=4",
            "train.max_steps=3", "optim.lr=1e-2", "logging.wandb=disabled", "train.mixed_precision=fp32",
            "scoring.workers=0", f"train.output_dir={out}", *extra]


@pytest.mark.parametrize("share_prompt", [True, False])
def test_grpo_keeps_the_mtp_module_in_step_and_the_policy_update_unchanged(tiny_model_dir, length_rule, tmp_path,
                                                                           share_prompt):
    from grpo.config import load_config
    from grpo.trainer import train

    share = f"train.share_prompt={str(share_prompt).lower()}"
    args = grpo_args(tiny_model_dir, length_rule, tmp_path / "plain", share)
    train(load_config(args[0], args[1:]))
    assert main(["train", *grpo_args(tiny_model_dir, length_rule, tmp_path / "mtp", share, "model.mtp={lr: 1.0e-2}")]) == 0
    a, b = load_file(tmp_path / "plain/final/model.safetensors"), load_file(tmp_path / "mtp/final/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the MTP module's training leaves the policy's update as it was
    records = [json.loads(line) for line in (tmp_path / "mtp/metrics.jsonl").read_text().splitlines()]
    losses = [r["mtp/loss"] for r in records if "mtp/loss" in r]
    assert len(losses) == 3 and all(0 < loss < 2 * math.log(102) for loss in losses)  # near-random samples here
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "mtp/final")
    trained, fresh = load_mtp(tmp_path / "mtp/final", lm), MTPModule.for_model(lm)
    assert not torch.equal(trained.eh_proj.weight, fresh.eh_proj.weight)


def test_grpo_with_speculative_rollouts_logs_acceptance_and_resumes_exactly(tiny_model_dir, length_rule, tmp_path):
    import shutil

    args = grpo_args(tiny_model_dir, length_rule, tmp_path / "run", "model.mtp={}", "rollout.speculative=mtp",
                     "train.save_every=1")
    assert main(["train", *args]) == 0
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["rollout/mtp_acceptance"] <= 1 and 1 <= r["rollout/tokens_per_forward"] <= 2 for r in records)
    assert (tmp_path / "run/checkpoint-2" / MTP_FILE).is_file()
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    shutil.rmtree(tmp_path / "again/final")
    again = grpo_args(tiny_model_dir, length_rule, tmp_path / "again", "model.mtp={}", "rollout.speculative=mtp",
                      "train.save_every=1")
    assert main(["train", *again, "--resume", str(tmp_path / "again/checkpoint-2")]) == 0
    for name in ("model.safetensors", MTP_FILE):
        a, b = load_file(tmp_path / "run/final" / name), load_file(tmp_path / "again/final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_eval_with_drafts_grades_what_eval_without_them_grades(tmp_path):
    from conftest import save_tiny_model
    from grpo.commands.evaluate import evaluate_checkpoint
    from grpo.config import load_config
    from grpo.modeling.mtp import MTPError

    folder = save_tiny_model(tmp_path / "model")
    args = [f"model.name_or_path={folder}", "eval.num_prompts=6", "rollout.max_completion_length=12",
            "train.mixed_precision=fp32", "scoring.workers=0", "model.mtp={}"]
    with pytest.raises(MTPError, match="has no MTP module"):
        evaluate_checkpoint(load_config(ROOT / "configs/quickstart.yaml", [*args, "rollout.speculative=mtp"]), None)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(folder)
    save_mtp(folder, poor_mtp(lm), lm.config)
    plain = evaluate_checkpoint(load_config(ROOT / "configs/quickstart.yaml", args), None)
    drafted = evaluate_checkpoint(load_config(ROOT / "configs/quickstart.yaml", [*args, "rollout.speculative=mtp"]), None)
    assert [s["completion"] for s in plain.samples] == [s["completion"] for s in drafted.samples]
    assert plain.metrics == drafted.metrics


@pytest.mark.parametrize("overrides, message", [
    (["rollout.speculative=mtp"], "set model.mtp"),
    (["model.mtp={layers: 2}"], "only depth 1"),
    (["model.mtp={}", "model.lora={}"], "not with model.lora"),
    (["model.mtp={}", "rollout.speculative=mtp", "tools=[{fn: calculator}]"], "single-turn"),
])
def test_mtp_settings_that_are_refused_say_what_to_change(overrides, message):
    from grpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/quickstart.yaml", overrides)
