// The chat page: keeps the conversation, posts it to api/chat and shows the reply as it streams,
// as markdown; after a cut or a reload it fetches the rest of the same reply by its last event id.
// A plain script, no build step. marked (loaded before it) only splits the markdown
// into tokens; this file builds the elements from them, so the model's text never goes through an
// HTML parser. Its top-level functions are globals on purpose: the browser tests call readEvents().
"use strict";

const conversation = document.getElementById("conversation");
const composer = document.getElementById("composer");
const messageInput = document.getElementById("prompt");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const newChatButton = document.getElementById("new-chat");
const modelRow = document.getElementById("model-row");
const modelPicker = document.getElementById("model");
const tokenRow = document.getElementById("token-row");
const tokenInput = document.getElementById("token");

// One saved conversation per page URL: two chats mounted on one site keep their own.
const STORE_KEY = `chat:${location.pathname}`;
// After a cut, the page asks for the rest of the reply again: first at once, then after a pause
// that doubles up to 8 s, for up to two minutes (the service keeps a reply going for a minute
// with no reader, and keeps a finished one for five).
const RECONNECT = { pause: 500, longestPause: 8000, giveUpAfter: 120_000 };
// The service's codes for "the conversation is too long": only a shorter one can be sent.
const TOO_LONG = new Set(["body_too_large", "too_many_messages", "context_too_long"]);
// GitHub's flavour (tables, ~~strike~~, bare links), and a new line is a line break, as typed.
const MARKDOWN = { ...marked.getDefaults(), breaks: true };
// Quotes, lists and emphasis nested deeper than this show as the text they are: nesting costs stack.
const MAX_NESTING = 16;
// What marked's lexer cannot take (it recurses per level, and overflows near 2,000 nested `> `):
// 100 quote or list markers at the start of one line, or a run of 100 `*`, `_` or `~`. A reply with
// either is shown as plain text, whole.
const TOO_DEEP = [/^(?:[ \t]*(?:>|[-+*](?=[ \t])|\d{1,9}[.)](?=[ \t]))){100}/m, /([*_~])\1{99}/];
// The named character references marked leaves in text; it decodes numeric ones itself.
const ENTITIES = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'", nbsp: "\u00a0" };
// Bidirectional embeddings, overrides, isolates and marks: in a link's text, U+202E makes
// "elpmaxe.knab//:sptth" read "https://bank.example". Taken out of link text.
const BIDI_CONTROLS = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
// An event the page could not show, the server's fault (bad JSON) or the page's own: not the
// network's, so it ends the reply instead of reconnecting.
class NotShown extends Error {}

// The conversation, sent whole with every request (the server keeps nothing between requests).
// A turn is {question, answer, reasoning, thought, state, note}; it joins once the model has said
// something, even when stopped or cut short: that is what the person saw. Kept in localStorage.
let turns = [];
// The newest turn on the page, kept or not (a refused question is not): Retry sends it again.
let latest = null;
// The reply streaming now, saved with the conversation as it grows, with its `stream`: the id the
// service gave it (X-Stream-Id) and the id of the last event shown. A reload resumes it from there.
let pending = null;
// The AbortController of the reply that is streaming, or null. Stop asks the service to stop the
// reply (a closed connection alone only detaches it), then aborts the fetch.
let streaming = null;
// Bumped by "New chat", so a reply still streaming into the old conversation is not kept.
let chatNumber = 0;
let savedModel = null;

// Only a server with CHAT_API_TOKEN set asks for a token (401). sessionStorage, not localStorage:
// the token lives as long as the tab, not on the disk.
tokenInput.value = sessionStorage.getItem("chat-token") || "";
tokenRow.hidden = !tokenInput.value;
tokenInput.addEventListener("input", () => sessionStorage.setItem("chat-token", tokenInput.value.trim()));

composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send(messageInput.value);
});
messageInput.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter falls through to the textarea's new line. An Enter that confirms an
  // input method's composition (Korean, Japanese, Chinese) is not a send.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    composer.requestSubmit();
  }
});
stopButton.addEventListener("click", () => stopReply());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") stopReply();
});
// A reload or a closed tab saves the reply where it is, so the next visit resumes from there.
addEventListener("pagehide", () => save());
newChatButton.addEventListener("click", () => newChat());
modelPicker.addEventListener("change", save);
conversation.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy");
  if (button) copyCode(button);
});

