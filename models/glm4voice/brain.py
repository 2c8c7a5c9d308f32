"""The loaded GLM-4-Voice models, and the units of work the worker runs with them.

Speech tokenizer (16 kHz -> 12.5 codes/s) -> GLM-4-Voice-9B (interleaved text and audio ids,
sampled with the reference demo's defaults) -> flow-matching decoder + HiFT (22.05 kHz).
Everything here runs on the worker thread only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.decoder import AudioDecoder, DecoderStream
from models.glm4voice.paths import ModelPaths
from models.glm4voice.worker import Job
from models.lm import GLM4VoiceTokenizer, LMStepper, SamplingConfig, load_lm, sample_next
from models.lm.loading import check_checkpoint
from models.lm.prompt import audio_tokens_text, build_prompt
from models.speech_tokenizer import SpeechTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """How to place the models: device, LM precision and quantization."""

    device: str = "cpu"
    lm_dtype: torch.dtype = torch.bfloat16
    quantization: str | None = None  # None or "int4" (bitsandbytes NF4)
    decoder_dtype: torch.dtype = torch.float32
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.quantization not in (None, "int4"):
            raise ValueError(f"quantization must be None or 'int4', got {self.quantization!r}")


class GLM4VoiceBrain:
    """The three models plus the text tokenizer, loaded on one device."""

    def __init__(
        self,
        speech_tokenizer: SpeechTokenizer,
        stepper: LMStepper,
        tokenizer: GLM4VoiceTokenizer,
        decoder: AudioDecoder,
        sampling: SamplingConfig,
    ) -> None:
        self.speech_tokenizer = speech_tokenizer
        self.stepper = stepper
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.sampling = sampling
        self.sample_rate = decoder.sample_rate
        self._stop_ids = {tokenizer.user_id}
        self._generator = sampling.generator(stepper.device)

    @classmethod
    def load(cls, paths: ModelPaths, options: LoadOptions) -> GLM4VoiceBrain:
        """Check every file and the LM's keys and shapes, then load onto the device.

        The tokenizer and the decoder are read on the CPU first so that a damaged file is
        reported before any accelerator memory is spent.
        """
        paths.check()
        check_checkpoint(paths.lm)
        tokenizer = GLM4VoiceTokenizer.from_dir(paths.lm)
        started = time.perf_counter()
        speech_tokenizer = SpeechTokenizer.from_pretrained(paths.tokenizer, device="cpu")
        decoder = AudioDecoder.from_pretrained(
            paths.decoder, device="cpu", dtype=options.decoder_dtype
        )
        logger.info("speech tokenizer and decoder read in %.1f s", time.perf_counter() - started)
        if options.device != "cpu":
            speech_tokenizer = SpeechTokenizer.from_pretrained(
                paths.tokenizer, device=options.device
            )
            decoder = AudioDecoder.from_pretrained(
                paths.decoder, device=options.device, dtype=options.decoder_dtype
            )
        started = time.perf_counter()
        lm = load_lm(paths.lm, options.device, options.lm_dtype, options.quantization)
        logger.info("language model loaded in %.1f s", time.perf_counter() - started)
        if lm.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"{paths.lm}: the model has {lm.config.vocab_size} rows but its tokenizer uses "
                f"ids up to {tokenizer.vocab_size - 1}"
            )
        return cls(speech_tokenizer, LMStepper(lm), tokenizer, decoder, options.sampling)

    # ------------------------------------------------------------------ token classes

    def is_audio(self, token_id: int) -> bool:
        return self.tokenizer.is_audio(token_id)

    def audio_code(self, token_id: int) -> int:
        return self.tokenizer.audio_code(token_id)

    def is_stop(self, token_id: int) -> bool:
        return token_id in self._stop_ids

    def decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    # ------------------------------------------------------------------ units of work

    def user_input(self, job: Job) -> tuple[str, str]:
        """The user's turn as prompt text, and the input mode ("audio" or "text")."""
        if job.turn_text is not None:
            return job.turn_text, "text"
        started = time.perf_counter()
        codes = self.speech_tokenizer.tokenize(job.turn_audio)
        job.timings.add("speech_tokenizer", time.perf_counter() - started)
        return audio_tokens_text(codes), "audio"

    def start_job(self, job: Job) -> None:
        user_input, mode = self.user_input(job)
        job.prompt = build_prompt(job.history_prefix, user_input, mode)  # type: ignore[arg-type]
        ids = self.tokenizer.encode(job.prompt)
        started = time.perf_counter()
        logits, state = self.stepper.prefill(torch.tensor([ids], dtype=torch.long))
        job.timings.add("prefill", time.perf_counter() - started)
        job.lm_state = (state, logits)
        job.decoder_state = DecoderStream()
        logger.debug("prefilled %d prompt ids", len(ids))

    def next_token(self, job: Job) -> int:
        state, logits = job.lm_state  # type: ignore[misc]
        token = sample_next(logits, self.sampling.temperature, self.sampling.top_p, self._generator)
        token_id = int(token[0])
        if not self.is_stop(token_id):
            job.lm_state = (state, self.stepper.decode(state, token))
        return token_id

    def decode_audio(self, job: Job, codes: list[int], final: bool) -> np.ndarray:
        stream: DecoderStream = job.decoder_state  # type: ignore[assignment]
        speech = self.decoder.decode_block(stream, torch.tensor([codes], dtype=torch.long), final)
        return speech[0].float().cpu().numpy()
