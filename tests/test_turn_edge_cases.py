"""Turn-taking when events meet at awkward moments: closing, cancelled handlers, early replies."""

from __future__ import annotations

import asyncio
import time

from tests.fakes import FakeEngine, FakeReply, Script
from tests.test_session import Harness, RecordingListener, pause_of, speech_end


def pending_early_fetches() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "early-reply" and not t.done()]


async def test_closing_as_an_early_reply_is_adopted_stops_its_fetch() -> None:
    h = Harness(Script(first_delay_s=1.0))
    end = speech_end()
    await h.turns.on_speech_paused(pause_of(end))
    await h.turns.on_speech_ended(end, user_stop=time.monotonic())
    assert h.turns.records[0].early
    await h.turns.close()  # before the adopted reply's stream has run at all
    assert h.engine.replies[0].cancelled
    assert not pending_early_fetches()
    await h.close()


async def test_a_handler_cancelled_while_stopping_the_reply_still_cancels_it() -> None:
    """A session closing cancels its tasks, maybe in the middle of a barge-in."""
    h = Harness(Script(audio_s=2.0))
    await h.turns.on_user_text("tell me a story")
    await h.wait_state("speaking")
    barge_in = asyncio.create_task(h.turns.on_speech_progress(1000.0))
    await asyncio.sleep(0)  # it silenced the answer and waits for the streaming task to end
    barge_in.cancel()
    await asyncio.gather(barge_in, return_exceptions=True)
    await h.close()
    assert h.engine.replies[0].cancelled


async def test_a_turn_end_cancelled_while_waiting_for_its_turn_closes_the_listener() -> None:
    """The session closing while a typed turn holds the floor: the speech's ear is freed."""
    h = Harness(Script(first_delay_s=1.0))
    await h.turns.on_user_text("first question")
    typed = asyncio.create_task(h.turns.on_user_text("second question"))
    listener = RecordingListener()
    ending = asyncio.create_task(
        h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic(), listener=listener)
    )
    await asyncio.sleep(0)  # the typed turn stops the first reply; the turn end waits for it
    ending.cancel()
    await asyncio.gather(typed, ending, return_exceptions=True)
    await h.close()
    assert listener.closed
    assert all(turn.listener is not listener for turn, _ in h.engine.calls)


class HistorylessEngine(FakeEngine):
    """Its replies cannot say what they leave in the history."""

    def respond(self, turn, history) -> FakeReply:
        reply = super().respond(turn, history)

        def broken(played_s):
            raise RuntimeError("no history")

        reply.history = broken  # type: ignore[method-assign]
        return reply


async def test_a_reply_that_cannot_give_its_history_leaves_the_conversation_going() -> None:
    h = Harness(Script(audio_s=0.2))
    h.turns.engine = h.engine = HistorylessEngine(h.engine.script)
    await h.turns.on_user_text("first")
    await h.wait_state("speaking")
    await h.wait_state("listening")  # finished: no history, but listening again
    await h.turns.on_user_text("second")
    await h.wait_state("speaking")
    await h.turns.on_speech_progress(1000.0)  # talked over: stopped, again without history
    await h.wait_state("listening")
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    assert len(h.engine.calls) == 3
    assert all(history == [] for _, history in h.engine.calls)
    await h.close()


async def test_an_interrupt_handled_after_a_new_turn_began_leaves_the_new_answer_alone() -> None:
    """The client's interrupt silences the answer it heard at once; by the time it is handled
    under the lock, a turn that ended in between may have begun another answer."""
    h = Harness(Script(audio_s=2.0))
    await h.turns.on_user_text("first")
    await h.wait_state("speaking")
    silenced = h.turns.silence()  # the interrupt arrives
    await h.turns.on_user_text("second")  # handled first: it stops the first answer itself
    await h.wait_state("speaking")
    await h.turns.interrupt(silenced)
    first, second = h.engine.replies
    assert first.cancelled and not second.cancelled
    assert h.turns.state == "speaking"
    await h.turns.interrupt(h.turns.silence())  # an interrupt of the second answer stops it
    assert second.cancelled and h.turns.state == "listening"
    await h.close()


async def test_an_interrupt_when_no_answer_was_in_flight_stops_none_begun_later() -> None:
    h = Harness(Script(audio_s=2.0))
    silenced = h.turns.silence()
    assert silenced is None
    await h.turns.on_user_text("hello")
    await h.wait_state("speaking")
    await h.turns.interrupt(silenced)
    assert not h.engine.replies[0].cancelled
    await h.close()


async def test_an_answer_that_fails_midway_ends_its_transcript_with_what_it_said() -> None:
    h = Harness(Script(fail_after_chunks=2, audio_s=1.0, text="one two three"))
    await h.turns.on_user_text("count")
    await h.wait_state("speaking")
    await h.wait_state("listening")
    assistant = [m for m in h.of_type("transcript") if m["role"] == "assistant"]
    assert assistant[-1] == {
        "type": "transcript",
        "role": "assistant",
        "text": "one two three",
        "final": True,
    }
    assert sum(m["final"] for m in assistant) == 1
    await h.close()