restore();
loadModels();

/** Send `text` with the conversation before it, and stream the reply into the page. */
async function send(text) {
  if (!text.trim() || streaming) return;
  if (latest && !turns.includes(latest)) discardLatest(); // a refused question gives way to the next
  latest?.view.actions.replaceChildren(); // Retry belongs to the newest turn only
  const turn = { question: text, answer: "", reasoning: "", thought: null, state: "streaming", note: "" };
  const history = turns.flatMap((t) => [
    { role: "user", content: t.question },
    { role: "assistant", content: t.answer }, // never the reasoning: the model does not get its thinking back
  ]);
  showTurn(turn);
  latest = turn;
  if (messageInput.value === text) messageInput.value = "";
  const body = { messages: [...history, { role: "user", content: text }] };
  if (!modelRow.hidden) body.model = modelPicker.value;
  const post = (signal) =>
    fetch("api/chat", { method: "POST", headers: requestHeaders("application/json"), body: JSON.stringify(body), signal });
  await follow(turn, post);
}

/** Stream the reply `open(signal)` answers into `turn`, locking the input meanwhile; then keep it. */
async function follow(turn, open) {
  const chat = chatNumber;
  setStreaming(new AbortController());
  let focus = messageInput;
  try {
    const outcome = await streamReply(turn, open, streaming.signal);
    if (chat !== chatNumber) return; // "New chat" was pressed meanwhile
    pending = null;
    delete turn.stream;
    if (turn.answer && !turns.includes(turn)) turns.push(turn);
    else if (!turn.answer && !messageInput.value) messageInput.value = turn.question; // to send again
    save();
    focus = offerWayOut(turn, outcome);
  } finally {
    setStreaming(null, focus); // whatever went wrong above, the controls come back
  }
}

/**
 * Show the reply as it arrives; after a cut, fetch the rest with backoff. Return {code} of a failure, or {}.
 *
 * Every event carries an id; the rest of a reply is `GET api/chat/<stream id>` with the last one
 * shown as `Last-Event-ID`, so nothing is shown twice and nothing is missed.
 */
async function streamReply(turn, open, signal) {
  for (let misses = 0, lostAt = null; ; misses += 1) {
    const shown = turn.stream?.last;
    try {
      const response = await (lostAt === null ? open(signal) : resumeRequest(turn, signal));
      const outcome = await readReply(turn, response);
      if (outcome) return outcome;
    } catch (error) {
      if (signal.aborted) return finishStopped(turn);
      if (error instanceof NotShown) {
        console.error(error.cause);
        const unreadable = error.cause instanceof SyntaxError;
        return finishFailed(turn, unreadable ? "The server sent something this page cannot read." : "The page could not show the reply.");
      }
      // Anything else is the network: the reply goes on without us, and can be fetched again.
    }
    if (lostAt === null || turn.stream?.last !== shown) [misses, lostAt] = [0, Date.now()]; // a new cut
    if (!turn.stream?.id || Date.now() - lostAt > RECONNECT.giveUpAfter) {
      return finishFailed(turn, "The connection to the server was lost. Please try again.");
    }
    setState(turn, "reconnecting", "The connection was lost. Reconnecting…");
    try {
      await pause(misses && Math.min(RECONNECT.pause * 2 ** (misses - 1), RECONNECT.longestPause), signal);
    } catch {
      return finishStopped(turn);
    }
  }
}

/** Ask for the rest of `turn`'s reply: everything after the last event shown (or all of it). */
function resumeRequest(turn, signal) {
  const headers = requestHeaders();
  if (turn.stream.last) {
    headers["Last-Event-ID"] = turn.stream.last;
  } else {
    turn.answer = turn.reasoning = ""; // the whole reply comes again: show it once
    turn.view.reasoning.data = "";
    renderMarkdown(turn.view, "");
  }
  return fetch(`api/chat/${encodeURIComponent(turn.stream.id)}`, { headers, signal, cache: "no-store" });
}

