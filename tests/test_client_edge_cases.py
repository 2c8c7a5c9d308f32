"""The VoiceAgent client at the edges of a call: failed answers, hang-ups, retries, slow prompts.

Driven like tests/test_browser.py: the demo page in headless Chromium against the real app.
"""

from __future__ import annotations

import pytest

from tests.fakes import FakeEngine, Script
from tests.test_browser import (  # noqa: F401 - fixtures used by name
    DemoPage,
    _answering,
    agent_server,
    chromium,
    launch,
    silence_wav,
)

pytest.importorskip("playwright.async_api")

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ASSISTANT_UTTERANCES_JS = """
() => [...document.querySelectorAll(".utterance.assistant")].map(
  (item) => [item.querySelector(".text").textContent, item.classList.contains("partial")])
"""


async def _ask(demo: DemoPage, text: str) -> None:
    await demo.page.fill("#text-input", text)
    await demo.page.press("#text-input", "Enter")


async def test_an_answer_that_fails_midway_is_not_merged_into_the_next_answer(
    launch,  # noqa: F811
    agent_server,  # noqa: F811
    silence_wav,  # noqa: F811
):
    broken = Script(text="this answer breaks off", audio_s=2.0, fail_after_chunks=3)
    server = await agent_server(FakeEngine(broken))
    demo = await DemoPage.open(await launch(silence_wav), server.url)
    await demo.connect()

    await _ask(demo, "first question")
    # The server reports the failure and listens again, without a final assistant transcript.
    await demo.page.wait_for_function(
        "window.seen.errors.length > 0 && window.seen.states.at(-1) === 'listening'"
        " && window.seen.states.includes('speaking')",
        timeout=20_000,
    )
    server.engine.script = Script(text="here is the second answer", audio_s=0.5)
    await _ask(demo, "second question")
    await demo.page.wait_for_function(
        "window.seen.transcripts.some((t) => t.final && t.text === 'here is the second answer')",
        timeout=20_000,
    )

    assert await demo.page.evaluate(ASSISTANT_UTTERANCES_JS) == [
        ["this answer breaks off", False],
        ["here is the second answer", False],
    ]
    assert (await demo.seen())["errors"] == ["the agent could not answer that turn"]
    await demo.hang_up()


async def test_hanging_up_mid_answer_ends_the_open_transcript_with_a_final_one(
    launch,  # noqa: F811
    agent_server,  # noqa: F811
    silence_wav,  # noqa: F811
):
    script, _server, demo = await _answering(launch, agent_server, silence_wav, audio_s=8.0)
    assert not (await demo.seen())["transcripts"][-1]["final"]

    await demo.hang_up()

    transcripts = (await demo.seen())["transcripts"]
    assert transcripts[-1] == {"role": "assistant", "text": script.text, "final": True}
    assert demo.problems == []


async def test_retrying_from_the_error_event_shows_the_retry_as_connecting(
    launch,  # noqa: F811
    agent_server,  # noqa: F811
    silence_wav,  # noqa: F811
):
    server = await agent_server()
    demo = await DemoPage.open(await launch(silence_wav), server.url)
    offers = 0

    async def refuse_the_first_offer(route):
        nonlocal offers
        offers += 1
        if offers == 1:
            await route.fulfill(status=503, json={"error": "try again in a moment"})
        else:
            await route.continue_()

    await demo.page.route("**/offer", refuse_the_first_offer)
    await demo.page.evaluate(
        """() => {
          const agent = window.voiceAgent;
          agent.addEventListener("error", () => {
            if (window.retried) return;
            window.retried = true;
            agent.connect().catch(() => {});
          });
        }"""
    )
    await demo.page.click("#talk")
    await demo.page.wait_for_selector("#connection[data-status=connected]", timeout=20_000)

    seen = await demo.seen()
    assert seen["statuses"] == ["connecting", "failed", "connecting", "connected"]
    assert seen["errors"] == ["The voice agent is busy: try again in a moment (HTTP 503)"]
    assert await demo.page.inner_text("#talk") == "Stop"
    await demo.hang_up()


async def test_a_slow_answer_to_the_microphone_prompt_does_not_time_the_call_out(
    launch,  # noqa: F811
    agent_server,  # noqa: F811
    silence_wav,  # noqa: F811
):
    server = await agent_server()
    demo = await DemoPage.open(await launch(silence_wav), server.url)
    # The user takes longer than the 20 s connect timeout to allow the microphone.
    await demo.page.evaluate(
        """() => {
          const devices = navigator.mediaDevices;
          const open = devices.getUserMedia.bind(devices);
          devices.getUserMedia = async (constraints) => {
            await new Promise((resolve) => setTimeout(resolve, 21_000));
            return open(constraints);
          };
        }"""
    )
    await demo.page.click("#talk")
    await demo.page.wait_for_selector(
        "#connection[data-status=connected], #connection[data-status=failed]", timeout=45_000
    )

    seen = await demo.seen()
    assert seen["errors"] == []
    assert seen["statuses"] == ["connecting", "connected"]
    await demo.hang_up()
