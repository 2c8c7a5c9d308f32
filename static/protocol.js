// The `events` data channel protocol, as the browser sees it.
//
// Every message is one JSON object with a `type` field. The table below mirrors
// agent/protocol.py field for field; tests/test_protocol_mirror.py parses the JSON between the
// two marker comments and checks it against the Python table, so keep it plain JSON.
//
// Field kinds are JSON kinds: "string", "boolean", "number".

export const PROTOCOL = Object.freeze(
  /* protocol-table:begin */ {
    "label": "events",
    "maxMessageBytes": 16384,
    "maxTextChars": 2000,
    "states": ["listening", "thinking", "speaking"],
    "roles": ["user", "assistant"],
    "messages": {
      "state": { "direction": "server", "fields": { "state": "string" } },
      "transcript": {
        "direction": "server",
        "fields": { "role": "string", "text": "string", "final": "boolean" }
      },
      "error": { "direction": "server", "fields": { "message": "string" } },
      "flush": { "direction": "server", "fields": {} },
      "duck": { "direction": "server", "fields": {} },
      "unduck": { "direction": "server", "fields": {} },
      "text": { "direction": "client", "fields": { "text": "string" } },
      "interrupt": { "direction": "client", "fields": {} }
    }
  } /* protocol-table:end */,
);

/** Label of the data channel the client creates before its offer. */
export const DATA_CHANNEL_LABEL = PROTOCOL.label;

/** Raised for a message that does not match the table; the text says what is wrong. */
export class ProtocolError extends Error {
  constructor(message) {
    super(message);
    this.name = "ProtocolError";
  }
}

/**
 * Check a parsed message against the table.
 *
 * @param {unknown} message the parsed JSON value
 * @param {"server"|"client"} direction who is expected to have sent it
 * @returns {object} the same message, once it is known to be valid
 * @throws {ProtocolError} naming the first problem found
 */
export function validate(message, direction) {
  if (message === null || typeof message !== "object" || Array.isArray(message)) {
    throw new ProtocolError("message must be a JSON object");
  }
  const { type, ...fields } = message;
  if (typeof type !== "string") {
    throw new ProtocolError("message needs a string 'type' field");
  }
  const spec = Object.hasOwn(PROTOCOL.messages, type) ? PROTOCOL.messages[type] : undefined;
  if (spec === undefined || spec.direction !== direction) {
    throw new ProtocolError(`not a ${direction} message type: '${type.slice(0, 40)}'`);
  }
  for (const [name, kind] of Object.entries(spec.fields)) {
    if (!Object.hasOwn(fields, name)) {
      throw new ProtocolError(`'${type}' message needs a '${name}' field`);
    }
    if (typeof fields[name] !== kind) {
      throw new ProtocolError(`'${type}.${name}' must be of type ${kind}`);
    }
  }
  const extra = Object.keys(fields).filter((name) => !Object.hasOwn(spec.fields, name));
  if (extra.length > 0) {
    throw new ProtocolError(`'${type}' message has unknown field(s): ${extra.sort().join(", ")}`);
  }
  if (type === "state" && !PROTOCOL.states.includes(fields.state)) {
    throw new ProtocolError(`unknown state '${fields.state}'`);
  }
  if (type === "transcript" && !PROTOCOL.roles.includes(fields.role)) {
    throw new ProtocolError(`unknown role '${fields.role}'`);
  }
  return message;
}

/**
 * Parse and validate one message received from the server.
 *
 * @param {string} raw the data channel payload
 * @returns {{type: string}} the message object
 * @throws {ProtocolError} if it is not JSON or does not match the table
 */
export function decodeServerMessage(raw) {
  if (typeof raw !== "string") {
    throw new ProtocolError("message is not text");
  }
  let message;
  try {
    message = JSON.parse(raw);
  } catch {
    throw new ProtocolError("message is not valid JSON");
  }
  return validate(message, "server");
}

/**
 * Serialize a client message after checking it against the table.
 *
 * @param {string} type a client message type ("text", "interrupt")
 * @param {object} [fields] its fields
 * @returns {string} the JSON text to send
 * @throws {ProtocolError} if the message is invalid or too large
 */
export function encodeClientMessage(type, fields = {}) {
  const message = validate({ type, ...fields }, "client");
  if (type === "text") {
    const text = message.text.trim();
    if (text.length === 0) throw new ProtocolError("'text' must not be empty");
    if ([...text].length > PROTOCOL.maxTextChars) {
      throw new ProtocolError(`'text' is longer than ${PROTOCOL.maxTextChars} characters`);
    }
    message.text = text;
  }
  const raw = JSON.stringify(message);
  if (new TextEncoder().encode(raw).length > PROTOCOL.maxMessageBytes) {
    throw new ProtocolError(`message too large (limit ${PROTOCOL.maxMessageBytes} bytes)`);
  }
  return raw;
}
