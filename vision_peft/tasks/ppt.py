"""PPT's prompt learner (Sun et al., ICRA 2024, https://arxiv.org/abs/2402.15823; CoOp-style, Zhou et al., IJCV 2022):
M context vectors shared by all classes, learned in the text encoder's token-embedding space, with the class name at
the front, middle or end of every prompt. The point-cloud task (``tasks/pointcloud.py``) encodes all class prompts
with the frozen text encoder at every forward.
"""

from __future__ import annotations

import torch
from torch import nn

POSITIONS = ("front", "middle", "end")


def class_text(name: str) -> str:
    """Class folder name → the words put in the prompt (``night_stand`` → ``night stand``)."""
    return name.replace("_", " ").strip()


class PromptLearner(nn.Module):
    """M shared context vectors in the text encoder's token-embedding space, spliced into every class prompt.

    Token layouts (S = start token, E = end token, C = context slots):
    ``end``: S C…C name . E · ``front``: S name C…C . E · ``middle``: S C[:M/2] name C[M/2:] . E.
    ``input_ids`` / ``attention_mask`` (K, L) hold the frozen tokens; ``ctx_index`` (K, L) is the context slot at
    each position (-1 elsewhere); ``forward()`` returns the (K, L, width) input embeddings.
    """

    def __init__(self, text, classnames: list[str], n_ctx: int, position: str, ctx_init: str | None = None) -> None:
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"class position must be one of {', '.join(POSITIONS)}, got {position!r}")
        empty = text.tokenize([""])
        real = empty["input_ids"][0][empty["attention_mask"][0].bool()].tolist()
        if len(real) != 2:
            raise ValueError(f"text encoder {text.spec!r}: expected start/end tokens for an empty text, got {real}")
        start, end = real
        two = text.tokenize(["", "a b c d"])
        pad_id = int(two["input_ids"][0][-1])

        def content(s: str) -> list[int]:
            enc = text.tokenize([s])
            return enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()[1:-1]

        dot = content(".")
        seqs, slots = [], []
        half = n_ctx // 2
        for name in classnames:
            words = content(class_text(name))
            if position == "end":
                parts = [("c", i) for i in range(n_ctx)] + [("t", t) for t in words]
            elif position == "front":
                parts = [("t", t) for t in words] + [("c", i) for i in range(n_ctx)]
            else:
                parts = [("c", i) for i in range(half)] + [("t", t) for t in words]
                parts += [("c", i) for i in range(half, n_ctx)]
            parts = [("t", start)] + parts + [("t", t) for t in dot] + [("t", end)]
            seqs.append([start if k == "c" else v for k, v in parts])
            slots.append([v if k == "c" else -1 for k, v in parts])
        length = max(len(s) for s in seqs)
        if length > text.context_length:
            raise ValueError(
                f"prompts are {length} tokens long, the text encoder {text.spec!r} takes {text.context_length}; "
                "lower task.n_ctx or shorten the class names"
            )
        k = len(classnames)
        ids = torch.full((k, length), pad_id, dtype=torch.long)
        mask = torch.zeros(k, length, dtype=torch.long)
        index = torch.full((k, length), -1, dtype=torch.long)
        for i, (s, c) in enumerate(zip(seqs, slots)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            index[i, : len(c)] = torch.tensor(c)
        emb = text.token_embedding()
        with torch.no_grad():
            base = emb(ids.to(emb.weight.device)).float().cpu()  # (K, L, W)
        self.register_buffer("input_ids", ids, persistent=False)
        self.register_buffer("attention_mask", mask, persistent=False)
        self.register_buffer("ctx_index", index, persistent=False)
        self.register_buffer("base_embeds", base, persistent=False)
        width = base.shape[-1]
        ctx = torch.randn(n_ctx, width, generator=torch.Generator().manual_seed(0)) * 0.02
        if ctx_init:
            init_ids = content(ctx_init)
            if len(init_ids) > n_ctx:
                raise ValueError(f"task.ctx_init {ctx_init!r} is {len(init_ids)} tokens; task.n_ctx is {n_ctx}")
            with torch.no_grad():
                ctx[: len(init_ids)] = emb(torch.tensor(init_ids, device=emb.weight.device)).float().cpu()
        self.ctx = nn.Parameter(ctx)  # (M, W)
        self.n_ctx, self.position = n_ctx, position

    def forward(self) -> torch.Tensor:
        sel = self.ctx[self.ctx_index.clamp(min=0)]  # (K, L, W)
        return torch.where((self.ctx_index >= 0)[..., None], sel.to(self.base_embeds.dtype), self.base_embeds)
