"""Prometheus metrics for conversations (exposed over HTTP by the signaling server).

Who updates what:
- sessions: `SESSIONS_ACTIVE`, `SESSIONS_TOTAL` (agent.session); `SESSION_DURATION_SECONDS`,
  `SESSIONS_CLOSED_TOTAL{reason}`, `OFFERS_TOTAL{result}` (signaling)
- turns: `TURNS_TOTAL{kind}`, `INTERRUPTIONS_TOTAL{reason}` (reason "barge-in" counts barge-ins),
  `DUCKS_TOTAL{outcome}` (provisional barge-ins),
  `EARLY_REPLIES_TOTAL{outcome}` (replies started at a pause), `FIRST_AUDIO_SECONDS`, `STOP_LATENCY_SECONDS`, `ENGINE_ERRORS_TOTAL`, `ERRORS_TOTAL{kind}`
- engines: `MODEL_STEP_SECONDS{stage}` per model step (LM step, decoder block, ...),
  `PROMPT_IDS_TOTAL{source}` (prompt ids reused from the previous turn or prefilled)
- queues: `QUEUE_DEPTH{queue}` sampled by their owners or at scrape time
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from agent.engine import EngineError

SESSIONS_ACTIVE = Gauge("voice_agent_sessions_active", "Conversations currently connected")
SESSIONS_TOTAL = Counter("voice_agent_sessions_total", "Conversations started")
SESSIONS_CLOSED_TOTAL = Counter(
    "voice_agent_sessions_closed_total", "Conversations ended, by reason", ["reason"]
)
SESSION_DURATION_SECONDS = Histogram(
    "voice_agent_session_duration_seconds",
    "How long conversations lasted",
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
OFFERS_TOTAL = Counter(
    "voice_agent_offers_total",
    "POST /offer requests by outcome (answered, busy, rate_limited, invalid, unauthorized)",
    ["result"],
)
TURNS_TOTAL = Counter("voice_agent_turns_total", "User turns answered", ["kind"])
INTERRUPTIONS_TOTAL = Counter("voice_agent_interruptions_total", "Answers cut short", ["reason"])
FIRST_AUDIO_SECONDS = Histogram(
    "voice_agent_first_audio_seconds",
    "From the user's actual stop to the first answer audio frame leaving the server",
    buckets=(0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
)
EARLY_REPLIES_TOTAL = Counter(
    "voice_agent_early_replies_total",
    "Replies started at a pause in the user's speech, by outcome (used: the turn ended there;"
    " dropped: the user went on, or the turn changed)",
    ["outcome"],
)
DUCKS_TOTAL = Counter(
    "voice_agent_ducks_total",
    "Provisional barge-ins by outcome (stopped: the answer was then cut, released: it resumed)",
    ["outcome"],
)
STOP_LATENCY_SECONDS = Histogram(
    "voice_agent_stop_latency_seconds",
    "From a barge-in or interrupt to the agent's audio being silenced",
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0),
)
ENGINE_ERRORS_TOTAL = Counter("voice_agent_engine_errors_total", "Replies that failed")
ERRORS_TOTAL = Counter(
    "voice_agent_errors_total",
    "Failures by kind (out_of_memory, engine, internal, protocol)",
    ["kind"],
)
MODEL_STEP_SECONDS = Histogram(
    "voice_agent_model_step_seconds",
    "Wall time of one model step, by stage (e.g. lm_step, decoder_block, tokenizer)",
    ["stage"],
    buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56),
)
PROMPT_IDS_TOTAL = Counter(
    "voice_agent_prompt_ids_total",
    "Prompt ids of started replies: reused (keys/values kept from the conversation's previous"
    " turn) or prefilled",
    ["source"],
)
QUEUE_DEPTH = Gauge("voice_agent_queue_depth", "Items waiting in a bounded queue", ["queue"])
AUDIT_RECORDS_DROPPED_TOTAL = Counter(
    "voice_agent_audit_records_dropped_total", "Audit records lost because the writer lagged"
)

OUT_OF_MEMORY_CLASS_NAMES = frozenset({"OutOfMemoryError", "MemoryError"})
OUT_OF_MEMORY_MESSAGE = (
    "the agent ran out of GPU memory answering that turn; try again, or try a shorter turn"
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for `torch.cuda.OutOfMemoryError` (by class name, torch is not imported), a host
    `MemoryError`, or an exception caused by one of them."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if type(current).__name__ in OUT_OF_MEMORY_CLASS_NAMES:
            return True
        if "CUDA out of memory" in str(current)[:200]:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def error_kind(exc: BaseException) -> str:
    """The `ERRORS_TOTAL` label for a failed reply."""
    if is_out_of_memory(exc):
        return "out_of_memory"
    return "engine" if isinstance(exc, EngineError) else "internal"


def record_reply_failure(exc: BaseException) -> str:
    """Count a failed reply by kind; returns that kind."""
    kind = error_kind(exc)
    ERRORS_TOTAL.labels(kind=kind).inc()
    return kind


__all__ = [
    "AUDIT_RECORDS_DROPPED_TOTAL",
    "ENGINE_ERRORS_TOTAL",
    "ERRORS_TOTAL",
    "FIRST_AUDIO_SECONDS",
    "INTERRUPTIONS_TOTAL",
    "DUCKS_TOTAL",
    "EARLY_REPLIES_TOTAL",
    "MODEL_STEP_SECONDS",
    "OFFERS_TOTAL",
    "OUT_OF_MEMORY_MESSAGE",
    "QUEUE_DEPTH",
    "SESSIONS_ACTIVE",
    "SESSIONS_CLOSED_TOTAL",
    "SESSIONS_TOTAL",
    "SESSION_DURATION_SECONDS",
    "STOP_LATENCY_SECONDS",
    "TURNS_TOTAL",
    "error_kind",
    "is_out_of_memory",
    "record_reply_failure",
]
