"""Where the three GLM-4-Voice repositories live, and checking them before anything is loaded.

A model directory holds the files of the three official repositories in folders named
`glm-4-voice-tokenizer/`, `glm-4-voice-9b/` and `glm-4-voice-decoder/`. Each of them may also
be given on its own as a local folder or as a Hugging Face hub id (downloaded with progress
bars into the hub cache).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TOKENIZER_FOLDER = "glm-4-voice-tokenizer"
LM_FOLDER = "glm-4-voice-9b"
DECODER_FOLDER = "glm-4-voice-decoder"
HUB_IDS = {
    TOKENIZER_FOLDER: "THUDM/glm-4-voice-tokenizer",
    LM_FOLDER: "THUDM/glm-4-voice-9b",
    DECODER_FOLDER: "THUDM/glm-4-voice-decoder",
}

TOKENIZER_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")
LM_FILES = (
    "config.json",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer_config.json",
)
DECODER_FILES = ("config.yaml", "flow.pt", "hift.pt")


class ModelFilesError(FileNotFoundError):
    """A model folder lacks a file the agent needs; the message names every missing file."""


@dataclass(frozen=True)
class ModelPaths:
    tokenizer: Path
    lm: Path
    decoder: Path

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelPaths:
        """The three folders under `model_dir`; a Hugging Face hub cache (`model_dir` holding
        `models--THUDM--glm-4-voice-9b/snapshots/...`, as `huggingface-cli download` without
        `--local-dir` leaves it) is also understood, for each folder that is absent."""
        root = Path(model_dir).expanduser()
        if not root.is_dir():
            raise ModelFilesError(f"model directory not found: {root}")
        return cls(*(_repo_folder(root, name) for name in HUB_IDS))

    def missing_files(self) -> list[str]:
        """Every required file that is absent (LM shards are checked from the index)."""
        missing = [
            str(folder / name)
            for folder, names in (
                (self.tokenizer, TOKENIZER_FILES),
                (self.lm, LM_FILES),
                (self.decoder, DECODER_FILES),
            )
            for name in names
            if not (folder / name).is_file()
        ]
        index = self.lm / "model.safetensors.index.json"
        if index.is_file():
            missing += [
                str(self.lm / shard)
                for shard in _index_shards(index)
                if not (self.lm / shard).is_file()
            ]
        return missing

    def check(self) -> None:
        missing = self.missing_files()
        if missing:
            raise ModelFilesError("GLM-4-Voice files missing:\n  " + "\n  ".join(missing))


HUB_OWNERS = ("THUDM", "zai-org")  # the repositories moved from THUDM to zai-org


def _repo_folder(root: Path, name: str) -> Path:
    """`root/name`, or where the hub cache under `root` (or `root/hub`) keeps that repository:
    the snapshot `refs/main` names, else the only snapshot. `root/name` when neither exists."""
    plain = root / name
    if plain.is_dir():
        return plain
    for cache in (root, root / "hub"):
        for owner in HUB_OWNERS:
            repo = cache / f"models--{owner}--{name}"
            ref = repo / "refs" / "main"
            if ref.is_file() and (named := repo / "snapshots" / ref.read_text().strip()).is_dir():
                return named
            snapshots = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
            if len(snapshots) == 1:
                return snapshots[0]
    return plain


def _index_shards(index: Path) -> list[str]:
    import json

    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFilesError(f"{index}: not a valid safetensors index ({exc})") from exc
    return sorted(set(weight_map.values()))


def looks_like_hub_id(spec: str) -> bool:
    """`owner/name` that is not an existing local path."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not Path(spec).expanduser().exists()


def resolve_repo(spec: str) -> Path:
    """A local folder as is, or a hub id downloaded (with progress bars) into the hub cache."""
    if not looks_like_hub_id(spec):
        return Path(spec).expanduser()
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the Hugging Face hub (progress below)", spec)
    return Path(snapshot_download(repo_id=spec))


def resolve_model_paths(
    model_dir: str | Path | None = None,
    tokenizer: str | None = None,
    lm: str | None = None,
    decoder: str | None = None,
) -> ModelPaths:
    """Folders of the three repositories: from `model_dir`, overridden per repository.

    Without `model_dir`, unspecified repositories come from the hub (THUDM/...).
    """
    base = ModelPaths.from_model_dir(model_dir) if model_dir is not None else None
    chosen = {
        TOKENIZER_FOLDER: tokenizer,
        LM_FOLDER: lm,
        DECODER_FOLDER: decoder,
    }
    resolved: dict[str, Path] = {}
    for folder, spec in chosen.items():
        if spec is not None:
            resolved[folder] = resolve_repo(spec)
        elif base is not None:
            resolved[folder] = {
                TOKENIZER_FOLDER: base.tokenizer,
                LM_FOLDER: base.lm,
                DECODER_FOLDER: base.decoder,
            }[folder]
        else:
            resolved[folder] = resolve_repo(HUB_IDS[folder])
    return ModelPaths(resolved[TOKENIZER_FOLDER], resolved[LM_FOLDER], resolved[DECODER_FOLDER])
