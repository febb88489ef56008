import pytest
import torch

from grpo.config import RolloutConfig
from grpo.modeling.logprobs import completion_logprobs, position_ids_from_mask, token_logprobs
from grpo.rollout import completion_mask, generate, sample_tokens

from conftest import ROOT, load_script, make_model, make_tokenizer


def test_completion_mask_keeps_the_real_eos_when_pad_equals_eos():
    # eos = pad = 2: the first 2 is a real EOS and stays in the mask; the 2s after it are padding
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2], [5, 6, 7, 2]])
    mask, truncated = completion_mask(ids, [2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True, False, False]


def test_several_eos_ids():
    mask, truncated = completion_mask(torch.tensor([[4, 9, 3, 3]]), [3, 9])
    assert mask.tolist() == [[1, 1, 0, 0]] and truncated.tolist() == [False]


def test_position_ids_skip_left_padding():
    assert position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).tolist() == [
        [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_token_logprobs_equal_full_log_softmax():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 4, 11), torch.randint(0, 11, (3, 4))
    full = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, targets, 0.7), full)


def test_left_padded_prompts_score_like_unpadded_ones():
    tok = make_tokenizer()
    tok.padding_side = "left"
    model = make_model(len(tok))
    prompts = ["What is 1 + 2?", "Hi"]
    completion = tok(["=3.", "=3."], add_special_tokens=False)["input_ids"]
    batch = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    ids = torch.cat([batch["input_ids"], torch.tensor(completion)], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        padded = completion_logprobs(model, ids, mask, 3, temperature=0.9)
        for i, prompt in enumerate(prompts):
            alone = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"] + completion[i]])
            single = completion_logprobs(model, alone, torch.ones_like(alone), 3, temperature=0.9)
            torch.testing.assert_close(padded[i], single[0], atol=1e-5, rtol=0)


def test_generate_returns_groups_with_consistent_masks():
    tok = make_tokenizer()
    tok.padding_side = "left"
    model = make_model(len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    r = generate(model, tok, ["What is 1 + 2?", "Hi"], 3, RolloutConfig(max_completion_length=6))
    N, T = r.completion_ids.shape
    assert N == 6 and T <= 6 and r.prompt_ids.shape[0] == 6 and len(r.texts) == 6
    assert torch.equal(r.prompt_ids[0], r.prompt_ids[2]) and not torch.equal(r.prompt_ids[2], r.prompt_ids[3])
    expected_mask, expected_truncated = completion_mask(r.completion_ids, [tok.eos_token_id])
    assert torch.equal(r.completion_mask, expected_mask) and torch.equal(r.truncated, expected_truncated)
    for i in range(N):
        kept = r.completion_ids[i][r.completion_mask[i].bool()]
        assert r.texts[i] == tok.decode(kept, skip_special_tokens=True)
    greedy = generate(model, tok, ["Hi"], 2, RolloutConfig(max_completion_length=6), greedy=True)
    assert torch.equal(greedy.completion_ids[0], greedy.completion_ids[1])


def test_greedy_decoding_matches_transformers_generate():
    tok = make_tokenizer()
    tok.padding_side = "left"
    model = make_model(len(tok), seed=3)
    prompts = ["What is 1 + 2?", "Hi", "<|im_start|>user\nabc"]
    ours = generate(model, tok, prompts, 2, RolloutConfig(max_completion_length=12), greedy=True)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[:, enc["input_ids"].shape[1]:]
    for i in range(len(prompts)):
        n = int(ours.completion_mask[2 * i].sum())
        assert ours.completion_ids[2 * i, :n].tolist() == ref[i, :n].tolist()
        assert torch.equal(ours.completion_ids[2 * i], ours.completion_ids[2 * i + 1])


def test_sampling_follows_the_tempered_distribution():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0 + 1e-9]])).repeat(20000, 1)
    counts = torch.bincount(sample_tokens(logits), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015, rtol=0)
    # temperature 2: probabilities proportional to sqrt(p) = [0.7071, 0.5477, 0.4472] / 1.7020
    counts = torch.bincount(sample_tokens(logits, temperature=2.0), minlength=4).float() / 20000
    torch.testing.assert_close(counts[:3], torch.tensor([0.4155, 0.3218, 0.2628]), atol=0.015, rtol=0)


def test_top_k_and_top_p_filtering():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    # top_k 2 -> renormalised [0.625, 0.375]
    counts = torch.bincount(sample_tokens(logits, top_k=2), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    # top_p 0.7: 0.5 < 0.7, 0.5 + 0.3 >= 0.7 -> keep two tokens
    assert set(sample_tokens(logits, top_p=0.7).tolist()) == {0, 1}
    # top_p 0.9: 0.8 < 0.9 -> the third token joins
    assert set(sample_tokens(logits, top_p=0.9).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("seed, scale", [(3, 0.09), (7, 0.12)])
def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(seed, scale):
    tok = make_tokenizer()
    tok.padding_side = "left"
    prompts = ["What is 1 + 2?", "Hi", "abc def", "x", "<|im_start|>user\nq", "zz top"]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model = make_model(len(tok), seed=seed)
    with torch.no_grad():  # point EOS's embedding at the mean final state, so some rows end early, at different steps
        final = model(**enc, output_hidden_states=True).hidden_states[-1][:, -1].mean(dim=0)
        model.get_input_embeddings().weight[tok.eos_token_id] = final * scale
    ours = generate(model, tok, prompts, 1, RolloutConfig(max_completion_length=16), greedy=True)
    lengths = ours.completion_mask.sum(dim=1)
    assert (lengths < 16).sum() * 4 >= len(prompts) and lengths.max() == 16, lengths  # the batch was compacted
    ref = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[:, enc["input_ids"].shape[1]:]
    for i in range(len(prompts)):
        n = int(lengths[i])
        assert ours.completion_ids[i, :n].tolist() == ref[i, :n].tolist()
        assert ours.completion_ids[i, n:].eq(tok.pad_token_id).all()


def test_sampler_check_compares_the_two_samplers_on_the_same_prompts(tiny_model_dir, tmp_path):
    """scripts/sampler_check.py: this trainer's sampler and `generate` on a tiny model, 16 questions x 4;
    each statistic's means agree within 4 standard errors (both samplers are seeded: the outcome is fixed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # larger logits: a peaked next-token distribution, where the temperature matters
        model.get_input_embeddings().weight.mul_(6.0)
    model.save_pretrained(tmp_path / "peaked")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "peaked")
    check = load_script("sampler_check").check
    result = check(str(ROOT / "configs/quickstart.yaml"), str(tmp_path / "peaked"), 16, 0, [
        f"data.path={ROOT / 'data/arithmetic/train.jsonl'}", "rollout.num_generations=4",
        "rollout.max_completion_length=8", "rollout.temperature=1.0"])
    assert result["completions"] == 64
    for name, row in result["statistics"].items():
        assert abs(row["z"]) < 4, (name, row)
    assert result["statistics"]["logprob"]["grpo"][1] > 0  # the samples differ