/** Show one response's events; return the outcome once the reply ended, or null when it was cut short. */
async function readReply(turn, response) {
  const resuming = Boolean(turn.stream?.id);
  if (!response.ok) return resuming ? refusedResume(turn, response) : refused(turn, response);
  if (!resuming) {
    turn.stream = { id: response.headers.get("X-Stream-Id"), last: null, end: null };
    pending = turn.stream.id ? turn : null; // no id: the service cannot resume it (or predates resuming)
    if (streaming.stopping) stopReply(); // Stop was pressed before the service said which reply this is
  }
  setState(turn, "streaming", "");
  for await (const { id, data } of readEvents(response.body)) {
    let outcome;
    try {
      outcome = showEvent(turn, data);
    } catch (error) {
      throw new NotShown("An event was not shown", { cause: error }); // ours, not the network's: no reconnecting
    }
    turn.stream.last = id;
    saveSoon();
    if (outcome) return outcome;
  }
  return null;
}

/** Show one event of the reply; return the outcome when it is the last. */
function showEvent(turn, data) {
  if (data === "[DONE]") {
    finish(turn, "done", describeEnd(turn.stream.end));
    return {};
  }
  const event = JSON.parse(data); // the events are told apart by their keys
  if (event.error) {
    finish(turn, "error", event.error); // the server words it for a person
    return { code: event.code };
  }
  if (event.reasoning) think(turn, event.reasoning);
  if (event.content) {
    stopThinking(turn, true);
    turn.answer += event.content;
    scheduleRender(turn.view, turn.answer);
  }
  if ("finish_reason" in event) turn.stream.end = event; // the end event; shown once [DONE] confirms it
  return null;
}

async function refused(turn, response) {
  const failure = await describeHttpError(response);
  finish(turn, "error", failure.message);
  return failure;
}

/** A resume the service refused: gone for good (404, 409), or worth another try (null). */
async function refusedResume(turn, response) {
  if (response.status === 404 || response.status === 409) {
    finish(turn, "error", "The rest of this reply can no longer be fetched.");
    return { code: "unresumable" };
  }
  if (response.status === 401) return refused(turn, response);
  return null; // busy (429, 503) or a proxy between deploys (502): try again
}

function finishStopped(turn) {
  finish(turn, "stopped", turn.answer ? "Stopped." : "Stopped before the model answered.");
  return { code: "stopped" };
}

function finishFailed(turn, note) {
  finish(turn, "error", note);
  return { code: "failed" };
}

/** Wait `ms`, or less if the browser comes back online; throw AbortError when `signal` aborts first. */
function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    const end = (settle) => {
      clearTimeout(timer);
      removeEventListener("online", online);
      signal.removeEventListener("abort", abort);
      settle();
    };
    const online = () => end(resolve);
    const abort = () => end(() => reject(signal.reason));
    const timer = setTimeout(online, ms);
    addEventListener("online", online);
    signal.addEventListener("abort", abort);
  });
}

/**
 * Stop the reply that is streaming: tell the service (POST api/chat/<stream id>/stop), which
 * ends the reply for every reader, and let go of the response. Pressed before the service said
 * which reply it is, the stop waits for that, once; pressed again, it lets go at once.
 */
function stopReply(force = false) {
  if (!streaming) return;
  const stream = latest?.stream;
  if (stream === undefined && !streaming.stopping && !force) {
    streaming.stopping = true;
    latest.view.note.textContent = "Stopping…";
    return;
  }
  if (stream?.id) {
    const url = `api/chat/${encodeURIComponent(stream.id)}/stop`;
    fetch(url, { method: "POST", headers: requestHeaders(), keepalive: true }).catch(() => {});
  }
  streaming.abort();
}

/**
 * Yield each Server-Sent Event in a fetch body as {data, id}: its data, as text, and the last event id.
 *
 * EventSource cannot POST, so this is the spec's parser cut down to what the wire protocol uses
 * (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
 * A read can end anywhere, inside a line or inside a UTF-8 character: the decoder keeps partial
 * characters and `buffer` the partial line. Lines end in \r\n, \n or \r; a blank line ends an
 * event; lines starting with ":" are comments (": ok", ": ping") and are skipped.
 */
