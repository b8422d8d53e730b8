"""A small GPT (Radford et al. 2019): token + position embeddings, pre-norm blocks, causal self-attention
through scaled_dot_product_attention, tied input/output embeddings, GPT-2 initialisation.

The normalization layer comes from conf/norm (layernorm, rmsnorm or none) like every sample model.

generate() keeps a key/value cache (KVCache) while the text fits in one block: each new token then costs a
forward pass of one position instead of the whole context (4x cheaper at block 64 on a CPU). Beyond block_size
the window slides and, the position embeddings being absolute, every position of it changes: nothing can be
reused, so each token recomputes its window, as without a cache. Both give the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tasks.norm import norm_layer

NormFactory = Callable[[int], nn.Module]


class KVCache:
    """The keys and values of the positions seen so far, per layer ([B, heads, positions, head size])."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.length = 0  # positions cached (GPT.forward advances it once all layers have seen the new ones)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.proj.residual = True  # scaled init, see GPT._init
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask = None
        if cache is not None and cache.length:  # queries at positions past..past+T-1 see keys 0..their own
            k, v = cache.extend(layer, k, v)
            past = cache.length
            mask = torch.arange(past, past + T, device=x.device)[:, None] >= torch.arange(past + T, device=x.device)
        elif cache is not None:
            cache.extend(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.up = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.down = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.down.residual = True
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, norm: NormFactory) -> None:
        super().__init__()
        self.norm1, self.attn = norm(n_embd), CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.norm2, self.mlp = norm(n_embd), MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int = 64, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0, bias: bool = True, norm: NormFactory | None = None) -> None:
        super().__init__()
        norm = norm or (lambda n: norm_layer(n, "layernorm"))
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias, norm) for _ in range(n_layer))
        self.norm = norm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied input and output embeddings (Press & Wolf 1608.05859)
        self.head.is_output_head = True  # optim.param_groups: routed like the head (e.g. not to Muon)
        self.n_layer = n_layer
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        """GPT-2: N(0, 0.02) weights, zero biases; residual projections N(0, 0.02/sqrt(2 n_layer))."""
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T] (at positions cache.length... when given a cache)."""
        past = cache.length if cache is not None else 0
        T = idx.shape[1]
        if self.block_size < past + T:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size={self.block_size}")
        x = self.drop(self.tok(idx) + self.pos(torch.arange(past, past + T, device=idx.device)))
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Sample `new_tokens` tokens after `idx` [B, T], each from the last block_size tokens."""
        if new_tokens <= 0:
            return idx
        cache = KVCache() if use_cache else None
        logits = self(idx[:, -self.block_size :], cache)[:, -1]
        for i in range(new_tokens):
            probs = F.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            if i == new_tokens - 1:
                break
            if cache is not None and cache.length < self.block_size:
                logits = self(nxt, cache)[:, -1]
            else:  # the window slides: every position's embedding changes, so the whole window is recomputed
                logits = self(idx[:, -self.block_size :])[:, -1]
        return idx
