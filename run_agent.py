"""Run the voice agent server: pick and warm an engine, then serve the page and WebRTC calls.

    python run_agent.py                       # http://127.0.0.1:8080, engine chosen automatically
    python run_agent.py --engine offline --host 0.0.0.0 --cert-file c.pem --key-file k.pem
    VOICE_AGENT_TOKEN_SECRET=... python run_agent.py --audit-log audit.jsonl --log-format json

Browsers allow the microphone only on localhost or over HTTPS: serve with a certificate when
callers connect from another machine, and give them a TURN server when they sit behind NAT.
Secrets may come from the environment instead of the command line (which `ps` shows):
VOICE_AGENT_AUTH_TOKEN, VOICE_AGENT_TOKEN_SECRET, VOICE_AGENT_METRICS_TOKEN.
See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.engine import Engine
from agent.metrics import is_out_of_memory
from agent.session import SessionConfig
from signaling import AuthConfig, ServerConfig, create_app, ice_servers_from_urls
from signaling.logs import LOG_FORMATS, configure_logging

log = logging.getLogger("run_agent")

DEFAULT_MODEL_DIR = Path("checkpoints")
ICE_URL_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")
SECRET_ENV = {
    "auth_token": "VOICE_AGENT_AUTH_TOKEN",
    "token_secret": "VOICE_AGENT_TOKEN_SECRET",
    "metrics_token": "VOICE_AGENT_METRICS_TOKEN",
}
GLM_ONLY = ("device", "quantization", "temperature", "top_p")  # None unless given


def _number(
    kind: Callable[[str], Any],
    low: float,
    high: float = math.inf,
    *,
    above: bool = False,
    what: str,
) -> Callable[[str], Any]:
    """An argparse `type` for a finite number in [low, high] (or (low, high] with `above`)."""

    def parse(text: str) -> Any:
        value = kind(text)  # ValueError: argparse says "invalid int/float value"
        if not math.isfinite(value) or value < low or value > high or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


PORT = _number(int, 1, 65535, what="a port number from 1 to 65535")
COUNT = _number(int, 0, what="an integer >= 0")
POSITIVE_COUNT = _number(int, 1, what="an integer >= 1")
NON_NEGATIVE = _number(float, 0, what="a number >= 0")
POSITIVE = _number(float, 0, above=True, what="a number > 0")
PROBABILITY = _number(float, 0, 1, above=True, what="a number above 0 and at most 1")


def _ice_url(text: str) -> str:
    if not text.startswith(ICE_URL_SCHEMES):
        raise argparse.ArgumentTypeError(
            f"not a STUN/TURN URL (one of {', '.join(ICE_URL_SCHEMES)}...): {text!r}"
        )
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=PORT, default=8080)
    p.add_argument(
        "--engine",
        choices=("auto", "offline", "glm4voice"),
        default="auto",
        help="auto: GLM-4-Voice with a CUDA GPU and its weights, else offline",
    )
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="GLM-4-Voice weights")
    p.add_argument("--device", help="GLM-4-Voice device, e.g. cuda:0 (default: cuda if present)")
    p.add_argument(
        "--quantization",
        choices=("int4",),
        help="load the GLM-4-Voice LM in 4 bits (bitsandbytes) to fit smaller GPUs",
    )
    p.add_argument(
        "--decode-step",
        choices=("auto", "dynamic", "static", "graphs", "compile"),
        default="auto",
        help="how the LM steps: auto = CUDA graphs on a GPU in bf16, else the static cache "
        "with the fused step; dynamic = transformers' growing cache (least memory); "
        "compile = torch.compile (minutes at start-up)",
    )
    p.add_argument(
        "--reply-language",
        choices=("any", "english"),
        default="any",
        help="english: GLM-4-Voice never writes (and so never speaks) Chinese, Japanese or "
        "Korean, even when it would answer English speech in Chinese",
    )
    p.add_argument(
        "--temperature",
        type=NON_NEGATIVE,
        metavar="T",
        help="GLM-4-Voice sampling temperature (default 0.2, as its demo; 0: greedy)",
    )
    p.add_argument(
        "--top-p", type=PROBABILITY, metavar="P", help="GLM-4-Voice nucleus sampling (default 0.8)"
    )
    p.add_argument(
        "--ice-server",
        action="append",
        default=[],
        type=_ice_url,
        metavar="URL",
        help="STUN/TURN URL (repeatable), e.g. turn:turn.example.org:3478",
    )
    p.add_argument("--ice-username", help="username for the TURN servers")
    p.add_argument("--ice-credential", help="credential for the TURN servers")
    p.add_argument("--cert-file", type=Path, help="TLS certificate (PEM) to serve HTTPS")
    p.add_argument("--key-file", type=Path, help="TLS private key (PEM)")
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let pages on ORIGIN (e.g. https://example.org, or *) call the server (repeatable)",
    )
    p.add_argument(
        "--echo-canceller",
        choices=("none", "auto", "aec3", "speex"),
        default="auto",
        help="server-side echo cancellation per session (browsers cancel echo themselves)",
    )
    _add_limit_args(p)
    _add_access_args(p)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument(
        "--log-format", default="text", choices=LOG_FORMATS, help="json: one object a line"
    )
    p.add_argument("--audit-log", type=Path, metavar="PATH", help="append session records (JSON)")
    args = p.parse_args(argv)
    if (args.cert_file is None) != (args.key_file is None):
        p.error("--cert-file and --key-file go together")
    for flag, path in (("--cert-file", args.cert_file), ("--key-file", args.key_file)):
        if path is not None and not path.is_file():
            p.error(f"{flag} {path}: no such file")
    for dest, env_name in SECRET_ENV.items():
        value = getattr(args, dest)
        if value is not None and not value.strip():
            flag = "--" + dest.replace("_", "-")
            p.error(f"{flag} (or {env_name}) is empty: give it a value or leave it unset")
    if args.token_secret is not None and len(args.token_secret.encode()) < 16:
        p.error("--token-secret (or VOICE_AGENT_TOKEN_SECRET) must be at least 16 bytes")
    refused = glm_only_options(args) if args.engine == "offline" else []
    if refused:
        p.error(f"{', '.join(refused)}: only for GLM-4-Voice, not --engine offline")
    return args


def glm_only_options(args: argparse.Namespace) -> list[str]:
    """The GLM-4-Voice options given on the command line (the offline engine takes none)."""
    given = [f"--{n.replace('_', '-')}" for n in GLM_ONLY if getattr(args, n, None) is not None]
    if getattr(args, "decode_step", "auto") != "auto":
        given.append("--decode-step")
    if getattr(args, "reply_language", "any") != "any":
        given.append("--reply-language")
    return given


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    d = ServerConfig
    p.add_argument("--max-sessions", type=COUNT, default=d.max_sessions, help="concurrent calls")
    p.add_argument(
        "--busy-retry-after",
        type=NON_NEGATIVE,
        default=d.busy_retry_after_s,
        metavar="S",
        help="Retry-After sent with 503 at the session limit",
    )
    p.add_argument(
        "--max-body-kb",
        type=POSITIVE_COUNT,
        default=d.max_body_bytes // 1024,
        help="largest request body",
    )
    p.add_argument(
        "--offer-rate",
        type=POSITIVE,
        default=d.offer_rate_per_minute,
        metavar="N",
        help="offers a minute per client address (429 beyond)",
    )
    p.add_argument(
        "--offer-burst", type=POSITIVE_COUNT, default=d.offer_burst, help="offers at once"
    )
    p.add_argument(
        "--trust-forwarded-for",
        action="store_true",
        help="rate-limit by the last X-Forwarded-For entry (only behind your own proxy)",
    )
    p.add_argument(
        "--idle-timeout",
        type=NON_NEGATIVE,
        default=d.idle_timeout_s,
        metavar="S",
        help="end a call with no inbound audio or messages for S seconds (0: never)",
    )
    p.add_argument(
        "--max-call-minutes",
        type=NON_NEGATIVE,
        default=d.max_duration_s / 60,
        metavar="M",
        help="end every call after M minutes (0: never)",
    )
    p.add_argument(
        "--connect-timeout",
        type=NON_NEGATIVE,
        default=d.connect_timeout_s,
        metavar="S",
        help=argparse.SUPPRESS,
    )


def _add_access_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument(
        "--auth-token",
        default=env("VOICE_AGENT_AUTH_TOKEN"),
        help="static bearer token required by /offer, /config and /metrics",
    )
    p.add_argument(
        "--token-secret",
        default=env("VOICE_AGENT_TOKEN_SECRET"),
        help="secret for signed session tokens (python -m signaling.tokens mint ...)",
    )
    p.add_argument(
        "--metrics-token",
        default=env("VOICE_AGENT_METRICS_TOKEN"),
        help="separate bearer token for /metrics",
    )


def glm4voice_weights_missing(model_dir: Path) -> list[str]:
    """What keeps the GLM-4-Voice engine from loading `model_dir` (empty when nothing does)."""
    try:
        from models.glm4voice.paths import ModelFilesError, ModelPaths
    except ImportError as exc:
        return [f"the GLM-4-Voice engine cannot be imported ({exc})"]
    try:
        return ModelPaths.from_model_dir(model_dir).missing_files()
    except ModelFilesError as exc:
        return [str(exc)]


def choose_engine(requested: str, model_dir: Path) -> tuple[str, str]:
    """(engine name, the reason for it) for `--engine requested`."""
    if requested != "auto":
        return requested, "requested with --engine"
    try:
        import torch
    except ImportError:
        return "offline", "torch is not installed"
    if not torch.cuda.is_available():
        return "offline", "no CUDA GPU is available"
    missing = glm4voice_weights_missing(model_dir)
    if missing:
        return "offline", f"GLM-4-Voice cannot load from {model_dir}: {missing[0]}"
    return "glm4voice", f"a CUDA GPU and the weights in {model_dir} were found"


@dataclass(frozen=True)
class GLMChoices:
    """How GLM-4-Voice loads and answers, as the command line chose.

    `device` and `quantization` place it (default: CUDA when available, bf16); `decode_step`
    is `LoadOptions.decode_step`; `reply_language` is `TokenConstraints.reply_language`;
    `temperature` and `top_p` (None: the demo's) are its sampling.
    """

    device: str | None = None
    quantization: str | None = None
    decode_step: str = "auto"
    reply_language: str = "any"
    temperature: float | None = None
    top_p: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GLMChoices:
        return cls(
            device=args.device,
            quantization=args.quantization,
            decode_step=getattr(args, "decode_step", "auto"),
            reply_language=getattr(args, "reply_language", "any"),
            temperature=getattr(args, "temperature", None),
            top_p=getattr(args, "top_p", None),
        )


def make_engine(name: str, model_dir: Path, glm: GLMChoices | None = None) -> Engine:
    """Instantiate the engine `name` (its models load later, in `start()`); `glm` applies
    to GLM-4-Voice."""
    if name == "offline":
        try:
            from models.offline import OfflineEngine
        except ImportError as exc:
            raise SystemExit(f"the offline engine is not available: {exc}") from exc
        return OfflineEngine()
    try:
        import torch

        from models.glm4voice import ModelPaths, load_engine
        from models.glm4voice.brain import LoadOptions
        from models.glm4voice.tokens import TokenConstraints
        from models.lm import SamplingConfig
    except ImportError as exc:
        raise SystemExit(f"the GLM-4-Voice engine is not available in this install: {exc}") from exc
    missing = glm4voice_weights_missing(model_dir)
    if missing:
        raise SystemExit(f"GLM-4-Voice weights are incomplete in {model_dir}: {missing[:3]}")
    glm = glm or GLMChoices()
    device = glm.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = SamplingConfig()
    try:
        options = LoadOptions(
            device=device,
            quantization=glm.quantization,
            decode_step=glm.decode_step,  # type: ignore[arg-type]
            sampling=SamplingConfig(
                temperature=defaults.temperature if glm.temperature is None else glm.temperature,
                top_p=defaults.top_p if glm.top_p is None else glm.top_p,
            ),
            constraints=TokenConstraints(reply_language=glm.reply_language),  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise SystemExit(f"GLM-4-Voice cannot run that way: {exc}") from exc
    precision = glm.quantization or str(options.resolved_lm_dtype).removeprefix("torch.")
    log.info(
        "GLM-4-Voice on %s (LM in %s, decode step %s, reply language %s, temperature %g, top-p %g)",
        device,
        precision,
        options.resolved_decode_step,
        glm.reply_language,
        options.sampling.temperature,
        options.sampling.top_p,
    )
    return load_engine(ModelPaths.from_model_dir(model_dir), options)


def check_echo_canceller(name: str) -> str:
    """Fail at start-up, not on the first call, when `--echo-canceller name` cannot be built."""
    if name == "none":
        return name
    from audio_dsp.aec import EchoCancellerUnavailable, create_canceller

    try:
        canceller = create_canceller(name)
    except EchoCancellerUnavailable as exc:
        raise SystemExit(f"echo canceller {name!r} is not available: {exc}") from exc
    log.info("server-side echo cancellation: %s", canceller.name)
    canceller.close()
    return name


def server_config(args: argparse.Namespace) -> ServerConfig:
    ice = ice_servers_from_urls(args.ice_server, args.ice_username, args.ice_credential)
    return ServerConfig(
        ice_servers=ice,
        max_body_bytes=args.max_body_kb * 1024,
        max_sessions=args.max_sessions,
        busy_retry_after_s=args.busy_retry_after,
        connect_timeout_s=args.connect_timeout,
        offer_rate_per_minute=args.offer_rate,
        offer_burst=args.offer_burst,
        trust_forwarded_for=args.trust_forwarded_for,
        idle_timeout_s=args.idle_timeout,
        max_duration_s=args.max_call_minutes * 60,
        allowed_origins=tuple(args.allow_origin),
        session=SessionConfig(echo_canceller=check_echo_canceller(args.echo_canceller)),
        auth=AuthConfig(args.auth_token, args.token_secret, args.metrics_token),
        audit_log=args.audit_log,
    )


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.cert_file, args.key_file)
    except OSError as exc:  # ssl.SSLError too: not PEM, or a key that does not match
        raise SystemExit(
            f"cannot serve HTTPS with --cert-file {args.cert_file} and --key-file "
            f"{args.key_file}: {exc}"
        ) from exc
    return context


async def start_engine(engine: Engine) -> None:
    """Load and warm `engine`; running out of (GPU) memory ends the program with advice."""
    try:
        await engine.start()
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        await engine.close()
        raise SystemExit(
            f"the {engine.name} engine ran out of memory while loading ({type(exc).__name__}): "
            "free the GPU, use --quantization int4, or a GPU with more memory"
        ) from exc


async def serve(args: argparse.Namespace) -> None:
    """Start the engine and the server; return after SIGINT/SIGTERM and a clean shutdown."""
    config = server_config(args)  # mistakes here end the program before the engine loads
    tls = ssl_context(args)
    name, reason = choose_engine(args.engine, args.model_dir)
    log.info("engine: %s (%s)", name, reason)
    ignored = glm_only_options(args) if name == "offline" else []
    if ignored:
        log.warning("ignoring %s: the offline engine runs", ", ".join(ignored))
    engine = make_engine(name, args.model_dir, GLMChoices.from_args(args))
    try:
        await start_engine(engine)
    except asyncio.CancelledError:  # Ctrl-C: the load is abandoned, the program exits now
        log.info("stopped while the %s engine was loading", name)
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(engine, config), access_log=None)
    try:
        await runner.setup()
        try:
            await web.TCPSite(runner, args.host, args.port, ssl_context=tls).start()
        except OSError as exc:  # the port is taken, the address is not this host's, ...
            reason = exc.strerror or str(exc)
            raise SystemExit(f"cannot listen on {args.host}:{args.port}: {reason}") from exc
        scheme = "https" if tls else "http"
        log.info("serving on %s://%s:%d", scheme, args.host, args.port)
        await stop.wait()
        log.info("shutting down: closing every call")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        await engine.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
