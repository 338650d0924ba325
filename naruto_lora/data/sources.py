"""Data sources: where items come from, what is skipped and why, and planning each item.

A data set is read from one of three places (``data.source``):

* a local folder in the ``imagefolder`` layout: images plus ``metadata.jsonl`` with ``file_name``
  and a caption field (``data.caption_column``);
* a local folder of images, each with a same-named ``.txt`` caption (other trainers' convention);
* anything ``datasets`` loads: a hub id (``lambdalabs/naruto-blip-captions``), a folder written by
  ``Dataset.save_to_disk``, a folder of parquet files.

Scanning never decodes pixels: items are listed with a lazy reader of their bytes. Bad items are
*skipped* with a reason (listed in the cache's ``skipped.jsonl``); the run fails only when nothing
is usable or with ``strict``. Planning hashes each image and computes its crop plans (see
``naruto_lora.data.preprocess``) from the header alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

# Images and preprocessing live in naruto_lora.data.preprocess; re-exported as part of this API.
from naruto_lora.data.preprocess import (  # noqa: F401
    BUCKET_STEP,
    MAX_BUCKET_RATIO,
    RESAMPLE,
    CropPlan,
    ImageError,
    bucket_for,
    image_hash,
    image_size,
    load_rgb,
    plan_crop,
    preprocess,
    time_ids,
)
from naruto_lora.util.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class FileBlob:
    """An image file on disk."""

    path: Path

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class RowBlob:
    """The image of row ``row`` of a ``datasets.Dataset`` whose image column is not decoded."""

    dataset: Any
    row: int
    column: str

    def read(self) -> bytes:
        value = self.dataset[self.row][self.column]
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"])
            if value.get("path"):
                return Path(value["path"]).read_bytes()
        raise OSError(f"row {self.row} has no image bytes in column '{self.column}'")


@dataclass(frozen=True)
class SourceItem:
    """One captioned image of the data set; ``key`` is stable across runs (relative path or row)."""

    key: str
    source: str
    caption: str
    blob: FileBlob | RowBlob


@dataclass(frozen=True)
class Skipped:
    key: str
    source: str
    reason: str

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "source": self.source, "reason": self.reason})


@dataclass
class DataScan:
    """What a data source holds: usable items, skipped ones (with reasons) and warnings."""

    description: str
    items: list[SourceItem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _caption_text(value: Any) -> str | None:
    """A caption value as text; lists (several captions per image) give their first one."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple)):
        texts = [v.strip() for v in value if isinstance(v, str) and v.strip()]
        return texts[0] if texts else None
    return None