async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  let id = null; // as the spec says, an id holds for the events after it until another one comes
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      // A \r at the very end waits for the next read: it may be the first half of a \r\n.
      const lines = buffer.split(/\r\n|\n|\r(?!$)/);
      buffer = lines.pop(); // the last piece has no line end yet: wait for the rest
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield { data: data.join("\n"), id };
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } else if (line.startsWith("id:")) {
          id = line.slice(line.startsWith("id: ") ? 4 : 3);
        } // anything else is a comment or a field this protocol does not use (event:, retry:)
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // leaving early (an error event, Stop) lets go of the body
  }
}

/** Turn an HTTP error that came before the stream into {code, message} for a person. */
async function describeHttpError(response) {
  // The service answers {"error": {"message", "code"}}; a proxy in front of it may answer HTML.
  const body = await response.json().catch(() => null);
  const message = body?.error?.message;
  const code = body?.error?.code ?? `http_${response.status}`;
  const seconds = retryAfterSeconds(response.headers.get("Retry-After"));
  const later = seconds
    ? `Please try again in ${seconds} second${seconds === 1 ? "" : "s"}.`
    : "Please try again shortly.";
  if (response.status === 413 || TOO_LONG.has(code)) {
    const what = code === "context_too_long" ? "too long for the model" : "too long to send";
    return { code: "too_long", message: `The conversation is ${what}.` };
  }
  switch (response.status) {
    case 401:
      tokenRow.hidden = false;
      return {
        code: "unauthorized",
        message: tokenInput.value
          ? "The access token was not accepted. Check it below and send again."
          : "This chat needs an access token. Enter it below and send again.",
      };
    case 429:
      return { code, message: `The model is busy right now. ${later}` };
    case 503:
      return { code, message: `The server is handling too many conversations right now. ${later}` };
  }
  if (message && response.status >= 500) return { code, message }; // 502, 504: worded for people
  if (message) return { code, message: `The request was refused: ${message}` };
  return { code, message: `The server answered with an error (HTTP ${response.status}). ${later}` };
}

/** Read Retry-After, seconds or an HTTP date (RFC 9110, section 10.2.3), as whole seconds, or null. */
function retryAfterSeconds(value) {
  if (!value) return null;
  const seconds = /^\s*\d+\s*$/.test(value) ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
  return Number.isFinite(seconds) ? Math.max(1, Math.ceil(seconds)) : null;
}

/** Describe how a complete reply ended: why, if it was cut short, and the tokens it used. */
function describeEnd(end) {
  const reasons = {
    length: "Cut short: the reply reached the model's length limit.",
    content_filter: "Cut short by the model's content filter.",
  };
  const usage = end?.usage;
  const tokens = usage
    ? `${usage.total_tokens} tokens: ${usage.prompt_tokens} prompt, ${usage.completion_tokens} reply.`
    : "";
  return [reasons[end?.finish_reason], tokens].filter(Boolean).join(" ");
}

function requestHeaders(contentType) {
  const headers = contentType ? { "Content-Type": contentType } : {};
  if (tokenInput.value.trim()) headers.Authorization = `Bearer ${tokenInput.value.trim()}`;
  return headers;
}

// --- Ways out of a failed reply -------------------------------------------------------------------

/** Offer what can be done after a reply that did not end well; return the element to focus. */
function offerWayOut(turn, outcome) {
  const { code } = outcome;
  if (code === undefined) return messageInput; // a complete reply: the next message
  if (code === "unauthorized") return tokenInput;
  if (code === "too_long") {
    if (!turns.length) {
      turn.view.note.textContent += " Shorten the message and send it again.";
      return messageInput;
    }
    turn.view.note.textContent += " Drop the oldest turns or start a new chat; your message is sent again.";
    offer(turn, [
      ["Drop oldest turns", dropOldestTurns],
      ["New chat", () => newChat(turn.question)],
    ]);
    return turn.view.actions.firstChild;
  }
  offer(turn, [["Retry", retry]]);
  return code === "stopped" ? messageInput : turn.view.actions.firstChild;
}

