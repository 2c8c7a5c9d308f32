// VoiceAgent: a browser client for the voice agent server, as one ES module.
//
//   import { VoiceAgent } from "/static/voice-agent.js";
//   const agent = new VoiceAgent();
//   agent.addEventListener("transcript", (e) => console.log(e.detail.role, e.detail.text));
//   await agent.connect();
//
// The client sends the microphone over WebRTC, plays the agent's voice, and exchanges JSON
// messages on the `events` data channel (see protocol.js). It speaks only the wire protocol:
// GET {url}/config for ICE servers, POST {url}/offer with the SDP offer. See docs/client.md.

import {
  DATA_CHANNEL_LABEL,
  ProtocolError,
  decodeServerMessage,
  encodeClientMessage,
} from "./protocol.js";

/** Browser speech processing is on by default: it keeps the agent from hearing itself. */
export const DEFAULT_MIC_CONSTRAINTS = Object.freeze({
  echoCancellation: true,
  noiseSuppression: true,
  autoGainControl: true,
  channelCount: 1,
});

// The server has no trickle ICE: the offer must carry every candidate, so we wait for gathering
// to finish, but never longer than this (an unreachable STUN/TURN server can stall it).
const ICE_GATHERING_TIMEOUT_MS = 5000;
// From clicking "connect" to audio flowing, less the time the user takes to allow the
// microphone; ICE checks alone can take this long on bad networks.
const CONNECT_TIMEOUT_MS = 20000;
const LEVEL_INTERVAL_MS = 50; // `level` events at 20 Hz
const LEVEL_FLOOR_DB = -60; // RMS at or below this reads as level 0
// After a `flush` the agent's audio element stays muted this long: enough for the receive
// jitter buffer to drain the audio the server had already sent before it stopped.
const FLUSH_MUTE_MS = 300;
// A `duck` mutes the agent until the server says `unduck` or `flush` (within half a second);
// should neither come, the sound comes back after this long anyway.
const DUCK_MUTE_MAX_MS = 3000;

/**
 * A conversation with the voice agent.
 *
 * Events (all `CustomEvent`s; read `event.detail`):
 * - `connection` {status}: "connecting" | "connected" | "disconnected" | "failed"
 * - `state` {state}: the agent's turn state, "listening" | "thinking" | "speaking"
 * - `transcript` {role, text, final}: "user" | "assistant"; `text` is the whole utterance so
 *   far and replaces the previous partial of the same role until one arrives with final=true
 *   (an answer that ends without one, failed or hung up on, is closed with its text so far)
 * - `error` {message}: something went wrong, in words a person can act on
 * - `level` {level, agentLevel}: microphone and agent loudness, each 0..1, about 20 times a second
 * - `flush` {}: the agent was interrupted; its buffered audio was dropped
 * - `duck` {}: the user may be talking over the agent; its audio is muted meanwhile
 * - `unduck` {}: it was not an interruption; the agent's audio plays again
 */
export class VoiceAgent extends EventTarget {
  #url;
  #iceServers;
  #micConstraints;
  #token; // string | () => string | Promise<string> | null
  #bearer = null; // the token resolved for the call being set up
  #audio;
  #status = "disconnected";
  #state = null;
  #muted = false;
  #attempt = 0; // bumped by each connect()/disconnect(): a stale connect() stops at its next step
  #session = null; // {pc, channel, mic, context, meters, levelTimer, connectTimer, ready, up}
  #remoteStream = null;
  #silenced = null; // {timer, wasMuted} while the agent audio is muted (duck, flush)
  #partials = new Map(); // role -> text of its utterance still open (no final transcript yet)

  /**
   * @param {object} [options]
   * @param {string} [options.url] server base URL ("" = the page's own origin)
   * @param {RTCIceServer[]|null} [options.iceServers] ICE servers; null = ask GET {url}/config
   * @param {HTMLAudioElement|null} [options.audioElement] plays the agent; null = a detached one
   * @param {MediaTrackConstraints} [options.micConstraints] merged over DEFAULT_MIC_CONSTRAINTS
   * @param {string|(() => string|Promise<string>)|null} [options.token] access token for a server
   *   with auth on: a string, or a function (e.g. one asking your backend) called once per connect()
   */
  constructor({
    url = "",
    iceServers = null,
    audioElement = null,
    micConstraints = {},
    token = null,
  } = {}) {
    super();
    this.#url = String(url).replace(/\/+$/, "");
    this.#token = token;
    this.#iceServers = iceServers;
    this.#micConstraints = { ...DEFAULT_MIC_CONSTRAINTS, ...micConstraints };
    this.#audio = audioElement ?? document.createElement("audio");
    this.#audio.autoplay = true;
  }