def read_text_file(path: Path, not_utf8: list[str], label: str) -> str:
    """A text file as UTF-8 (a byte-order mark allowed); a file that is not UTF-8 is read as
    Latin-1 (every byte is a character there, and it is what older Windows tools write) and
    its ``label`` is added to ``not_utf8`` for a warning, instead of silently turning letters
    into U+FFFD."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        not_utf8.append(label)
        return data.decode("latin-1")


def _not_utf8_warning(labels: list[str]) -> str:
    shown = ", ".join(labels[:5]) + (f" (and {len(labels) - 5} more)" if len(labels) > 5 else "")
    return (
        f"{len(labels)} caption file(s) are not UTF-8 and were read as Latin-1: {shown}. "
        "Check their accented letters, and save them as UTF-8 to be sure."
    )


def _safe_member(root: Path, name: str) -> Path | None:
    """``root/name`` if ``name`` stays inside ``root`` lexically, else None.

    Lexical on purpose: a data folder assembled with symlinks (the hub cache does that) is
    fine; a ``file_name`` with ``..`` or an absolute path is what a hostile or broken
    ``metadata.jsonl`` would use to read files elsewhere.
    """
    if not name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
        return None
    if PureWindowsPath(name).drive:
        return None
    joined = os.path.normpath(os.path.join(root, name))
    root_norm = os.path.normpath(root)
    if os.path.commonpath([root_norm, joined]) != root_norm or joined == root_norm:
        return None
    return Path(joined)


def _file_problem(path: Path) -> str | None:
    if not path.is_file():
        return "file not found"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    return None


def _missing_caption_warning(sources: list[str]) -> str:
    shown = ", ".join(sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
    return f"{len(sources)} item(s) have no caption and train with an empty caption: {shown}."


def _scan_metadata_folder(root: Path, metadata: Path, caption_column: str) -> DataScan:
    scan = DataScan(description=f"imagefolder '{root}' ({metadata.name})")
    seen: dict[str, int] = {}
    no_caption: list[str] = []
    caption_found = False
    not_utf8: list[str] = []
    lines = read_text_file(metadata, not_utf8, metadata.name).splitlines()
    if not_utf8:
        scan.warnings.append(_not_utf8_warning(not_utf8))
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{metadata.name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            scan.skipped.append(Skipped(where, where, "not valid JSON"))
            continue
        name = record.get("file_name") if isinstance(record, dict) else None
        if not isinstance(name, str) or not name:
            scan.skipped.append(Skipped(where, where, "no 'file_name'"))
            continue
        path = _safe_member(root, name)
        if path is None:
            reason = "refused: file_name escapes the data folder (absolute path or '..')"
            scan.skipped.append(Skipped(name, where, reason))
            continue
        key = path.relative_to(root).as_posix()
        if key in seen:
            scan.skipped.append(Skipped(key, where, f"duplicate of line {seen[key]}"))
            continue
        seen[key] = number
        problem = _file_problem(path)
        if problem:
            scan.skipped.append(Skipped(key, key, problem))
            continue
        caption_found |= caption_column in record
        caption = _caption_text(record.get(caption_column))
        if not caption:
            no_caption.append(key)
        scan.items.append(SourceItem(key, key, caption or "", FileBlob(path)))
    if scan.items and not caption_found:
        raise UserError(
            f"No line of '{metadata}' has the caption field '{caption_column}'.",
            hint="Name the caption field with --caption-column (data.caption_column).",
        )
    if no_caption:
        scan.warnings.append(_missing_caption_warning(no_caption))
    return scan


def _scan_text_caption_folder(root: Path) -> DataScan:
    scan = DataScan(description=f"folder '{root}' (images with .txt captions)")
    no_caption: list[str] = []
    not_utf8: list[str] = []
    images = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for path in images:
        key = path.relative_to(root).as_posix()
        problem = _file_problem(path)
        if problem:
            scan.skipped.append(Skipped(key, key, problem))
            continue
        caption_file = path.with_suffix(".txt")
        caption = ""
        if caption_file.is_file():
            label = caption_file.relative_to(root).as_posix()
            caption = read_text_file(caption_file, not_utf8, label).strip()
        if not caption:
            no_caption.append(key)
        scan.items.append(SourceItem(key, key, caption, FileBlob(path)))
    if no_caption:
        scan.warnings.append(_missing_caption_warning(no_caption))
    if not_utf8:
        scan.warnings.append(_not_utf8_warning(not_utf8))
    return scan


def _load_hf_dataset(source: str, split: str, local: bool) -> Any:
    import datasets

    path = Path(source).expanduser()
    try:
        if local and (
            (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
        ):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(
                        f"Data set '{source}' has no split '{split}'; it has: {', '.join(loaded)}.",
                        hint="Choose one with --set data.split=NAME.",
                    )
                loaded = loaded[split]
            return loaded
        return datasets.load_dataset(str(path) if local else source, split=split)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types (network, format, missing split)
        raise UserError(
            f"Could not load the data set '{source}' (split '{split}'): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="Give a hub data set id, a folder with images and metadata.jsonl or .txt "
            "captions, or a folder written by Dataset.save_to_disk. A hub id needs network "
            "access once (or a filled hub cache).",
        ) from exc


def _scan_hf(source: str, split: str, image_column: str, caption_column: str, local: bool):
    import datasets

    ds = _load_hf_dataset(source, split, local)
    columns = list(ds.column_names)
    for column, option in ((image_column, "--image-column"), (caption_column, "--caption-column")):
        if column not in columns:
            raise UserError(
                f"Data set '{source}' has no column '{column}'; its columns: {', '.join(columns)}.",
                hint=f"Name the right column with {option}.",
            )
    feature = ds.features[image_column]
    if isinstance(feature, datasets.Image):
        # Undecoded: we hash the exact bytes and decode (and convert) ourselves.
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    elif not (isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")):
        raise UserError(
            f"Column '{image_column}' of '{source}' holds {feature}, not images.",
            hint="Name the image column with --image-column.",
        )
    scan = DataScan(description=f"data set '{source}' split '{split}' ({len(ds)} rows)")
    no_caption: list[str] = []
    for row, value in enumerate(ds[caption_column]):
        key = f"row-{row:06d}"
        caption = _caption_text(value)
        if not caption:
            no_caption.append(key)
        scan.items.append(
            SourceItem(key, f"row {row}", caption or "", RowBlob(ds, row, image_column))
        )
    if no_caption:
        scan.warnings.append(_missing_caption_warning(no_caption))
    return scan


def _scan_any(data_cfg: Any) -> DataScan:
    from naruto_lora.models.loading import resolve_data

    source = resolve_data(data_cfg.source)
    path = Path(source).expanduser()
    if path.is_dir():
        metadata = path / "metadata.jsonl"
        if not metadata.is_file() and (path / data_cfg.split / "metadata.jsonl").is_file():
            path = path / data_cfg.split
            metadata = path / "metadata.jsonl"
        if metadata.is_file():
            return _scan_metadata_folder(path, metadata, data_cfg.caption_column)
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files)
        saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
        if has_images and not saved:
            return _scan_text_caption_folder(path)
        if not files:
            raise UserError(
                f"The data folder '{source}' is empty.",
                hint="Put images in it (with .txt captions or a metadata.jsonl).",
            )
        if not saved and not has_images and not _has_data_files(files):
            kinds = sorted({p.suffix.lower() or p.name for p in files})
            raise UserError(
                f"The data folder '{source}' has no images: it holds {len(files)} file(s) "
                f"({', '.join(kinds[:6])}).",
                hint="Put each image beside its caption with the same name (cat.png + cat.txt); "
                f"images are {', '.join(IMAGE_EXTENSIONS)}.",
            )
        return _scan_hf(
            source, data_cfg.split, data_cfg.image_column, data_cfg.caption_column, True
        )
    if path.exists():
        raise UserError(f"data.source '{source}' is a file; give a folder or a data set id.")
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        # Not a hub id (those are NAME or OWNER/NAME): a local folder that is not there.
        raise UserError(
            f"Data folder '{source}' does not exist (looked for '{path.absolute()}').",
            hint="Check data.source / --data; a relative path is taken from the current folder.",
        )
    try:
        return _scan_hf(
            source, data_cfg.split, data_cfg.image_column, data_cfg.caption_column, False
        )
    except UserError as exc:
        if not str(exc.args[0]).startswith("Could not load the data set"):
            raise  # it loaded; the problem is in it (a column, a split)
        raise UserError(
            f"Data source '{source}' is not a local folder (there is no '{path.absolute()}') "
            f"and not a data set on the hub or in its cache. {exc.args[0]}",
            hint="For a local folder, check the path (relative to the current folder); for a "
            "hub data set, check the id and the network (or HF_HUB_OFFLINE).",
        ) from None


# What `datasets` reads from a local folder as a table (load_dataset's packaged builders).
DATA_FILE_EXTENSIONS = (".csv", ".json", ".jsonl", ".parquet", ".arrow", ".tsv")


def _has_data_files(files: list[Path]) -> bool:
    return any(p.suffix.lower() in DATA_FILE_EXTENSIONS for p in files)


def apply_caption_template(template: str, caption: str) -> str:
    """``template`` with ``{caption}`` replaced by the caption (plain text replacement: other
    braces stay as written). An empty caption leaves no stray separator: "{caption}, naruto
    style" gives "naruto style"."""
    if not template:
        return caption
    if not caption:
        return template.replace("{caption}", "").strip(" ,;")
    return template.replace("{caption}", caption)