/** Show buttons under a reply: [label, action] pairs. */
function offer(turn, choices) {
  const buttons = choices.map(([label, action]) => {
    const button = element("button", [label]);
    button.type = "button";
    button.addEventListener("click", action);
    return button;
  });
  followTheEnd(() => turn.view.actions.replaceChildren(...buttons));
}

/** Send the newest turn's question again, in place of its failed or stopped reply. */
function retry() {
  if (streaming || !latest) return;
  const { question } = latest;
  discardLatest();
  send(question);
}

/** Forget the older half of the conversation (at least one turn) and send the refused question again. */
function dropOldestTurns() {
  if (streaming || !latest) return;
  const { question } = latest;
  discardLatest();
  for (const turn of turns.splice(0, Math.ceil(turns.length / 2))) removeTurnView(turn);
  if (!conversation.querySelector(".dropped")) {
    const note = element("p", ["The oldest turns were dropped; the model no longer sees them."]);
    note.className = "dropped";
    conversation.prepend(note);
  }
  save();
  send(question);
}

/** Start over: an empty conversation (and, when given, `question` sent as its first message). */
function newChat(question) {
  chatNumber += 1;
  stopReply(true);
  turns = [];
  latest = null;
  pending = null;
  conversation.replaceChildren();
  save();
  if (question) send(question);
  else messageInput.focus();
}

/** Take the newest turn off the page and out of the conversation. */
function discardLatest() {
  if (turns.at(-1) === latest) turns.pop();
  removeTurnView(latest);
  latest = null;
  save();
}

// --- Keeping the conversation --------------------------------------------------------------------

function save() {
  clearTimeout(saveSoon.timer);
  saveSoon.timer = 0;
  const [kept, reply] = [turns, pending ? [pending] : []].map((list) => list.map(({ view, ...turn }) => turn));
  const model = modelRow.hidden ? savedModel : modelPicker.value;
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify({ turns: kept, model, pending: reply[0] ?? null }));
  } catch {
    // Storage full or switched off: the conversation still works, it just will not survive a reload.
  }
}

/** Save within half a second: a streaming reply is saved as it grows, not once per token. */
function saveSoon() {
  saveSoon.timer ||= setTimeout(save, 500);
}

/** Show the conversation saved by an earlier visit. */
function restore() {
  let saved = null;
  try {
    saved = JSON.parse(localStorage.getItem(STORE_KEY));
  } catch {
    // Nothing readable saved: start empty.
  }
  savedModel = typeof saved?.model === "string" ? saved.model : null;
  for (const turn of Array.isArray(saved?.turns) ? saved.turns : []) {
    if (typeof turn?.question !== "string" || typeof turn.answer !== "string" || !turn.answer) continue;
    turns.push(turn);
    showTurn(turn);
    if (turn.reasoning) showReasoning(turn);
    renderMarkdown(turn.view, turn.answer);
    setState(turn, turn.state, turn.note);
  }
  latest = turns.at(-1) ?? null;
  const reply = saved?.pending;
  if (typeof reply?.question === "string" && typeof reply.stream?.id === "string") {
    resume(reply);
  } else if (latest?.state === "error" || latest?.state === "stopped") {
    offer(latest, [["Retry", retry]]);
  }
}

/** Go on with the reply a reload interrupted, from the last event it showed. */
function resume(reply) {
  const turn = { question: "", answer: "", reasoning: "", thought: null, ...reply, state: "streaming", note: "" };
  showTurn(turn);
  if (turn.reasoning) showReasoning(turn);
  renderMarkdown(turn.view, turn.answer);
  latest = pending = turn;
  follow(turn, (signal) => resumeRequest(turn, signal));
}

/** Show a model picker when the service allows more than one model (GET api/models). */
async function loadModels() {
  const response = await fetch("api/models", { headers: requestHeaders() }).catch(() => null);
  if (!response?.ok) return; // none listed (or an older service): the server's default model answers
  const listed = await response.json().catch(() => null);
  const models = Array.isArray(listed?.models) ? listed.models.filter((m) => typeof m === "string") : [];
  if (models.length < 2) return;
  modelPicker.replaceChildren(...models.map((model) => new Option(model, model)));
  modelPicker.value = models.includes(savedModel) ? savedModel : listed.default;
  modelRow.hidden = false;
}