  /** "connecting" | "connected" | "disconnected" | "failed" */
  get status() {
    return this.#status;
  }

  /** The agent's last reported turn state, or null before the first one. */
  get state() {
    return this.#state;
  }

  /** The agent's audio as a MediaStream once it arrives (null before and after a call). */
  get remoteStream() {
    return this.#remoteStream;
  }

  /** The call's RTCPeerConnection while one is up (for getStats() diagnostics), else null. */
  get peerConnection() {
    return this.#session?.pc ?? null;
  }

  /** The element that plays the agent's audio. */
  get audioElement() {
    return this.#audio;
  }

  /** True while the microphone sends silence. Settable at any time, also before connect(). */
  get muted() {
    return this.#muted;
  }

  set muted(value) {
    this.#muted = Boolean(value);
    for (const track of this.#session?.mic?.getAudioTracks() ?? []) track.enabled = !this.#muted;
  }

  /**
   * Open the microphone and start a call. Resolves once audio and the data channel are up.
   * Rejects with an Error whose message is the same text the `error` event carried
   * (or an AbortError if disconnect() was called first). Does nothing while already connected.
   */
  async connect() {
    if (this.#session) return this.#session.ready.promise;
    const attempt = ++this.#attempt;
    const session = { ready: deferred() };
    this.#session = session;
    // Created before any await so it counts as started by the user's click (autoplay rules).
    session.context = new AudioContext();
    session.context.resume().catch(() => {});
    this.#setStatus("connecting");
    const seconds = CONNECT_TIMEOUT_MS / 1000;
    const slow = new Error(`Connecting took too long: no audio connection after ${seconds} s.`);
    const startTimer = () => {
      session.connectTimer = setTimeout(() => this.#fail(session, slow), CONNECT_TIMEOUT_MS);
    };
    startTimer();
    try {
      this.#bearer = await this.#resolveToken();
      this.#ensureCurrent(attempt, session);
      // The permission prompt waits for the user as long as they take: not part of connecting.
      clearTimeout(session.connectTimer);
      session.mic = await openMicrophone(this.#micConstraints);
      this.#ensureCurrent(attempt, session);
      startTimer();
      this.muted = this.#muted;
      const iceServers = this.#iceServers ?? (await this.#fetchIceServers());
      this.#ensureCurrent(attempt, session);
      this.#startPeer(session, iceServers);
      await session.pc.setLocalDescription(await session.pc.createOffer());
      await iceGatheringComplete(session.pc, ICE_GATHERING_TIMEOUT_MS);
      this.#ensureCurrent(attempt, session);
      const answer = await this.#postOffer(session.pc.localDescription);
      this.#ensureCurrent(attempt, session);
      await session.pc.setRemoteDescription(answer);
      this.#startMeters(session);
    } catch (err) {
      if (this.#session === session) this.#fail(session, err);
      else release(session); // replaced meanwhile: free what this attempt still opened
    }
    return session.ready.promise;
  }

  /** End the call and release the microphone. Safe to call at any time. */
  disconnect() {
    this.#attempt++;
    const session = this.#session;
    if (!session) return;
    this.#teardown(session);
    session.ready.reject(new DOMException("disconnected before the call was up", "AbortError"));
    this.#setStatus("disconnected");
  }

  /** Ask the agent to stop talking now; its audio already buffered here is dropped at once. */
  interrupt() {
    this.#send(encodeClientMessage("interrupt"));
    this.#dropAgentAudio();
  }

  /**
   * Send a typed user turn.
   * @param {string} text what the user says (trimmed; must not be empty)
   * @throws {Error} if not connected or the text is empty or too long
   */
  sendText(text) {
    this.#send(encodeClientMessage("text", { text: String(text) }));
  }

  // --- call setup ---------------------------------------------------------------------------

  #ensureCurrent(attempt, session) {
    if (attempt !== this.#attempt || this.#session !== session) throw new Superseded();
  }

  async #fetchIceServers() {
    const body = await this.#request("GET", "/config");
    return Array.isArray(body?.iceServers) ? body.iceServers : [];
  }

  async #postOffer(offer) {
    const answer = await this.#request("POST", "/offer", { sdp: offer.sdp, type: offer.type });
    if (typeof answer?.sdp !== "string" || answer.type !== "answer") {
      throw new Error("The server sent an answer this page cannot use (no SDP answer in it).");
    }
    return answer;
  }

  async #resolveToken() {
    if (this.#token === null || this.#token === undefined) return null;
    try {
      const token = typeof this.#token === "function" ? await this.#token() : this.#token;
      return token ? String(token) : null;
    } catch (err) {
      throw new Error(`Could not get an access token for the voice agent: ${err?.message ?? err}`);
    }
  }

  async #request(method, path, json) {
    const init = { method, headers: { Accept: "application/json" } };
    if (this.#bearer) init.headers.Authorization = `Bearer ${this.#bearer}`;
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(`${this.#url}${path}`, init);
    } catch {
      const where = this.#url || window.location.origin;
      throw new Error(`Could not reach the voice agent server at ${where}. Is it running?`);
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new Error(httpErrorMessage(response, body));
    return body;
  }

  #startPeer(session, iceServers) {
    const pc = new RTCPeerConnection({ iceServers });
    session.pc = pc;
    for (const track of session.mic.getAudioTracks()) {
      pc.addTransceiver(track, { direction: "sendrecv", streams: [session.mic] });
    }
    pc.addEventListener("track", (event) => this.#playAgent(event));
    pc.addEventListener("connectionstatechange", () => this.#onPeerState(session));
    const channel = pc.createDataChannel(DATA_CHANNEL_LABEL, { ordered: true });
    session.channel = channel;
    channel.addEventListener("open", () => this.#onPeerState(session));
    channel.addEventListener("message", (event) => this.#onMessage(event.data));
    channel.addEventListener("close", () => {
      if (this.#session !== session) return;
      if (session.up) this.#end(session);
      else this.#fail(session, new Error("The server closed the connection while connecting."));
    });
  }

  #onPeerState(session) {
    if (this.#session !== session) return;
    const { pc, channel } = session;
    if (pc.connectionState === "failed") {
      const reason = "there is no network path to the server (a TURN server may be needed)";
      this.#fail(session, new Error(`The audio connection failed: ${reason}.`));
    } else if (pc.connectionState === "closed") {
      this.#end(session);
    } else if (pc.connectionState === "connected" && channel.readyState === "open") {
      clearTimeout(session.connectTimer);
      session.up = true;
      this.#setStatus("connected");
      session.ready.resolve();
    } else if (pc.connectionState === "disconnected" && this.#status === "connected") {
      this.#setStatus("connecting"); // ICE is trying to recover the path
    }
  }

  #playAgent(event) {
    this.#remoteStream = event.streams[0] ?? new MediaStream([event.track]);
    this.#audio.srcObject = this.#remoteStream;
    this.#audio.play().catch((err) => {
      if (err?.name === "NotAllowedError") {
        this.#emitError("The browser blocked the agent's audio. Click the page to allow sound.");
      }
    });
    const session = this.#session;
    if (session?.meters) session.meters.agent = analyserFor(session.context, this.#remoteStream);
  }

  // --- data channel -------------------------------------------------------------------------

  #onMessage(raw) {
    let message;
    try {
      message = decodeServerMessage(raw);
    } catch (err) {
      if (err instanceof ProtocolError) return; // a newer server's extra messages: ignore them
      throw err;
    }
    const { type, ...detail } = message;
    if (type === "transcript") {
      if (detail.final) this.#partials.delete(detail.role);
      else this.#partials.set(detail.role, detail.text);
    }
    if (type === "state") {
      this.#state = detail.state;
      // The answer is over; one that failed got no final transcript: close it here.
      if (detail.state === "listening") this.#closeTranscript("assistant");
    }
    if (type === "flush") this.#dropAgentAudio();
    if (type === "duck") this.#muteAgent(DUCK_MUTE_MAX_MS);
    if (type === "unduck") this.#unmuteAgent();
    if (type === "error") {
      this.#emitError(detail.message);
      return;
    }
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** End the role's open utterance with a final transcript of its text so far. */
  #closeTranscript(role) {
    if (!this.#partials.has(role)) return;
    const text = this.#partials.get(role);
    this.#partials.delete(role);
    this.dispatchEvent(new CustomEvent("transcript", { detail: { role, text, final: true } }));
  }

  #send(raw) {
    const channel = this.#session?.channel;
    if (!channel || channel.readyState !== "open") {
      throw new Error("Not connected to the voice agent.");
    }
    channel.send(raw);
  }

  #dropAgentAudio() {
    // WebRTC gives no way to empty the receive jitter buffer, so play it out muted instead.
    this.#muteAgent(FLUSH_MUTE_MS);
  }

  /** Mute the agent's audio now, for `ms` at most (a later call replaces the deadline). */
  #muteAgent(ms) {
    if (this.#silenced) clearTimeout(this.#silenced.timer);
    else this.#silenced = { wasMuted: this.#audio.muted };
    this.#audio.muted = true;
    this.#silenced.timer = setTimeout(() => this.#unmuteAgent(), ms);
  }

  /** Give the agent's audio its sound back (as muted as it was before), if it was muted. */
  #unmuteAgent() {
    if (!this.#silenced) return;
    clearTimeout(this.#silenced.timer);
    this.#audio.muted = this.#silenced.wasMuted;
    this.#silenced = null;
  }

  // --- levels -------------------------------------------------------------------------------

  #startMeters(session) {
    session.meters = {
      mic: analyserFor(session.context, session.mic),
      agent: this.#remoteStream ? analyserFor(session.context, this.#remoteStream) : null,
    };
    const buffer = new Float32Array(session.meters.mic.fftSize);
    session.levelTimer = setInterval(() => {
      const { mic, agent } = session.meters;
      const level = this.#muted ? 0 : loudness(mic, buffer);
      const agentLevel = agent ? loudness(agent, buffer) : 0;
      this.dispatchEvent(new CustomEvent("level", { detail: { level, agentLevel } }));
    }, LEVEL_INTERVAL_MS);
  }

  // --- ending -------------------------------------------------------------------------------

  #fail(session, err) {
    if (this.#session !== session || err instanceof Superseded) return;
    const message = describeError(err);
    this.#teardown(session);
    // Status first: a listener may connect() again on the error, and its "connecting" must last.
    this.#setStatus("failed");
    this.#emitError(message);
    session.ready.reject(new Error(message));
  }

  #end(session) {
    this.#teardown(session);
    this.#setStatus("disconnected");
    session.ready.reject(new DOMException("the call ended before it was up", "AbortError"));
  }

  #teardown(session) {
    release(session);
    if (this.#session !== session) return;
    this.#session = null;
    this.#unmuteAgent();
    this.#audio.srcObject = null;
    this.#remoteStream = null;
    this.#state = null;
    for (const role of [...this.#partials.keys()]) this.#closeTranscript(role);
  }

  #setStatus(status) {
    if (status === this.#status) return;
    this.#status = status;
    this.dispatchEvent(new CustomEvent("connection", { detail: { status } }));
  }

  #emitError(message) {
    this.dispatchEvent(new CustomEvent("error", { detail: { message } }));
  }
}

/** Thrown inside a connect() that a later connect()/disconnect() has replaced. */
class Superseded extends Error {}

/** Stop everything a call holds: timers, connection, microphone, audio graph. Idempotent. */
function release(session) {
  clearTimeout(session.connectTimer);
  clearInterval(session.levelTimer);
  session.channel?.close();
  session.pc?.close();
  for (const track of session.mic?.getTracks() ?? []) track.stop();
  if (session.context?.state !== "closed") session.context?.close().catch(() => {});
}

function deferred() {
  const d = {};
  d.promise = new Promise((resolve, reject) => Object.assign(d, { resolve, reject }));
  d.promise.catch(() => {}); // callers that never await connect() must not see unhandled rejections
  return d;
}

async function openMicrophone(constraints) {
  if (!navigator.mediaDevices?.getUserMedia) {
    const reason = "the page must be served over HTTPS (or from localhost)";
    throw new Error(`This page cannot use the microphone: ${reason}.`);
  }
  try {
    return await navigator.mediaDevices.getUserMedia({ audio: constraints, video: false });
  } catch (err) {
    throw new Error(microphoneErrorMessage(err));
  }
}

function microphoneErrorMessage(err) {
  switch (err?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone access was denied. Allow the microphone for this page and try again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No usable microphone was found. Connect one and try again.";
    case "NotReadableError":
    case "AbortError":
      return "The microphone could not be started. Is another application using it?";
    default:
      return `The microphone could not be opened (${err?.message || err}).`;
  }
}

function httpErrorMessage(response, body) {
  const given = typeof body?.error === "string" ? body.error.trim() : "";
  const reason = `${given || response.statusText || "no reason given"} (HTTP ${response.status})`;
  if (response.status === 503) return `The voice agent is busy: ${reason}`;
  if (response.status >= 500) return `The server could not start the call: ${reason}`;
  return `The server refused the call: ${reason}`;
}

function describeError(err) {
  if (err instanceof Error && err.message) {
    return err.name === "Error" ? err.message : `Could not start the call: ${err.message}`;
  }
  return `Could not start the call: ${err}`;
}

function iceGatheringComplete(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

function analyserFor(context, stream) {
  const analyser = context.createAnalyser();
  analyser.fftSize = 1024;
  context.createMediaStreamSource(stream).connect(analyser);
  return analyser;
}

/** RMS loudness of the analyser's latest window, mapped from [LEVEL_FLOOR_DB, 0] dBFS to 0..1. */
function loudness(analyser, buffer) {
  analyser.getFloatTimeDomainData(buffer);
  let sum = 0;
  for (const x of buffer) sum += x * x;
  const rms = Math.sqrt(sum / buffer.length);
  const db = 20 * Math.log10(rms || 1e-9);
  return Math.min(1, Math.max(0, 1 - db / LEVEL_FLOOR_DB));
}
