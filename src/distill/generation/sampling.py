"""Batched sampling with a KV cache, left padding, and one random generator per sequence.

``transformers``' ``generate`` draws every row's samples from the global RNG, so a row's text depends
on which rows share its batch. Here each sequence owns a ``torch.Generator`` seeded from (seed,
prompt index, completion index): the same prompt gives the same completions whatever the batch
size or composition, and a resumed run reproduces the text of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["sample_batch", "sequence_seed"]


def sequence_seed(seed: int, prompt_index: int, completion_index: int) -> int:
    """A 63-bit seed for one (prompt, completion) pair, independent of batching and of other seeds."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{completion_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and the top-p nucleus with -inf. logits: [B, V] float32."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first stays).
        drop_sorted = probs.cumsum(dim=-1) - probs > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_tokens(
    logits: torch.Tensor, generators: Sequence[torch.Generator], temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """One token per row. logits: [B, V] (any device); returns [B] int64 on the CPU."""
    logits = logits.float().cpu()  # sampled on the CPU so the CPU generators give the same draws on every device
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = _filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


@torch.no_grad()
def sample_batch(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[list[int]]:
    """Continue each prompt with up to ``max_new_tokens`` sampled tokens.

    Args:
        model: A causal LM (``model(input_ids, attention_mask, position_ids, past_key_values)``).
        prompt_ids: ``B`` token-id lists, of any lengths; left-padded into one ``[B, L]`` batch.
        generators: ``B`` CPU generators, one per row, consumed one draw per generated token.
        max_new_tokens: Most tokens generated per row.
        eos_token_ids: A row stops after producing any of these (it is kept in the output).
        pad_token_id: Fills the left padding and the steps after a row stopped.
        temperature: Softmax temperature; 0 means greedy.
        top_k: Keep only the k most likely tokens (0: all).
        top_p: Keep the smallest set of tokens holding this probability mass (1: all).

    Returns:
        ``B`` lists of new token ids, each ending at its first eos (included) or after ``max_new_tokens``.
    """
    device = next(model.parameters()).device
    batch, length = len(prompt_ids), max(len(p) for p in prompt_ids)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, length - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    # Left padding: real tokens are numbered 0, 1, ... from each row's first real token.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    input_ids, attention_mask, position_ids = input_ids.to(device), attention_mask.to(device), position_ids.to(device)

    eos = set(int(t) for t in eos_token_ids)
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1
    )
    next_position = position_ids[:, -1:] + 1
    for step in range(max_new_tokens):
        tokens = _next_tokens(out.logits[:, -1, :], generators, temperature, top_k, top_p)
        for row in range(batch):
            if finished[row]:
                tokens[row] = pad_token_id
            else:
                new_tokens[row].append(int(tokens[row]))
                finished[row] = int(tokens[row]) in eos
        if all(finished) or step == max_new_tokens - 1:
            break
        # Finished rows keep feeding padding; their outputs are ignored and do not touch the other rows.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
        out = model(
            input_ids=tokens[:, None].to(device),
            attention_mask=attention_mask,
            position_ids=next_position,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_position = next_position + 1
    return new_tokens
