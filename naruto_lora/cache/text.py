"""The text-embedding cache: every distinct caption encoded once through both CLIP encoders.

Stored per caption, in fp16: ``prompt_embeds`` [seq, D1 + D2] = the penultimate hidden states
of both encoders concatenated, and ``pooled_embeds`` [P] = the second encoder's projected pooled
output (for SDXL: 77 x 2048 and 1280) - what ``models.encode_prompts`` computes. With this cache
on disk (``cache.text = "disk"``) training never loads the text encoders.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from naruto_lora.cache import manifest
from naruto_lora.cache.builder import BuildReport, Planned, ReadyCache, assess, sync_cache
from naruto_lora.cache.manifest import Index, fingerprint
from naruto_lora.data.sources import Skipped, check_usable, scan_source
from naruto_lora.util.devices import resolve_device
from naruto_lora.util.errors import UserError

KIND = "text"
STORE_DTYPE = torch.float16
COMMAND = "nlora cache text --to-disk"
PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")


def text_cache_dir(profile: Any) -> Path:
    return Path(profile.cache.dir).expanduser() / KIND


def caption_key(caption: str) -> str:
    return hashlib.blake2b(caption.encode("utf-8"), digest_size=16).hexdigest()


@dataclass(frozen=True)
class TextModelFacts:
    """Shapes of what the two encoders produce, read from tokenizer and encoder configs."""

    max_lengths: tuple[int, int]
    hidden_sizes: tuple[int, int]
    pooled_size: int
    config_hash: str

    @property
    def prompt_shape(self) -> tuple[int, int]:
        return self.max_lengths[0], sum(self.hidden_sizes)

    def bytes_per_caption(self) -> int:
        seq, dim = self.prompt_shape
        return (seq * dim + self.pooled_size) * torch.empty((), dtype=STORE_DTYPE).element_size()


def text_model_facts(model_cfg: Any) -> TextModelFacts:
    from transformers import CLIPTextConfig, CLIPTokenizer

    from naruto_lora.models.loading import resolve_model

    model_id = resolve_model(model_cfg.pretrained)
    revision = {"revision": model_cfg.revision} if model_cfg.revision else {}
    try:
        tokenizers = [
            CLIPTokenizer.from_pretrained(model_id, subfolder=s, **revision) for s in PARTS[:2]
        ]
        configs = [
            CLIPTextConfig.from_pretrained(model_id, subfolder=s, **revision) for s in PARTS[2:]
        ]
    except (OSError, ValueError) as exc:
        raise UserError(
            f"Could not read the text encoders of '{model_cfg.pretrained}': {str(exc).splitlines()[0]}",
            hint="Check model.pretrained / --model (a hub id needs network access once).",
        ) from exc
    lengths = tuple(int(t.model_max_length) for t in tokenizers)
    if lengths[0] != lengths[1]:
        raise UserError(
            f"The two tokenizers of '{model_cfg.pretrained}' have different lengths {lengths}."
        )
    return TextModelFacts(
        max_lengths=lengths,
        hidden_sizes=(int(configs[0].hidden_size), int(configs[1].hidden_size)),
        pooled_size=int(configs[1].projection_dim),
        config_hash=fingerprint(
            {"configs": [c.to_diff_dict() for c in configs], "lengths": lengths}
        ),
    )


def text_common(model_cfg: Any, facts: TextModelFacts) -> dict[str, Any]:
    from naruto_lora.models.loading import resolve_model

    resolved = resolve_model(model_cfg.pretrained)
    return {
        "model": model_cfg.pretrained,
        "model_revision": manifest.component_revision(
            resolved, model_cfg.pretrained, list(PARTS), model_cfg.revision
        ),
        "variant": model_cfg.variant,
        "encoders_config": facts.config_hash,
        "max_length": facts.max_lengths[0],
        "prompt_embeds": "penultimate hidden states of both encoders, concatenated",
        "pooled_embeds": "projected pooled output of text_encoder_2",
        "store_dtype": str(STORE_DTYPE).removeprefix("torch."),
    }


def clip_encoder(model_cfg: Any, device: torch.device):
    """(prepare, encode) for the builder. fp16 on a GPU (CLIP is fp16-safe), fp32 on a CPU."""
    from naruto_lora.models.loading import encode_prompts, load_text_encoders

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    text = load_text_encoders(model_cfg, dtype)
    for encoder in text.encoders:
        encoder.to(device)

    def prepare(batch: list[Planned]) -> list[str]:
        return [p.payload for p in batch]

    def encode(captions: list[str]) -> list[dict[str, torch.Tensor] | str]:
        prompt, pooled = encode_prompts(text, captions, device)
        prompt, pooled = prompt.to(STORE_DTYPE).cpu(), pooled.to(STORE_DTYPE).cpu()
        out: list[dict[str, torch.Tensor] | str] = []
        for i in range(len(captions)):
            item = {"prompt_embeds": prompt[i].clone(), "pooled_embeds": pooled[i].clone()}
            finite = all(bool(torch.isfinite(t).all()) for t in item.values())
            out.append(item if finite else "the text encoders produced non-finite embeddings")
        return out

    return prepare, encode


class TextCache(ReadyCache):
    """A ready text cache: ``embeddings(caption)`` -> (prompt_embeds, pooled_embeds), fp16."""

    kind = KIND
    label = "text"

    def __init__(
        self, folder: Path, index: Index, keys: list[str], report: BuildReport | None = None
    ):
        super().__init__(folder, index, keys, report)
        self.captions = [index.entries[k].meta["caption"] for k in self.keys]

    def __contains__(self, caption: str) -> bool:
        return caption_key(caption) in self._slots

    def stored(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The caption's embeddings as views of the mapped shard (copy before changing them)."""
        key = caption_key(caption)
        if key not in self._slots:
            raise UserError(
                f"The text cache '{self.folder}' has no embeddings for the caption {caption!r}.",
                hint=f"Run `{COMMAND}` with the training profile to refresh it.",
            )
        return self._tensor(key, "prompt_embeds"), self._tensor(key, "pooled_embeds")

    def embeddings(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [seq, D], pooled_embeds [P]) for ``caption``, fp16 copies."""
        prompt_embeds, pooled_embeds = self.stored(caption)
        return prompt_embeds.clone(), pooled_embeds.clone()


def plan_text_entries(
    profile: Any, strict: bool = False
) -> tuple[list[Planned], dict[str, Any], TextModelFacts, Any]:
    """One entry per distinct caption of the data set (identical captions are encoded once)."""
    scan = scan_source(profile.data, strict=strict)
    facts = text_model_facts(profile.model)
    common = text_common(profile.model, facts)
    by_caption: dict[str, dict[str, Any]] = {}
    for item in scan.items:
        meta = by_caption.setdefault(
            item.caption, {"caption": item.caption, "source": item.source, "items": 0}
        )
        meta["items"] += 1
    entries = [
        Planned(caption_key(c), fingerprint({"common": common, "caption": c}), meta, None, c)
        for c, meta in by_caption.items()
    ]
    return entries, common, facts, scan


def ensure_text_cache(
    profile: Any,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    auto: bool = True,
    strict: bool = False,
) -> TextCache:
    """Validate the profile's text cache; encode what is missing or stale (``auto``), or raise
    a UserError naming what is missing and the command that builds it. ``strict``: fail on
    any unusable data set entry or caption that cannot be encoded."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1.")
    folder = text_cache_dir(profile)
    entries, common, _, scan = plan_text_entries(profile, strict)
    index, report = sync_cache(
        folder,
        KIND,
        common,
        entries,
        lambda: clip_encoder(profile.model, resolve_device(device)),
        batch_size=batch_size,
        shard_items=profile.cache.shard_items,
        auto=auto,
        command=COMMAND,
        skipped=[],
        skipped_of=lambda p, reason: Skipped(p.key, p.meta["source"], reason),
        unit="caption",
    )
    report.warnings = scan.warnings
    ready = [
        p.key for p in entries if (e := index.entries.get(p.key)) and e.fingerprint == p.fingerprint
    ]
    check_usable(scan.description, len(ready), report.skipped, strict)
    return TextCache(folder, index, ready, report)


@dataclass(frozen=True)
class TextPlan:
    """What ``nlora cache text`` without ``--to-disk`` reports."""

    folder: Path
    items: int
    captions: int
    cached: int
    facts: TextModelFacts

    @property
    def bytes_total(self) -> int:
        return self.captions * self.facts.bytes_per_caption()

    @property
    def bytes_to_encode(self) -> int:
        return (self.captions - self.cached) * self.facts.bytes_per_caption()


def plan_text_cache(profile: Any) -> TextPlan:
    """What the text cache would hold for this profile, and how much of it is already valid."""
    folder = text_cache_dir(profile)
    entries, _, facts, scan = plan_text_entries(profile)
    state = assess(folder, KIND, entries, verify=False)
    return TextPlan(folder, len(scan.items), len(entries), len(state.valid), facts)