// --- The page's view of a turn -------------------------------------------------------------------

/** Add a turn to the page: the question, and an empty reply with room for thinking, a note and buttons. */
function showTurn(turn) {
  const user = element("div", [speaker("You: "), element("p", [turn.question])]);
  user.className = "message user";
  user.lastChild.className = "text"; // the question as typed, never markdown
  const summary = element("summary", ["Thinking…"]);
  const reasoning = document.createTextNode("");
  const thinking = element("details", [summary, element("p", [reasoning])]);
  thinking.className = "thinking";
  thinking.hidden = true;
  const text = element("div");
  text.className = "text";
  const note = element("p");
  note.className = "note";
  const actions = element("p");
  actions.className = "actions";
  const item = element("div", [speaker("Assistant: "), thinking, text, note, actions]);
  item.className = "message assistant";
  item.dataset.state = turn.state;
  turn.view = { user, item, thinking, summary, reasoning, text, note, actions, blocks: [], links: "{}" };
  followTheEnd(() => conversation.append(user, item));
}

function speaker(words) {
  const label = element("span", [words]);
  label.className = "visually-hidden"; // screen readers hear who speaks; the layout shows it
  return label;
}

function removeTurnView(turn) {
  cancelAnimationFrame(turn.view.frame);
  turn.view.user.remove();
  turn.view.item.remove();
}

/** Show a piece of the model's thinking, live, in the open "Thinking" block. */
function think(turn, words) {
  const view = turn.view;
  if (view.thinkingSince === undefined) {
    view.thinkingSince = performance.now();
    view.thinking.hidden = false;
    view.thinking.open = true;
  }
  turn.reasoning += words;
  followTheEnd(() => view.reasoning.appendData(words));
}

/** Note how long the model thought; fold the block away once the answer starts (`fold`). */
function stopThinking(turn, fold) {
  const view = turn.view;
  if (view.thinkingSince === undefined || view.thinkingSince === null) return;
  turn.thought = Math.max(1, Math.round((performance.now() - view.thinkingSince) / 1000));
  view.thinkingSince = null;
  view.summary.textContent = thoughtFor(turn.thought);
  if (fold) view.thinking.open = false;
}

/** A restored turn's thinking: folded, with how long it took. */
function showReasoning(turn) {
  turn.view.reasoning.data = turn.reasoning;
  turn.view.summary.textContent = turn.thought ? thoughtFor(turn.thought) : "Thinking";
  turn.view.thinking.hidden = false;
}

function thoughtFor(seconds) {
  return `Thought for ${seconds} second${seconds === 1 ? "" : "s"}`;
}

/** Mark a reply finished: its state (styles and tests read it) and a short note under it. */
function finish(turn, state, note) {
  turn.state = state;
  turn.note = note;
  setState(turn, state, note);
  stopThinking(turn, Boolean(turn.answer));
  cancelAnimationFrame(turn.view.frame);
  turn.view.frame = 0;
  followTheEnd(() => renderMarkdown(turn.view, turn.answer)); // what is still waiting for a frame
}

function setState(turn, state, note) {
  turn.view.item.dataset.state = state;
  turn.view.note.textContent = note;
}

/** Make a change; if the page was scrolled to its end, keep it there, else leave the reader alone. */
function followTheEnd(change) {
  const page = document.documentElement;
  const atEnd = window.innerHeight + window.scrollY >= page.scrollHeight - 48;
  change();
  if (atEnd) window.scrollTo(0, page.scrollHeight);
}

/** Lock the input while a reply streams (`controller` set) and swap Send for Stop; then focus. */
function setStreaming(controller, focus = messageInput) {
  streaming = controller;
  const busy = controller !== null;
  messageInput.disabled = busy;
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
  conversation.setAttribute("aria-busy", String(busy));
  (busy ? stopButton : focus).focus(); // the disabled box loses focus: Stop is a key away
}

// --- Markdown -------------------------------------------------------------------------------------

