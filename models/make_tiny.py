"""Write a complete tiny random-weight GLM-4-Voice model set in the official layouts.

    python -m models.make_tiny DIR

DIR then holds `glm-4-voice-tokenizer/`, `glm-4-voice-9b/` (sharded ChatGLM checkpoint with its
tokenizer files) and `glm-4-voice-decoder/`, in exactly the files and formats of the released
repositories, so `run_agent.py --engine glm4voice --model-dir DIR` loads it like the real one.
It runs on a CPU in seconds; it talks nonsense (random weights) but exercises every code path.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from models.glm4voice.paths import DECODER_FOLDER, LM_FOLDER, TOKENIZER_FOLDER, ModelPaths

logger = logging.getLogger(__name__)


def write_tiny_model_set(out_dir: str | Path, seed: int = 0) -> ModelPaths:
    """Write the three tiny repositories under `out_dir`; returns their paths."""
    import torch

    from models.decoder.tiny import write_tiny_decoder
    from models.lm.tiny import write_tiny_lm
    from models.speech_tokenizer.tiny import write_tiny_tokenizer

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(root / TOKENIZER_FOLDER, seed=seed)
    write_tiny_lm(root / LM_FOLDER, seed=seed, dtype=torch.float32)
    write_tiny_decoder(root / DECODER_FOLDER, seed=seed)
    paths = ModelPaths.from_model_dir(root)
    paths.check()
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the three repositories into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = write_tiny_model_set(args.out_dir, args.seed)
    logger.info(
        "tiny GLM-4-Voice model set written: %s, %s, %s", paths.tokenizer, paths.lm, paths.decoder
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
