"""Put trainable vectors into a prompt: token layout and the embedding-layer hook.

The prompt is tokenized with ``num_vectors`` slot positions wherever the embedding's name
appears; a forward hook on the text encoder's token-embedding layer then overwrites those
positions with the vectors. The token table itself is never modified or trained, so the
host model cannot be corrupted and only the vectors receive gradients.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SLOT_ID = 0  # any ordinary id works: the hook replaces it; it only must not be BOS/EOS


@dataclass
class SlotLayout:
    ids: torch.Tensor  # long [B, L]
    batch_index: torch.Tensor  # long [S]: which prompt each slot is in
    position: torch.Tensor  # long [S]: token position of the slot
    vector_index: torch.Tensor  # long [S]: which of the n vectors goes there


def name_pattern(token: str) -> re.Pattern[str]:
    """The embedding's name as a whole word, case-insensitive (CLIP lower-cases prompts anyway)."""
    return re.compile(rf"(?<![\w]){re.escape(token)}(?![\w])", re.IGNORECASE)


def layout_prompts(tokenizer, prompts: list[str], token: str, num_vectors: int, max_length: int = 77) -> SlotLayout:
    """Token ids with slots for the vectors; prompts longer than the context are truncated, like diffusers."""
    pattern = name_pattern(token)
    rows: list[list[int]] = []
    slots: list[tuple[int, int, int]] = []  # (prompt, token position, vector index)
    for b, prompt in enumerate(prompts):
        body: list[int] = []
        for i, chunk in enumerate(pattern.split(prompt)):
            if i:
                slots.extend((b, len(body) + 1 + k, k) for k in range(num_vectors))  # +1 for BOS
                body.extend([SLOT_ID] * num_vectors)
            if chunk.strip():
                body.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
        body = body[: max_length - 2]
        row = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
        row += [tokenizer.pad_token_id] * (max_length - len(row))
        rows.append(row)
    kept = [s for s in slots if s[1] < max_length - 1]  # slots cut off by truncation are dropped
    batch_index, position, vector_index = (torch.tensor(column, dtype=torch.long).reshape(-1) for column in
                                           zip(*kept, strict=True)) if kept else (torch.zeros(0, dtype=torch.long),) * 3
    return SlotLayout(torch.tensor(rows, dtype=torch.long), batch_index, position, vector_index)


@contextlib.contextmanager
def spliced(embedding_layer: torch.nn.Module, layout: SlotLayout, vectors: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``embedding_layer``'s output carries ``vectors`` at the layout's slots."""

    def hook(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        if layout.position.numel() == 0:
            return output
        device = output.device
        rows = vectors.to(device=device, dtype=output.dtype)[layout.vector_index.to(device)]
        # index_put (not in place) keeps the graph: gradients flow into ``vectors`` only.
        return output.index_put((layout.batch_index.to(device), layout.position.to(device)), rows)

    handle = embedding_layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def spread_init_vectors(token_vectors: torch.Tensor, num_vectors: int, width: int) -> torch.Tensor:
    """The webui's rule: vector i takes init token i*len//n (spreads or repeats); no tokens -> zeros."""
    out = torch.zeros(num_vectors, width, dtype=torch.float32)
    count = token_vectors.shape[0]
    if count:
        for i in range(num_vectors):
            out[i] = token_vectors[i * count // num_vectors].float()
    return out