def scan_source(data_cfg: Any, *, strict: bool = False) -> DataScan:
    """List the data set's items (no pixel decoding); apply ``data.max_items`` and
    ``data.caption_template`` (so the text cache, its fingerprint and training all see the
    templated captions)."""
    scan = _scan_any(data_cfg)
    if data_cfg.max_items:
        scan.items = scan.items[: data_cfg.max_items]
    template = getattr(data_cfg, "caption_template", "")
    if template:
        scan.items = [
            dataclasses.replace(item, caption=apply_caption_template(template, item.caption))
            for item in scan.items
        ]
    if not scan.items and not scan.skipped:
        raise UserError(
            f"The data set {scan.description} is empty: it has no images.",
            hint="Check data.source (--data) and the layout (see docs/data-and-caches.md).",
        )
    check_usable(scan.description, len(scan.items), scan.skipped, strict)
    return scan


def check_usable(description: str, usable: int, skipped: list[Skipped], strict: bool) -> None:
    """Fail when nothing is usable, or when anything was skipped under ``--strict``."""
    if usable and not (strict and skipped):
        return
    listing = "; ".join(f"{s.source}: {s.reason}" for s in skipped[:5])
    more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
    if not usable:
        raise UserError(
            f"No usable item in {description}: all {len(skipped)} were skipped. {listing}{more}",
            hint="Fix or replace the files listed.",
        )
    raise UserError(
        f"--strict: {len(skipped)} item(s) of {description} are unusable: {listing}{more}",
        hint="Fix them, or run without --strict to skip them.",
    )


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PlannedItem:
    """A source item with its bytes' hash and one crop plan per variant (flip False/True)."""

    item: SourceItem
    image_hash: str
    plans: tuple[CropPlan, ...]


def flip_variants(data_cfg: Any) -> tuple[bool, ...]:
    # Random flip is served by caching both mirror images; training picks one per epoch.
    return (False, True) if data_cfg.random_flip else (False,)


def plan_items(
    items: list[SourceItem],
    data_cfg: Any,
    seed: int,
    on_progress: Callable[[], None] | None = None,
) -> tuple[list[PlannedItem], list[Skipped]]:
    """Hash each image's bytes and plan its crops from the header (no pixel decoding)."""
    planned: list[PlannedItem] = []
    skipped: list[Skipped] = []
    for item in items:
        try:
            data = item.blob.read()
            size = image_size(data)
            plans = tuple(
                plan_crop(size, data_cfg, seed=seed, key=item.key, flip=flip)
                for flip in flip_variants(data_cfg)
            )
            planned.append(PlannedItem(item, image_hash(data), plans))
        except (ImageError, OSError) as exc:
            skipped.append(Skipped(item.key, item.source, str(exc)))
        if on_progress is not None:
            on_progress()
    return planned, skipped
