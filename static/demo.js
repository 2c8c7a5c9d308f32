// The demo page: wires the VoiceAgent client to the controls in index.html.
//
// Query parameters:
//   ?server=https://host:8080   talk to another server (default: this page's origin)
//   ?processing=off             turn off the browser's echo cancellation, noise suppression and
//                               gain control (for headsets or recorded test input)
//   ?token=...                  access token for a server with auth on (e.g. a link minted by
//                               your backend with `python -m signaling.tokens mint`)

import { VoiceAgent } from "./voice-agent.js";

const STATUS_TEXT = {
  connecting: "Connecting…",
  connected: "Connected",
  disconnected: "Disconnected",
  failed: "Connection failed",
};
const ROLE_LABEL = { user: "You", assistant: "Agent" };

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"),
  connectionText: $("connection-text"),
  talk: $("talk"),
  mute: $("mute"),
  interrupt: $("interrupt"),
  micLevel: $("mic-level"),
  agentLevel: $("agent-level"),
  turnState: $("turn-state"),
  stateText: $("state-text"),
  error: $("error"),
  transcript: $("transcript"),
  announce: $("announce"),
  placeholder: $("transcript-placeholder"),
  form: $("text-form"),
  input: $("text-input"),
  send: $("send"),
};

const params = new URLSearchParams(window.location.search);
const processing = params.get("processing") !== "off";
const agent = new VoiceAgent({
  url: params.get("server") ?? "",
  token: params.get("token"),
  audioElement: $("agent-audio"),
  micConstraints: {
    echoCancellation: processing,
    noiseSuppression: processing,
    autoGainControl: processing,
  },
});
// Handy from the developer console.
window.voiceAgent = agent;

// The utterance of each role still being spoken (its <li>), until a final transcript arrives.
const open = { user: null, assistant: null };

agent.addEventListener("connection", ({ detail: { status } }) => showConnection(status));
agent.addEventListener("state", ({ detail: { state } }) => showState(state));
agent.addEventListener("transcript", ({ detail }) => showTranscript(detail));
agent.addEventListener("error", ({ detail: { message } }) => showError(message));
agent.addEventListener("level", ({ detail: { level, agentLevel } }) => {
  ui.micLevel.value = level;
  ui.agentLevel.value = agentLevel;
});

ui.talk.addEventListener("click", () => {
  if (agent.status === "connecting" || agent.status === "connected") {
    agent.disconnect();
    return;
  }
  showError(null);
  // Failures arrive as `error` events; the rejection carries the same text.
  agent.connect().catch(() => {});
});

ui.mute.addEventListener("click", () => {
  agent.muted = !agent.muted;
  ui.mute.setAttribute("aria-pressed", String(agent.muted));
  ui.mute.textContent = agent.muted ? "Unmute mic" : "Mute mic";
});

ui.interrupt.addEventListener("click", () => attempt(() => agent.interrupt()));

// Leaving the page ends the call at once rather than when the server notices the silence.
window.addEventListener("pagehide", () => agent.disconnect());

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (!text) return;
  if (attempt(() => agent.sendText(text))) ui.input.value = "";
});

function attempt(action) {
  try {
    action();
    return true;
  } catch (err) {
    showError(err.message);
    return false;
  }
}

function showConnection(status) {
  const live = status === "connected";
  const busy = status === "connecting" || live;
  ui.connection.dataset.status = status;
  ui.connectionText.textContent = STATUS_TEXT[status] ?? status;
  ui.talk.textContent = busy ? "Stop" : "Start talking";
  ui.talk.setAttribute("aria-pressed", String(busy));
  for (const control of [ui.interrupt, ui.input, ui.send]) control.disabled = !live;
  if (live) showError(null);
  if (!busy) {
    showState(null);
    ui.micLevel.value = 0;
    ui.agentLevel.value = 0;
    closeOpenUtterances();
  }
}

function showState(state) {
  for (const step of ui.turnState.children) {
    step.classList.toggle("active", step.dataset.state === state);
  }
  ui.turnState.dataset.state = state ?? "";
  ui.stateText.textContent = state ? `Agent is ${state}` : "";
}

function showTranscript({ role, text, final }) {
  let item = open[role];
  if (!item) {
    if (final && !text) return; // nothing was heard or said
    item = addUtterance(role);
  }
  item.querySelector(".text").textContent = text;
  item.classList.toggle("partial", !final);
  if (final) {
    open[role] = null;
    if (!text) item.remove();
    else ui.announce.textContent = `${ROLE_LABEL[role] ?? role}: ${text}`;
  } else {
    open[role] = item;
  }
}

function addUtterance(role) {
  ui.placeholder?.remove();
  const item = document.createElement("li");
  item.className = `utterance ${role}`;
  item.dataset.role = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = ROLE_LABEL[role] ?? role;
  const text = document.createElement("span");
  text.className = "text";
  item.append(who, text);
  ui.transcript.append(item);
  open[role] = item;
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function closeOpenUtterances() {
  for (const role of Object.keys(open)) {
    open[role]?.classList.remove("partial");
    open[role] = null;
  }
}

function showError(message) {
  ui.error.hidden = !message;
  ui.error.textContent = message ?? "";
}
