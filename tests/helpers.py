"""Shared builders for tests."""

from __future__ import annotations

import torch


def make_problem(
    n_out: int,
    k_in: int,
    shapes: list[tuple[int, int, int, int]],
    dtype: torch.dtype,
    lead: tuple[int, ...] = (7,),
    gate: bool = True,
    bias: bool = True,
    requires_grad: bool = True,
):
    """Random x, W0, factors (all non-zero), gate logits and bias for a layer of shape (n_out, k_in)."""
    x = torch.randn(*lead, k_in, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    weight = (torch.randn(n_out, k_in, dtype=torch.float64) / k_in**0.5).to(dtype)
    a_factors = [
        (torch.randn(a1, a2, dtype=torch.float64) / a2**0.5).to(dtype).requires_grad_(requires_grad)
        for a1, a2, _, _ in shapes
    ]
    b_factors = [
        (torch.randn(b1, b2, dtype=torch.float64) / b2**0.5).to(dtype).requires_grad_(requires_grad)
        for _, _, b1, b2 in shapes
    ]
    gate_logits = (
        torch.randn(len(shapes), dtype=torch.float64).to(dtype).requires_grad_(requires_grad) if gate else None
    )
    b = (torch.randn(n_out, dtype=torch.float64) * 0.1).to(dtype).requires_grad_(requires_grad) if bias else None
    return x, weight, a_factors, b_factors, gate_logits, b


def leaves(x, a_factors, b_factors, gate_logits, bias):
    return [t for t in (x, *a_factors, *b_factors, gate_logits, bias) if t is not None and t.requires_grad]


def grads_of(out: torch.Tensor, tensors, grad_out: torch.Tensor):
    return torch.autograd.grad(out, tensors, grad_out, allow_unused=False)


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128, tie_word_embeddings: bool = False):
    """A small random LlamaForCausalLM (GQA: 4 heads, 2 KV heads), built in code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3 // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config).eval()


def randomize_adapters(model, std: float = 0.2, seed: int = 1) -> None:
    """Non-zero values in every trainable adapter tensor, so ΔW != 0."""
    from moka import moka_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moka_layers(model).values():
            for p in [*layer.a_factors, *layer.b_factors] + (
                [layer.gate_logits] if layer.gate_logits is not None else []
            ):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def word_level_tokenizer(words: list[str]):
    """(tokenizer, vocab size): a whitespace word-level fast tokenizer with a tiny chat template, built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>"]
    vocab = specials + [w for w in dict.fromkeys(words) if w not in specials]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast, len(vocab)


def train_steps(model, ids: torch.Tensor, steps: int, lr: float, optimizer=torch.optim.AdamW) -> list[float]:
    """``steps`` optimizer steps of causal-LM loss on ``ids`` over the trainable parameters; the losses."""
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
