"""Pivotal tuning: new identifier tokens learned as textual-inversion embeddings with the adapter.

As in diffusers' advanced DreamBooth scripts (same flag names and meanings): each
`--token_abstraction` word (default "TOK") in the prompts is replaced by
`--num_new_tokens_per_abstraction` new tokens `<s0><s1>...`, added to every tokenizer; only their
embedding rows train, for the first `--train_text_encoder_ti_frac` of the steps (the "pivot"),
then they freeze and the adapter goes on alone.

Here the rows live in their own parameter (`NewTokenEmbedding.new`, (n, D) fp32) beside the
untouched base embedding (V, D): ids below the new ones read the base table, the new ids read `new`. So the rest
of the embedding matrix stays exactly the base's by construction (no copy-back after each step,
no weight decay on rows that must not move), and the lookup equals that of a table resized with
the new rows appended, which is what stock `pipe.load_textual_inversion` builds.

Files written beside the adapter:

    embeddings.safetensors              diffusers' advanced-script layout: `clip_l` (n, 768)
                                        [+ `clip_g` (n, 1280) for SDXL and SD 3] [+ `t5` (n, 4096),
                                        FLUX.1 / SD 3 with `--enable_t5_ti`], all new tokens in order;
                                        `pipe.load_textual_inversion(f["clip_l"], token=[...], ...)`
    webui_embeddings/<ABSTRACTION>.safetensors
                                        one file per abstraction for A1111 / Forge / ComfyUI (their
                                        trigger word is the file name): `emb_params` (SD 1.x/2.x)
                                        or `clip_l` + `clip_g` (SDXL); CLIP's rows only

T5's table has rows past its tokenizer (T5-XXL: 32128 rows, 32100 tokens); the new tokens take the
ids after the tokenizer's, as stock `load_textual_inversion` gives them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..outputs import atomic_dir, atomic_path

EMBEDDINGS_FILE = "embeddings.safetensors"
WEBUI_FOLDER = "webui_embeddings"
ABSTRACTION = re.compile(r"[A-Za-z0-9_\-]+")  # also a file name: the web UIs' trigger word


def new_token_names(abstractions: list[str], per_abstraction: int) -> dict[str, list[str]]:
    """{abstraction: its new tokens}, numbered across abstractions as diffusers does:
    ["TOK", "DOG"], 2 -> {"TOK": ["<s0>", "<s1>"], "DOG": ["<s2>", "<s3>"]}."""
    return {a: [f"<s{i * per_abstraction + j}>" for j in range(per_abstraction)] for i, a in enumerate(abstractions)}


def insert_tokens(text: str, tokens: dict[str, list[str]]) -> str:
    """The prompt with every abstraction replaced by its tokens ("a TOK icon" -> "a <s0><s1> icon")."""
    for abstraction, names in tokens.items():
        text = text.replace(abstraction, "".join(names))
    return text


class NewTokenEmbedding(nn.Module):
    """A token embedding with `n` rows appended: ids (..,) -> (.., D).

    `base`: the frozen (V, D) table, untouched; `new`: (n, D) trainable, fp32. The new tokens'
    ids start at `first` (the tokenizer's size before they were added: V for CLIP; T5's table has
    unused rows past its tokenizer, 32128 against 32100). Ids >= `first` read `new[id - first]`, in
    the base table's dtype: what a table resized to `first + n` by stock `load_textual_inversion`
    holds."""

    def __init__(self, base: nn.Embedding, new: torch.Tensor, first: int | None = None):
        super().__init__()
        self.base = base
        self.first = base.num_embeddings if first is None else first
        self.new = nn.Parameter(new.detach().to(base.weight.device, torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:  # the resized table, for code that reads `.weight`
        return torch.cat([self.base.weight[:self.first], self.new.to(self.base.weight.dtype)])

    @property
    def num_embeddings(self) -> int:
        return self.first + self.new.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.first - 1))
        is_new = ids >= self.first  # no shortcut when there are none: every process must get a gradient
        rows = self.new[(ids - self.first).clamp(min=0)].to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), rows, out)


class PivotalTokens:
    """The new tokens of a run: added to the tokenizers, their rows trained in each text encoder.

    `tokens`: {abstraction: [new token, ...]}. Initial rows: random normal scaled by the base
    table's std (seeded), or with `initializer_concept` the concept's token embeddings in turn
    (token k takes the concept's token k mod its length), as diffusers does."""

    def __init__(self, tokenizers: list, text_encoders: list, tokens: dict[str, list[str]],
                 initializer_concept: str | None, seed: int, keys: tuple[str, ...] = ("clip_l", "clip_g")):
        """`keys`: each text encoder's name in the embeddings file (the family's `embedding_keys`)."""
        self.tokens, self.keys = tokens, keys
        self.names = [t for names in tokens.values() for t in names]
        self.tables: list[NewTokenEmbedding] = []
        gen = torch.Generator().manual_seed(seed)
        for _, tokenizer, encoder in zip(keys, tokenizers, text_encoders):  # one per key: T5 (FLUX, SD 3) has none
            taken = [t for t in self.names if t in tokenizer.get_vocab()]
            if taken:
                raise ValueError(f"the tokenizer already has the token {taken[0]!r}; choose another token_abstraction")
            base = encoder.get_input_embeddings()
            first = len(tokenizer)  # the new tokens' first id
            if first > base.num_embeddings:
                raise ValueError(f"tokenizer has {first} tokens but the text encoder's table only "
                                 f"{base.num_embeddings} rows")
            tokenizer.add_tokens(self.names)  # as stock load_textual_inversion adds them
            table = base.weight.detach().float()[:first]  # (T5's rows past its tokenizer are unused)
            if initializer_concept:
                ids = tokenizer.encode(initializer_concept, add_special_tokens=False)
                if not ids:
                    raise ValueError(f"initializer_concept {initializer_concept!r} has no tokens")
                init = table[[ids[k % len(ids)] for k in range(len(self.names))]]
            else:
                init = torch.randn(len(self.names), table.shape[1], generator=gen) * table.std()
            module = NewTokenEmbedding(base, init, first)
            encoder.set_input_embeddings(module)
            self.tables.append(module)

    def parameters(self) -> list[nn.Parameter]:
        return [t.new for t in self.tables]

    def train_rows(self, on: bool) -> None:
        """Before the pivot the rows train; after it they are frozen (no gradient, so the
        optimiser leaves them exactly as they are)."""
        for p in self.parameters():
            p.requires_grad_(on)

    @torch.no_grad()
    def load_vectors(self, vectors: dict[str, torch.Tensor]) -> None:
        """Rows from `vectors()`'s layout (a checkpoint's embeddings file)."""
        for key, t in zip(self.keys, self.tables):
            t.new.copy_(vectors[key])

    def vectors(self) -> dict[str, torch.Tensor]:
        """{"clip_l": (n, D1)[, "clip_g": (n, D2)]} fp32 on the CPU, all tokens in order."""
        return {key: t.new.detach().to("cpu", torch.float32).contiguous() for key, t in zip(self.keys, self.tables)}

    def save(self, out_dir: str | Path) -> list[Path]:
        return save_embeddings(out_dir, self.vectors(), self.tokens)


def save_embeddings(out_dir: str | Path, vectors: dict[str, torch.Tensor], tokens: dict[str, list[str]],
                    webui: bool = True) -> list[Path]:
    """`embeddings.safetensors` and (`webui`) `webui_embeddings/<abstraction>.safetensors`, atomically.

    `vectors`: {"clip_l": (n, D)[, "clip_g"]}, rows in the order of `tokens`' values."""
    import json

    from safetensors.torch import save_file

    out = Path(out_dir)
    meta = {"format": "pt", "dreambooth_dora_tokens": json.dumps(tokens)}
    with atomic_path(out / EMBEDDINGS_FILE) as tmp:
        save_file(vectors, str(tmp), metadata=meta)
    if not webui:
        return [out / EMBEDDINGS_FILE]
    with atomic_dir(out / WEBUI_FOLDER, kind="webui-embeddings") as folder:
        for abstraction, data in webui_embeddings(vectors, tokens).items():
            save_file(data, str(folder / f"{abstraction}.safetensors"), metadata={"format": "pt"})
    return [out / EMBEDDINGS_FILE, out / WEBUI_FOLDER]


def webui_embeddings(vectors: dict[str, torch.Tensor], tokens: dict[str, list[str]]) -> dict[str, dict]:
    """{abstraction: its web UI embedding}: `emb_params` (n, D) for SD 1.x/2.x, `clip_l` + `clip_g`
    for SDXL (what A1111, Forge and ComfyUI read; see consumers.a1111_embedding)."""
    out, start = {}, 0
    for abstraction, names in tokens.items():  # CLIP's rows (T5's, with enable_t5_ti, stay in the diffusers file)
        rows = {k: v[start:start + len(names)].contiguous() for k, v in vectors.items() if k != "t5"}
        start += len(names)
        out[abstraction] = rows if len(rows) == 2 else {"emb_params": rows["clip_l"]}
    return out


def bundled_embeddings(vectors: dict[str, torch.Tensor], tokens: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """The web UI embeddings as kohya "bundled embeddings" inside a LoRA file:
    `bundle_emb.<abstraction>.<emb_params | clip_l | clip_g>` (A1111 and Forge load them with the LoRA)."""
    return {f"bundle_emb.{a}.{k}": v for a, data in webui_embeddings(vectors, tokens).items() for k, v in data.items()}


def read_embeddings(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """(vectors {"clip_l"[, "clip_g"]}, tokens {abstraction: [token, ...]}) of an embeddings file."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        vectors = {k: f.get_tensor(k) for k in f.keys()}
        tokens = json.loads((f.metadata() or {}).get("dreambooth_dora_tokens") or "{}")
    return vectors, tokens