/** Render the reply at the next frame: tokens that arrive within one frame cost one render. */
function scheduleRender(view, source) {
  view.source = source;
  view.frame ||= requestAnimationFrame(() => {
    view.frame = 0;
    followTheEnd(() => renderMarkdown(view, view.source));
  });
}

/**
 * Show `source` as markdown in the reply, rebuilding only the top-level blocks that changed.
 *
 * A streaming reply grows at its end, so usually only its last block (the paragraph or code block
 * being written) is built again; the blocks before it, their text selection and their Copy buttons
 * stay as they are.
 */
function renderMarkdown(view, source) {
  try {
    if (TOO_DEEP.some((pattern) => pattern.test(source))) showPlain(view, source);
    else renderBlocks(view, source);
  } catch (error) {
    // Whatever a reply holds, it is shown: as the text it is, if it cannot be shown as markdown.
    console.error("The reply is shown as plain text:", error);
    showPlain(view, source);
  }
}

function renderBlocks(view, source) {
  const tokens = marked.lexer(source, MARKDOWN);
  const links = JSON.stringify(tokens.links); // a link definition can change the blocks before it
  let same = 0;
  if (links === view.links) {
    while (same < view.blocks.length && same < tokens.length && view.blocks[same].raw === tokens[same].raw) same++;
  }
  view.links = links;
  for (const old of view.blocks.splice(same)) old.node?.remove();
  for (const token of tokens.slice(same)) {
    const nodes = blockNodes(token);
    const node = nodes.length === 1 && nodes[0] instanceof Element ? nodes[0] : nodes.length ? element("p", nodes) : null;
    if (node) view.text.append(node);
    view.blocks.push({ raw: token.raw, node });
  }
}

/** Show the whole reply as its text, in place of its blocks. */
function showPlain(view, source) {
  const text = rawText(source);
  view.text.replaceChildren(text);
  view.blocks = [{ raw: null, node: text }]; // never the same as a block: the next render replaces it
  view.links = null;
}

/** Markdown shown as the text it is (raw HTML, what is nested too deep), never parsed. */
function rawText(source) {
  const raw = element("p", [source.trim()]);
  raw.className = "raw";
  return raw;
}

/** Build the nodes of block tokens: a reply, a list item, a quote, `depth` quotes and lists deep. */
function blocks(tokens, depth) {
  return tokens.flatMap((token) => blockNodes(token, depth));
}

function blockNodes(token, depth = 0) {
  if ((token.type === "blockquote" || token.type === "list") && depth >= MAX_NESTING) return [rawText(token.raw)];
  switch (token.type) {
    case "paragraph":
      return [element("p", inline(token.tokens))];
    case "heading": // the page's own title is the h1
      return [element(`h${Math.min(token.depth + 1, 6)}`, inline(token.tokens))];
    case "code":
      return [codeBlock(token)];
    case "blockquote":
      return [element("blockquote", blocks(token.tokens, depth + 1))];
    case "list":
      return [list(token, depth + 1)];
    case "table":
      return [table(token)];
    case "hr":
      return [element("hr")];
    case "text": // the words of a tight list item
      return token.tokens ? inline(token.tokens) : [decodeEntities(token.text)];
    case "checkbox":
      return [token.checked ? "☑ " : "☐ "];
    case "space":
    case "def":
      return [];
    default: // raw HTML (and any token type newer than this code)
      return [rawText(token.raw)];
  }
}

/** Build the nodes of inline tokens: words, emphasis, code, links, inside `depth` others. */
function inline(tokens = [], depth = 0) {
  return tokens.flatMap((token) => {
    if (token.tokens && token.type !== "text" && depth >= MAX_NESTING) return [token.raw];
    switch (token.type) {
      case "text":
        return token.tokens ? inline(token.tokens, depth) : [decodeEntities(token.text)];
      case "escape":
        return [token.text];
      case "strong":
      case "em":
      case "del":
        return [element(token.type, inline(token.tokens, depth + 1))];
      case "codespan":
        return [element("code", [token.text])];
      case "br":
        return [element("br")];
      case "link":
        return link(token.href, inline(token.tokens, depth + 1));
      case "image": // never loaded: an image URL can carry data out (a request to it is a leak)
        return link(token.href, [`Image: ${token.text || token.href}`]);
      default: // inline HTML, as text
        return [token.raw];
    }
  });
}

