"""static/protocol.js mirrors agent/protocol.py: the browser and the server speak one table."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from agent import protocol
from tests.conftest import REPO_ROOT

PROTOCOL_JS = REPO_ROOT / "static" / "protocol.js"
TABLE_RE = re.compile(r"/\* protocol-table:begin \*/(.*?)/\* protocol-table:end \*/", re.DOTALL)

# Python field types -> the JSON kind `typeof` reports in the browser.
JS_KINDS = {str: "string", bool: "boolean", int: "number", float: "number"}


def js_table() -> dict:
    match = TABLE_RE.search(PROTOCOL_JS.read_text(encoding="utf-8"))
    assert match, "protocol.js lost its protocol-table markers"
    return json.loads(match.group(1))


def python_table() -> dict:
    def kind(t: type | tuple[type, ...]) -> str:
        kinds = {JS_KINDS[k] for k in (t if isinstance(t, tuple) else (t,))}
        assert len(kinds) == 1, f"field type {t} has no single JSON kind"
        return kinds.pop()

    return {
        "label": protocol.DATA_CHANNEL_LABEL,
        "maxMessageBytes": protocol.MAX_MESSAGE_BYTES,
        "maxTextChars": protocol.MAX_TEXT_CHARS,
        "states": list(protocol.STATES),
        "roles": list(protocol.ROLES),
        "messages": {
            name: {"direction": direction, "fields": {f: kind(t) for f, t in fields.items()}}
            for name, (direction, fields) in protocol.MESSAGES.items()
        },
    }


def test_js_table_equals_python_table():
    assert js_table() == python_table()


def test_js_table_keeps_message_order():
    """Order matters to readers of both files, so the mirror keeps it too."""
    assert list(js_table()["messages"]) == list(protocol.MESSAGES)


NODE_CHECK = """
const p = await import(process.argv[1]);
const out = {};
const attempt = (f) => { try { return f(); } catch (e) { return `${e.name}: ${e.message}`; } };
out.text = attempt(() => p.encodeClientMessage("text", { text: "  hi there " }));
out.interrupt = attempt(() => p.encodeClientMessage("interrupt"));
out.emptyText = attempt(() => p.encodeClientMessage("text", { text: "   " }));
out.serverType = attempt(() => p.encodeClientMessage("state", { state: "listening" }));
out.state = attempt(() => p.decodeServerMessage('{"type":"state","state":"speaking"}'));
out.badState = attempt(() => p.decodeServerMessage('{"type":"state","state":"dancing"}'));
out.badFinal = attempt(() =>
  p.decodeServerMessage('{"type":"transcript","role":"user","text":"x","final":1}'));
out.extra = attempt(() => p.decodeServerMessage('{"type":"flush","x":1}'));
out.notJson = attempt(() => p.decodeServerMessage("{"));
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_js_helpers_accept_and_reject_like_python():
    done = subprocess.run(
        ["node", "--input-type=module", "-e", NODE_CHECK, PROTOCOL_JS.as_uri()],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = json.loads(done.stdout)
    assert json.loads(out["text"]) == {"type": "text", "text": "hi there"}
    assert protocol.decode_client(out["text"]).fields == {"text": "hi there"}
    assert protocol.decode_client(out["interrupt"]).type == "interrupt"
    assert out["emptyText"].startswith("ProtocolError")
    assert out["serverType"].startswith("ProtocolError")
    assert out["state"] == json.loads(protocol.encode("state", state="speaking"))
    for key in ("badState", "badFinal", "extra", "notJson"):
        assert out[key].startswith("ProtocolError"), key
