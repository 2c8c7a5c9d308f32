"""The demo page in a real headless Chromium, with a fake microphone playing an eSpeak NG wav.

The page talks to the real aiohttp app over WebRTC on loopback: what a user does in the browser
(speak, type, interrupt) must show up as states, transcripts and audible agent audio.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from agent.engine import Engine
from signaling import REGISTRY_KEY
from signaling.app import create_app
from signaling.auth import AuthConfig
from signaling.config import ServerConfig
from signaling.tokens import mint_token
from tests.fakes import FakeEngine, Script

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
SPOKEN_SENTENCE = "hello, my name is alice."
LEAD_SILENCE_S = 2.0  # the fake mic starts with getUserMedia; the call is up well before this
TAIL_SILENCE_S = 4.0  # lets the endpointer see the turn end
TURN_TIMEOUT_MS = 90_000  # a spoken turn through ASR + reply + TTS on two busy CPU cores

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

# Installed in the page after load: records what the VoiceAgent reports, for the assertions.
RECORDER_JS = """
() => {
  const seen = { statuses: [], states: [], transcripts: [], errors: [], flushes: 0,
                 mutedOnFlush: null, micLevelMax: 0, agentLevelMax: 0 };
  const agent = window.voiceAgent;
  agent.addEventListener("connection", (e) => seen.statuses.push(e.detail.status));
  agent.addEventListener("state", (e) => seen.states.push(e.detail.state));
  agent.addEventListener("transcript", (e) => seen.transcripts.push(e.detail));
  agent.addEventListener("error", (e) => seen.errors.push(e.detail.message));
  agent.addEventListener("flush", () => {
    seen.flushes += 1;
    seen.mutedOnFlush = agent.audioElement.muted;
  });
  seen.ducks = [];  // [event, whether the agent's audio was muted right after it]
  for (const type of ["duck", "unduck"]) {
    agent.addEventListener(type, () => seen.ducks.push([type, agent.audioElement.muted]));
  }
  agent.addEventListener("level", (e) => {
    seen.micLevelMax = Math.max(seen.micLevelMax, e.detail.level);
    seen.agentLevelMax = Math.max(seen.agentLevelMax, e.detail.agentLevel);
  });
  window.seen = seen;
}
"""

# What the page received and played of the agent's audio.
AGENT_AUDIO_JS = """
async () => {
  const agent = window.voiceAgent;
  const audio = agent.audioElement;
  let energy = 0, samples = 0;
  const stats = await agent.peerConnection.getStats();
  stats.forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "audio") {
      energy = r.totalAudioEnergy ?? 0;
      samples = r.totalSamplesReceived ?? 0;
    }
  });
  return { energy, samples, playing: !audio.paused && audio.srcObject !== null,
           currentTime: audio.currentTime, levelMax: window.seen.agentLevelMax };
}
"""


# --- audio fixtures ---------------------------------------------------------------------------


def _need_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} to make the fake microphone input")


def _write_wav(path: Path, sentence: str | None, lead_s: float, tail_s: float) -> Path:
    """A 48 kHz mono 16-bit wav: `lead_s` of silence, the sentence spoken, `tail_s` of silence."""
    _need_tools("sox")
    if sentence is None:
        cmd = ["sox", "-n", "-r", "48000", "-c", "1", "-b", "16", str(path), "trim", "0"]
        subprocess.run([*cmd, str(lead_s + tail_s)], check=True, capture_output=True)
        return path
    _need_tools("espeak-ng")
    spoken = path.with_suffix(".espeak.wav")
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(spoken), sentence],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["sox", str(spoken), "-r", "48000", "-c", "1", "-b", "16", str(path)]
        + ["pad", str(lead_s), str(tail_s)],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    return _write_wav(path, SPOKEN_SENTENCE, LEAD_SILENCE_S, TAIL_SILENCE_S)


@pytest.fixture(scope="session")
def silence_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_wav(tmp_path_factory.mktemp("mic") / "silence.wav", None, 0.0, 30.0)


# --- browser ----------------------------------------------------------------------------------

Launch = Callable[..., Awaitable["playwright_api.Browser"]]


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(
            f"Chromium not found at {CHROMIUM} (install Debian's 'chromium' or set CHROMIUM_PATH)"
        )
    return CHROMIUM


@pytest.fixture
async def launch(chromium: Path) -> AsyncIterator[Launch]:
    """Starts Chromium with a fake microphone playing a wav once; closes every browser after."""
    playwright = await playwright_api.async_playwright().start()
    browsers = []

    async def start(mic_wav: Path | None = None, *, allow_mic: bool = True):
        flags = list(CHROMIUM_FLAGS)
        if mic_wav is not None:
            flags.append(f"--use-file-for-fake-audio-capture={mic_wav}%noloop")
        if not allow_mic:
            flags.remove("--use-fake-ui-for-media-stream")
            flags.append("--deny-permission-prompts")
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=flags
        )
        browsers.append(browser)
        return browser

    try:
        yield start
    finally:
        for browser in browsers:
            await browser.close()
        await playwright.stop()


class DemoPage:
    """The demo page plus everything it logged as a problem (page errors, console errors)."""

    def __init__(self, page) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on(
            "console",
            lambda msg: msg.type == "error" and self.problems.append(f"console: {msg.text}"),
        )

    @classmethod
    async def open(cls, browser, url: str, **context_options) -> DemoPage:
        context = await browser.new_context(**context_options)
        demo = cls(await context.new_page())
        await demo.page.goto(url)
        await demo.page.wait_for_function("window.voiceAgent !== undefined")
        await demo.page.evaluate(RECORDER_JS)
        return demo

    async def seen(self) -> dict:
        return await self.page.evaluate("window.seen")

    async def connect(self) -> None:
        await self.page.click("#talk")
        await self.page.wait_for_selector("#connection[data-status=connected]", timeout=20_000)

    async def hang_up(self) -> None:
        await self.page.click("#talk")
        await self.page.wait_for_selector("#connection[data-status=disconnected]")

    async def wait_for_final(self, role: str, timeout_ms: float = TURN_TIMEOUT_MS) -> str:
        """Text of the first finished utterance of `role` shown in the conversation."""
        item = self.page.locator(f".utterance.{role}:not(.partial) .text").first
        await item.wait_for(timeout=timeout_ms)
        return await item.inner_text()


# --- the server -------------------------------------------------------------------------------


@dataclass
class RunningServer:
    url: str
    runner: web.AppRunner
    engine: Engine

    async def stop(self) -> None:
        """Shut the app down (closing every peer connection), then the engine. Idempotent."""
        await self.runner.cleanup()
        await self.engine.close()


@pytest.fixture
async def agent_server() -> AsyncIterator[Callable[..., Awaitable[RunningServer]]]:
    """Starts the real app around an engine on a random loopback port; always shuts both down.

    `await agent_server(engine=None, **server_config)`; the default engine is the scripted fake.
    """
    started: list[RunningServer] = []

    async def start(engine: Engine | None = None, **config) -> RunningServer:
        engine = engine or FakeEngine()
        await engine.start()
        runner = web.AppRunner(create_app(engine, ServerConfig(**config)))
        server = RunningServer("", runner, engine)
        started.append(server)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        server.url = f"http://{host}:{port}"
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.stop()


def _in_order(seen: list[str], expected: list[str]) -> bool:
    """True if `expected` occurs in `seen` as a subsequence."""
    remaining = iter(seen)
    return all(item in remaining for item in expected)


# --- the page and its failures -----------------------------------------------------------------


async def test_demo_page_loads_without_errors_and_fits_a_phone_screen(
    launch, agent_server, tmp_path
):
    server = await agent_server()
    demo = await DemoPage.open(await launch(), server.url, viewport={"width": 360, "height": 740})
    page = demo.page
    assert await page.inner_text("#connection-text") == "Disconnected"
    assert await page.is_enabled("#talk")
    for control in ("#interrupt", "#text-input", "#send"):
        assert await page.is_disabled(control), f"{control} is usable before a call"
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than a phone screen"
    await page.screenshot(path=str(tmp_path / "demo-phone.png"), full_page=True)
    assert demo.problems == []


async def test_server_at_its_session_limit_is_shown_as_busy(launch, agent_server, silence_wav):
    server = await agent_server(max_sessions=0)
    demo = await DemoPage.open(await launch(silence_wav), server.url)
    await demo.page.click("#talk")
    await demo.page.wait_for_selector("#connection[data-status=failed]")
    error = await demo.page.inner_text("#error")
    assert error.startswith("The voice agent is busy: the server is at its session limit"), error
    assert await demo.page.inner_text("#talk") == "Start talking"


async def test_page_with_a_signed_token_connects_to_a_server_with_auth_on(
    launch, agent_server, silence_wav
):
    secret = "s3cret-for-tests"
    server = await agent_server(auth=AuthConfig(token_secret=secret))
    token = mint_token(secret, "alice", ttl_s=300)
    demo = await DemoPage.open(await launch(silence_wav), f"{server.url}/?token={token}")
    await demo.connect()
    await demo.hang_up()
    assert demo.problems == []


async def test_page_without_a_token_is_refused_in_words_by_a_server_with_auth_on(
    launch, agent_server, silence_wav
):
    server = await agent_server(auth=AuthConfig(bearer_token="only-for-staff"))
    demo = await DemoPage.open(await launch(silence_wav), server.url)
    await demo.page.click("#talk")
    await demo.page.wait_for_selector("#connection[data-status=failed]")
    error = await demo.page.inner_text("#error")
    assert "401" in error, error


async def test_offer_the_server_rejects_shows_its_reason_in_words(
    launch, agent_server, silence_wav
):
    server = await agent_server()
    demo = await DemoPage.open(await launch(silence_wav), server.url)
    # Corrupt the page's offer on its way out, so the real server answers 400 with a reason.
    bad_offer = json.dumps({"sdp": "not an sdp", "type": "offer"})
    await demo.page.route("**/offer", lambda route: route.continue_(post_data=bad_offer))
    await demo.page.click("#talk")
    await demo.page.wait_for_selector("#connection[data-status=failed]")
    error = await demo.page.inner_text("#error")
    assert error.startswith("The server refused the call: 'sdp' is not a session description"), (
        error
    )
    assert error.endswith("(HTTP 400)"), error
    assert await demo.page.is_visible("#error")


async def test_server_missing_at_the_given_url_is_shown_in_words(launch, agent_server):
    server = await agent_server()
    demo = await DemoPage.open(await launch(), f"{server.url}/?server={server.url}/nowhere")
    await demo.page.click("#talk")
    await demo.page.wait_for_selector("#connection[data-status=failed]")
    error = await demo.page.inner_text("#error")
    assert error == "The server refused the call: Not Found (HTTP 404)", error


async def test_unreachable_server_is_shown_in_words(launch, agent_server):
    server = await agent_server()
    demo = await DemoPage.open(await launch(), f"{server.url}/?server=http://127.0.0.1:9")
    await demo.page.click("#talk")
    await demo.page.wait_for_selector("#connection[data-status=failed]")
    error = await demo.page.inner_text("#error")
    assert error.startswith("Could not reach the voice agent server at http://127.0.0.1:9"), error


async def test_denied_microphone_is_shown_in_words(launch, agent_server):
    server = await agent_server()
    demo = await DemoPage.open(await launch(allow_mic=False), server.url)
    await demo.page.click("#talk")
    await demo.page.wait_for_selector("#connection[data-status=failed]")
    assert "Microphone access was denied" in await demo.page.inner_text("#error")
    assert demo.problems == []


# --- the page talking to the real app ----------------------------------------------------------


def _spoken_turn_engine() -> Engine:
    """The real offline engine (PocketSphinx, eSpeak NG) where it can run, else the scripted fake."""
    fake = FakeEngine(Script(audio_s=1.5))
    try:
        from models.offline import OfflineEngine
        from models.offline.tts import EspeakNotFoundError
    except ImportError:
        return fake
    try:
        return OfflineEngine()
    except EspeakNotFoundError:
        return fake


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


async def test_spoken_turn_shows_states_and_transcripts_and_plays_the_answer(
    launch, agent_server, speech_wav
):
    server = await agent_server(_spoken_turn_engine())
    demo = await DemoPage.open(await launch(speech_wav), f"{server.url}/?processing=off")
    await demo.connect()

    user_text = await demo.wait_for_final("user")
    answer = await demo.wait_for_final("assistant")
    await demo.page.wait_for_function(
        "window.seen.states.includes('speaking')", timeout=TURN_TIMEOUT_MS
    )
    await demo.page.wait_for_function("window.seen.agentLevelMax > 0.05", timeout=10_000)
    heard = await demo.page.evaluate(AGENT_AUDIO_JS)
    seen = await demo.seen()

    assert seen["statuses"][:2] == ["connecting", "connected"]
    assert _in_order(seen["states"], ["listening", "thinking", "speaking"]), seen["states"]
    # Whichever engine answered: it heard part of the sentence and answered about what it heard.
    assert _words(user_text) & _words(SPOKEN_SENTENCE), user_text
    assert _words(answer) & _words(user_text), (user_text, answer)
    assert heard["samples"] > 0 and heard["energy"] > 0, heard
    assert heard["playing"] and heard["currentTime"] > 0, heard
    assert seen["micLevelMax"] > 0.05, "the fake microphone never showed on the level meter"
    assert seen["errors"] == [] and demo.problems == []
    await demo.hang_up()


async def test_typed_text_gets_an_assistant_answer_on_the_page(launch, agent_server, silence_wav):
    server = await agent_server(FakeEngine(Script(text="nice to meet you")))
    demo = await DemoPage.open(await launch(silence_wav), server.url)
    await demo.connect()

    await demo.page.fill("#text-input", "  hi, I am typing  ")
    await demo.page.press("#text-input", "Enter")

    assert await demo.wait_for_final("user", timeout_ms=20_000) == "hi, I am typing"
    assert await demo.wait_for_final("assistant", timeout_ms=20_000) == "nice to meet you"
    assert await demo.page.input_value("#text-input") == ""
    assert await demo.page.inner_text("#announce") == "Agent: nice to meet you"
    seen = await demo.seen()
    assert _in_order(seen["states"], ["listening", "thinking", "speaking"]), seen["states"]
    assert demo.problems == []
    await demo.hang_up()


async def _answering(launch, agent_server, silence_wav, audio_s: float):
    """The demo page connected, a typed question sent and the agent audibly answering it."""
    script = Script(text="one two three four five six seven eight nine ten", audio_s=audio_s)
    server = await agent_server(FakeEngine(script))
    demo = await DemoPage.open(await launch(silence_wav), server.url)
    await demo.connect()
    await demo.page.fill("#text-input", "count to ten")
    await demo.page.click("#send")
    await demo.page.wait_for_function("window.voiceAgent.state === 'speaking'", timeout=20_000)
    await demo.page.wait_for_function("window.seen.agentLevelMax > 0.05", timeout=10_000)
    return script, server, demo


async def test_interrupt_button_silences_the_agent_and_cuts_its_transcript(
    launch, agent_server, silence_wav
):
    script, _server, demo = await _answering(launch, agent_server, silence_wav, audio_s=8.0)
    await demo.page.wait_for_timeout(1_500)  # let a few words be heard before cutting in
    await demo.page.click("#interrupt")

    await demo.page.wait_for_function("window.seen.flushes > 0", timeout=5_000)
    await demo.page.wait_for_function("window.voiceAgent.state === 'listening'", timeout=5_000)
    assert (await demo.seen())["mutedOnFlush"], "buffered agent audio stays audible after a flush"
    answer = await demo.wait_for_final("assistant", timeout_ms=5_000)
    assert 0 < len(answer.split()) < len(script.text.split()), answer

    # Nothing more of the cut answer arrives once the jitter buffer has drained.
    await demo.page.wait_for_timeout(500)
    before = (await demo.page.evaluate(AGENT_AUDIO_JS))["energy"]
    await demo.page.wait_for_timeout(1_000)
    after = (await demo.page.evaluate(AGENT_AUDIO_JS))["energy"]
    assert after - before < 1e-3, (before, after)
    assert not await demo.page.evaluate("window.voiceAgent.audioElement.muted")
    assert demo.problems == []
    await demo.hang_up()


async def test_a_duck_mutes_the_agent_and_unduck_lets_the_whole_answer_play_on(
    launch, agent_server, silence_wav
):
    script, server, demo = await _answering(launch, agent_server, silence_wav, audio_s=4.0)
    (conn,) = server.runner.app[REGISTRY_KEY].connections()
    await conn.session.turns.on_speech_progress(0.0, 100.0)  # a run of speech, never confirmed

    await demo.page.wait_for_function("window.seen.ducks.length === 2", timeout=5_000)
    assert (await demo.seen())["ducks"] == [["duck", True], ["unduck", False]]
    answer = await demo.wait_for_final("assistant", timeout_ms=10_000)
    assert answer == script.text  # the answer was held, not cut
    assert (await demo.seen())["flushes"] == 0
    assert not await demo.page.evaluate("window.voiceAgent.audioElement.muted")
    assert demo.problems == []
    await demo.hang_up()


async def test_muted_microphone_sends_no_speech_to_the_agent(launch, agent_server, speech_wav):
    server = await agent_server()
    demo = await DemoPage.open(await launch(speech_wav), f"{server.url}/?processing=off")
    await demo.page.click("#mute")  # before the call: it starts muted
    await demo.connect()
    assert await demo.page.get_attribute("#mute", "aria-pressed") == "true"

    # The fake microphone speaks and falls silent again within this time.
    await demo.page.wait_for_timeout((LEAD_SILENCE_S + 4.0) * 1000)
    seen = await demo.seen()
    assert seen["transcripts"] == [] and "thinking" not in seen["states"], seen
    assert server.engine.calls == []


async def test_server_going_away_ends_the_call_on_the_page(launch, agent_server, silence_wav):
    server = await agent_server()
    demo = await DemoPage.open(await launch(silence_wav), server.url)
    await demo.connect()

    await server.stop()

    await demo.page.wait_for_selector("#connection[data-status=disconnected]", timeout=15_000)
    assert await demo.page.inner_text("#talk") == "Start talking"
    assert await demo.page.is_disabled("#text-input")