/**
 * A link that opens in a new tab, for http(s) URLs only; anything else is just its text.
 *
 * The model writes both a link's text and its title, so neither may say where it goes: the title
 * is the real URL, and text that reads like another address gets the real host beside it.
 */
function link(href, children) {
  let url = null;
  try {
    url = new URL(href); // relative URLs throw: they would point into this site
  } catch {
    return children;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return children; // javascript:, data:, ...
  const anchor = element("a", children);
  stripBidiControls(anchor);
  anchor.href = url.href;
  anchor.target = "_blank";
  anchor.rel = "noopener noreferrer";
  anchor.title = url.href; // percent-encoded, its host in punycode: what the browser will open
  if (hostOf(anchor.textContent) === undefined || hostOf(anchor.textContent) === url.hostname) return [anchor];
  const host = element("span", [` (${url.hostname})`]);
  host.className = "link-host";
  return [anchor, host];
}

/** The host named by text that reads like a web address ("https://bank.example/x", "www.x.org"), or undefined. */
function hostOf(text) {
  const words = text.trim().split(/\s/)[0];
  if (!/^[a-z][a-z\d+.-]*:\/\/|^[^/?#]*\.[a-z]/i.test(words)) return undefined;
  try {
    const url = new URL(/^[a-z][a-z\d+.-]*:\/\//i.test(words) ? words : `http://${words}`);
    return url.username || url.password ? null : url.hostname; // "bank.example@evil.example" names evil
  } catch {
    return null; // reads like an address, but is none: show the real host
  }
}

function stripBidiControls(node) {
  const walker = document.createTreeWalker(node, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) walker.currentNode.data = walker.currentNode.data.replace(BIDI_CONTROLS, "");
}

function codeBlock(token) {
  const copy = element("button", ["Copy"]);
  copy.type = "button";
  copy.className = "copy";
  const language = element("span", [token.lang?.split(/\s/)[0] || "code"]);
  const bar = element("div", [language, copy]);
  bar.className = "code-bar";
  const pre = element("pre", [element("code", [token.text])]);
  pre.tabIndex = 0; // it scrolls sideways: a keyboard must be able to reach it
  const block = element("div", [bar, pre]);
  block.className = "code-block";
  return block;
}

function list(token, depth) {
  const node = element(
    token.ordered ? "ol" : "ul",
    token.items.map((item) => element("li", blocks(item.tokens, depth))),
  );
  if (token.ordered && token.start !== "" && token.start !== 1) node.start = token.start;
  return node;
}

function table(token) {
  const row = (cells, tag) =>
    element(
      "tr",
      cells.map((cell) => {
        const node = element(tag, inline(cell.tokens));
        if (cell.align) node.dataset.align = cell.align; // chat.css aligns it: no inline style
        return node;
      }),
    );
  const wrap = element("div", [
    element("table", [element("thead", [row(token.header, "th")]), element("tbody", token.rows.map((r) => row(r, "td")))]),
  ]);
  wrap.className = "table";
  wrap.tabIndex = 0; // it scrolls sideways on a phone: a keyboard must be able to reach it
  return wrap;
}

/** Decode the few named character references marked leaves in text. */
function decodeEntities(text) {
  return text.replace(/&(amp|lt|gt|quot|apos|nbsp);/g, (_, name) => ENTITIES[name]);
}

/** Create an element with children; strings become Text nodes, never markup. */
function element(tag, children = []) {
  const node = document.createElement(tag);
  node.append(...children);
  return node;
}

/** Copy a code block's text; say so on the button for two seconds. */
async function copyCode(button) {
  const code = button.closest(".code-block").querySelector("code");
  try {
    await navigator.clipboard.writeText(code.textContent);
  } catch {
    // No clipboard API (a plain-http page that is not localhost): copy the selection the old way.
    getSelection().selectAllChildren(code);
    document.execCommand("copy");
  }
  button.textContent = "Copied";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 2000);
}
