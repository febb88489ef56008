"""Write a tiny random DeepSeek-V3 (multi-head latent attention with q/kv LoRA ranks, a dense first layer,
shared + routed experts with group-limited top-k routing) with the built-in model's tokenizer, for
configs/deepseek_v3_tiny.yaml. Random weights: it exercises the machinery, it does not solve tasks.

    python scripts/make_tiny_deepseek_v3.py --out runs/tiny-deepseek-v3
"""

import argparse

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def tiny_deepseek_v3(vocab_size: int, eos_token_id: int, pad_token_id: int, bos_token_id: int | None = None,
                     seed: int = 0) -> DeepseekV3ForCausalLM:
    config = DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tiny-deepseek-v3")
    args = parser.parse_args()
    from grpo.config import ModelConfig
    from grpo.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    model = tiny_deepseek_v3(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{args.out}: DeepSeek-V3, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
